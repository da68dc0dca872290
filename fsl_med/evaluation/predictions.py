"""Prediction files as a Lightning callback: one multi-label NIfTI per query scan and variant.

``eval.save_predictions=true`` writes, for every query scan and variant,

- ``predictions/<variant>/pred_<scan>.nii.gz`` on the prepared grid with the prepared affine (the grid of
  ``image_<scan>.nii.gz``), and
- ``predictions/<variant>/source_grid/pred_<scan>.nii.gz`` resampled (nearest) to the source scan's grid with its
  affine, when the folder's ``manifest.json`` records the source geometry (folders made by ``fsl-med prepare``),

ready for ITK-SNAP or 3D Slicer. Voxel values are the dataset's label ids (its classmap); 0 elsewhere, including
the slices EP1 does not score. Where the predictions of two organs overlap, the voxel takes the organ with the
higher foreground probability (the lower label id on a tie).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import nibabel as nib
import numpy as np

from fsl_med.data.volumes import resize_label_slices
from fsl_med.models.prediction import ItemPrediction
from fsl_med.prepare.geometry import to_original_grid
from fsl_med.prepare.manifest import read_manifest
from fsl_med.prepare.nifti import write_nifti
from fsl_med.ranks import gather_objects


@dataclass(frozen=True)
class OrganPrediction:
    """One organ's prediction of one query scan and variant, sparse (foreground voxels only)."""

    query_id: str
    query_path: str
    variant: str
    label_id: int
    z: np.ndarray  # [n] scored slices
    shape: tuple[int, int, int]  # [n, H, W] of the prediction (model grid)
    index: np.ndarray  # flat indices of foreground voxels in [n, H, W]
    prob: np.ndarray  # their foreground probabilities


def assemble_label(parts: list[OrganPrediction], depth: int) -> np.ndarray:
    """``[Z, H, W]`` uint8 label volume (model grid) of one query scan and variant from its organs' parts."""
    _, h, w = parts[0].shape
    label = np.zeros((depth, h, w), dtype=np.uint8)
    best = np.full((depth, h, w), -np.inf, dtype=np.float32)
    for p in sorted(parts, key=lambda q: q.label_id):
        i, y, x = np.unravel_index(p.index, p.shape)
        z = p.z[i]
        win = p.prob > best[z, y, x]
        label[z[win], y[win], x[win]] = p.label_id
        best[z[win], y[win], x[win]] = p.prob[win]
    return label


class PredictionWriter(L.Callback):
    """Writes every query scan's prediction per variant as a multi-label NIfTI (see the module docstring).

    Args:
        dirpath: the ``predictions`` folder; ``None``: ``<run>/predictions``, set by :class:`fsl_med.runs.RunFolder`.
        variants: the variants written (``None``: every variant of the record).
        source_grid: also write the copy on the source grid when the manifest records it.

    Parts are kept sparse during the epoch, gathered over ranks, and written by global rank 0;
    :attr:`written` lists the files of the last test epoch.
    """

    def __init__(self, dirpath: str | Path | None, variants: list[str] | None = None, source_grid: bool = True) -> None:
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self.variants = list(variants) if variants is not None else None
        self.source_grid = source_grid
        self.parts: list[OrganPrediction] = []  # this process's, until the end of the test epoch
        self.written: list[Path] = []

    def bind_run_dir(self, run_dir: Path) -> None:
        """Called by :class:`fsl_med.runs.RunFolder` once the run folder exists (when no folder was given)."""
        if self.dirpath is None:
            self.dirpath = Path(run_dir) / "predictions"

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.parts, self.written = [], []

    def collect(self, record: ItemPrediction) -> None:
        """Keep the record's variants (sparse) for :meth:`write`; :attr:`parts` holds what was collected."""
        item = record.item
        if not item.query_path:
            raise ValueError(f"{item.organ} scan {item.query_id}: the item names no query file (EvalItem.query_path)")
        for v in self.variants if self.variants is not None else list(record.variants):
            p = record.variants[v]
            idx = np.flatnonzero(p.pred)
            self.parts.append(OrganPrediction(item.query_id, str(item.query_path), v, int(item.label_id),
                                              np.asarray(item.z), tuple(p.pred.shape), idx.astype(np.int64),
                                              p.prob.reshape(-1)[idx].copy()))

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        if isinstance(outputs, ItemPrediction):
            self.collect(outputs)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        parts = [p for g in gather_objects(trainer, self.parts) for p in g]
        self.parts = []
        if trainer.is_global_zero:
            self.written = self.write(parts)

    def write(self, parts: list[OrganPrediction]) -> list[Path]:
        """Write the files of ``parts`` (all organs of each query scan and variant, e.g. :attr:`parts` after
        :meth:`collect`); returns their paths."""
        if self.dirpath is None:
            raise ValueError("PredictionWriter has no folder: pass dirpath or run it under fsl_med.runs.RunFolder")
        groups: dict[tuple[str, str], list[OrganPrediction]] = {}
        for p in parts:
            groups.setdefault((p.variant, p.query_id), []).append(p)
        manifests: dict[Path, dict[str, Any] | None] = {}
        out: list[Path] = []
        for (variant, qid), group in sorted(groups.items()):
            path = Path(group[0].query_path)
            header = nib.load(str(path))
            sx, sy, sz = (int(n) for n in header.shape[:3])
            label = resize_label_slices(assemble_label(group, sz), (sy, sx))  # model grid -> prepared in-plane
            xyz = np.ascontiguousarray(label.transpose(2, 1, 0))
            affine = np.asarray(header.affine, dtype=np.float64)
            out.append(write_nifti(self.dirpath / variant / f"pred_{qid}.nii.gz", xyz, affine))
            if not self.source_grid:
                continue
            if path.parent not in manifests:
                manifests[path.parent] = read_manifest(path.parent)
            entry = ((manifests[path.parent] or {}).get("scans") or {}).get(qid) or {}
            if "source_affine" in entry and "source_shape" in entry:
                src_affine = np.asarray(entry["source_affine"], dtype=np.float64)
                src = to_original_grid(xyz, affine, tuple(int(n) for n in entry["source_shape"][:3]), src_affine)
                out.append(write_nifti(self.dirpath / variant / "source_grid" / f"pred_{qid}.nii.gz", src, src_affine))
        return out
