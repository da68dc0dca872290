"""Report figures (matplotlib, no display needed): Dice bar chart per organ and variant, and overlays.

Every figure is written atomically as PNG.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fsl_med.atomic import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def dice_bar_chart(summaries: dict[str, dict[str, Any]], organs: list[str], dest: str | Path,
                   titles: dict[str, str] | None = None, errors: dict[str, dict[str, float]] | None = None) -> Path:
    """Grouped bars: Dice (%) of each organ (groups) for each variant (bars), with optional error bars.

    Args:
        summaries: variant -> ``{"dice": {organ: %}}``.
        organs: group order; titles: organ -> display name; errors: variant -> {organ: std}.
    """
    plt = _pyplot()
    names = [(titles or {}).get(o, o) for o in organs]
    x = np.arange(len(organs))
    width = 0.8 / max(len(summaries), 1)
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(organs), 3.6), dpi=110)
    for j, (variant, summ) in enumerate(summaries.items()):
        vals = [summ["dice"].get(o, np.nan) for o in organs]
        err = [errors[variant].get(o, 0.0) for o in organs] if errors and variant in errors else None
        ax.bar(x + (j - (len(summaries) - 1) / 2) * width, vals, width, yerr=err, capsize=2, label=variant)
    ax.set_xticks(x, names)
    ax.set_ylabel("Dice (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8, ncols=min(4, len(summaries)))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    with atomic_path(dest, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(dest)


def _show(ax, image: np.ndarray, title: str) -> None:
    ax.imshow(image, cmap="gray", interpolation="nearest")
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def overlay_figure(sample: dict[str, Any], dest: str | Path, variant_titles: dict[str, str] | None = None) -> Path:
    """Support slice with its mask, and the query slice with ground truth and each variant's prediction.

    Args:
        sample: ``{"organ", "query", "z", "image", "label", "preds": {variant: [H, W]}, "support",
            "support_z", "support_image", "support_mask"}`` (arrays ``[H, W]``).
    """
    plt = _pyplot()
    preds = sample["preds"]
    fig, axes = plt.subplots(1, 2 + len(preds), figsize=(2.4 * (2 + len(preds)), 2.6), dpi=100)
    _show(axes[0], sample["support_image"], f"support {sample['support']} z={sample['support_z']}")
    axes[0].contour(sample["support_mask"], levels=[0.5], colors="yellow", linewidths=0.8)
    _show(axes[1], sample["image"], f"query {sample['query']} z={sample['z']}: ground truth")
    axes[1].contour(sample["label"], levels=[0.5], colors="lime", linewidths=0.8)
    for ax, (variant, pred) in zip(axes[2:], preds.items(), strict=True):
        _show(ax, sample["image"], (variant_titles or {}).get(variant, variant))
        if pred.any():
            ax.contour(pred, levels=[0.5], colors="red", linewidths=0.8)
        ax.contour(sample["label"], levels=[0.5], colors="lime", linewidths=0.5, alpha=0.6)
    fig.suptitle(f"{sample['organ']}: green ground truth, red prediction", fontsize=9)
    fig.tight_layout()
    with atomic_path(dest, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(dest)


def before_after_figure(pairs: list[tuple[dict[str, Any], dict[str, Any]]], dest: str | Path,
                        titles: tuple[str, str] = ("untrained", "trained"), variant: str = "plain",
                        organ_titles: dict[str, str] | None = None) -> Path:
    """One row per organ: the query slice with its ground truth, then the prediction of ``variant`` before and after
    (e.g. training), each over the ground truth, with the slice's Dice in the title.

    Args:
        pairs: ``(before, after)`` overlay samples (:func:`overlay_figure`'s ``sample``) of the same query slice.
        titles: the column titles of ``before`` and ``after``.
    Raises:
        ValueError: no pairs.
    """
    if not pairs:
        raise ValueError("before_after_figure needs at least one (before, after) pair")
    plt = _pyplot()
    fig, axes = plt.subplots(len(pairs), 3, figsize=(7.2, 2.5 * len(pairs)), dpi=100, squeeze=False)

    def dice(pred: np.ndarray, label: np.ndarray) -> float:
        inter, total = float(np.logical_and(pred, label).sum()), float(pred.sum() + label.sum())
        return 100.0 * 2 * inter / total if total else 100.0

    for row, (before, after) in zip(axes, pairs, strict=True):
        organ = (organ_titles or {}).get(before["organ"], before["organ"])
        _show(row[0], before["image"], f"{organ}: query {before['query']} z={before['z']}")
        row[0].contour(before["label"], levels=[0.5], colors="lime", linewidths=0.8)
        for ax, sample, title in ((row[1], before, titles[0]), (row[2], after, titles[1])):
            pred = sample["preds"][variant]
            _show(ax, sample["image"], f"{title}: slice Dice {dice(pred > 0, sample['label'] > 0):.0f}%")
            if pred.any():
                ax.contour(pred, levels=[0.5], colors="red", linewidths=0.8)
            ax.contour(sample["label"], levels=[0.5], colors="lime", linewidths=0.5, alpha=0.6)
    fig.suptitle("green ground truth, red prediction", fontsize=9)
    fig.tight_layout()
    with atomic_path(dest, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(dest)
