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


VARIANT_TITLES = {"plain": "plain", "cca": "+CCA", "ttt": "+TTT", "ttt_cca": "+TTT+CCA"}


def metric_table(columns: dict[str, dict[str, Any]], organs: list[str], metric: str = "dice",
                 std: dict[str, dict[str, float]] | None = None) -> str:
    """A Markdown table, one row per organ plus the mean, one column per result set.

    Args:
        columns: column title -> summary with ``{metric: {organ: value}, f"{metric}_mean": value}``.
        metric: ``dice`` (%) or ``hd95`` (mm).
        std: optional column title -> {organ: std} shown as ``mean ± std``.
    """
    titles = list(columns)

    def cell(t: str, o: str) -> str:
        v = columns[t][metric].get(o)
        if std and t in std and o in std[t] and v is not None:
            return f"{_fmt(v)} ± {_fmt(std[t][o])}"
        return _fmt(v)

    lines = ["| Organ | " + " | ".join(titles) + " |", "|---|" + "---:|" * len(titles)]
    for o in organs:
        lines.append(f"| {ORGAN_TITLES.get(o, o)} | " + " | ".join(cell(t, o) for t in titles) + " |")
    lines.append("| **Mean** | " + " | ".join(f"**{_fmt(columns[t][f'{metric}_mean'])}**" for t in titles) + " |")
    return "\n".join(lines)


def build_results(summary: dict[str, Any], volumes: list[VolumeResult], skipped: list[tuple[str, str, str]],
                  meta: dict[str, Any], variants: dict[str, dict[str, Any]] | None = None,
                  ttt_seconds_per_slice: float | None = None) -> dict[str, Any]:
    """The ``results.json`` document: the headline summary (first variant), every variant's summary,
    per-volume rows, skipped (scan, organ) pairs, TTT cost and run facts."""
    return {
        **summary,
        "variants": variants or {},
        "ttt_seconds_per_slice": ttt_seconds_per_slice,
        "volumes": [
            {"organ": v.organ, "query": v.query_id, "variant": v.variant, "dice": 100.0 * v.dice,
             "hd95": None if math.isnan(v.hd95) else v.hd95, "tp": v.counts.tp, "fp": v.counts.fp,
             "fn": v.counts.fn, "slices": v.n_slices, "seconds": v.seconds}
            for v in volumes
        ],
        "skipped": [{"query": q, "organ": o, "reason": reason} for q, o, reason in skipped],
        **meta,
    }


def provenance_line(results: dict[str, Any]) -> str:
    """How a table was produced: dataset, fold, setting, seed, encoder and weights, checkpoint, steps."""
    enc = results.get("encoder", {})
    return (f"Dataset `{results.get('dataset')}`, fold {results.get('fold')}, setting {results.get('setting')}, "
            f"seed {results.get('seed')}. Encoder `{enc.get('name')}` (weights `{enc.get('weights')}`, "
            f"fine-tuning `{enc.get('finetune')}`), checkpoint `{results.get('checkpoint')}`, "
            f"trained steps {results.get('global_step')}.")


def write_results(run_dir: Path, results: dict[str, Any], organs: list[str]) -> Path:
    """Write ``results.json``, ``results.csv`` (one row per variant and organ, plus means) and ``results.md``.

    Returns:
        The path of ``results.json``.
    """
    run_dir = Path(run_dir)
    variants = results.get("variants") or {"plain": results}
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["variant", "organ", "dice", "dice_std", "hd95_mm", "n_volumes", "seconds_per_volume"])
    for v, summ in variants.items():
        for o in organs:
            if o in summ["dice"]:
                w.writerow([v, o, f"{summ['dice'][o]:.4f}", f"{summ['dice_std'][o]:.4f}",
                            _fmt(summ.get("hd95", {}).get(o)), summ["n_volumes"][o], ""])
        w.writerow([v, "mean", f"{summ['dice_mean']:.4f}", "", _fmt(summ.get("hd95_mean")),
                    sum(summ["n_volumes"].values()), _fmt(summ.get("seconds_per_volume"))])
    atomic.write_text(run_dir / "results.csv", buf.getvalue())

    cols = {VARIANT_TITLES.get(v, v): summ for v, summ in variants.items()}
    md = [f"**{results['in_sample']}**", ""] if results.get("in_sample") else []
    md += [
        f"# Results: {results.get('name', '')}",
        "",
        provenance_line(results),
        "",
        "Dice (%), 3D per query volume, mean over volumes:",
        "",
        metric_table(cols, organs, "dice"),
        "",
    ]
    if any("hd95" in summ for summ in variants.values()):
        md += ["HD95 (mm), mean over volumes where it is defined:", "", metric_table(cols, organs, "hd95"), ""]
    secs = ", ".join(f"{t} {_fmt(summ.get('seconds_per_volume'))}" for t, summ in cols.items())
    md.append(f"Seconds per query volume: {secs}")
    if results.get("ttt_seconds_per_slice") is not None:
        md.append(f"TTT seconds per slice: {results['ttt_seconds_per_slice']:.3f}")
    if results["skipped"]:
        md.append("")
        md.append("Skipped, never scored: " + "; ".join(f"scan {s['query']} / {s['organ']}: {s['reason']}"
                                                       for s in results["skipped"]))
    atomic.write_text(run_dir / "results.md", "\n".join(md) + "\n")
    return atomic.write_json(run_dir / "results.json", results)
