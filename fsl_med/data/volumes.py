"""Read prepared volumes with their geometry, check them, and normalise intensities.

Arrays are returned slice-first, ``[Z, H, W]`` (H = rows = image y, W = columns = image x), which is
the order SimpleITK gives and the reference code uses; nibabel's ``[x, y, z]`` is transposed on read.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fsl_med.errors import DataError
from fsl_med.prepare.datasets import scan_files
from fsl_med.prepare.nifti import affine_mismatch, check_intensities, read_nifti

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Volume:
    """One prepared scan.

    Attributes:
        scan_id: id from the file name (``image_{id}.nii.gz``).
        image: ``[Z, H, W]`` float32 intensities as stored (not normalised), resized to the loader size if asked.
        label: ``[Z, H, W]`` uint8 label ids.
        spacing: voxel size in mm as ``(z, y, x)``.
        affine: the image's 4x4 affine (nibabel convention).
        path: the image file.
        stored_shape: ``(H, W)`` in-plane size in the file (differs from ``image``'s when resized on loading).
        stored_stats: ``(mean, std)`` of the stored image (:func:`image_stats`) when it was resized on loading, else
            ``None`` (then they are ``image``'s own).
    """

    scan_id: str
    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray
    path: Path
    stored_shape: tuple[int, int] = (0, 0)
    stored_stats: tuple[float, float] | None = None

    def slices_with(self, label_id: int) -> np.ndarray:
        """Sorted z indices where ``label_id`` has at least one voxel (the classmap entry)."""
        return np.flatnonzero((self.label == label_id).reshape(self.label.shape[0], -1).any(axis=1))


def resize_slices(arr: np.ndarray, size: int | tuple[int, int], mode: str) -> np.ndarray:
    """``[Z, H, W]`` slices resized in-plane to ``size`` (``"bilinear"``, as the reference loader resizes images,
    or ``"nearest"``, for labels); returns a new float32 array."""
    hw = (size, size) if isinstance(size, int) else tuple(size)
    t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))[:, None]
    if mode == "nearest":
        out = F.interpolate(t, size=hw, mode="nearest")
    else:
        out = F.interpolate(t, size=hw, mode="bilinear", align_corners=False)
    return out[:, 0].numpy()


def resize_label_slices(label: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``[Z, H, W]`` label ids resized in-plane to ``shape`` (nearest; the inverse of ``load_volume``'s
    ``image_size`` resize). Returns a new uint8 array; the input is not modified."""
    if tuple(label.shape[1:]) == tuple(shape):
        return np.array(label, dtype=np.uint8)
    return resize_slices(label, shape, "nearest").astype(np.uint8)


def load_volume(root: str | Path, scan_id: str, label_ids: tuple[int, ...] | None = None,
                image_size: int | None = None, warn: bool = True) -> Volume:
    """Load ``image_{scan_id}`` and ``label_{scan_id}`` from a prepared folder and check them.

    Args:
        root: prepared data folder.
        scan_id: scan id.
        label_ids: allowed label values (the dataset's label map); ``None`` skips that check.
        image_size: if given and different from the stored in-plane size, slices are resized to
            ``image_size``² (image bilinear, label nearest), as the reference loader does.

    The files are found by :func:`~fsl_med.prepare.datasets.scan_files` (``.nii.gz`` or ``.nii``). A label whose
    affine differs from the image's (:func:`affine_mismatch`) is logged as a warning (unless ``warn`` is false: a
    second read of the same files in one run) and used as is.

    Raises:
        DataError: missing/unreadable/corrupt file, singular affine, not 3D, shape mismatch, NaN/inf voxels,
            intensities too large for float32 arithmetic, non-integer labels or label values outside ``label_ids``.
    """
    root = Path(root)
    ipath, lpath = scan_files(root).paths(str(scan_id))
    img, affine, zooms = read_nifti(ipath)
    lab, laffine, _ = read_nifti(lpath)
    warning = affine_mismatch(ipath, affine, lpath, laffine)
    if warning and warn:
        log.warning("%s", warning)
    if img.ndim != 3:
        raise DataError(f"{ipath}: expected a 3D volume, got {img.ndim}D shape {tuple(img.shape)}")
    if lab.ndim != 3:
        raise DataError(f"{lpath}: expected a 3D volume, got {lab.ndim}D shape {tuple(lab.shape)}")
    if img.shape != lab.shape:
        raise DataError(f"{lpath}: label shape {tuple(lab.shape)} differs from image shape {tuple(img.shape)}")
    if not np.isfinite(img).all():
        raise DataError(f"{ipath}: contains {int((~np.isfinite(img)).sum())} NaN/inf voxels")
    check_intensities(img, ipath)  # before the float32 cast, which would turn larger values into inf
    img = img.astype(np.float32, copy=False)
    labf = np.asarray(lab)
    if labf.dtype.kind == "f":
        if not np.isfinite(labf).all() or not np.array_equal(labf, np.rint(labf)):
            raise DataError(f"{lpath}: label has non-integer values")
    if labf.size and (labf.min() < 0 or labf.max() > 255):
        bad = np.unique(labf[(labf < 0) | (labf > 255)])
        raise DataError(f"{lpath}: label values {bad.tolist()[:5]} are outside 0..255")
    label = labf.astype(np.uint8)  # label ids fit a byte; 8x less memory than int64 for cached volumes
    if label_ids is not None:
        bad = np.setdiff1d(np.unique(label), np.asarray(label_ids))
        if bad.size:
            raise DataError(f"{lpath}: label values {bad.tolist()[:5]} are outside the dataset's label map {list(label_ids)}")
    # nibabel [x, y, z] -> [z, y, x]
    image = np.ascontiguousarray(img.transpose(2, 1, 0))
    label = np.ascontiguousarray(label.transpose(2, 1, 0))
    spacing = (zooms[2], zooms[1], zooms[0]) if len(zooms) >= 3 else (1.0, 1.0, 1.0)
    stored = (int(image.shape[1]), int(image.shape[2]))
    stats = None
    if image_size is not None and image.shape[1:] != (image_size, image_size):
        stats = image_stats(image)
        sy, sx = image.shape[1] / image_size, image.shape[2] / image_size
        image = resize_slices(image, image_size, "bilinear")
        label = resize_slices(label, image_size, "nearest").astype(np.uint8)
        spacing = (spacing[0], spacing[1] * sy, spacing[2] * sx)
    return Volume(scan_id=str(scan_id), image=image, label=label, spacing=spacing, affine=affine, path=ipath,
                  stored_shape=stored, stored_stats=stats)


def image_stats(image: np.ndarray) -> tuple[float, float]:
    """``(mean, std)`` of a volume as the reference's per-volume z-score computes them (numpy on the float32
    volume); only where they overflow (huge intensities) are they recomputed in float64."""
    with np.errstate(over="ignore", invalid="ignore"):
        m, s = float(image.mean()), float(image.std())
        if not (np.isfinite(m) and np.isfinite(s)):
            m, s = float(image.mean(dtype=np.float64)), float(image.std(dtype=np.float64))
    return m, s


@dataclass(frozen=True)
class Normalizer:
    """Intensity z-scoring: per volume (MRI) or with fixed statistics (CT, from training scans).

    ``before_resize`` (``data.resize_last``, the reference loader's order): a per-volume z-score uses the
    statistics of the stored image when the loader resized it (``stored_stats``), as if it normalised before
    resizing (the z-score is linear, so the two orders then agree)."""

    mean: float | None = None
    std: float | None = None
    before_resize: bool = False

    def __call__(self, image: np.ndarray, what: str | Path | None = None,
                 stored_stats: tuple[float, float] | None = None) -> np.ndarray:
        """Return a normalised float32 copy of ``image`` (any shape); the input is not modified.

        Args:
            what: the image's file, named in the error.
            stored_stats: :attr:`Volume.stored_stats` (used with ``before_resize``; ``None``: not resized).
        Raises:
            DataError: the normalised intensities are not all finite (the message gives the input range).
        """
        with np.errstate(over="ignore", invalid="ignore"):  # non-finite results are reported below
            if self.mean is None:
                m, s = stored_stats if self.before_resize and stored_stats is not None else image_stats(image)
            else:
                m, s = self.mean, float(self.std or 1.0)
            out = ((image - m) / max(s, 1e-8)).astype(np.float32)
        if not np.isfinite(out).all():
            lo, hi = (float(np.min(image)), float(np.max(image))) if image.size else (0.0, 0.0)
            raise DataError(f"{what or 'image'}: intensities are not finite after normalisation "
                            f"(range {lo:.1e}..{hi:.1e}, mean {m:.3g}, std {s:.3g}); rescale the image")
        return out


def make_normalizer(modality: str, train_images: list[np.ndarray] | None = None,
                    before_resize: bool = False) -> Normalizer:
    """The normaliser of method.md §1.2.

    Args:
        modality: ``"mri"`` (per-volume z-score) or ``"ct"`` (global statistics).
        train_images: for CT, the fold's training volumes (as stored, for ``before_resize``); their voxels give
            mean and std (in float64).
        before_resize: see :class:`Normalizer`.
    Raises:
        DataError: CT without training scans, or statistics that are not finite.
    """
    if modality == "mri":
        return Normalizer(before_resize=before_resize)
    if not train_images:
        raise DataError("CT normalisation needs the training scans' statistics, but no training scans were given")
    n = sum(im.size for im in train_images)
    mean = sum(float(im.sum(dtype=np.float64)) for im in train_images) / n
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported below
        var = sum(float(((im - mean) ** 2).sum(dtype=np.float64)) for im in train_images) / n
    std = float(np.sqrt(var))
    if not (np.isfinite(mean) and np.isfinite(std)):
        raise DataError(f"CT normalisation: the training scans' intensity statistics are not finite (mean {mean:.3g}, "
                        f"std {std:.3g}); rescale the images")
    return Normalizer(mean=mean, std=std, before_resize=before_resize)


def slice_input(volume: np.ndarray, three_slices: bool = False) -> np.ndarray:
    """Model input slices of a normalised ``[Z, H, W]`` volume.

    Returns the volume itself (``three_slices`` False: each slice is tiled ×3 later, the reference), or a new
    ``[Z, 3, H, W]`` array whose slice z stacks z-1, z, z+1 with zeros beyond the volume ends (the reference's
    ``use_3_slices``, ``data.three_slices``).
    """
    if not three_slices:
        return volume
    z = volume.shape[0]
    out = np.zeros((z, 3, *volume.shape[1:]), dtype=volume.dtype)
    out[:, 1] = volume
    out[1:, 0] = volume[:-1]
    out[:-1, 2] = volume[1:]
    return out


def slice_stack(volume: np.ndarray, z: int) -> np.ndarray:
    """``[3, H, W]`` stack of slices z-1, z, z+1 of a ``[Z, H, W]`` volume, zeros beyond its ends (a new array;
    equals ``slice_input(volume, True)[z]``)."""
    out = np.zeros((3, *volume.shape[1:]), dtype=volume.dtype)
    out[1] = volume[z]
    if z > 0:
        out[0] = volume[z - 1]
    if z < volume.shape[0] - 1:
        out[2] = volume[z + 1]
    return out
