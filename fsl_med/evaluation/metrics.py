"""Segmentation metrics: TP/FP/FN counts, 3D Dice per volume, per-organ and mean aggregation.

Dice of a volume is computed from TP/FP/FN summed over its evaluated slices (method.md §5), so counts
from several processes or batches can be added before the ratio is taken.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Counts:
    """Voxel counts of one prediction against its ground truth."""

    tp: int
    fp: int
    fn: int

    def __add__(self, other: Counts) -> Counts:
        return Counts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn)

    @property
    def dice(self) -> float:
        """2TP / (2TP + FP + FN); 1.0 when prediction and ground truth are both empty."""
        denom = 2 * self.tp + self.fp + self.fn
        return 1.0 if denom == 0 else 2.0 * self.tp / denom


def confusion_counts(pred: np.ndarray, gt: np.ndarray) -> Counts:
    """Counts of binary ``pred`` against binary ``gt`` (same shape, any number of dimensions).

    Raises:
        ValueError: the shapes differ.
    """
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground-truth shape {gt.shape}")
    p, g = pred.astype(bool), gt.astype(bool)
    tp = int(np.count_nonzero(p & g))
    return Counts(tp=tp, fp=int(np.count_nonzero(p)) - tp, fn=int(np.count_nonzero(g)) - tp)


@dataclass(frozen=True)
class VolumeResult:
    """Result of one query volume for one organ."""

    organ: str
    query_id: str
    counts: Counts
    n_slices: int
    seconds: float = 0.0

    @property
    def dice(self) -> float:
        """3D Dice of the volume."""
        return self.counts.dice


def summarize(results: list[VolumeResult], organs: list[str]) -> dict[str, object]:
    """Per-organ Dice (mean over volumes) and the mean over organs, in percent.

    Organs with no scored volume are omitted from ``dice`` and listed under ``organs_without_volumes``.
    Returns:
        ``{"dice": {organ: %}, "dice_std": {organ: %}, "dice_mean": %, "n_volumes": {organ: n},
        "organs_without_volumes": [...]}``.
    """
    by_organ: dict[str, list[float]] = defaultdict(list)
    for r in results:
        by_organ[r.organ].append(r.dice)
    dice = {o: 100.0 * float(np.mean(by_organ[o])) for o in organs if by_organ.get(o)}
    std = {o: 100.0 * float(np.std(by_organ[o])) for o in organs if by_organ.get(o)}
    return {
        "dice": dice,
        "dice_std": std,
        "dice_mean": float(np.mean(list(dice.values()))) if dice else float("nan"),
        "n_volumes": {o: len(by_organ.get(o, [])) for o in organs},
        "organs_without_volumes": [o for o in organs if not by_organ.get(o)],
    }
