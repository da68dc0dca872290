"""Read prepared volumes with their geometry, check them, and normalise intensities.

Arrays are returned slice-first, ``[Z, H, W]`` (H = rows = image y, W = columns = image x), which is
the order SimpleITK gives and the reference code uses; nibabel's ``[x, y, z]`` is transposed on read.
"""

from __future__ import annotations

import gzip
import logging
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from fsl_med.atomic import atomic_path
from fsl_med.data.datasets import scan_files
from fsl_med.errors import DataError

log = logging.getLogger(__name__)


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


def _check_affine(path: Path, affine: np.ndarray) -> None:
    """Raise :class:`DataError` for an affine whose voxel axes have zero length, are parallel, or are not finite."""
    if not np.isfinite(affine).all():
        raise DataError(f"{path}: affine has NaN/inf entries; fix the header's qform/sform")
    axes = affine[:3, :3]
    norms = np.linalg.norm(axes, axis=0)
    # |det| is the voxel volume; relative to the product of the axis lengths it is |sin| of the axes' skew
    if norms.min() == 0 or abs(float(np.linalg.det(axes))) <= 1e-6 * float(np.prod(norms)):
        raise DataError(f"{path}: singular affine (voxel axes have zero length or are parallel); "
                        "fix the header's qform/sform")


def read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """Read a NIfTI file fully and check that its geometry can be used.

    Returns:
        ``(array in nibabel order, affine, zooms)``.

    Raises:
        DataError: one line naming the file: a filesystem fault, reported as such with the OS's reason
            (``cannot read (Permission denied)``, ``(Is a directory)``, ``(No such file or directory)``);
            truncated or not gzip; not NIfTI; or a singular (or NaN) affine.
    """
    try:  # filesystem faults first, so that they are never mistaken for a corrupt file
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or type(e).__name__})") from e
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
    except OSError as e:
        if e.errno is not None:  # an I/O fault while reading (EIO, ...), not a format problem
            raise DataError(f"{path}: cannot read ({e.strerror or type(e).__name__})") from e
        raise DataError(f"{path}: cannot read NIfTI ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from e
    except ValueError as e:
        raise DataError(f"{path}: cannot read NIfTI ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from e
    affine = np.asarray(img.affine, dtype=np.float64)
    _check_affine(Path(path), affine)
    if np.iscomplexobj(arr):
        raise DataError(f"{path}: complex-valued voxels ({arr.dtype}); store the magnitude image as real values")
    return arr, affine, tuple(float(z) for z in img.header.get_zooms())


AFFINE_ATOL_MM = 1e-3
"""Largest difference (mm, any affine entry) between an image's and its label's affine that goes unremarked."""


def affine_mismatch(image_path: Path, image_affine: np.ndarray, label_path: Path,
                    label_affine: np.ndarray) -> str | None:
    """A one-line warning when a label's affine differs from its image's by more than ``AFFINE_ATOL_MM``
    in any entry (None when they agree). The label is still used voxel for voxel with the image."""
    if np.allclose(image_affine, label_affine, rtol=0.0, atol=AFFINE_ATOL_MM):
        return None
    diff = float(np.max(np.abs(np.asarray(image_affine) - np.asarray(label_affine))))
    return (f"{label_path}: affine differs from that of {image_path} by up to {diff:.3g} mm; the label is used "
            "voxel for voxel with the image (check that it belongs to this image)")


MAX_INTENSITY = float(np.sqrt(np.finfo(np.float32).max))
"""Largest intensity magnitude accepted (~1.8e19): beyond it a value's square is not finite in float32."""


def check_intensities(image: np.ndarray, what: str | Path) -> None:
    """Reject intensities too large for float32 arithmetic (their squares overflow).

    Such values (e.g. near 3e38) are finite but come from a broken export (a garbage ``scl_slope``, a wrong
    data type); statistics, augmentation and the model work in float32 and would turn them into inf/NaN.

    Raises:
        DataError: ``what`` (the file) and the intensity range in one line.
    """
    if image.size == 0:
        return
    lo, hi = float(np.min(image)), float(np.max(image))
    if max(abs(lo), abs(hi)) > MAX_INTENSITY:
        raise DataError(f"{what}: intensities are too large: their squares are not finite in float32 "
                        f"(range {lo:.1e}..{hi:.1e}); rescale the image or fix the header's scl_slope")


def _resize_slices(arr: np.ndarray, size: int | tuple[int, int], mode: str) -> np.ndarray:
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
    return _resize_slices(label, shape, "nearest").astype(np.uint8)


def load_volume(root: str | Path, scan_id: str, label_ids: tuple[int, ...] | None = None,
                image_size: int | None = None) -> Volume:
    """Load ``image_{scan_id}`` and ``label_{scan_id}`` from a prepared folder and check them.

    Args:
        root: prepared data folder.
        scan_id: scan id.
        label_ids: allowed label values (the dataset's label map); ``None`` skips that check.
        image_size: if given and different from the stored in-plane size, slices are resized to
            ``image_size``² (image bilinear, label nearest), as the reference loader does.

    The files are found by :func:`~fsl_med.data.datasets.scan_files` (``.nii.gz`` or ``.nii``). A label whose
    affine differs from the image's (:func:`affine_mismatch`) is logged as a warning and used as is.

    Raises:
        DataError: missing/unreadable/corrupt file, singular affine, not 3D, shape mismatch, NaN/inf voxels,
            intensities too large for float32 arithmetic, non-integer labels or label values outside ``label_ids``.
    """
    root = Path(root)
    ipath, lpath = scan_files(root).paths(str(scan_id))
    img, affine, zooms = read_nifti(ipath)
    lab, laffine, _ = read_nifti(lpath)
    warning = affine_mismatch(ipath, affine, lpath, laffine)
    if warning:
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

    def __call__(self, image: np.ndarray, what: str | Path | None = None) -> np.ndarray:
        """Return a normalised float32 copy of ``image`` (any shape); the input is not modified.

        Per-volume statistics are those of the reference (numpy on the float32 volume); only where they overflow
        (huge intensities) are they recomputed in float64, so normal volumes give bit-identical results.

        Args:
            what: the image's file, named in the error.
        Raises:
            DataError: the normalised intensities are not all finite (the message gives the input range).
        """
        with np.errstate(over="ignore", invalid="ignore"):  # non-finite results are reported below
            if self.mean is None:
                m, s = float(image.mean()), float(image.std())
                if not (np.isfinite(m) and np.isfinite(s)):
                    m, s = float(image.mean(dtype=np.float64)), float(image.std(dtype=np.float64))
            else:
                m, s = self.mean, float(self.std or 1.0)
            out = ((image - m) / max(s, 1e-8)).astype(np.float32)
        if not np.isfinite(out).all():
            lo, hi = (float(np.min(image)), float(np.max(image))) if image.size else (0.0, 0.0)
            raise DataError(f"{what or 'image'}: intensities are not finite after normalisation "
                            f"(range {lo:.1e}..{hi:.1e}, mean {m:.3g}, std {s:.3g}); rescale the image")
        return out


def make_normalizer(modality: str, train_images: list[np.ndarray] | None = None) -> Normalizer:
    """The normaliser of method.md §1.2.

    Args:
        modality: ``"mri"`` (per-volume z-score) or ``"ct"`` (global statistics).
        train_images: for CT, the fold's training volumes; their voxels give mean and std (in float64).
    Raises:
        DataError: CT without training scans, or statistics that are not finite.
    """
    if modality == "mri":
        return Normalizer()
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
    return Normalizer(mean=mean, std=std)


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
