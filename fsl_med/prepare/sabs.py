"""``fsl-med prepare sabs``: Synapse / BTCV abdomen CT from the official ``RawData/Training`` folder (or zip).

Input layout (any prefix): ``img/img00XX.nii.gz`` (HU) and ``label/label00XX.nii.gz`` (13 organs).
Scans are re-indexed 0..N-1 in sorted file-name order, as the reference does (the manifest records the
source file of each id). Preparation (method.md §1.2, CT): clip HU to [-125, 275] and rescale to 0..255,
bring to the canonical orientation, crop 32 px from every in-plane border, resample in-plane to exactly
256 x 256 (linear for the image, per class for labels; z unchanged). Labels keep their BTCV ids.
"""

from __future__ import annotations

import gzip
import re
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from fsl_med.errors import DataError
from fsl_med.prepare.datasets import get_dataset_info
from fsl_med.prepare.pipeline import Case, PrepareReport, run_preparation
from fsl_med.prepare.plan import CtPlan, Scan
from fsl_med.prepare.sources import Source

_IMG_RE = re.compile(r"(?:^|/)img/img(\d+)\.nii(\.gz)?$")


def read_nifti_bytes(source: Source, rel: str) -> tuple[np.ndarray, np.ndarray]:
    """Read a (gzipped) NIfTI file of ``source`` into ``(array [X, Y, Z] float32, affine)``.

    Raises:
        DataError: truncated, not gzip, not NIfTI, or not 3D, naming the file.
    """
    where = source.describe(rel)
    data = source.read(rel)
    try:
        if rel.endswith(".gz"):
            data = gzip.decompress(data)
        img = nib.Nifti1Image.from_bytes(data)
        arr = np.asarray(img.get_fdata(dtype=np.float32))
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataError(f"{where}: truncated or corrupt gzip file") from e
    except Exception as e:  # nibabel raises several types for a non-NIfTI payload
        raise DataError(f"{where}: not a readable NIfTI file ({type(e).__name__})") from e
    if arr.ndim != 3:
        raise DataError(f"{where}: expected a 3D volume, got shape {tuple(arr.shape)}")
    return arr, np.asarray(img.affine, dtype=np.float64)


def find_sabs_cases(source: Source) -> list[Case]:
    """The labelled training scans of a Synapse/BTCV download, re-indexed 0..N-1 in file-name order.

    Raises:
        DataError: no ``img/imgXXXX.nii.gz`` found (the expected layout is named) or an image has no label.
    """
    files = set(source.files())
    images = sorted(rel for rel in files if _IMG_RE.search(rel) and "__MACOSX" not in rel)
    if not images:
        raise DataError(f"{source.path}: no Synapse/BTCV scans found; expected the official layout "
                        "RawData/Training/img/img00XX.nii.gz with RawData/Training/label/label00XX.nii.gz")
    cases = []
    for idx, img_rel in enumerate(sorted(images, key=lambda r: r.rsplit("/", 1)[-1])):
        head, name = img_rel.rsplit("img/", 1)
        lab_rel = f"{head}label/{name.replace('img', 'label', 1)}"
        if lab_rel not in files:
            raise DataError(f"{source.describe(img_rel)}: no matching label file {lab_rel}")

        def load(i: str = img_rel, lb: str = lab_rel) -> Scan:
            image, affine = read_nifti_bytes(source, i)
            label, laff = read_nifti_bytes(source, lb)
            if label.shape != image.shape:
                raise DataError(f"{source.describe(lb)}: label shape {label.shape} differs from image shape {image.shape}")
            if not np.allclose(laff, affine, atol=1e-3):
                raise DataError(f"{source.describe(lb)}: label affine differs from its image's")
            if not np.isfinite(image).all():
                raise DataError(f"{source.describe(i)}: contains NaN/inf voxels")
            if not np.array_equal(label, np.rint(label)):
                raise DataError(f"{source.describe(lb)}: label has non-integer values")
            return Scan(image=image, label=label.astype(np.int16), affine=affine)

        cases.append(Case(scan_id=str(idx), inputs=(img_rel, lab_rel), load=load))
    return cases


def prepare_sabs(src: str | Path, out: str | Path, plan: CtPlan | None = None, *, force: bool = False,
                 overwrite: bool = False, progress: bool = True) -> PrepareReport:
    """Prepare the official Synapse/BTCV ``RawData/Training`` folder (or zip) ``src`` into ``out`` with ``plan``
    (default :class:`~fsl_med.prepare.plan.CtPlan`); its parameters are recorded in the manifest."""
    p = plan or CtPlan()
    with Source(src) as source:
        cases = find_sabs_cases(source)
        return run_preparation(get_dataset_info("sabs"), source, cases, out, p, force=force, overwrite=overwrite,
                               progress=progress)
