"""The evaluation report: ``results.json``, ``results.csv`` and ``results.md`` (through :mod:`fsl_med.evaluation.table`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from fsl_med.evaluation.metrics import VolumeResult
from fsl_med.evaluation.table import MISSING, Column, Table, is_missing, text, write_report

ORGAN_TITLES = {"liver": "Liver", "right_kidney": "Right kidney", "left_kidney": "Left kidney", "spleen": "Spleen"}


VARIANT_TITLES = {"plain": "plain", "cca": "+CCA", "ttt": "+TTT", "ttt_cca": "+TTT+CCA"}

RUN = text("run", "run")
"""The first column of ``results.csv`` and ``ablation.csv``: the name of the run a row is of (``eval``: the run's
``name``; ``ablate``: the row's ``name`` in ``ablation.runs``)."""

SETTING = Column("setting", "setting", digits=None)
"""The first column of ``protocol.csv`` (and the third of ``compare.csv``): the benchmark setting (1 or 2) a row
aggregates over folds and seeds."""


def _fmt(v: float | None) -> str:
    return MISSING if is_missing(v) else f"{v:.2f}"


def organ_table(columns: dict[str, dict[str, Any]], organs: list[str], metric: str = "dice",
                std: dict[str, dict[str, float]] | None = None) -> Table:
    """One row per organ plus the (bold) mean, one column per result set.

    Args:
        columns: column title -> summary with ``{metric: {organ: value}, f"{metric}_mean": value}``.
        metric: ``dice`` (%) or ``hd95`` (mm).
        std: optional column title -> {organ: std} shown as ``mean ± std``.
    """
    titles = list(columns)
    keys = [f"c{i}" for i in range(len(titles))]

    def cell(key: str, t: str) -> Any:
        def show(row: dict[str, Any]) -> str:
            v, o = row.get(key), row["_organ"]
            if std and o is not None and t in std and o in std[t] and not is_missing(v):
                return f"{_fmt(v)} ± {_fmt(std[t][o])}"
            return _fmt(v)
        return show

    cols = (text("organ", "Organ"), *(Column(k, t, fmt=cell(k, t)) for k, t in zip(keys, titles, strict=True)))
    rows = [{"organ": ORGAN_TITLES.get(o, o), "_organ": o, **{k: columns[t][metric].get(o) for k, t in zip(keys, titles,
                                                                                                          strict=True)}}
            for o in organs]
    rows.append({"organ": "Mean", "_organ": None, **{k: columns[t][f"{metric}_mean"] for k, t in zip(keys, titles,
                                                                                                   strict=True)}})
    return Table(cols, tuple(rows), bold=(len(rows) - 1,))


def metric_table(columns: dict[str, dict[str, Any]], organs: list[str], metric: str = "dice",
                 std: dict[str, dict[str, float]] | None = None) -> str:
    """:func:`organ_table` as Markdown."""
    return organ_table(columns, organs, metric, std).markdown()


def variant_rows(variants: dict[str, dict[str, Any]], organs: list[str], **keys: Any) -> list[dict[str, Any]]:
    """Long-format rows (one per variant and organ, then the variant's mean) of per-variant summaries, each row
    also holding ``keys`` (e.g. ``run=...``).

    ``seconds_per_volume`` is the mean seconds per query volume: of the organ's volumes on an organ row (a summary's
    ``seconds_per_volume_by_organ``; empty for summaries without it, e.g. aggregates over runs), of all volumes on the
    mean row."""
    rows: list[dict[str, Any]] = []
    for v, summ in variants.items():
        for o in organs:
            if o in summ["dice"]:
                rows.append({**keys, "variant": v, "organ": o, "dice": summ["dice"][o],
                             "dice_std": summ.get("dice_std", {}).get(o), "hd95_mm": summ.get("hd95", {}).get(o),
                             "n": (summ.get("n_volumes") or summ.get("n_runs") or {}).get(o),
                             "seconds_per_volume": summ.get("seconds_per_volume_by_organ", {}).get(o)})
        n = summ.get("n_volumes") or summ.get("n_runs") or {}
        rows.append({**keys, "variant": v, "organ": "mean", "dice": summ["dice_mean"], "dice_std": None,
                     "hd95_mm": summ.get("hd95_mean"), "n": sum(n.values()) if "n_volumes" in summ else None,
                     "seconds_per_volume": summ.get("seconds_per_volume")})
    return rows


def long_table(rows: list[dict[str, Any]], first: tuple[Column, ...] = (), n_title: str = "n_volumes") -> Table:
    """The long-format results table (``first`` columns, then variant, organ, Dice, std, HD95, n, seconds)."""
    cols = (*first, text("variant", "variant"), text("organ", "organ"), Column("dice", "Dice %"),
            Column("dice_std", "Dice std"), Column("hd95_mm", "HD95 mm"), Column("n", n_title, digits=None),
            Column("seconds_per_volume", "s/volume"))
    return Table(cols, tuple(rows))


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
    """Write ``results.json``, ``results.csv`` (one row per variant and organ, plus means, each starting with the
    run's name: :data:`RUN`, as in ``ablation.csv``) and ``results.md``.

    Returns:
        The path of ``results.json``.
    """
    variants = results.get("variants") or {"plain": results}
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
    if results.get("refine_seconds_per_slice") is not None:
        md.append(f"Head's test-time refinement, seconds per query slice: {results['refine_seconds_per_slice']:.3f}")
    if results["skipped"]:
        md.append("")
        md.append("Skipped, never scored: " + "; ".join(f"scan {s['query']} / {s['organ']}: {s['reason']}"
                                                       for s in results["skipped"]))
    table = long_table(variant_rows(variants, organs, run=results.get("name")), (RUN,))
    return write_report(run_dir, "results", md, table, results)
