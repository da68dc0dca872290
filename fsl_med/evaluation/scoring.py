"""Scoring as a Lightning callback: TP/FP/FN, HD95 and seconds per (variant, organ, query volume).

:class:`Scoring` reads the :class:`~fsl_med.models.prediction.ItemPrediction` each validation/test step returns
(after the refinement callbacks have added their variants), gathers the rows of every DDP rank through the
Lightning strategy at the end of the epoch, logs ``val/dice`` (plain) and ``test/dice`` /
``test/dice_<variant>[_<organ>]``, and keeps the gathered rows (:attr:`Scoring.results`) for the writers.
Dice is 3D per query volume from TP/FP/FN summed over its scored slices (method.md §5).
"""

from __future__ import annotations

from typing import Any

import lightning as L
from omegaconf import DictConfig

from fsl_med.config import VARIANTS
from fsl_med.errors import ConfigError
from fsl_med.evaluation.metrics import VolumeResult, confusion_counts, hd95, summarize
from fsl_med.models.prediction import ItemPrediction
from fsl_med.prepare.datasets import scan_sort_key
from fsl_med.ranks import gather_objects
from fsl_med.refine.base import Refinement


def dice_metric_name(stage: str, variant: str, first: bool) -> str:
    """Name of a logged mean Dice: ``<stage>/dice`` for the first variant, ``<stage>/dice_<variant>`` otherwise."""
    return f"{stage}/dice" if first else f"{stage}/dice_{variant}"


def logged_dice_metrics(cfg: DictConfig) -> set[str]:
    """The mean-Dice metric names a run of ``cfg`` logs (``fsl-med run``: validation, then test)."""
    variants = list(cfg.eval.variants)
    return {"val/dice"} | {dice_metric_name("test", v, j == 0) for j, v in enumerate(variants)}


class Scoring(L.Callback):
    """Scores every item's variants against its ground truth and logs the mean Dice.

    Args:
        variants: the test variants to score, in report order (the first is logged as ``test/dice``); ``None``
            scores every variant the record holds, in the order they were made. Validation always scores
            ``plain`` only (checkpoint selection by ``val/dice``).
        hd95: compute HD95 (mm, MONAI) of test variants.

    After a validation or test epoch, :attr:`results` ``[stage]`` holds the gathered :class:`VolumeResult` rows
    of all ranks, sorted by organ, query scan and variant; :meth:`summaries` gives the per-variant summaries.
    Every refinement callback must come before this one in the trainer's callbacks (checked when the stage
    starts).
    """

    def __init__(self, variants: list[str] | None = None, hd95: bool = True) -> None:
        self.variants = list(variants) if variants is not None else None
        self.hd95 = hd95
        self.results: dict[str, list[VolumeResult]] = {"val": [], "test": []}
        self._rows: dict[str, list[VolumeResult]] = {"val": [], "test": []}
        self._order: dict[str, list[str]] = {"val": ["plain"], "test": list(variants or [])}

    # -- set-up checks -----------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Refuse a refinement listed after this callback (it would run after scoring and never be scored)."""
        cbs = list(trainer.callbacks)
        me = cbs.index(self) if self in cbs else -1
        late = [c for c in cbs[me + 1:] if isinstance(c, Refinement)]
        if me >= 0 and late:
            raise ConfigError(f"refinement callback(s) {', '.join(repr(c) for c in late)} come after Scoring in the "
                              "trainer's callbacks and would never be scored: list every refinement before Scoring")

    def volumes_scored(self, stage: str) -> int:
        """(organ, query volume) pairs scored so far in the running ``stage`` on this process."""
        return len({(r.organ, r.query_id) for r in self._rows[stage]})

    def variant_order(self, stage: str) -> list[str]:
        """The variants scored in ``stage``, in report order."""
        return list(self._order[stage])

    # -- per item ----------------------------------------------------------------------------------------------
    def _score(self, record: Any, stage: str) -> None:
        if not isinstance(record, ItemPrediction):
            return
        item = record.item
        if stage == "val":
            wanted = ["plain"]
        elif self.variants is not None:
            wanted = self.variants
        else:
            wanted = list(record.variants)
            self._order[stage] = list(dict.fromkeys([*self._order[stage], *wanted]))
        for v in wanted:
            p = record.variants.get(v)
            if p is None:
                raise ConfigError(f"variant '{v}' was not produced for {item.organ} scan {item.query_id} (have: "
                                  f"{', '.join(record.variants)}): add its refinement callback before Scoring")
            h = hd95(p.pred, item.query_labels, item.spacing) if (self.hd95 and stage == "test") else float("nan")
            self._rows[stage].append(VolumeResult(item.organ, item.query_id, confusion_counts(p.pred, item.query_labels),
                                                  len(item.z), p.seconds, v, h))

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._rows["val"] = []

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._rows["test"] = []
        if self.variants is None:
            self._order["test"] = []

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        self._score(outputs, "val")

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self._score(outputs, "test")

    # -- per epoch -------------------------------------------------------------------------------------------
    def _epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # every rank scored a shard of the items: gather TP/FP/FN (and HD95, timings) before any ratio
        gathered = gather_objects(trainer, (self._rows[stage], self._order[stage]))
        if self.variants is None and stage == "test":
            self._order[stage] = list(dict.fromkeys(v for _, order in gathered for v in order))
        order = self._order[stage]
        rows = [r for g, _ in gathered for r in g]
        rank = {v: VARIANTS.index(v) if v in VARIANTS else len(VARIANTS) + i for i, v in enumerate(order)}
        self.results[stage] = sorted(rows, key=lambda r: (r.organ, scan_sort_key(r.query_id), rank[r.variant]))
        self._rows[stage] = []
        if not rows:
            return
        organs = list(dict.fromkeys(r.organ for r in self.results[stage]))
        metrics: dict[str, float] = {}
        for j, v in enumerate(order):
            summary = summarize(self.results[stage], organs, variant=v)
            key = dice_metric_name(stage, v, first=j == 0)
            metrics[key] = summary["dice_mean"]
            metrics.update({f"{key}_{o}": d for o, d in summary["dice"].items()})
        pl_module.log_dict(metrics, prog_bar=stage == "val", sync_dist=True)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_end(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_end(trainer, pl_module, "test")

    def summaries(self, organs: list[str], stage: str = "test") -> dict[str, dict[str, Any]]:
        """Variant -> :func:`~fsl_med.evaluation.metrics.summarize` of the last ``stage`` epoch, in report order."""
        return {v: summarize(self.results[stage], organs, variant=v) for v in self._order[stage]}
