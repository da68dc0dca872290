"""Test oracle: an equation-literal Q-Net episode and prediction, written from docs/method-zoo.md §4(b,c) and §7.

Written from the spec's equations, not from the reference code nor from fsl_med (it imports nothing from fsl_med).
Deliberately slow and literal: features are upsampled to the mask's full resolution before masked average pooling,
one shot, one scale and one query slice at a time; the test-time refinement is the literal loop of §4(b) on one
slice and one scale. ``tests/test_heads_qnet.py`` compares fsl_med's ``qnet`` head with it.

Encoder convention: ``encoder(images [N, 3, H, W]) -> (fine [N, C, h0, w0], coarse [N, C, h1, w1], pooled [N, D])``,
``fine`` being the larger grid (the reference's stride-4 layer3 map, α₀'s). The threshold predictor is a list of
``nn.Linear`` layers applied literally: ``τ = W_L(… (W_1 g + b_1) …) + b_L`` of the query's pooled vector ``g``.
Shapes: support images [k, 3, H, W], support masks [k, H, W] float in {0, 1}, query image [1, 3, H, W], query label
[1, H, W] int64 (255 = ignore).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SCALE = 20.0  # cosine scaler: P = σ(SCALE/2 · cos + τ/2)
MAP_EPS = 1e-5
COS_EPS = 1e-8
IGNORE = 255
FLOAT32_EPS = torch.finfo(torch.float32).eps


def upsampled_masked_average(feats: Tensor, mask: Tensor) -> Tensor:
    """MAP(U(F), M) = Σ U(F) M / (Σ M + 1e-5), U bilinear h×w -> H×W (align_corners=False). [C, h, w], [H, W] -> [C]."""
    up = F.interpolate(feats[None], size=tuple(mask.shape[-2:]), mode="bilinear", align_corners=False)[0]
    return (up * mask[None]).sum(dim=(1, 2)) / (mask.sum() + MAP_EPS)


def threshold(tau_layers: Sequence[nn.Linear], pooled: Tensor) -> Tensor:
    """τ of one image: the linear layers applied in turn to its pooled vector ``[D]`` -> a scalar tensor."""
    x = pooled
    for layer in tau_layers:
        x = layer.weight @ x + layer.bias
    return x.reshape(())


def probability(feats: Tensor, proto: Tensor, tau: Tensor) -> Tensor:
    """P = σ(10·cos(F(y), p) + τ/2) per position. [C, h, w], [C], scalar -> [h, w]."""
    cos = F.cosine_similarity(feats, proto[:, None, None], dim=0, eps=COS_EPS)
    return torch.sigmoid(SCALE / 2 * cos + tau / 2)


def combine(p_fine: Tensor, p_coarse: Tensor, alpha: Sequence[float], size: tuple[int, int]) -> Tensor:
    """(α₀ up(P_0) + α₁ up(P_1)) / (α₀ + α₁), up = bilinear with align_corners=True to ``size``. -> [H, W]."""
    up0 = F.interpolate(p_fine[None, None], size=size, mode="bilinear", align_corners=True)[0, 0]
    up1 = F.interpolate(p_coarse[None, None], size=size, mode="bilinear", align_corners=True)[0, 0]
    return (alpha[0] * up0 + alpha[1] * up1) / (alpha[0] + alpha[1])


def two_class(p: Tensor) -> Tensor:
    """[1 − P, P] as [1, 2, H, W]."""
    return torch.stack([1 - p, p])[None]


def nll_on_probability(prob: Tensor, label: Tensor, weight: Tensor | None) -> Tensor:
    """NLL(log clamp(prob, ε, 1 − ε), label), ε = float32 eps, ignore 255. prob [1, 2, H, W], label [1, H, W]."""
    return F.nll_loss(torch.log(torch.clamp(prob, FLOAT32_EPS, 1 - FLOAT32_EPS)), label, weight=weight,
                      ignore_index=IGNORE)


def support_label(mask: Tensor) -> Tensor:
    """[H, W] int64: 1 where M = 1, 0 where M = 0."""
    label = torch.full(mask.shape, IGNORE, dtype=torch.long)
    label[mask == 1] = 1
    label[mask == 0] = 0
    return label


def _prototypes(f_s: Sequence[Tensor], masks: Tensor) -> list[Tensor]:
    """Per scale p_n = (1/k) Σ_j MAP(U(F_s^n[j]), M_j)."""
    k = masks.shape[0]
    return [sum(upsampled_masked_average(f[j], masks[j]) for j in range(k)) / k for f in f_s]


def qnet_episode(encoder, tau_layers: Sequence[nn.Linear], support_images: Tensor, support_masks: Tensor,
                 query_image: Tensor, query_label: Tensor, alpha: Sequence[float],
                 ce_weights: Tensor | None = None) -> dict[str, Tensor]:
    """One 1-way k-shot training episode (§4(b,c)): ``output`` [1, 2, H, W] = [1 − P, P], ``ce`` (L_q with
    ``ce_weights``), ``align`` (L_align, 0 when [P > 0.5] at full size is empty), ``tau`` (the query's τ)."""
    k = support_images.shape[0]
    size = tuple(support_masks.shape[-2:])
    fine, coarse, pooled = encoder(torch.cat([support_images, query_image]))
    f_s, f_q = [fine[:k], coarse[:k]], [fine[k], coarse[k]]
    tau = threshold(tau_layers, pooled[k])  # from the query image; both scales and the align loss use it

    protos = _prototypes(f_s, support_masks)
    p = combine(probability(f_q[0], protos[0], tau), probability(f_q[1], protos[1], tau), alpha, size)
    output = two_class(p)
    ce = nll_on_probability(output, query_label, None if ce_weights is None else ce_weights.to(output))

    m_hat = (p > 0.5).to(p.dtype)  # at full resolution, from the combined prediction
    align = torch.zeros((), dtype=p.dtype)
    if m_hat.sum() > 0:
        q = [upsampled_masked_average(f, m_hat) for f in f_q]
        for j in range(k):
            ps = combine(probability(f_s[0][j], q[0], tau), probability(f_s[1][j], q[1], tau), alpha, size)
            align = align + nll_on_probability(two_class(ps), support_label(support_masks[j])[None], None) / k
    return {"output": output, "ce": ce, "align": align, "tau": tau}


def _normalise(x: Tensor) -> Tensor:
    """ν(x) = σ((x − min x) / (max x − min x)), min and max over the whole tensor."""
    return torch.sigmoid((x - x.min()) / (x.max() - x.min()))


def refine_prototype(feats: Tensor, proto: Tensor, tau: Tensor, iters: int, lr: float) -> Tensor:
    """§4(b)'s test-time refinement of one scale's prototype on one query slice: ``iters`` Adam steps of
    BCE(ν(F), ν(F ⊙ (1 − m) + p ⊗ m)) with m = [P > 0.5] from the current prototype. [C, h, w], [C] -> [C]."""
    feats, tau = feats.detach(), tau.detach()
    p = nn.Parameter(proto.detach().clone())
    opt = torch.optim.Adam([p], lr=lr)
    with torch.no_grad():
        prob = probability(feats, p, tau)
    for _ in range(iters):
        m = (prob > 0.5).to(feats.dtype)[None]  # [1, h, w]
        new = feats * (1 - m) + p[:, None, None] * m
        loss = F.binary_cross_entropy(_normalise(feats), _normalise(new))
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            prob = probability(feats, p, tau)
    return p.detach()


def qnet_predict(encoder, tau_layers: Sequence[nn.Linear], support_images: Tensor, support_masks: Tensor,
                 query_image: Tensor, alpha: Sequence[float], iters: int, lr: float = 0.01) -> Tensor:
    """The evaluation output [1, 2, H, W] of one query slice, after ``iters`` refinement steps per scale."""
    k = support_images.shape[0]
    size = tuple(support_masks.shape[-2:])
    with torch.no_grad():
        fine, coarse, pooled = encoder(torch.cat([support_images, query_image]))
        tau = threshold(tau_layers, pooled[k])
        protos = _prototypes([fine[:k], coarse[:k]], support_masks)
    f_q = [fine[k], coarse[k]]
    protos = [refine_prototype(f, p, tau, iters, lr) for f, p in zip(f_q, protos, strict=True)]
    with torch.no_grad():
        p = combine(probability(f_q[0], protos[0], tau), probability(f_q[1], protos[1], tau), alpha, size)
    return two_class(p)


class TwoScaleConvEncoder(nn.Module):
    """Stand-in encoder: ``fine`` = Conv(3 → C, kernel = stride = 4) (stride 4), ``coarse`` = Conv(C → C, kernel =
    stride = 2) of ``fine`` (stride 8), ``pooled`` = [GAP(fine), GAP(coarse)] (D = 2C). Weights N(0, 1/fan_in),
    biases N(0, 0.1²) from a seeded generator; every parameter requires grad."""

    def __init__(self, seed: int, channels: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, channels, kernel_size=4, stride=4)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=2, stride=2)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for conv in (self.conv1, self.conv2):
                fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) / math.sqrt(fan_in))
                conv.bias.copy_(0.1 * torch.randn(conv.bias.shape, generator=g))

    @property
    def pooled_channels(self) -> int:
        return 2 * self.conv1.out_channels

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        fine = self.conv1(images)
        coarse = self.conv2(fine)
        return fine, coarse, torch.cat([fine.mean(dim=(2, 3)), coarse.mean(dim=(2, 3))], dim=1)
