"""The report of a check: ``gpu-check.md`` (a headline, the environment, one table per section of rows, the
failures) and ``gpu-check.json`` (every figure). Which columns a row gets is fixed by its section
(:data:`SECTION_TABLES`)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fsl_med import atomic
from fsl_med.gpu_check.state import CheckState, Row


def headline(check: CheckState, counts: bool = True) -> str:
    """The report's first line: what ran where, and (``counts``) how many rows passed, failed, were skipped."""
    n = {s: sum(r.status.startswith(s) for r in check.rows) for s in ("ok", "FAILED", "skipped")}
    tally = f" {n['ok']} rows ok, {n['FAILED']} failed, {n['skipped']} skipped." if counts else ""
    if check.profile.name == "tiny":
        why = "No CUDA device" if not check.cuda else "--profile tiny"
        data = "phantom data" if check.phantom else "real data"
        return (f"{why}: tiny mode on {check.device} ({data}, tiny random-init ViT, {check.profile.steps} timed "
                f"steps); the figures exercise the code and are not benchmarks.{tally}")
    e = check.env
    gpu = f"{e.get('gpu')} ({e.get('gpu_memory_gib', 0):.0f} GiB)" if e else "CUDA"
    return f"GPU check on {gpu}, torch {torch.__version__}, CUDA {torch.version.cuda}.{tally}"


def to_json(check: CheckState) -> dict[str, Any]:
    """The content of ``gpu-check.json``: the headline, the settings and every row with its figures."""
    return {"headline": headline(check), "profile": check.profile.name, "device": check.device,
            "started": check.started, "seconds": time.monotonic() - check.t_start, "data": str(check.data),
            "fold0": check.split, "overrides": check.overrides,
            "bound_tflops": check.bound / 1e12 if check.bound else None, "rows": [r.__dict__ for r in check.rows]}


def write_report(check: CheckState) -> Path:
    """Write ``gpu-check.md`` and ``gpu-check.json`` (atomically); returns the Markdown path."""
    atomic.write_json(check.out / "gpu-check.json", jsonable(to_json(check)))
    return atomic.write_text(check.out / "gpu-check.md", render_markdown(check))


