"""Results tables: JSON, CSV and Markdown in the run folder, each written atomically."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from fsl_med import atomic
from fsl_med.evaluation.metrics import VolumeResult

ORGAN_TITLES = {"liver": "Liver", "right_kidney": "Right kidney", "left_kidney": "Left kidney", "spleen": "Spleen"}


def _fmt(v: float | None) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


def dice_table(columns: dict[str, dict[str, Any]], organs: list[str]) -> str:
    """A Markdown table with one row per organ plus the mean, one column per result set.

    Args:
        columns: column title -> a summary (``{"dice": {organ: %}, "dice_mean": %}``).
        organs: row order.
    """
    titles = list(columns)
    lines = ["| Organ | " + " | ".join(titles) + " |", "|---|" + "---:|" * len(titles)]
    for o in organs:
        lines.append(f"| {ORGAN_TITLES.get(o, o)} | " + " | ".join(_fmt(columns[t]["dice"].get(o)) for t in titles) + " |")
    lines.append("| **Mean** | " + " | ".join(f"**{_fmt(columns[t]['dice_mean'])}**" for t in titles) + " |")
    return "\n".join(lines)


def build_results(summary: dict[str, Any], volumes: list[VolumeResult], skipped: list[tuple[str, str]],
                  meta: dict[str, Any]) -> dict[str, Any]:
    """The ``results.json`` document: summary, per-volume rows, skipped (scan, organ) pairs and run facts."""
    secs = [v.seconds for v in volumes]
    return {
        **summary,
        "seconds_per_volume": (sum(secs) / len(secs)) if secs else None,
        "volumes": [
            {"organ": v.organ, "query": v.query_id, "dice": 100.0 * v.dice, "tp": v.counts.tp, "fp": v.counts.fp,
             "fn": v.counts.fn, "slices": v.n_slices, "seconds": v.seconds}
            for v in volumes
        ],
        "skipped": [{"query": q, "organ": o, "reason": "organ absent from the query scan"} for q, o in skipped],
        **meta,
    }


def write_results(run_dir: Path, results: dict[str, Any], organs: list[str]) -> Path:
    """Write ``results.json``, ``results.csv`` (one row per organ + mean) and ``results.md``.

    Returns:
        The path of ``results.json``.
    """
    run_dir = Path(run_dir)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["organ", "dice", "dice_std", "n_volumes"])
    for o in organs:
        if o in results["dice"]:
            w.writerow([o, f"{results['dice'][o]:.4f}", f"{results['dice_std'][o]:.4f}", results["n_volumes"][o]])
    w.writerow(["mean", f"{results['dice_mean']:.4f}", "", sum(results["n_volumes"].values())])
    atomic.write_text(run_dir / "results.csv", buf.getvalue())

    enc = results.get("encoder", {})
    md = [
        f"# Results: {results.get('name', '')}",
        "",
        f"Dataset `{results.get('dataset')}`, fold {results.get('fold')}, setting {results.get('setting')}, "
        f"seed {results.get('seed')}. Encoder `{enc.get('name')}` (weights `{enc.get('weights')}`, "
        f"fine-tuning `{enc.get('finetune')}`), checkpoint `{results.get('checkpoint')}`, "
        f"trained steps {results.get('global_step')}.",
        "",
        "Dice (%), 3D per query volume, mean over volumes:",
        "",
        dice_table({"Dice": results}, organs),
        "",
    ]
    if results.get("seconds_per_volume") is not None:
        md.append(f"Seconds per query volume: {results['seconds_per_volume']:.2f}")
    if results["skipped"]:
        md.append("")
        md.append("Skipped (organ absent from the query scan): "
                  + ", ".join(f"{s['query']}/{s['organ']}" for s in results["skipped"]))
    atomic.write_text(run_dir / "results.md", "\n".join(md) + "\n")
    return atomic.write_json(run_dir / "results.json", results)
