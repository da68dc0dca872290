"""NIfTI files of the prepared layout: read with checked geometry, write atomically, sanity checks on intensities
and affines. Arrays are in nibabel order ``[X, Y, Z]``."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from fsl_med.atomic import atomic_path
from fsl_med.errors import DataError


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


def write_nifti(dest: str | Path, data: np.ndarray, affine: np.ndarray) -> Path:
    """Atomically write ``data`` (nibabel order ``[X, Y, Z]``) with ``affine`` (qform = sform, scanner, mm)."""
    img = nib.Nifti1Image(data, np.asarray(affine, dtype=np.float64))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    img.header.set_xyzt_units(xyz="mm")
    with atomic_path(dest) as tmp:
        nib.save(img, str(tmp))
    return Path(dest)
