"""Phantom scans in the *official download* formats, for testing and demonstrating ``fsl-med prepare``.

No raw CHAOS or Synapse/BTCV data exist on our machines, so these writers produce small stand-ins with
known, non-trivial geometry from the phantom anatomy (:func:`fsl_med.data.phantom.make_phantom_scan`):

* :func:`write_raw_chaos`: ``Train_Sets/MR/<patient>/T2SPIR/DICOM_anon/IMG-*.dcm`` (uint16 MR slices,
  LPS geometry, instance numbers running superior -> inferior) with ``.../Ground/IMG-*.png`` masks in
  CHAOS grey levels (63 liver, 126 right kidney, 189 left kidney, 252 spleen); optionally zipped as
  ``CHAOS_Train_Sets.zip``.
* :func:`write_raw_sabs`: ``RawData/Training/img/img00XX.nii.gz`` in Hounsfield units (int16) and
  ``label/label00XX.nii.gz`` with BTCV ids (spleen 1, kidneys 2/3, liver 6, plus stomach 7 and aorta 8),
  stored in alternating orientations (LPS, RAI) as real CT files are.

:func:`world_affine` gives the voxel-to-world map of the phantom anatomy, so a test can check that organ
positions survive preparation.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from fsl_med.atomic import atomic_path, replace_folder
from fsl_med.data.phantom import make_phantom_scan
from fsl_med.errors import DataError, FslMedError, write_error
from fsl_med.prepare.nifti import write_nifti

CHAOS_IDS: tuple[int, ...] = (1, 2, 3, 5, 8, 10, 13, 15, 19, 20, 21, 22, 31, 32, 33, 34, 36, 37, 38, 39)
"""The CHAOS MR patient ids, in order (the first ``n`` are used)."""

CHAOS_TO_BTCV: dict[int, int] = {0: 0, 1: 6, 2: 2, 3: 3, 4: 1}
"""Phantom/CHAOS label -> BTCV id (liver 6, right kidney 2, left kidney 3, spleen 1)."""

MR_SPACING = (1.6, 1.6, 8.8)
CT_SPACING = (1.5, 1.5, 5.0)


def world_affine(size: int, depth: int, spacing: tuple[float, float, float]) -> np.ndarray:
    """RAS affine of the phantom arrays (``[X, Y, Z]`` in LAS order) at ``spacing``, centred near 0."""
    sx, sy, sz = spacing
    aff = np.diag([-sx, sy, sz, 1.0])
    aff[:3, 3] = [sx * (size - 1) / 2.0 + 3.0, -sy * (size - 1) / 2.0 - 7.0, -sz * (depth - 1) / 2.0 + 11.0]
    return aff


MARKER = ".fsl_med_phantom"
"""A file at the root of a phantom raw tree (and the comment of a phantom zip): only these are ever replaced."""
_ZIP_COMMENT = b"fsl_med phantom"


def _refuse_foreign(dest: Path) -> None:
    """Refuse to replace ``dest`` unless it is a phantom written here before: a real download (CHAOS zip or
    ``Train_Sets``, Synapse ``RawData/Training``) at the same place is never deleted.

    Raises:
        DataError: naming ``dest``.
    """
    if not (dest.exists() or dest.is_symlink()):
        return
    ours = False
    if dest.is_dir() and not dest.is_symlink():
        ours = (dest / MARKER).is_file()
    elif dest.is_file():
        try:
            with zipfile.ZipFile(dest) as zf:
                ours = zf.comment == _ZIP_COMMENT
        except (zipfile.BadZipFile, OSError):
            ours = False
    if not ours:
        raise DataError(f"phantom: {dest} already exists and was not written by fsl-med phantom (a real download?); "
                        "refusing to replace it: choose another --out")


@contextlib.contextmanager
def _staged_tree(dest: Path):
    """Write a folder tree in a temporary sibling and move it onto ``dest`` at the end, replacing a phantom tree
    written before (never anything else: :func:`_refuse_foreign`)."""
    _refuse_foreign(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    except OSError as e:
        raise write_error(dest, e) from e
    try:
        yield tmp
        (tmp / MARKER).write_text("written by fsl-med phantom; replaced when it is run again\n")
        replace_folder(dest, tmp)
    except FslMedError:
        raise
    except OSError as e:
        raise write_error(dest, e) from e
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _dicom_slice(pixels: np.ndarray, position: list[float], spacing: tuple[float, float, float], instance: int,
                 patient: str, series_uid: str, study_uid: str) -> bytes:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    meta = FileMetaDataset()
    uid = generate_uid()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, uid
    ds.Modality, ds.PatientID = "MR", patient
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.SeriesDescription = "T2SPIR phantom"
    ds.InstanceNumber = instance
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelSpacing = [f"{spacing[1]:g}", f"{spacing[0]:g}"]  # row spacing, column spacing
    ds.SliceThickness = f"{spacing[2]:g}"
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.ImagePositionPatient = [f"{v:.4f}" for v in position]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _png(mask: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def chaos_raw_files(n_patients: int = 4, size: int = 128, depth: int = 16, seed: int = 0,
                    spacing: tuple[float, float, float] = MR_SPACING) -> dict[str, bytes]:
    """The files of a phantom ``CHAOS_Train_Sets`` tree: {``Train_Sets/MR/...`` relative path: bytes}.

    DICOM pixel ``(row r, column c)`` of slice ``k`` shows phantom voxel ``(c, size-1-r, k)``; its LPS
    position follows from :func:`world_affine`. Instance numbers run from the top slice down.
    """
    from pydicom.uid import generate_uid

    aff = world_affine(size, depth, spacing)
    ox, oy, oz = aff[:3, 3]
    files: dict[str, bytes] = {}
    for n, pid in enumerate(CHAOS_IDS[:n_patients], start=1):
        image, label = make_phantom_scan(n, size=size, depth=depth, seed=seed)
        series_uid, study_uid = generate_uid(), generate_uid()
        base = f"Train_Sets/MR/{pid}/T2SPIR"
        for k in range(depth):
            inst = depth - k  # superior slice first
            name = f"IMG-0002-{inst:05d}"
            pix = np.clip(image[:, ::-1, k].T, 0, 65535)
            pos = [-ox, -oy - spacing[1] * (size - 1), oz + spacing[2] * k]
            files[f"{base}/DICOM_anon/{name}.dcm"] = _dicom_slice(pix, pos, spacing, inst, str(pid), series_uid, study_uid)
            files[f"{base}/Ground/{name}.png"] = _png(label[:, ::-1, k].T * 63)
    return files


def write_raw_chaos(out_dir: str | Path, n_patients: int = 4, size: int = 128, depth: int = 16, seed: int = 0,
                    as_zip: bool = False) -> Path:
    """Write a phantom CHAOS download into ``out_dir``; returns the ``Train_Sets`` folder or the zip file."""
    out = Path(out_dir)
    files = chaos_raw_files(n_patients, size, depth, seed)
    if as_zip:
        dest = out / "CHAOS_Train_Sets.zip"
        _refuse_foreign(dest)
        with atomic_path(dest) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.comment = _ZIP_COMMENT
            for rel, data in files.items():
                zf.writestr(rel, data)
        return dest
    dest = out / "Train_Sets"
    with _staged_tree(dest) as tmp:
        for rel, data in files.items():
            p = tmp / rel.removeprefix("Train_Sets/")
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
    return dest


def _ct_scan(index: int, size: int, depth: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    image, label = make_phantom_scan(index, size=size, depth=depth, seed=seed)
    body = image >= 50
    hu = np.where(body, -160.0 + 0.35 * image, -1000.0)
    lut = np.zeros(max(CHAOS_TO_BTCV) + 1, dtype=np.uint8)
    for k, v in CHAOS_TO_BTCV.items():
        lut[k] = v
    lab = lut[label.astype(np.int64)]
    u, v, w = np.ogrid[0:1:complex(0, size), 0:1:complex(0, size), 0:1:complex(0, depth)]
    free = (lab == 0) & body
    stomach = free & (((u - 0.66) / 0.07) ** 2 + ((v - 0.68) / 0.06) ** 2 + ((w - 0.6) / 0.25) ** 2 < 1)
    aorta = free & (((u - 0.5) / 0.025) ** 2 + ((v - 0.4) / 0.025) ** 2 < 1)
    lab[stomach], hu[stomach] = 7, 25.0
    lab[aorta], hu[aorta] = 8, 190.0
    return np.rint(hu).astype(np.int16), lab


def write_raw_sabs(out_dir: str | Path, n_scans: int = 8, size: int = 160, depth: int = 16, seed: int = 0,
                   spacing: tuple[float, float, float] = CT_SPACING) -> Path:
    """Write a phantom Synapse/BTCV ``RawData/Training`` folder into ``out_dir`` and return that folder.

    Scan ``i`` (1-based) is ``img{i:04d}.nii.gz`` / ``label{i:04d}.nii.gz``; odd scans are stored in LPS,
    even scans in RAI orientation (same world positions, see :func:`world_affine`).
    """
    from fsl_med.prepare.geometry import reorient

    dest = Path(out_dir) / "RawData" / "Training"
    aff = world_affine(size, depth, spacing)
    with _staged_tree(dest) as tmp:
        for i in range(1, n_scans + 1):
            hu, lab = _ct_scan(i, size, depth, seed)
            codes = "LPS" if i % 2 else "RAI"
            hu_o, aff_o = reorient(hu, aff, codes)
            lab_o, _ = reorient(lab, aff, codes)
            write_nifti(tmp / "img" / f"img{i:04d}.nii.gz", hu_o, aff_o)
            write_nifti(tmp / "label" / f"label{i:04d}.nii.gz", lab_o, aff_o)
    return dest
