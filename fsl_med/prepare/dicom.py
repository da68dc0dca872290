"""Read a DICOM series (pydicom) with its geometry, and the CHAOS PNG ground truth that goes with it.

The series is returned in nibabel order ``[X, Y, Z]`` (X = DICOM columns, Y = rows, Z = slices sorted
along the slice normal) with the RAS affine built from ImagePositionPatient, ImageOrientationPatient,
PixelSpacing and the slice positions. Masks are read from the PNG beside each DICOM file (same file stem,
or the same rank in sorted order) and undergo the same sorting, so image and label stay aligned.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import PurePosixPath

import numpy as np

from fsl_med.errors import DataError
from fsl_med.prepare.sources import Source

CHAOS_GREY_RANGES: tuple[tuple[int, int, int], ...] = ((55, 70, 1), (110, 135, 2), (175, 200, 3), (240, 255, 4))
"""CHAOS ground-truth grey levels (official ranges around 63, 126, 189, 252) -> labels 1 liver,
2 right kidney, 3 left kidney, 4 spleen; 0 stays background."""

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class Series:
    """A DICOM series read into memory.

    Attributes:
        image: ``[X, Y, Z]`` float32 (rescale slope/intercept applied).
        affine: 4x4 RAS voxel-to-world affine.
        files: source paths of the slices in array z order.
    """

    image: np.ndarray
    affine: np.ndarray
    files: tuple[str, ...]


def _float_list(ds: object, tag: str, n: int, where: str) -> np.ndarray:
    v = getattr(ds, tag, None)
    if v is None or len(v) != n:
        raise DataError(f"{where}: DICOM attribute {tag} is missing or malformed")
    return np.asarray([float(x) for x in v], dtype=np.float64)


def read_series(source: Source, files: list[str]) -> Series:
    """Read the DICOM slices ``files`` of ``source`` as one volume sorted along the slice normal.

    Raises:
        DataError: a file is not DICOM, lacks geometry or pixels, slices differ in size or
            orientation, two slices share a position, or the slice spacing is irregular.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    if not files:
        raise DataError(f"{source.path}: no DICOM files")
    slices = []
    for rel in files:
        where = source.describe(rel)
        try:
            ds = pydicom.dcmread(io.BytesIO(source.read(rel)))
            pix = ds.pixel_array.astype(np.float32)
        except InvalidDicomError as e:
            raise DataError(f"{where}: not a DICOM file") from e
        except (AttributeError, ValueError, TypeError, EOFError) as e:
            raise DataError(f"{where}: cannot read DICOM pixels ({e})") from e
        if pix.ndim != 2:
            raise DataError(f"{where}: expected a 2D slice, got pixel array shape {pix.shape}")
        slope, icpt = float(getattr(ds, "RescaleSlope", 1) or 1), float(getattr(ds, "RescaleIntercept", 0) or 0)
        pos = _float_list(ds, "ImagePositionPatient", 3, where)
        iop = _float_list(ds, "ImageOrientationPatient", 6, where)
        sp = _float_list(ds, "PixelSpacing", 2, where)
        slices.append((rel, pix * slope + icpt, pos, iop, sp))
    iop0, sp0, shape0 = slices[0][3], slices[0][4], slices[0][1].shape
    for rel, pix, _, iop, sp in slices[1:]:
        if pix.shape != shape0 or not np.allclose(iop, iop0, atol=1e-4) or not np.allclose(sp, sp0, atol=1e-4):
            raise DataError(f"{source.describe(rel)}: slice size, orientation or pixel spacing differs from the "
                            f"rest of the series")
    row_dir, col_dir = iop0[:3], iop0[3:]
    normal = np.cross(row_dir, col_dir)
    order = sorted(range(len(slices)), key=lambda i: float(slices[i][2] @ normal))
    slices = [slices[i] for i in order]
    dists = np.asarray([float(s[2] @ normal) for s in slices])
    if len(slices) > 1:
        steps = np.diff(dists)
        if np.any(steps < 1e-3):
            raise DataError(f"{source.describe(slices[int(np.argmin(steps)) + 1][0])}: two slices share one position")
        dz = float(np.median(steps))
        if np.max(np.abs(steps - dz)) > 0.05 * dz + 1e-3:
            raise DataError(f"{source.describe(slices[0][0])}: irregular slice spacing in the series "
                            f"({steps.min():.2f}..{steps.max():.2f} mm)")
    else:
        dz = float(getattr(pydicom.dcmread(io.BytesIO(source.read(slices[0][0]))), "SliceThickness", 1.0) or 1.0)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * sp0[1]   # column index runs along the row direction; PixelSpacing[1] = column spacing
    lps[:3, 1] = col_dir * sp0[0]   # row index runs along the column direction; PixelSpacing[0] = row spacing
    lps[:3, 2] = normal * dz
    lps[:3, 3] = slices[0][2]
    image = np.stack([s[1].T for s in slices], axis=2)  # (rows, cols) -> [X = col, Y = row]
    return Series(image=np.ascontiguousarray(image, dtype=np.float32), affine=_LPS_TO_RAS @ lps,
                  files=tuple(s[0] for s in slices))


