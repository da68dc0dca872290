"""``fsl-med prepare chaos``: CHAOS T2-SPIR MRI from the official ``CHAOS_Train_Sets.zip`` (or its folder).

Input layout (any prefix): ``.../MR/<patient>/T2SPIR/DICOM_anon/*.dcm`` and ``.../MR/<patient>/T2SPIR/
Ground/*.png`` (grey levels 63 liver, 126 right kidney, 189 left kidney, 252 spleen). Preparation
(method.md §1.2, MRI): read the series in slice order with its geometry, clip the top 0.5 % of
intensities, bring to the canonical orientation, resample to 1.25 x 1.25 x 7.7 mm (linear for the
image, per class for labels), centre-crop or pad in-plane to 256 x 256 with the image minimum.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fsl_med.data.datasets import get_dataset_info
from fsl_med.errors import DataError
from fsl_med.prepare.dicom import read_masks, read_series
from fsl_med.prepare.geometry import (
    CANONICAL_ORIENTATION,
    crop_or_pad_xy,
    reorient,
    resample_image,
    resample_label,
)
from fsl_med.prepare.pipeline import Case, PrepareReport, Scan, run_preparation
from fsl_med.prepare.sources import Source

_DICOM_RE = re.compile(r"(?:^|/)MR/(\d+)/T2SPIR/DICOM_anon/([^/]+)$")
_GROUND_RE = re.compile(r"(?:^|/)MR/(\d+)/T2SPIR/Ground/([^/]+\.png)$", re.IGNORECASE)


@dataclass(frozen=True)
class MriParams:
    """MRI preparation parameters (method.md §1.2)."""

    clip_top_percent: float = 0.5
    spacing: tuple[float, float, float] = (1.25, 1.25, 7.7)
    size: int = 256
    label_interp: str = "per_class"
    orientation: str = CANONICAL_ORIENTATION

    def as_dict(self) -> dict[str, Any]:
        """JSON-able parameters (recorded in the manifest)."""
        return {"modality": "mri", "clip_top_percent": self.clip_top_percent, "spacing": list(self.spacing),
                "size": self.size, "label_interp": self.label_interp, "orientation": self.orientation}


def preprocess_mri(scan: Scan, p: MriParams) -> Scan:
    """Clip, reorient, resample and crop/pad one MRI scan (inputs are not modified).

    Returns:
        a scan of shape ``(p.size, p.size, Z')`` with spacing ``p.spacing`` in ``p.orientation``.
    """
    image = scan.image.astype(np.float32, copy=True)
    if p.clip_top_percent > 0:
        image = np.minimum(image, np.percentile(image, 100.0 - p.clip_top_percent)).astype(np.float32)
    image, affine = reorient(image, scan.affine, p.orientation)
    label, _ = reorient(np.asarray(scan.label, dtype=np.uint8), scan.affine, p.orientation)
    image, new_aff = resample_image(image, affine, p.spacing)
    label, _ = resample_label(label, affine, p.spacing, p.label_interp)
    lo = float(image.min())
    image, out_aff = crop_or_pad_xy(image, new_aff, p.size, value=lo)
    label, _ = crop_or_pad_xy(label.astype(np.float32), new_aff, p.size, value=0.0)
    return Scan(image=image, label=np.rint(label).astype(np.uint8), affine=out_aff)


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


def prepare_chaos(src: str | Path, out: str | Path, params: MriParams | None = None, *,
                  cache_dir: str | Path | None = None, force: bool = False, progress: bool = True) -> PrepareReport:
    """Prepare the official CHAOS download ``src`` (zip or folder) into ``out`` (prepared layout).

    Returns:
        a :class:`~fsl_med.prepare.pipeline.PrepareReport`.
    """
    p = params or MriParams()
    with Source(src) as source:
        cases = find_chaos_cases(source)
        return run_preparation(get_dataset_info("chaos_t2"), source, cases, out, p.as_dict(),
                               lambda s: preprocess_mri(s, p), cache_dir=cache_dir, force=force, progress=progress)
