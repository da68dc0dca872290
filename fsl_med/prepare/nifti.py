"""NIfTI files of the prepared layout: read with checked geometry, write atomically, sanity checks on intensities
and affines. Arrays are in nibabel order ``[X, Y, Z]``."""

from __future__ import annotations

import gzip
import logging
import math
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.openers import ImageOpener

from fsl_med.atomic import atomic_path
from fsl_med.errors import DataError

log = logging.getLogger(__name__)


HEADER_AFFINE = "the header's qform/sform"
"""Where a file's affine comes from (what :func:`check_affine` tells the user to fix)."""


def check_affine(what: str | Path, affine: np.ndarray, source: str = HEADER_AFFINE) -> None:
    """Raise :class:`DataError` for an affine whose voxel axes have zero length, are parallel, or are not finite.

    Args:
        what: the file (or array) it belongs to, named first in the message.
        source: where the affine came from, named as what to fix (a file's header; ``query_affine`` for an array).
    """
    if not np.isfinite(affine).all():
        raise DataError(f"{what}: affine has NaN/inf entries; fix {source}")
    axes = affine[:3, :3]
    norms = np.linalg.norm(axes, axis=0)
    # |det| is the voxel volume; relative to the product of the axis lengths it is |sin| of the axes' skew
    if norms.min() == 0 or abs(float(np.linalg.det(axes))) <= 1e-6 * float(np.prod(norms)):
        raise DataError(f"{what}: singular affine (voxel axes have zero length or are parallel); fix {source}")


def _raw_header(path: Path) -> nib.Nifti1Header | None:
    """The NIfTI-1 or NIfTI-2 header of ``path`` exactly as stored (nibabel replaces an invalid scaling on load),
    or ``None`` when it cannot be read here (``nib.load`` then says why)."""
    try:
        with ImageOpener(str(path)) as f:
            block = f.read(540)
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error):
        return None
    for cls in (nib.Nifti1Header, nib.Nifti2Header):
        n = int(cls.template_dtype.itemsize)
        if len(block) < n:
            continue
        try:
            hdr = cls(block[:n], check=False)
        except Exception:  # noqa: BLE001 - not this kind of header
            continue
        if int(hdr["sizeof_hdr"]) == n:
            return hdr
    return None


def scaling_note(path: str | Path, slope: float, inter: float) -> str | None:
    """What reading a header's intensity scaling ``(scl_slope, scl_inter)`` assumes, when that is worth a note.

    The rule (nibabel's reading, made explicit): a slope of 0 or NaN means *no scaling* (the NIfTI standard's 0;
    nibabel writes NaN), so the data are read unscaled (slope 1, intercept 0) and the intercept is ignored; an
    infinite slope is treated the same way; a non-finite intercept beside a real slope counts as 0. The usual
    headers (a real slope and intercept; slope 0/NaN with intercept 0/NaN) need no note; every other case
    returns one line naming the file and what was read.
    """
    slope_unset = slope == 0 or not math.isfinite(slope)
    if slope_unset:
        if math.isfinite(slope) or math.isnan(slope):  # 0 or NaN: the standard's "no scaling"
            if inter == 0 or math.isnan(inter):
                return None
            return (f"{path}: scl_slope is {slope:g} (no scaling); scl_inter {inter:g} ignored: read unscaled "
                    "(slope 1, intercept 0)")
        return f"{path}: scl_slope is {slope:g}; read unscaled (slope 1, intercept 0)"
    if not math.isfinite(inter):
        return f"{path}: scl_inter is {inter:g}; read with intercept 0 (scl_slope {slope:g} applied)"
    return None


def _read_scaled_with_zero_intercept(path: Path, hdr: nib.Nifti1Header) -> tuple[np.ndarray, np.ndarray,
                                                                                tuple[float, ...]]:
    """Data, affine and zooms of a NIfTI file with a real slope and a non-finite intercept (which nibabel refuses
    to load), read with its header ``hdr``: the slope applied, the intercept taken as 0."""
    hdr = hdr.copy()
    hdr["scl_inter"] = 0.0
    with ImageOpener(str(path)) as f:
        arr = np.asarray(hdr.data_from_fileobj(f))
    return arr, np.asarray(hdr.get_best_affine(), dtype=np.float64), tuple(float(z) for z in hdr.get_zooms())


def read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """Read a NIfTI file fully and check that its geometry can be used.

    Returns:
        ``(array in nibabel order, affine, zooms)``.

    Raises:
        DataError: one line naming the file: a filesystem fault, reported as such with the OS's reason
            (``cannot read (Permission denied)``, ``(Is a directory)``, ``(No such file or directory)``);
            truncated or not gzip; not NIfTI; or a singular (or NaN) affine.

    A header whose intensity scaling is invalid (an infinite ``scl_slope``, a non-finite ``scl_inter``, an
    intercept beside a slope of 0/NaN) is read as :func:`scaling_note` says, with that note logged once as a
    warning; the usual "no scaling" headers (slope and intercept 0 or NaN) are read silently.
    """
    try:  # filesystem faults first, so that they are never mistaken for a corrupt file
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or type(e).__name__})") from e
    hdr = _raw_header(Path(path))
    slope, inter = (float(hdr["scl_slope"]), float(hdr["scl_inter"])) if hdr is not None else (math.nan, math.nan)
    note = scaling_note(path, slope, inter)
    try:
        if hdr is not None and slope != 0 and math.isfinite(slope) and not math.isfinite(inter):
            arr, affine, zooms = _read_scaled_with_zero_intercept(Path(path), hdr)  # nibabel refuses to load it
        else:
            img = nib.load(str(path))
            arr = np.asarray(img.dataobj)
            affine = np.asarray(img.affine, dtype=np.float64)
            zooms = tuple(float(z) for z in img.header.get_zooms())
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
    except (ValueError, nib.spatialimages.HeaderDataError) as e:
        raise DataError(f"{path}: cannot read NIfTI ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from e
    check_affine(Path(path), affine)
    if np.iscomplexobj(arr):
        raise DataError(f"{path}: complex-valued voxels ({arr.dtype}); store the magnitude image as real values")
    if note is not None:
        log.warning("%s", note)
    return arr, affine, zooms


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
