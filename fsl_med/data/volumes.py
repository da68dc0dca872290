"""Read prepared volumes with their geometry, check them, and normalise intensities.

Arrays are returned slice-first, ``[Z, H, W]`` (H = rows = image y, W = columns = image x), which is
the order SimpleITK gives and the reference code uses; nibabel's ``[x, y, z]`` is transposed on read.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from fsl_med.atomic import atomic_path
from fsl_med.errors import DataError


@dataclass(frozen=True)
class Volume:
    """One prepared scan.

    Attributes:
        scan_id: id from the file name (``image_{id}.nii.gz``).
        image: ``[Z, H, W]`` float32 intensities as stored (not normalised).
        label: ``[Z, H, W]`` uint8 label ids.
        spacing: voxel size in mm as ``(z, y, x)``.
        affine: the image's 4x4 affine (nibabel convention).
        path: the image file.
    """

    scan_id: str
    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray
    path: Path

    def slices_with(self, label_id: int) -> np.ndarray:
        """Sorted z indices where ``label_id`` has at least one voxel (the classmap entry)."""
        return np.flatnonzero((self.label == label_id).reshape(self.label.shape[0], -1).any(axis=1))


def _find(root: Path, stem: str) -> Path:
    for ext in (".nii.gz", ".nii"):
        p = root / f"{stem}{ext}"
        if p.is_file():
            return p
    raise DataError(f"{root / (stem + '.nii.gz')}: file not found")


def read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """Read a NIfTI file fully.

    Returns:
        ``(array in nibabel order, affine, zooms)``.

    Raises:
        DataError: truncated, not gzip, not NIfTI, or unreadable; the message names the file.
    """
    try:
        img = nib.load(str(path))
        arr = np.asarray(img.dataobj)
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataError(f"{path}: truncated or corrupt gzip file ({e.__class__.__name__})") from e
    except nib.filebasedimages.ImageFileError as e:
        if str(path).endswith(".gz"):  # a cut-off gzip stream can look like a bad header: say which it is
            try:
                with gzip.open(path, "rb") as f:
                    while f.read(1 << 20):
                        pass
            except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as ge:
                raise DataError(f"{path}: truncated or corrupt gzip file ({ge.__class__.__name__})") from e
        raise DataError(f"{path}: not a NIfTI file") from e
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read NIfTI ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from e
    return arr, np.asarray(img.affine, dtype=np.float64), tuple(float(z) for z in img.header.get_zooms())


def _resize_slices(arr: np.ndarray, size: int, mode: str) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))[:, None]
    if mode == "nearest":
        out = F.interpolate(t, size=(size, size), mode="nearest")
    else:
        out = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
    return out[:, 0].numpy()


def load_volume(root: str | Path, scan_id: str, label_ids: tuple[int, ...] | None = None,
                image_size: int | None = None) -> Volume:
    """Load ``image_{scan_id}`` and ``label_{scan_id}`` from a prepared folder and check them.

    Args:
        root: prepared data folder.
        scan_id: scan id.
        label_ids: allowed label values (the dataset's label map); ``None`` skips that check.
        image_size: if given and different from the stored in-plane size, slices are resized to
            ``image_size``² (image bilinear, label nearest), as the reference loader does.

    Raises:
        DataError: missing/corrupt file, not 3D, shape mismatch, NaN/inf voxels, non-integer labels
            or label values outside ``label_ids``.
    """
    root = Path(root)
    ipath, lpath = _find(root, f"image_{scan_id}"), _find(root, f"label_{scan_id}")
    img, affine, zooms = read_nifti(ipath)
    lab, _, _ = read_nifti(lpath)
    if img.ndim != 3:
        raise DataError(f"{ipath}: expected a 3D volume, got {img.ndim}D shape {tuple(img.shape)}")
    if lab.ndim != 3:
        raise DataError(f"{lpath}: expected a 3D volume, got {lab.ndim}D shape {tuple(lab.shape)}")
    if img.shape != lab.shape:
        raise DataError(f"{lpath}: label shape {tuple(lab.shape)} differs from image shape {tuple(img.shape)}")
    img = img.astype(np.float32, copy=False)
    if not np.isfinite(img).all():
        raise DataError(f"{ipath}: contains {int((~np.isfinite(img)).sum())} NaN/inf voxels")
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
    if image_size is not None and image.shape[1:] != (image_size, image_size):
        sy, sx = image.shape[1] / image_size, image.shape[2] / image_size
        image = _resize_slices(image, image_size, "bilinear")
        label = _resize_slices(label, image_size, "nearest").astype(np.uint8)
        spacing = (spacing[0], spacing[1] * sy, spacing[2] * sx)
    return Volume(scan_id=str(scan_id), image=image, label=label, spacing=spacing, affine=affine, path=ipath)


def write_nifti(dest: str | Path, data: np.ndarray, affine: np.ndarray) -> Path:
    """Atomically write ``data`` (nibabel order ``[X, Y, Z]``) with ``affine`` (qform = sform, scanner, mm)."""
    img = nib.Nifti1Image(data, np.asarray(affine, dtype=np.float64))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    img.header.set_xyzt_units(xyz="mm")
    with atomic_path(dest) as tmp:
        nib.save(img, str(tmp))
    return Path(dest)


def classmap_from_labels(labels: dict[str, np.ndarray], class_names: tuple[str, ...] | dict[int, str]
                         ) -> dict[str, dict[str, list[int]]]:
    """Build the ``classmap_1.json`` object from {scan id: ``[X, Y, Z]`` label volume}.

    Args:
        class_names: names by label id (a tuple indexed by id, or {id: name}); id 0 is the background.

    Returns:
        {class name: {scan id: [z, ...]}}: class ``c`` lists the z indices with >= 1 voxel of ``c``;
        the background class (as in the reference file) lists the z indices with >= 1 foreground voxel.
    """
    names = dict(enumerate(class_names)) if not isinstance(class_names, dict) else dict(class_names)
    out: dict[str, dict[str, list[int]]] = {name: {} for name in names.values()}
    for sid, lab in labels.items():
        lab_i = np.asarray(lab).astype(np.int64)
        for c, name in names.items():
            hit = (lab_i > 0) if c == 0 else (lab_i == c)
            out[name][sid] = [int(z) for z in np.flatnonzero(hit.any(axis=(0, 1)))]
    return out


@dataclass(frozen=True)
class Normalizer:
    """Intensity z-scoring: per volume (MRI) or with fixed statistics (CT, from training scans)."""

    mean: float | None = None
    std: float | None = None

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """Return a normalised float32 copy of ``image`` (any shape); the input is not modified."""
        if self.mean is None:
            m, s = float(image.mean()), float(image.std())
        else:
            m, s = self.mean, float(self.std or 1.0)
        return ((image - m) / max(s, 1e-8)).astype(np.float32)


def make_normalizer(modality: str, train_images: list[np.ndarray] | None = None) -> Normalizer:
    """The normaliser of method.md §1.2.

    Args:
        modality: ``"mri"`` (per-volume z-score) or ``"ct"`` (global statistics).
        train_images: for CT, the fold's training volumes; their voxels give mean and std.
    """
    if modality == "mri":
        return Normalizer()
    if not train_images:
        raise DataError("CT normalisation needs the training scans' statistics, but no training scans were given")
    n = sum(im.size for im in train_images)
    mean = sum(float(im.sum(dtype=np.float64)) for im in train_images) / n
    var = sum(float(((im - mean) ** 2).sum(dtype=np.float64)) for im in train_images) / n
    return Normalizer(mean=mean, std=float(np.sqrt(var)))


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
