"""Voxel geometry of preparation: canonical orientation, resampling to a spacing, in-plane crop/pad.

Arrays here are in nibabel order ``[X, Y, Z]`` with a 4x4 RAS voxel-to-world affine. Every function
returns a new array and the affine that keeps each voxel at its world position, so organ positions
survive preparation (tested by round trips). Resampling and cropping use MONAI's transforms on
``MetaTensor``; reorientation uses nibabel's exact axis permutations and flips.
"""

from __future__ import annotations

from collections.abc import Callable

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import ResizeWithPadOrCrop, Spacing, SpatialCrop
from scipy import ndimage

CANONICAL_ORIENTATION = "LAS"
"""Orientation of every prepared volume (nibabel axis codes): the orientation of the prepared CHAOS
data the reference distributes. Axis 0 runs to the patient's left, axis 1 to anterior, axis 2 to superior."""


def orientation_of(affine: np.ndarray) -> str:
    """The nibabel axis codes of an affine, e.g. ``"LAS"``."""
    return "".join(nib.aff2axcodes(np.asarray(affine, dtype=np.float64)))


def spacing_of(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm along the array axes (column norms of the affine)."""
    a = np.asarray(affine, dtype=np.float64)[:3, :3]
    return tuple(float(v) for v in np.linalg.norm(a, axis=0))  # type: ignore[return-value]


def reoriented_geometry(shape: tuple[int, ...], affine: np.ndarray, codes: str = CANONICAL_ORIENTATION
                        ) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """Shape and voxel size (mm) along the axes that :func:`reorient` to ``codes`` gives a volume of ``shape``
    and ``affine``, without touching its voxels."""
    affine = np.asarray(affine, dtype=np.float64)
    tr = nib.orientations.ornt_transform(nib.orientations.io_orientation(affine),
                                         nib.orientations.axcodes2ornt(tuple(codes)))
    sp = spacing_of(affine)
    out_shape, out_sp = [0, 0, 0], [0.0, 0.0, 0.0]
    for i, (axis, _) in enumerate(tr[:3]):
        out_shape[int(axis)], out_sp[int(axis)] = int(shape[i]), sp[i]
    return (out_shape[0], out_shape[1], out_shape[2]), (out_sp[0], out_sp[1], out_sp[2])


def reorient(arr: np.ndarray, affine: np.ndarray, codes: str = CANONICAL_ORIENTATION) -> tuple[np.ndarray, np.ndarray]:
    """Permute/flip ``arr`` ``[X, Y, Z]`` so that its axes follow ``codes``; exact (no interpolation).

    Returns:
        ``(array, affine)``: a new contiguous array and its affine (same world positions).
    """
    affine = np.asarray(affine, dtype=np.float64)
    now = nib.orientations.io_orientation(affine)
    want = nib.orientations.axcodes2ornt(tuple(codes))
    tr = nib.orientations.ornt_transform(now, want)
    out = nib.orientations.apply_orientation(arr, tr)
    new_aff = affine @ nib.orientations.inv_ornt_aff(tr, arr.shape)
    return np.ascontiguousarray(out), new_aff


def _meta(arr: np.ndarray, affine: np.ndarray) -> MetaTensor:
    return MetaTensor(torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))[None],
                      affine=torch.as_tensor(np.asarray(affine, dtype=np.float64)))


def _unmeta(t: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    assert isinstance(t, MetaTensor)
    return t.as_tensor()[0].numpy(), t.affine.numpy().astype(np.float64)


def resample_image(arr: np.ndarray, affine: np.ndarray, spacing: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Linearly resample an intensity volume to ``spacing`` (mm per array axis).

    The world position of voxel 0 is kept (as SimpleITK's resampler does); the output extent covers
    the input's. Values outside the input are clamped to the border.
    """
    out = Spacing(pixdim=spacing, mode="bilinear", padding_mode="border", dtype=torch.float32)(_meta(arr, affine))
    return _unmeta(out)


def resample_index_grid(arr: np.ndarray, affine: np.ndarray, factors: tuple[float, float, float],
                        shape: tuple[int, int, int], order: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Resampling (``order`` 1: linear, 0: nearest) as SimpleITK's ``ResampleImageFilter`` does it with the input's
    origin and direction (the reference notebooks): output voxel ``i`` samples the input at continuous index
    ``i * factors``; samples outside the input's extent ``[-0.5, n - 0.5]`` are 0 (SimpleITK's default pixel value), samples inside it
    interpolate with the edge voxels repeated.

    Args:
        arr: ``[X, Y, Z]`` values; affine: its voxel-to-world affine.
        factors: output spacing / input spacing per axis. shape: output shape.
    Returns:
        ``(float32 array of shape, affine)``; voxel 0 keeps its world position.
    """
    a = np.asarray(arr, dtype=np.float32)
    fac = np.asarray(factors, dtype=np.float64)
    out = ndimage.affine_transform(a, np.diag(fac), output_shape=tuple(shape), order=order, mode="nearest")
    for axis, (n, f, m) in enumerate(zip(a.shape, fac, shape, strict=True)):
        outside = np.arange(m) * f > n - 0.5
        if outside.any():
            idx = [slice(None)] * 3
            idx[axis] = outside  # type: ignore[call-overload]
            out[tuple(idx)] = 0.0
    new_aff = np.asarray(affine, dtype=np.float64).copy()
    new_aff[:3, :3] = new_aff[:3, :3] * fac[None, :]
    return out.astype(np.float32, copy=False), new_aff


LABEL_RULES = ("per_class", "nearest", "per_class_rint")
"""Label resampling rules: ``per_class`` (each class's mask resampled linearly, the class of highest membership
wins), ``nearest``, ``per_class_rint`` (the reference notebooks: each class's mask resampled linearly and rounded,
classes in ascending order, a higher id overwrites; a voxel no class rounds to 1 is background)."""


def labels_per_class(arr: np.ndarray, resample: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
                     rule: str) -> tuple[np.ndarray, np.ndarray]:
    """Resample a label volume one class at a time with ``resample`` (a float mask -> ``(array, affine)``),
    combined by ``rule`` (``"per_class"`` or ``"per_class_rint"``, :data:`LABEL_RULES`).

    Returns:
        ``(uint8 labels, affine)``.
    """
    classes = np.unique(arr)  # ascending
    if rule == "per_class_rint":  # background adds nothing (a voxel no class rounds to 1 stays 0): not resampled
        out: np.ndarray | None = None
        for c in [c for c in classes if c != 0] or list(classes[:1]):
            prob, aff = resample((arr == c).astype(np.float32))
            if out is None:
                out = np.zeros(prob.shape, dtype=np.uint8)
            if c != 0:
                out[np.rint(prob) == 1] = c
        assert out is not None
        return out, aff
    best, winner = None, None
    for c in classes:
        prob, aff = resample((arr == c).astype(np.float32))
        if best is None or winner is None:
            best, winner = prob, np.full(prob.shape, c, dtype=np.uint8)
        else:
            take = prob > best
            best = np.where(take, prob, best)
            winner[take] = c
    assert winner is not None
    return winner, aff


def resample_label(arr: np.ndarray, affine: np.ndarray, spacing: tuple[float, float, float],
                   mode: str = "per_class") -> tuple[np.ndarray, np.ndarray]:
    """Resample a label volume to ``spacing``.

    Args:
        mode: a rule of :data:`LABEL_RULES` (``"per_class"``: method.md §1.2 with the highest membership winning).

    Returns:
        ``(uint8 labels, affine)``; the affine equals :func:`resample_image`'s for the same input.
    """
    if mode == "nearest":
        out = Spacing(pixdim=spacing, mode="nearest", padding_mode="border", dtype=torch.float32)(_meta(arr, affine))
        lab, aff = _unmeta(out)
        return np.rint(lab).astype(np.uint8), aff
    if mode not in LABEL_RULES:
        raise ValueError(f"label resampling mode must be one of {', '.join(LABEL_RULES)}, got {mode!r}")
    return labels_per_class(arr, lambda m: resample_image(m, affine, spacing), mode)


def crop_or_pad_xy(arr: np.ndarray, affine: np.ndarray, size: int, value: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Centre-crop or pad axes 0 and 1 to ``size`` (padding with ``value``); axis 2 is unchanged."""
    op = ResizeWithPadOrCrop(spatial_size=(size, size, -1), mode="constant", value=value)
    return _unmeta(op(_meta(arr, affine)))


def crop_border_xy(arr: np.ndarray, affine: np.ndarray, border: int) -> tuple[np.ndarray, np.ndarray]:
    """Remove ``border`` voxels from each side of axes 0 and 1.

    Raises:
        ValueError: the volume is not larger than ``2 * border`` in-plane.
    """
    x, y, z = arr.shape
    if x <= 2 * border or y <= 2 * border:
        raise ValueError(f"in-plane size {x}x{y} is too small to crop {border} px per border")
    op = SpatialCrop(roi_start=(border, border, 0), roi_end=(x - border, y - border, z))
    return _unmeta(op(_meta(arr, affine)))


def world_centroid(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """World (RAS mm) centroid of a boolean ``[X, Y, Z]`` mask; NaNs if it is empty."""
    idx = np.argwhere(mask)
    if idx.size == 0:
        return np.full(3, np.nan)
    c = idx.mean(axis=0)
    a = np.asarray(affine, dtype=np.float64)
    return a[:3, :3] @ c + a[:3, 3]


def nearest_on_grid(values: np.ndarray, model_affine: np.ndarray, shape: tuple[int, int, int],
                    affine: np.ndarray) -> np.ndarray:
    """Map a ``[X, Y, Z]`` volume (labels or probabilities) on the model grid onto another grid by nearest neighbour.

    Each output voxel ``i`` takes the value of the model voxel nearest to its world position
    (``round(inv(model_affine) @ affine @ i)``, halves up); outside the model grid (its voxels' extent, half a voxel
    beyond the first and last centres) the value is 0. (``grid-constant``: scipy's ``constant`` would also zero a
    position a rounding error outside the first or last voxel centre, e.g. a whole edge slice of the source.)

    Returns:
        array of ``shape`` and of ``values``'s dtype (uint8 for booleans).
    """
    v = np.asarray(values)
    v = v.astype(np.uint8) if v.dtype == bool else v
    m = np.linalg.inv(np.asarray(model_affine, dtype=np.float64)) @ np.asarray(affine, dtype=np.float64)
    return ndimage.affine_transform(np.ascontiguousarray(v), m, output_shape=tuple(shape), order=0,
                                    mode="grid-constant", cval=0, prefilter=False)


def to_original_grid(pred: np.ndarray, model_affine: np.ndarray, shape: tuple[int, int, int],
                     affine: np.ndarray) -> np.ndarray:
    """:func:`nearest_on_grid` of a label volume; returns a uint8 array of ``shape``."""
    return nearest_on_grid(np.asarray(pred, dtype=np.uint8), model_affine, shape, affine).astype(np.uint8)
