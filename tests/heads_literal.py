"""Test oracle: equation-literal PANet and ADNet episodes, written from docs/method-zoo.md §2(b,c), §3(b,c) and §7.

This module is written from the spec's equations, not from the reference code nor from fsl_med (it imports
nothing from fsl_med). It is deliberately slow and literal: features are upsampled to the mask's full
resolution before masked average pooling, one episode at a time, one shot at a time. The fidelity tests
(``tests/test_heads_fidelity.py``) compare fsl_med's heads with it. It was checked once against the reference
code (kaixin96/PANet @ 1695bf37, sha168/ADNet @ c6bba850) with the reference's encoder replaced by
``strided_conv_encoder``; those differential runs live outside the repository (no reference code is committed).

Shapes: support images [k, 3, H, W], support masks [k, H, W] float in {0, 1}, query image [1, 3, H, W],
query label [1, H, W] int64 (255 = ignore), ``encoder`` maps [N, 3, H, W] -> [N, C, h, w].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SCALE = 20.0  # cosine scaler of PANet and ADNet
MAP_EPS = 1e-5  # masked-average-pooling denominator
COS_EPS = 1e-8  # F.cosine_similarity's default eps
IGNORE = 255
FLOAT32_EPS = torch.finfo(torch.float32).eps  # ADNet's probability clamp


# ------------------------------------------------------------------------------------------------ helpers


def upsampled_masked_average(feats: Tensor, mask: Tensor) -> Tensor:
    """MAP(U(F), M) = Σ_x U(F)(x) M(x) / (Σ_x M(x) + 1e-5), U = bilinear h×w -> H×W, align_corners=False.

    feats [C, h, w], mask [H, W] -> [C]."""
    up = F.interpolate(feats[None], size=tuple(mask.shape[-2:]), mode="bilinear", align_corners=False)[0]
    return (up * mask[None]).sum(dim=(1, 2)) / (mask.sum() + MAP_EPS)


def feature_masked_average(feats: Tensor, mask: Tensor) -> Tensor:
    """Σ F m / (Σ m + 1e-5) at feature resolution (the query prototypes of the alignment losses).

    feats [C, h, w], mask [h, w] -> [C]."""
    return (feats * mask[None]).sum(dim=(1, 2)) / (mask.sum() + MAP_EPS)


def cosine_map(feats: Tensor, proto: Tensor) -> Tensor:
    """cos(F(y), p) per position with F.cosine_similarity (eps 1e-8). feats [C, h, w], proto [C] -> [h, w]."""
    return F.cosine_similarity(feats, proto[:, None, None], dim=0, eps=COS_EPS)


def _encode(encoder, support_images: Tensor, query_image: Tensor) -> tuple[Tensor, Tensor]:
    k = support_images.shape[0]
    feats = encoder(torch.cat([support_images, query_image], dim=0))
    return feats[:k], feats[k]


def _support_label(mask: Tensor) -> Tensor:
    """1 where M = 1, 0 where the background mask 1 − M is 1, else 255 (none for a {0, 1} mask). [H, W] int64."""
    label = torch.full(mask.shape, IGNORE, dtype=torch.long, device=mask.device)
    label[mask == 1] = 1
    label[(1 - mask) == 1] = 0
    return label


def _nll_on_probability(prob: Tensor, label: Tensor, weight: Tensor | None) -> Tensor:
    """NLL(log clamp(prob, ε, 1 − ε), label), ε = float32 eps, ignore 255. prob [1, 2, H, W], label [1, H, W]."""
    log_prob = torch.log(torch.clamp(prob, FLOAT32_EPS, 1 - FLOAT32_EPS))
    return F.nll_loss(log_prob, label, weight=weight, ignore_index=IGNORE)


# ------------------------------------------------------------------------------------------------ PANet §2


def panet_episode(encoder, support_images: Tensor, support_masks: Tensor, query_image: Tensor,
                  query_label: Tensor, ce_weights: Tensor | None = None) -> dict[str, Tensor]:
    """PANet, one 1-way k-shot episode with one query (method-zoo.md §2(b,c)).

    Returns ``output`` [1, 2, H, W] logits (bg, fg), ``ce`` (query CE with ``ce_weights``, ignore 255; PANet
    itself is unweighted, i.e. [1, 1]) and ``align`` (PAR, 0 when the query argmax has no foreground)."""
    k = support_images.shape[0]
    H, W = support_masks.shape[-2:]
    f_s, f_q = _encode(encoder, support_images, query_image)

    # prototypes: average over shots of MAP over the upsampled features; background mask B = 1 − M
    p_fg = sum(upsampled_masked_average(f_s[j], support_masks[j]) for j in range(k)) / k
    p_bg = sum(upsampled_masked_average(f_s[j], 1 - support_masks[j]) for j in range(k)) / k

    # scores at feature resolution, then logits upsampled (align_corners=False)
    d = torch.stack([SCALE * cosine_map(f_q, p_bg), SCALE * cosine_map(f_q, p_fg)], dim=0)  # [2, h, w]
    output = F.interpolate(d[None], size=(H, W), mode="bilinear", align_corners=False)  # [1, 2, H, W]
    weight = None if ce_weights is None else ce_weights.to(output)
    ce = F.cross_entropy(output, query_label, weight=weight, ignore_index=IGNORE)

    # PAR: query argmax at h×w -> query prototypes at h×w -> segment each support shot
    m_hat = d.argmax(dim=0)  # [h, w], ties -> background
    if (m_hat == 1).sum() == 0:
        align = torch.zeros((), dtype=output.dtype, device=output.device)
    else:
        q_bg = feature_masked_average(f_q, (m_hat == 0).to(f_q.dtype))
        q_fg = feature_masked_average(f_q, (m_hat == 1).to(f_q.dtype))
        align = torch.zeros((), dtype=output.dtype, device=output.device)
        for j in range(k):
            s = torch.stack([SCALE * cosine_map(f_s[j], q_bg), SCALE * cosine_map(f_s[j], q_fg)], dim=0)
            s_up = F.interpolate(s[None], size=(H, W), mode="bilinear", align_corners=False)
            align = align + F.cross_entropy(s_up, _support_label(support_masks[j])[None],
                                            ignore_index=IGNORE) / k
    return {"output": output, "ce": ce, "align": align}


# ------------------------------------------------------------------------------------------------ ADNet §3


def adnet_foreground_probability(feats: Tensor, proto: Tensor, threshold: Tensor) -> Tensor:
    """P = 1 − σ(0.5 (S − T)), S = −20·cos(F, p). feats [C, h, w], proto [C], threshold [1] -> [h, w]."""
    s = -SCALE * cosine_map(feats, proto)
    return 1 - torch.sigmoid(0.5 * (s - threshold))


def _probability_output(p: Tensor, size: tuple[int, int]) -> Tensor:
    """[1 − P↑, P↑] with P upsampled bilinearly, align_corners=True. p [h, w] -> [1, 2, H, W]."""
    p_up = F.interpolate(p[None, None], size=size, mode="bilinear", align_corners=True)
    return torch.cat([1 - p_up, p_up], dim=1)


def adnet_episode(encoder, support_images: Tensor, support_masks: Tensor, query_image: Tensor,
                  query_label: Tensor, threshold: Tensor, ce_weights: Tensor | None = None,
                  threshold_weight: float = 1.0) -> dict[str, Tensor]:
    """ADNet, one 1-way k-shot episode with one query (method-zoo.md §3(b,c)).

    ``threshold`` is the learned T (shape [1]). Returns ``output`` [1, 2, H, W] probabilities [1 − P↑, P↑],
    ``ce`` (L_q: weighted NLL on log clamp, ADNet's weights are [0.1, 1]), ``align`` (0 when [P > 0.5] at feature
    resolution is empty) and ``threshold`` (L_T = threshold_weight · T / 20)."""
    k = support_images.shape[0]
    H, W = support_masks.shape[-2:]
    f_s, f_q = _encode(encoder, support_images, query_image)

    p = sum(upsampled_masked_average(f_s[j], support_masks[j]) for j in range(k)) / k  # one fg prototype
    prob = adnet_foreground_probability(f_q, p, threshold)  # [h, w]
    output = _probability_output(prob, (H, W))
    weight = None if ce_weights is None else ce_weights.to(output)
    ce = _nll_on_probability(output, query_label, weight)

    # L_align: query prototype from [P > 0.5] at h×w, same T, unweighted NLL against each support mask
    m_hat = (prob > 0.5).to(f_q.dtype)
    align = torch.zeros((), dtype=output.dtype, device=output.device)
    if m_hat.sum() > 0:
        q = feature_masked_average(f_q, m_hat)
        for j in range(k):
            out_s = _probability_output(adnet_foreground_probability(f_s[j], q, threshold), (H, W))
            align = align + _nll_on_probability(out_s, _support_label(support_masks[j])[None], None) / k

    l_t = threshold_weight * threshold.reshape(()) / SCALE
    return {"output": output, "ce": ce, "align": align, "threshold": l_t}


# ------------------------------------------------------------------------------------------------ §7 fixtures


def _disc(size: int, cy: float, cx: float, r: float) -> Tensor:
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64),
                            indexing="ij")
    return (((yy - cy) ** 2 + (xx - cx) ** 2) <= r * r).to(torch.float64)


def _image(mask: Tensor, seed: int, noise: float = 0.3, contrast: float = 1.5) -> Tensor:
    """noise·N(0, 1) + contrast·mask, tiled to 3 channels. mask [H, W] -> [3, H, W] float32."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(mask.shape, generator=g, dtype=torch.float64)
    return (noise * z + contrast * mask).to(torch.float32)[None].repeat(3, 1, 1)


