"""Masked average pooling of features with a full-resolution mask (PANet, ADNet and their lineage)."""

from __future__ import annotations

import torch

from fsl_med.data.masks import mask_at_feature_size, pull_back

MAP_EPS = 1e-5


def masked_average(feats: torch.Tensor, masks: torch.Tensor, mode: str) -> torch.Tensor:
    """``[S, C]`` masked average of ``[S, C, h, w]`` features under ``[S, H, W]`` masks.

    ``adjoint``: ``Σ F·m' / (Σ M + 1e-5)`` with ``m' = A_yᵀ M A_x`` (:func:`fsl_med.data.masks.pull_back`), equal to
    the references' ``Σ U(F)·M / (Σ M + 1e-5)`` over the features bilinearly upsampled to ``H×W`` (align_corners
    False), without allocating them. ``nearest``/``bilinear``: the mask downsampled to ``h×w`` instead,
    ``Σ F·m / (Σ m + 1e-5)``. An empty mask gives a zero vector.
    """
    if mode == "adjoint":
        m = pull_back(masks.to(feats.dtype), (feats.shape[-2], feats.shape[-1]))  # [S, h, w]
        total = masks.to(feats.dtype).sum(dim=(-1, -2))
    else:
        m = mask_at_feature_size(masks, feats.shape[-1], mode).to(feats.dtype)
        total = m.sum(dim=(-1, -2))
    return torch.einsum("schw,shw->sc", feats, m) / (total[:, None] + MAP_EPS)
