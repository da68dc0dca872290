"""Overlay figures as a Lightning callback: a few slices of the first query volume of each organ, with the support
slice, the ground truth and every variant's prediction."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import numpy as np

from fsl_med.evaluation.figures import overlay_figure
from fsl_med.evaluation.report import VARIANT_TITLES
from fsl_med.models.prediction import ItemPrediction
from fsl_med.prepare.datasets import scan_sort_key
from fsl_med.ranks import gather_objects


class Overlays(L.Callback):
    """Collects overlay slices during a test epoch and (with ``dirpath``) draws them.

    Args:
        slices: slices per organ (one per support part, at the part's middle query slice); 0 draws nothing.
        dirpath: folder of the figures, ``<organ>_q<scan>_z<z>.png`` (written by global rank 0; with ``bind``: set
            to ``<run>/overlays`` by the run folder); ``None`` only
            collects (:attr:`samples`).
        variants: the variants drawn (``None``: every variant of the record).

    The samples are of the first query scan of each organ over all ranks, as in a single process.
    """

    def __init__(self, slices: int = 3, dirpath: str | Path | None = None, variants: list[str] | None = None,
                 bind: bool = False) -> None:
        self.slices, self.dirpath = int(slices), Path(dirpath) if dirpath is not None else None
        self.variants = list(variants) if variants is not None else None
        self._bind = bind
        self.samples: list[dict[str, Any]] = []
        self.written: list[Path] = []

    def bind_run_dir(self, run_dir: Path) -> None:
        """Called by :class:`fsl_med.runs.RunFolder` once the run folder exists: with ``bind=True`` the figures go to
        ``<run>/overlays``."""
        if self._bind:
            self.dirpath = Path(run_dir) / "overlays"

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.samples, self.written = [], []

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        if not isinstance(outputs, ItemPrediction) or self.slices == 0:
            return
        item = outputs.item
        if any(s["organ"] == item.organ for s in self.samples):
            return
        names = self.variants if self.variants is not None else list(outputs.variants)
        for p in np.unique(item.part)[:self.slices]:
            rows = np.flatnonzero(item.part == p)
            i = int(rows[len(rows) // 2])
            s = int(p) * item.shots  # the part's first support slice

            def mid(img: np.ndarray) -> np.ndarray:
                return img[1] if img.ndim == 3 else img  # the centre slice of a 3-slice stack

            self.samples.append({
                "organ": item.organ, "query": item.query_id, "z": int(item.z[i]), "image": mid(item.query_images[i]),
                "label": item.query_labels[i], "preds": {v: outputs.variants[v].pred[i] for v in names},
                "support": item.support_id.split("+")[0], "support_z": int(item.support_z[s]),
                "support_image": mid(item.support_images[s]), "support_mask": item.support_masks[s],
            })

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        samples = sorted((x for g in gather_objects(trainer, self.samples) for x in g),
                         key=lambda x: (x["organ"], scan_sort_key(x["query"]), x["z"]))
        first: dict[str, str] = {}
        for x in samples:
            first.setdefault(x["organ"], x["query"])
        self.samples = [x for x in samples if x["query"] == first[x["organ"]]]
        if self.dirpath is not None and trainer.is_global_zero:
            self.written = [overlay_figure(s, self.dirpath / f"{s['organ']}_q{s['query']}_z{s['z']}.png", VARIANT_TITLES)
                            for s in self.samples]