def synthetic_episode(seed: int, shots: int = 1, size: int = 256, query_radius: float = 44.0,
                      query_noise: float = 0.3, query_contrast: float = 1.5) -> dict[str, Tensor]:
    """§7's synthetic episode: support disc r = 40 at (y, x) = (120, 130), query disc r = 44 at (128, 120)
    (coordinates scale with ``size``/256), image = 0.3·N(0, 1) + 1.5·mask tiled ×3.

    Shot j > 0 uses its own noise seed and a disc shifted by (3j, −2j) pixels. ``query_radius=0`` gives a query
    without a disc (all background). ``query_noise=0, query_contrast=0`` gives an all-zero query image (its
    features are the encoder's bias, closer to the background prototype everywhere) whose label still has the
    disc: PANet's empty-prediction case with a large query loss. Returns support_images [k, 3, H, W], support_masks [k, H, W] float32,
    query_image [1, 3, H, W], query_label [1, H, W] int64."""
    s = size / 256.0
    images, masks = [], []
    for j in range(shots):
        m = _disc(size, (120 + 3 * j) * s, (130 - 2 * j) * s, 40 * s)
        images.append(_image(m, 10_000 * seed + 1 + j))
        masks.append(m.to(torch.float32))
    qm = _disc(size, 128 * s, 120 * s, query_radius * s) if query_radius > 0 else torch.zeros(size, size,
                                                                                               dtype=torch.float64)
    return {
        "support_images": torch.stack(images),
        "support_masks": torch.stack(masks),
        "query_image": _image(qm, 10_000 * seed, query_noise, query_contrast)[None],
        "query_label": qm.to(torch.long)[None],
    }


def strided_conv_encoder(seed: int, channels: int = 16, stride: int = 8) -> nn.Conv2d:
    """A fixed nn.Conv2d(3, channels, kernel = stride = ``stride``) with weights N(0, 1/fan_in) and biases
    N(0, 0.1²) from a seeded generator; parameters require grad. Stands in for the heavy encoders."""
    conv = nn.Conv2d(3, channels, kernel_size=stride, stride=stride)
    g = torch.Generator().manual_seed(seed)
    fan_in = 3 * stride * stride
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) / math.sqrt(fan_in))
        conv.bias.copy_(0.1 * torch.randn(conv.bias.shape, generator=g))
    conv.weight.requires_grad_(True)
    conv.bias.requires_grad_(True)
    return conv
