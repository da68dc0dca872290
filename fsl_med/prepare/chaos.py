"""``fsl-med prepare chaos``: CHAOS T2-SPIR MRI from the official ``CHAOS_Train_Sets.zip`` (or its folder).

Input layout (any prefix): ``.../MR/<patient>/T2SPIR/DICOM_anon/*.dcm`` and ``.../MR/<patient>/T2SPIR/
Ground/*.png`` (grey levels 63 liver, 126 right kidney, 189 left kidney, 252 spleen). Preparation
(method.md §1.2, MRI): read the series in slice order with its geometry, clip the top 0.5 % of
intensities, bring to the canonical orientation, resample to 1.25 x 1.25 x 7.7 mm (linear for the
image, per class for labels), centre-crop or pad in-plane to 256 x 256 with the image minimum.
"""

from __future__ import annotations

import re
from pathlib import Path

from fsl_med.errors import DataError
from fsl_med.prepare.datasets import get_dataset_info
from fsl_med.prepare.dicom import read_masks, read_series
from fsl_med.prepare.pipeline import Case, PrepareReport, run_preparation
from fsl_med.prepare.plan import MriPlan, Scan
from fsl_med.prepare.sources import Source

_DICOM_RE = re.compile(r"(?:^|/)MR/(\d+)/T2SPIR/DICOM_anon/([^/]+)$")
_GROUND_RE = re.compile(r"(?:^|/)MR/(\d+)/T2SPIR/Ground/([^/]+\.png)$", re.IGNORECASE)


def find_chaos_cases(source: Source) -> list[Case]:
    """The T2-SPIR patients of a CHAOS download, sorted by patient id.

    Raises:
        DataError: no ``MR/<id>/T2SPIR/DICOM_anon`` series found (the expected layout is named), or a
            patient has DICOM files but no ground-truth PNGs.
    """
    dicoms: dict[str, list[str]] = {}
    masks: dict[str, list[str]] = {}
    for rel in source.files():
        name = rel.rsplit("/", 1)[-1]
        if name.startswith(".") or "__MACOSX" in rel:
            continue
        m = _DICOM_RE.search(rel)
        if m:
            dicoms.setdefault(m.group(1), []).append(rel)
            continue
        m = _GROUND_RE.search(rel)
        if m:
            masks.setdefault(m.group(1), []).append(rel)
    if not dicoms:
        raise DataError(f"{source.path}: no CHAOS T2-SPIR series found; expected the official layout "
                        "Train_Sets/MR/<patient>/T2SPIR/DICOM_anon/*.dcm with .../T2SPIR/Ground/*.png")
    cases = []
    for pid in sorted(dicoms, key=int):
        if pid not in masks:
            raise DataError(f"{source.describe(dicoms[pid][0].rsplit('/DICOM_anon/', 1)[0])}: no Ground/*.png "
                            "masks for this patient")
        d, g = sorted(dicoms[pid]), sorted(masks[pid])

        def load(d: list[str] = d, g: list[str] = g) -> Scan:
            series = read_series(source, d)
            return Scan(image=series.image, label=read_masks(source, g, series), affine=series.affine)

        cases.append(Case(scan_id=str(int(pid)), inputs=tuple(d + g), load=load))
    return cases


def prepare_chaos(src: str | Path, out: str | Path, plan: MriPlan | None = None, *, force: bool = False,
                  overwrite: bool = False, progress: bool = True) -> PrepareReport:
    """Prepare the official CHAOS download ``src`` (zip or folder) into ``out`` (prepared layout) with ``plan``
    (default :class:`~fsl_med.prepare.plan.MriPlan`); its parameters are recorded in the manifest.

    Returns:
        a :class:`~fsl_med.prepare.pipeline.PrepareReport`.
    """
    p = plan or MriPlan()
    with Source(src) as source:
        cases = find_chaos_cases(source)
        return run_preparation(get_dataset_info("chaos_t2"), source, cases, out, p, force=force, overwrite=overwrite,
                               progress=progress)
