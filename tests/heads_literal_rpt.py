"""Test oracle: an equation-literal RPT episode, written from docs/method-zoo.md §5(b,c) (both variants) and §7.

Written from the spec's equations, not from the reference code nor from fsl_med (it imports nothing from fsl_med).
Deliberately slow and literal: features are upsampled to the mask's full resolution before every masked average
pooling, one shot at a time; farthest-point sampling recomputes every distance to every chosen centre at each step;
regional prototypes, attention heads and morphology are explicit loops. Dropout is not modelled (the fidelity
tests run the head in eval mode). ``tests/test_heads_rpt.py`` compares fsl_med's ``rpt`` head with it.

k shots (the reference runs one): each shot's regional prototypes go through the BaT block against the same query
prototype; ``p* = mean over shots and regions (+ p)``; the periphery and alignment terms are means over the shots;
MSE and the query-self term are counted once.

Shapes: support images [k, 3, H, W], support masks [k, H, W] float in {0, 1}, query image [1, 3, H, W], query label
[1, H, W] int64 (255 = ignore). ``encoder`` maps [N, 3, H, W] -> (features [N, C, h, w], pooled [N, D]); ``tau``
maps a pooled vector [D] to a scalar threshold; ``bat`` holds the BaT block's tensors (see :func:`bat_block`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

SCALE = 20.0
MAP_EPS = 1e-5
COS_EPS = 1e-8
IGNORE = 255
FLOAT32_EPS = torch.finfo(torch.float32).eps
LN_EPS = 1e-5  # nn.LayerNorm's default
SELECT_PENALTY = 10_000.0
REGIONS = {"2024": 100, "2023": 10}


# ------------------------------------------------------------------------------------------------ helpers


def upsampled_masked_average(feats: Tensor, mask: Tensor) -> Tensor:
    """MAP(U(F), M) = Σ_x U(F)(x) M(x) / (Σ_x M(x) + 1e-5), U = bilinear h×w -> H×W (align_corners=False).
    feats [C, h, w], mask [H, W] -> [C]."""
    up = F.interpolate(feats[None], size=tuple(mask.shape[-2:]), mode="bilinear", align_corners=False)[0]
    return (up * mask[None]).sum(dim=(1, 2)) / (mask.sum() + MAP_EPS)


def probability(feats: Tensor, proto: Tensor, tau: Tensor) -> Tensor:
    """P = σ(10·cos(F(y), p) + τ/2). feats [C, h, w], proto [C], tau scalar -> [h, w]."""
    cos = F.cosine_similarity(feats, proto[:, None, None], dim=0, eps=COS_EPS)
    return torch.sigmoid(SCALE / 2 * cos + tau / 2)


def upsample_probability(p: Tensor, size: tuple[int, int]) -> Tensor:
    """P↑ with align_corners=True. [h, w] -> [H, W]."""
    return F.interpolate(p[None, None], size=size, mode="bilinear", align_corners=True)[0, 0]


def two_class(p_up: Tensor) -> Tensor:
    """[1 − P, P] as [1, 2, H, W]."""
    return torch.stack([1 - p_up, p_up])[None]


def nll_on_probability(prob: Tensor, label: Tensor, weight: Tensor | None = None) -> Tensor:
    """NLL(log clamp(prob, ε, 1 − ε), label), ε = float32 eps, ignore 255. prob [1, 2, H, W], label [1, H, W]."""
    return F.nll_loss(torch.log(torch.clamp(prob, FLOAT32_EPS, 1 - FLOAT32_EPS)), label, weight=weight,
                      ignore_index=IGNORE)


def neighbourhood_max(x: Tensor, width: int) -> Tensor:
    """Max over the width×width neighbourhood of every pixel (positions outside the image do not count).
    x [..., H, W] -> same shape."""
    r = (width - 1) // 2
    H, W = x.shape[-2:]
    padded = F.pad(x, (r, r, r, r), value=float("-inf"))
    out = torch.full_like(x, float("-inf"))
    for dy in range(width):
        for dx in range(width):
            out = torch.maximum(out, padded[..., dy:dy + H, dx:dx + W])
    return out


def dilate(mask: Tensor) -> Tensor:
    """D = 3×3 dilation of a binary mask (one iteration). [H, W] -> [H, W]."""
    return neighbourhood_max(mask, 3)


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """(x − mean) / sqrt(var + 1e-5) · weight + bias over the last axis (biased variance)."""
    mu = x.mean(dim=-1, keepdim=True)
    var = ((x - mu) ** 2).mean(dim=-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + LN_EPS) * weight + bias


def linear(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    return x @ weight.T + bias


# ------------------------------------------------------------------------------------------------ §5(b)


def regional_prototypes(feats: Tensor, mask: Tensor, n_regions: int, sampler: np.random.RandomState) -> Tensor:
    """K regional prototypes of one shot. feats [C, h, w], mask [H, W]; the first centre is
    ``sampler.choice(N)`` among the N mask positions on the feature grid (row-major). -> [K, C].

    Mask -> h×w by bilinear downsampling, any positive value counts; fewer than K positions: the first K flattened
    positions are set too. Farthest-point sampling (squared distance to the nearest chosen centre, the first of
    equal maxima), Voronoi assignment (nearest centre, the lowest index on ties), mean feature per region."""
    h, w = feats.shape[-2:]
    grid = F.interpolate(mask[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0] != 0
    if int(grid.sum()) < n_regions:
        grid = grid.clone()
        flat = grid.view(-1)
        for i in range(n_regions):
            flat[i] = True
    points = [(y, x) for y in range(h) for x in range(w) if bool(grid[y, x])]
    pts = torch.tensor(points, dtype=torch.long)  # [N, 2]
    centres = [int(sampler.choice(len(points)))]
    for _ in range(1, n_regions):
        chosen = pts[centres]  # [c, 2]
        sq = ((pts[:, None, :] - chosen[None, :, :]) ** 2).sum(dim=-1)  # [N, c]
        nearest = sq.min(dim=1).values
        best = int(nearest.max())
        centres.append(int(torch.nonzero(nearest == best)[0, 0]))  # the first of equal maxima
    sq = ((pts[:, None, :] - pts[centres][None, :, :]) ** 2).sum(dim=-1)  # [N, K]
    labels = []
    for n in range(pts.shape[0]):
        row = sq[n]
        labels.append(int(torch.nonzero(row == row.min())[0, 0]))  # the lowest centre index on ties
    labels_t = torch.tensor(labels)
    protos = []
    for k in range(n_regions):
        members = pts[labels_t == k]
        protos.append(torch.stack([feats[:, int(y), int(x)] for y, x in members]).mean(dim=0))
    return torch.stack(protos)


def bat_block(P: Tensor, q: Tensor, bat: Mapping[str, Tensor], heads: int) -> Tensor:
    """One BaT pass. P [K, C] regional prototypes, q [C] query prototype -> [K, C].

    ``bat`` keys: ``ln_in.{weight,bias}``, ``wq|wk|wv.{weight,bias}`` ([heads·C, C], [heads·C]),
    ``fc.{weight,bias}`` ([C, heads·C]), ``ln_attn.{weight,bias}``, ``mlp1.{weight,bias}`` ([2C, C]),
    ``mlp2.{weight,bias}`` ([C, 2C]), ``ln_out.{weight,bias}``."""
    C = P.shape[1]
    A = P @ q  # [K] raw dot products
    kappa = torch.floor((A.min() + A.mean()) / 2)
    w = torch.softmax(A - SELECT_PENALTY * (A < kappa).to(A.dtype), dim=0)
    X = layer_norm(w[:, None] * q[None, :] + P, bat["ln_in.weight"], bat["ln_in.bias"])
    Q = torch.relu(linear(X, bat["wq.weight"], bat["wq.bias"]))
    Kt = torch.relu(linear(X, bat["wk.weight"], bat["wk.bias"]))
    V = torch.relu(linear(X, bat["wv.weight"], bat["wv.bias"]))
    outs = []
    for h in range(heads):
        sl = slice(h * C, (h + 1) * C)
        att = torch.softmax(Q[:, sl] @ Kt[:, sl].T / math.sqrt(C), dim=1)
        outs.append(att @ V[:, sl])
    Y = torch.relu(linear(torch.cat(outs, dim=1), bat["fc.weight"], bat["fc.bias"]))
    X2 = layer_norm(Y + X, bat["ln_attn.weight"], bat["ln_attn.bias"])
    Z = linear(F.gelu(linear(X2, bat["mlp1.weight"], bat["mlp1.bias"])), bat["mlp2.weight"], bat["mlp2.bias"])
    return layer_norm(Z + X2, bat["ln_out.weight"], bat["ln_out.bias"])


def soft_query_prototype(feats: Tensor, p: Tensor) -> Tensor:
    """q = Σ F P / (Σ P + 1e-5) at feature resolution. feats [C, h, w], p [h, w] -> [C]."""
    return (feats * p[None]).sum(dim=(1, 2)) / (p.sum() + MAP_EPS)


# ------------------------------------------------------------------------------------------------ §5(c), 2023 losses


def boundary_f1_loss(output: Tensor, label: Tensor) -> Tensor:
    """1 − BF1 averaged over the two classes; the output [1, 2, H, W] is treated as logits (softmax), boundaries are
    3×3 (a pixel of the class next to a pixel not of it), extended 5×5; precision Σ b_pred·ext(b_gt) / (Σ b_pred +
    1e-7), recall Σ ext(b_pred)·b_gt / (Σ b_gt + 1e-7). Ignored pixels belong to neither class and are left out of the
    sums. label [1, H, W]."""
    prob = torch.softmax(output, dim=1)[0]
    valid = (label[0] != IGNORE).to(prob.dtype)
    losses = []
    for c in range(2):
        not_gt = 1.0 - (label[0] == c).to(prob.dtype)
        not_pred = 1.0 - prob[c]
        b_gt = neighbourhood_max(not_gt, 3) - not_gt
        b_pred = neighbourhood_max(not_pred, 3) - not_pred
        ext_gt, ext_pred = neighbourhood_max(b_gt, 5), neighbourhood_max(b_pred, 5)
        b_gt, b_pred, ext_gt, ext_pred = b_gt * valid, b_pred * valid, ext_gt * valid, ext_pred * valid
        precision = (b_pred * ext_gt).sum() / (b_pred.sum() + 1e-7)
        recall = (ext_pred * b_gt).sum() / (b_gt.sum() + 1e-7)
        losses.append(1 - 2 * precision * recall / (precision + recall + 1e-7))
    return torch.stack(losses).mean()


def dice_on_logit(output: Tensor, label: Tensor) -> Tensor:
    """1 − (2 Σ σ(o₁) y + 1) / (Σ σ(o₁) + Σ y + 1), o₁ the output's foreground channel treated as a logit, y = [label
    = 1]; ignored pixels left out. output [1, 2, H, W], label [1, H, W]."""
    valid = (label[0] != IGNORE).to(output.dtype)
    s = torch.sigmoid(output[0, 1]) * valid
    y = (label[0] == 1).to(output.dtype)
    return 1 - (2 * (s * y).sum() + 1) / (s.sum() + y.sum() + 1)


# ------------------------------------------------------------------------------------------------ episode


def rpt_episode(encoder: Callable[[Tensor], tuple[Tensor, Tensor]], tau: Callable[[Tensor], Tensor],
                bat: Mapping[str, Tensor], support_images: Tensor, support_masks: Tensor, query_image: Tensor,
                query_label: Tensor, seed: int = 1289, variant: str = "2024", n_regions: int | None = None,
                passes: int = 3, heads: int = 3, ce_weights: Tensor | None = None, periphery_weight: float = 0.1,
                align_weight: float = 1.0, mse_weight: float = 0.1, self_weight: float = 1.0, eta: float = 1.0
                ) -> dict[str, Tensor]:
    """RPT, one 1-way k-shot episode with one query (method-zoo.md §5(b,c)).

    The first FPS centre of shot j is ``RandomState(seed).choice(N_j)``, drawn in shot order from one generator.
    Returns ``output`` [1, 2, H, W] ([1 − P↑, P↑]) and, 2024: ``ce`` (L_q), ``periphery``, ``align``, ``mse``,
    ``self`` (align and mse 0 when the query prediction is empty) and ``total``; 2023: ``ce``, ``boundary``,
    ``dice`` and ``total = ce + (1 − eta)·boundary + eta·dice``."""
    k = support_images.shape[0]
    H, W = support_masks.shape[-2:]
    K = REGIONS[variant] if n_regions is None else n_regions
    feats, pooled = encoder(torch.cat([support_images, query_image]))
    f_s, f_q = feats[:k], feats[k]
    tau_s = [tau(pooled[j]) for j in range(k)]
    tau_q = tau(pooled[k])

    # coarse and dilated prototypes, averaged over the shots
    p = sum(upsampled_masked_average(f_s[j], support_masks[j]) for j in range(k)) / k
    dilated = [dilate(support_masks[j]) for j in range(k)]
    p_d = sum(upsampled_masked_average(f_s[j], dilated[j]) for j in range(k)) / k

    # regional prototypes per shot
    sampler = np.random.RandomState(seed)
    regions = [regional_prototypes(f_s[j], support_masks[j], K, sampler) for j in range(k)]

    # coarse query prediction, then the BaT passes
    prob = probability(f_q, p, tau_q)
    for _ in range(passes):
        q = soft_query_prototype(f_q, prob)
        regions = [bat_block(regions[j], q, bat, heads) for j in range(k)]
        p_star = sum(r.mean(dim=0) for r in regions) / k
        if variant == "2024":
            p_star = p_star + p
        prob = probability(f_q, p_star, tau_q)
    p_up = upsample_probability(prob, (H, W))
    output = two_class(p_up)
    weight = None if ce_weights is None else ce_weights.to(output)
    ce = nll_on_probability(output, query_label, weight)
    zero = torch.zeros((), dtype=output.dtype)

    if variant == "2023":
        boundary, dice = boundary_f1_loss(output, query_label), dice_on_logit(output, query_label)
        return {"output": output, "ce": ce, "boundary": boundary, "dice": dice,
                "total": ce + (1 - eta) * boundary + eta * dice}

    # periphery: Π = up(P(F_s, p_D)) − up(P(F_s, p)) with the support's own τ, against R = D − M
    periphery = zero
    for j in range(k):
        pi = (upsample_probability(probability(f_s[j], p_d, tau_s[j]), (H, W))
              - upsample_probability(probability(f_s[j], p, tau_s[j]), (H, W)))
        ring = (dilated[j] - support_masks[j]).to(torch.long)
        periphery = periphery + nll_on_probability(two_class(pi), ring[None]) / k

    # alignment and prototype MSE from the query's argmax at full resolution (skipped when empty)
    m_hat = (output.argmax(dim=1)[0] == 1).to(f_q.dtype)
    align, mse = zero, zero
    if m_hat.sum() > 0:
        q_al = upsampled_masked_average(f_q, m_hat)
        for j in range(k):
            s_up = upsample_probability(probability(f_s[j], q_al, tau_q), (H, W))
            align = align + nll_on_probability(two_class(s_up), support_masks[j].to(torch.long)[None]) / k
        mse = ((q_al - p) ** 2).mean()

    # the query segmented by its own label's prototype
    own = upsampled_masked_average(f_q, (query_label[0] == 1).to(f_q.dtype))
    own_up = upsample_probability(probability(f_q, own, tau_q), (H, W))
    self_term = nll_on_probability(two_class(own_up), query_label)

    total = ce + periphery_weight * periphery + align_weight * align + mse_weight * mse + self_weight * self_term
    return {"output": output, "ce": ce, "periphery": periphery, "align": align, "mse": mse, "self": self_term,
            "total": total}
