#!/usr/bin/env python3
"""Estimate the wall time of the full protocol (45 training runs: 5 folds x Setting 1 and two Setting-2 groups x 3
seeds, 100k steps each, plus their evaluations) on G GPUs, from measured figures. An ESTIMATE: it assumes every run
takes the same time, the jobs pack into waves of G x jobs_per_gpu, and the measured step time holds for 100k steps.

Inputs, either given or read from a `make gpu-check` report (gpu-check.json, on the GPU that will train):
  --seconds-per-step   one training step of the run's model (gpu-check: row train-large-bf16, ViT-L/14 LoRA bf16, b1)
  --jobs-per-gpu/--speedup  runs sharing one GPU and their total throughput over one run (gpu-check: row jobs-b1's
                        suggested_jobs_per_gpu and its speed-up); default 1 and 1.0
  --eval-seconds       evaluation of one run with every variant (plain, +CCA, +TTT, +TTT+CCA); default 0 (training only)

  python scripts/protocol-estimate.py --gpu-check lightning_logs/gpu-check/gpu-check.json --gpus 1 8
  python scripts/protocol-estimate.py --seconds-per-step 0.25 --jobs-per-gpu 2 --speedup 1.6 --gpus 1 8
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

RUNS, STEPS = 45, 100_000


def from_gpu_check(path: Path) -> dict[str, float]:
    """Step time and jobs-per-GPU figures of a gpu-check report (rows that did not run are left out)."""
    rows = {r["key"]: r for r in json.loads(path.read_text())["rows"]}
    out: dict[str, float] = {}
    train = rows.get("train-large-bf16", {})
    if train.get("status") == "ok":
        out["seconds_per_step"] = float(train["figures"]["seconds_per_step"])
    jobs = rows.get("jobs-b1", {})
    if jobs.get("status") == "ok" and jobs["figures"].get("suggested_jobs_per_gpu"):
        best = int(jobs["figures"]["suggested_jobs_per_gpu"])
        gain = next(c["speedup"] for c in jobs["figures"]["concurrent"] if c["jobs"] == best)
        out.update(jobs_per_gpu=best, speedup=float(gain))
    return out


def wall_seconds(gpus: int, seconds_per_step: float, jobs_per_gpu: int = 1, speedup: float = 1.0,
                 eval_seconds: float = 0.0, runs: int = RUNS, steps: int = STEPS) -> float:
    """Waves of ``gpus x jobs_per_gpu`` runs; a run sharing its GPU with ``jobs_per_gpu - 1`` others is slower by
    ``jobs_per_gpu / speedup``."""
    per_run = (steps * seconds_per_step + eval_seconds) * jobs_per_gpu / speedup
    return math.ceil(runs / (gpus * jobs_per_gpu)) * per_run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu-check", type=Path, help="gpu-check.json of the GPU that will train")
    p.add_argument("--seconds-per-step", type=float)
    p.add_argument("--jobs-per-gpu", type=int)
    p.add_argument("--speedup", type=float)
    p.add_argument("--eval-seconds", type=float, default=0.0)
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 8])
    p.add_argument("--runs", type=int, default=RUNS)
    p.add_argument("--steps", type=int, default=STEPS)
    a = p.parse_args(argv)
    fig = from_gpu_check(a.gpu_check) if a.gpu_check else {}
    sps = a.seconds_per_step if a.seconds_per_step is not None else fig.get("seconds_per_step")
    if sps is None or sps <= 0:
        print("protocol-estimate: error: no step time: give --seconds-per-step or a gpu-check.json whose "
              "train-large-bf16 row ran", file=sys.stderr)
        return 2
    jpg = a.jobs_per_gpu or int(fig.get("jobs_per_gpu", 1))
    gain = a.speedup or float(fig.get("speedup", 1.0))
    print(f"ESTIMATE of the full protocol ({a.runs} runs x {a.steps} steps): inputs {sps:.4f} s/step, "
          f"{jpg} run(s) per GPU at {gain:.2f}x one run's throughput, {a.eval_seconds:.0f} s evaluation per run")
    print("| GPUs | wall time (h) | days |")
    print("|---:|---:|---:|")
    for g in a.gpus:
        s = wall_seconds(g, sps, jpg, gain, a.eval_seconds, a.runs, a.steps)
        print(f"| {g} | {s / 3600:.1f} | {s / 86400:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