def chaos_grey_to_label(png: np.ndarray, where: str) -> np.ndarray:
    """Map a CHAOS ground-truth PNG (grey levels) to label ids 0..4 (see :data:`CHAOS_GREY_RANGES`).

    Raises:
        DataError: a non-zero grey level lies outside every organ range.
    """
    if png.ndim == 3:  # RGB(A) saved masks: the channels are equal
        png = png[..., 0]
    out = np.zeros(png.shape, dtype=np.uint8)
    known = png == 0
    for lo, hi, lab in CHAOS_GREY_RANGES:
        hit = (png >= lo) & (png <= hi)
        out[hit] = lab
        known |= hit
    if not known.all():
        bad = np.unique(png[~known])
        raise DataError(f"{where}: grey levels {bad.tolist()[:5]} are not CHAOS organ values (63, 126, 189, 252)")
    return out


def read_masks(source: Source, mask_files: list[str], series: Series) -> np.ndarray:
    """Stack the PNG masks matching ``series`` in its z order, as labels ``[X, Y, Z]`` (uint8).

    A mask belongs to the DICOM file with the same stem; when stems differ, masks are paired with the
    DICOM files by rank in sorted file-name order (the official pairing).

    Raises:
        DataError: mask count differs from the slice count, a PNG is unreadable, or its size differs.
    """
    from PIL import Image, UnidentifiedImageError

    dcm_sorted = sorted(series.files)
    if len(mask_files) != len(dcm_sorted):
        raise DataError(f"{source.describe(PurePosixPath(mask_files[0]).parent.as_posix()) if mask_files else source.path}: "
                        f"{len(mask_files)} masks for {len(dcm_sorted)} DICOM slices")
    by_stem = {PurePosixPath(m).stem: m for m in mask_files}
    if all(PurePosixPath(d).stem in by_stem for d in dcm_sorted):
        pair = {d: by_stem[PurePosixPath(d).stem] for d in dcm_sorted}
    else:
        pair = dict(zip(dcm_sorted, sorted(mask_files), strict=True))
    shape = series.image.shape[:2]
    planes = []
    for d in series.files:
        rel = pair[d]
        where = source.describe(rel)
        try:
            png = np.asarray(Image.open(io.BytesIO(source.read(rel))))
        except (UnidentifiedImageError, OSError) as e:
            raise DataError(f"{where}: not a readable PNG") from e
        lab = chaos_grey_to_label(png, where).T
        if lab.shape != shape:
            raise DataError(f"{where}: mask size {lab.shape[::-1]} differs from its DICOM slice {shape[::-1]}")
        planes.append(lab)
    return np.ascontiguousarray(np.stack(planes, axis=2))