def jsonable(x: Any) -> Any:
    """``x`` as JSON can hold it: numpy numbers as Python ones, non-finite floats as ``None``, others as text."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, (str, int, bool)) or x is None:
        return x
    return str(x)


def _cell(v: Any, nd: int = 3) -> str:
    """A table cell: ``–`` for none, ``yes``/``**no**``, a float to ``nd`` decimals."""
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "**no**"
    if isinstance(v, float):
        return "–" if not math.isfinite(v) else f"{v:.{nd}f}"
    return str(v)


def _pct(v: Any) -> str:
    return "–" if not isinstance(v, float) else f"{100 * v:.1f} %"


def _fig(v: Any) -> str:
    """A figure in the ``figures`` column: dicts and lists inline, floats to 4 significant digits."""
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_fig(x)}" for k, x in v.items()) + "}"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return ",".join(str(x) for x in v)
    return _cell(v)


def _environment(check: CheckState) -> list[str]:
    """The environment table (the ``env`` row's figures); nothing before that row ran."""
    e = check.env
    if not e:
        return []
    lines = ["| environment | |", "|---|---|"]
    for k in ("gpu", "gpu_memory_gib", "multiprocessors", "compute_capability", "cuda_version", "cudnn",
              "bf16_supported", "tf32_matmul", "tf32_cudnn", "torch", "lightning", "timm", "python", "cpu",
              "cores", "torch_threads"):
        if k in e:
            lines.append(f"| {k} | {_cell(e[k], 1)} |")
    return lines + [f"| bf16 matmul {e['matmul_n']}³ (best of 10) | {e['bf16_matmul_tflops']:.2f} TFLOP/s "
                    f"(median {e['bf16_matmul_median_tflops']:.2f}) |",
                    f"| fp32 matmul {e['matmul_n']}³ (best of 5) | {e['fp32_matmul_tflops']:.2f} TFLOP/s |",
                    f"| bound (the faster of the two; denominator of every fraction) | {e['bound_tflops']:.2f} TFLOP/s |",
                    ""]


def _train_table(check: CheckState, rows: list[Row]) -> list[str]:
    """The training section: step time, throughput, FLOP-bound fraction, memory and the data pipeline."""
    lines = ["## Training (median after warm-up)", "",
             "| row | head | s/step | steps/s | episodes/s | GFLOP/step | of bound | peak GPU MB | first step s "
             "| wait between steps s | loader episodes/s (workers) | data keeps up | status |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        f = r.figures
        loader = (f"{_cell(f.get('loader_episodes_per_s'), 1)} ({f.get('loader_workers', '–')})"
                  if "loader_workers" in f else "–")
        keeps = _cell(f.get("data_keeps_up"))
        if f.get("data_keeps_up") is False:
            keeps += f" (needs ~{f.get('workers_needed')} workers)"
        mem = f.get("peak_gpu_mb")
        lines.append(f"| {r.title} | {_cell(f.get('head'))} | {_cell(f.get('seconds_per_step'), 4)} "
                     f"| {_cell(f.get('steps_per_s'), 2)} "
                     f"| {_cell(f.get('episodes_per_s'), 1)} | {_cell(f.get('gflop_per_step'), 1)} "
                     f"| {_pct(f.get('bound_fraction'))} | {_cell(mem, 0) if isinstance(mem, float) else (mem or '–')} "
                     f"| {_cell(f.get('first_step_seconds'), 2)} | {_cell(f.get('wait_seconds_per_step'), 4)} "
                     f"| {loader} | {keeps} | {r.status} |")
    lines.append("")
    return lines


def _heads_table(check: CheckState, rows: list[Row]) -> list[str]:
    """The few-shot heads section: each head's parameters, step time and its prediction."""
    lines = ["## Few-shot heads (every registered head, whatever the overrides name)", "",
             "| row | head | head parameters (values) | s/step | GFLOP/step | prediction s/slice | foreground "
             "| probability range | status |", "|---|---|---|---:|---:|---:|---:|---|---|"]
    for r in rows:
        f = r.figures
        params = ", ".join(f.get("head_parameters", [])) or "none"
        if f.get("head_values"):
            params += f" ({_fig(f['head_values'])})"
        prob = (f"[{_cell(f['predict_prob_min'])}, {_cell(f['predict_prob_max'])}]" if "predict_prob_min" in f
                else "–")
        predict = _cell(f.get("predict_seconds_per_slice"), 4)
        if f.get("refine_seconds_per_slice") is not None:  # Q-Net: its test-time refinement's part
            predict += f" (refinement {_cell(f['refine_seconds_per_slice'], 4)})"
        lines.append(f"| {r.title} | {_cell(f.get('head'))} | {params} | {_cell(f.get('seconds_per_step'), 4)} "
                     f"| {_cell(f.get('gflop_per_step'), 1)} | {predict} "
                     f"| {_pct(f.get('predict_foreground'))} | {prob} | {r.status} |")
    lines.append("")
    return lines


def _jobs_table(check: CheckState, rows: list[Row]) -> list[str]:
    """The concurrent-training section: one line per row and process count, then the suggested
    ``protocol.jobs_per_gpu`` of each row."""
    where = "one GPU" if check.cuda else "the CPU (tiny mode: not a benchmark)"
    mem = "peak GPU MB per process" if check.cuda else "peak RSS MB per process"
    lines = [f"## Concurrent training processes on {where} (`protocol.jobs_per_gpu`)", "",
             "Each process trains on its own (separate OS processes); the counts start together after their warm-up. "
             "Total episodes/s = (sum of batch x steps) / the wall time from the first start to the last end.", "",
             f"| row | head | processes | total episodes/s | speed-up vs 1 | episodes/s per process | {mem} "
             "| window s | status |", "|---|---|---:|---:|---:|---|---|---:|---|"]
    notes = []
    for r in rows:
        f = r.figures
        res = f.get("concurrent") or []
        if not res:
            lines.append(f"| {r.title} | {_cell(f.get('head'))} | – | – | – | – | – | – | {r.status} |")
            continue
        for i, c in enumerate(res):
            per = ", ".join(f"{x:.2f}" for x in c["per_process_episodes_per_s"])
            peak = c.get("peak_gpu_mb") if check.cuda else c.get("peak_rss_mb")
            peak = ", ".join(f"{x:.0f}" for x in peak) if isinstance(peak, list) else _cell(peak)
            best = " **(best)**" if c["jobs"] == f.get("best_jobs") else ""
            lines.append(f"| {r.title if i == 0 else ''} | {_cell(f.get('head')) if i == 0 else ''} | {c['jobs']}{best} "
                         f"| {_cell(c['episodes_per_s'], 2)} | {_cell(c['speedup'], 2)}× | {per} | {peak} "
                         f"| {_cell(c['window_s'], 2)} | {r.status if i == 0 else ''} |")
        if f.get("suggested_jobs_per_gpu") is not None:
            notes.append(f"- batch {f.get('batch')}: the most episodes/s with {f['suggested_jobs_per_gpu']} "
                         f"process(es) ({_cell(f['best_episodes_per_s'], 2)} episodes/s): "
                         f"`protocol.jobs_per_gpu={f['suggested_jobs_per_gpu']}`")
    lines.append("")
    if notes:
        lines += ["Suggested `protocol.jobs_per_gpu` (the count with the most total episodes/s):", "", *notes, ""]
    return lines


def _figures_table(heading: str) -> Callable[[CheckState, list[Row]], list[str]]:
    """A section whose rows list their figures in one column (evaluation, segment, DDP)."""
    def table(check: CheckState, rows: list[Row]) -> list[str]:
        lines = [heading, "", "| row | head | figures | seconds | status |", "|---|---|---|---:|---|"]
        for r in rows:
            figs = "; ".join(f"{k} {_fig(v)}" for k, v in r.figures.items() if k != "head" and v not in ([], {}))
            lines.append(f"| {r.title} | {_cell(r.figures.get('head'))} | {figs or '–'} | {_cell(r.seconds, 1)} "
                         f"| {r.status} |")
        lines.append("")
        return lines

    return table


SECTION_TABLES: dict[str, Callable[[CheckState, list[Row]], list[str]]] = {
    "train": _train_table,
    "heads": _heads_table,
    "jobs": _jobs_table,
    "eval": _figures_table("## Evaluation"),
    "segment": _figures_table("## Segment"),
    "ddp": _figures_table("## DDP"),
}
"""Each section's table, in the report's order (the ``env`` row's figures are the environment table instead)."""


def render_markdown(check: CheckState) -> str:
    """The report: headline, environment, then one table per section; failures with their messages."""
    lines = [f"# fsl_med GPU check: {headline(check)}", "", *_environment(check)]
    sp = check.split
    fold = (f", fold 0: query scans {', '.join(sp['query'])}, support {sp['support']}, training "
            f"{', '.join(sp['train'])}" if sp else "")
    lines += [f"Data: `{check.data}`{fold}. Config overrides: `{' '.join(check.overrides) or 'none'}`.", ""]
    for section, table in SECTION_TABLES.items():
        rows = [r for r in check.rows if r.section == section]
        if rows:
            lines += table(check, rows)
    failed = [r for r in check.rows if r.status.startswith("FAILED")]
    if failed:
        lines += ["## Failures", ""] + [f"- `{r.key}`: {r.status[len('FAILED: '):]}" for r in failed]
        lines += ["", "Tracebacks: `gpu-check.log`.", ""]
    return "\n".join(lines)
