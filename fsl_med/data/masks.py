"""Support masks at the feature grid: the one place a full-resolution mask meets ``h×w`` features.

``nearest`` and ``bilinear`` downsample the mask (fsl_med's ALP path, [D] and [A]). ``adjoint`` pulls the mask back
through the bilinear upsampling ``U`` of the features (align_corners=False): with the 1-D interpolation matrices
``A_y [H, h]`` and ``A_x [W, w]``, ``Σ_xy U(F)(x, y) M(x, y) = Σ_ij F_ij (A_yᵀ M A_x)_ij``, so pooling the ``h×w``
features with ``m' = A_yᵀ M A_x`` equals the references' pooling of features upsampled to the mask's grid, without
the ``H×W`` feature map (docs "Methods": ``model.mask_pooling=adjoint``). ``Σ m' = Σ M`` because every row of ``A``
sums to 1.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from fsl_med.config import MASK_POOLINGS


@functools.lru_cache(maxsize=32)
def _matrix_cpu64(out_size: int, in_size: int) -> torch.Tensor:
    eye = torch.eye(in_size, dtype=torch.float64)[:, None, :]  # in_size signals of length in_size
    up = F.interpolate(eye, size=out_size, mode="linear", align_corners=False)  # [in, 1, out]
    return up[:, 0, :].T.contiguous()  # [out, in]: column j is the upsampled unit vector e_j


def bilinear_matrix(out_size: int, in_size: int, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[out_size, in_size]`` matrix of 1-D linear upsampling with ``align_corners=False`` (PyTorch's bilinear is
    this along each axis); built once per size pair by upsampling an identity matrix. Rows sum to 1."""
    return _matrix_cpu64(int(out_size), int(in_size)).to(device=device, dtype=dtype)


def pull_back(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``A_yᵀ M A_x``: ``[..., H, W]`` masks pulled back to ``[..., h, w]`` = ``size`` (float, same sum as ``mask``)."""
    h, w = size
    m = mask.float() if not mask.is_floating_point() else mask
    ay = bilinear_matrix(m.shape[-2], h, m.device, m.dtype)  # [H, h]
    ax = bilinear_matrix(m.shape[-1], w, m.device, m.dtype)  # [W, w]
    return ay.T @ m @ ax


def mask_at_feature_size(mask: torch.Tensor, feature_size: int, mode: str) -> torch.Tensor:
    """``[..., H, W]`` masks at ``feature_size``²: downsampled (``nearest``, ``bilinear``), or pulled back and scaled
    by ``f²/(HW)`` (``adjoint``; a soft mask with the mean of ``mask``, non-empty iff ``mask`` is)."""
    if mode not in MASK_POOLINGS:
        raise ValueError(f"mask pooling must be one of {', '.join(MASK_POOLINGS)}, got {mode!r}")
    shape = mask.shape
    f = feature_size
    if mode == "adjoint":
        return pull_back(mask, (f, f)) * (f * f / (shape[-2] * shape[-1]))
    m = mask.reshape(-1, 1, *shape[-2:]).float()
    if mode == "nearest":
        out = F.interpolate(m, size=(f, f), mode="nearest")
    else:
        out = F.interpolate(m, size=(f, f), mode="bilinear", align_corners=False)
    return out.reshape(*shape[:-2], f, f)
