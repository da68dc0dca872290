"""Segmentation metrics: TP/FP/FN counts, 3D Dice per volume, per-organ and mean aggregation.

Dice of a volume is computed from TP/FP/FN summed over its evaluated slices (method.md §5), so counts
from several processes or batches can be added before the ratio is taken.
"""

from __future__ import annotations

import warnings
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


def hd95(pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, ...]) -> float:
    """95th-percentile Hausdorff distance in mm between binary ``pred`` and ``gt`` (MONAI).

    Args:
        pred: ``[Z, H, W]`` binary prediction (the evaluated slices, in order).
        gt: ``[Z, H, W]`` binary ground truth, the same slices.
        spacing: voxel size ``(z, y, x)`` in mm.
    Returns:
        The distance, ``nan`` when either volume is empty (undefined; reported, never averaged as 0).
    """
    from monai.metrics import compute_hausdorff_distance

    p, g = np.asarray(pred) > 0, np.asarray(gt) > 0
    if not p.any() or not g.any():
        return float("nan")
    import torch

    with warnings.catch_warnings():  # MONAI 1.5+ deprecation notice from its own internals
        warnings.simplefilter("ignore", FutureWarning)
        d = compute_hausdorff_distance(torch.from_numpy(p)[None, None], torch.from_numpy(g)[None, None],
                                       include_background=True, percentile=95, spacing=list(spacing))
    return float(d.reshape(-1)[0])


@dataclass(frozen=True)
class VolumeResult:
    """Result of one query volume for one organ and one evaluation variant (plain, cca, ttt, ttt_cca)."""

    organ: str
    query_id: str
    counts: Counts
    n_slices: int
    seconds: float = 0.0
    variant: str = "plain"
    hd95: float = float("nan")

    @property
    def dice(self) -> float:
        """3D Dice of the volume."""
        return self.counts.dice


def mean_seconds(results: list[VolumeResult]) -> float:
    """Mean seconds per query volume of ``results`` (``nan`` when there is none): the summary's
    ``seconds_per_volume`` over all its volumes, and each organ's over that organ's volumes."""
    return float(np.mean([r.seconds for r in results])) if results else float("nan")


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def summarize(results: list[VolumeResult], organs: list[str], variant: str | None = None) -> dict[str, object]:
    """Per-organ Dice (mean over volumes) and the mean over organs, in percent; HD95 in mm; seconds.

    Args:
        results: volume results (of any variants).
        organs: the organs to report, in order.
        variant: only results of this variant (``None``: all results, which must be of one variant).
    Organs with no scored volume are omitted from ``dice`` and listed under ``organs_without_volumes``.
    HD95 averages the volumes where it is defined (``hd95_undefined`` counts the others).
    Returns:
        ``{"dice": {organ: %}, "dice_std": {organ: %}, "dice_mean": %, "hd95": {organ: mm}, "hd95_mean": mm,
        "hd95_undefined": {organ: n}, "seconds_per_volume": s, "seconds_per_volume_by_organ": {organ: s},
        "n_volumes": {organ: n}, "organs_without_volumes": [...]}``.
    """
    if variant is not None:
        results = [r for r in results if r.variant == variant]
    by_organ: dict[str, list[VolumeResult]] = defaultdict(list)
    for r in results:
        by_organ[r.organ].append(r)
    dice = {o: 100.0 * float(np.mean([r.dice for r in by_organ[o]])) for o in organs if by_organ.get(o)}
    std = {o: 100.0 * float(np.std([r.dice for r in by_organ[o]])) for o in organs if by_organ.get(o)}
    hd = {o: _nanmean([r.hd95 for r in by_organ[o]]) for o in organs if by_organ.get(o)}
    return {
        "dice": dice,
        "dice_std": std,
        "dice_mean": float(np.mean(list(dice.values()))) if dice else float("nan"),
        "hd95": hd,
        "hd95_mean": _nanmean(list(hd.values())),
        "hd95_undefined": {o: sum(not np.isfinite(r.hd95) for r in by_organ[o]) for o in organs if by_organ.get(o)},
        "seconds_per_volume": mean_seconds(results),
        "seconds_per_volume_by_organ": {o: mean_seconds(by_organ[o]) for o in organs if by_organ.get(o)},
        "n_volumes": {o: len(by_organ.get(o, [])) for o in organs},
        "organs_without_volumes": [o for o in organs if not by_organ.get(o)],
    }
