"""The ``protocol`` verb: the benchmark protocol in one command (method.md §1.1, §5).

For every seed and fold of ``protocol``: Setting 1 trains one model per fold on all organs' data and
tests all four organs; Setting 2 trains one model per fold *and label group* (kidneys; liver + spleen)
with the test group's slices removed from training. Each trained model is evaluated once with every
variant in ``protocol.variants`` (plain, +CCA, +TTT, +TTT+CCA), so all variants share one checkpoint.
The report (Markdown, CSV, JSON, a bar chart and overlays) gives per-organ and mean Dice as mean ± std
over folds and seeds, HD95 in mm, seconds per volume and TTT seconds per slice, and states the encoder,
its weights, the steps and the seeds.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from fsl_med import __version__, atomic
from fsl_med.config import to_container
from fsl_med.evaluate import write_dice_bar
from fsl_med.evaluation.report import (
    ORGAN_TITLES,
    SETTING,
    VARIANT_TITLES,
    long_table,
    metric_table,
    variant_rows,
)
from fsl_med.evaluation.table import Table, text, write_report
from fsl_med.job_table import (
    TABLE,
    Outcome,
    drive,
    failed_jobs_section,
    log_report_to_wandb,
    open_report_folder,
    raise_if_failed,
)
from fsl_med.jobs import JobSpec
from fsl_med.prepare.datasets import get_dataset_info
from fsl_med.run_config import validate_run
from fsl_med.runs import check_output_location, check_trainer_settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    """One training run of the protocol."""

    seed: int
    fold: int
    setting: int
    organs: tuple[str, ...]

    @property
    def tag(self) -> str:
        """Short name, e.g. ``s2-f0-seed1234-kidneys``."""
        group = "" if self.setting == 1 else "-" + ("kidneys" if "left_kidney" in self.organs else "-".join(self.organs))
        return f"s{self.setting}-f{self.fold}-seed{self.seed}{group}"


def protocol_jobs(cfg: DictConfig) -> list[Job]:
    """The training runs ``cfg.protocol`` asks for, in order (seed, fold, setting, label group)."""
    info = get_dataset_info(cfg.data.dataset)
    jobs = []
    for seed in cfg.protocol.seeds:
        for fold in cfg.protocol.folds:
            for setting in cfg.protocol.settings:
                groups = [tuple(info.labels)] if setting == 1 else [tuple(g) for g in info.label_groups]
                jobs.extend(Job(int(seed), int(fold), int(setting), g) for g in groups)
    return jobs


def job_config(cfg: DictConfig, job: Job, out_dir: Path) -> DictConfig:
    """The run configuration of one job (a validated copy of ``cfg``)."""
    jcfg = cfg.copy()
    for key, value in (("seed", job.seed), ("data.fold", job.fold), ("data.setting", job.setting),
                       ("data.test_organs", list(job.organs)), ("eval.variants", list(cfg.protocol.variants)),
                       ("name", f"{cfg.name}-{job.tag}"), ("logging.output_dir", str(out_dir / "runs"))):
        OmegaConf.update(jcfg, key, value, merge=False)
    validate_run(jcfg)
    return jcfg


def aggregate(runs: list[dict[str, Any]], organs: list[str], variants: list[str]) -> dict[str, dict[str, Any]]:
    """Per variant: Dice mean/std over (fold, seed) per organ, HD95, seconds per volume (``runs``: :func:`run_jobs`
    entries of one setting)."""
    out: dict[str, dict[str, Any]] = {}
    for v in variants:
        dice: dict[str, list[float]] = {o: [] for o in organs}
        hd: dict[str, list[float]] = {o: [] for o in organs}
        secs: list[float] = []
        for r in runs:
            summ = r["results"]["variants"][v]
            for o, d in summ["dice"].items():
                dice[o].append(d)
                if summ["hd95"].get(o) is not None and np.isfinite(summ["hd95"][o]):
                    hd[o].append(summ["hd95"][o])
            secs.append(summ["seconds_per_volume"])
        d_mean = {o: float(np.mean(x)) for o, x in dice.items() if x}
        out[v] = {
            "dice": d_mean, "dice_std": {o: float(np.std(x)) for o, x in dice.items() if x},
            "dice_mean": float(np.mean(list(d_mean.values()))) if d_mean else float("nan"),
            "hd95": {o: float(np.mean(x)) for o, x in hd.items() if x},
            "hd95_mean": float(np.mean([np.mean(x) for x in hd.values() if x])) if any(hd.values()) else float("nan"),
            "seconds_per_volume": float(np.mean(secs)) if secs else float("nan"),
            "n_runs": {o: len(x) for o, x in dice.items()},
        }
    return out


def run_jobs(run_dir: Path, work: list[tuple[str, DictConfig]], cfg: DictConfig, verb: str,
             no_wait: bool = False) -> tuple[dict[str, dict[str, Any]], Outcome]:
    """Train and evaluate each ``(tag, job config)`` of ``work`` through ``cfg.protocol.launcher`` (one checkpoint per
    job, evaluated with every variant of its ``eval.variants``): the job loop of ``protocol`` and ``compare``.

    Returns:
        Per finished job's tag: ``tag``, ``train_dir``, ``results_path``, ``results`` (the ``results.json`` document)
        and ``seconds_per_step``; and the driver's :class:`~fsl_med.job_table.Outcome` (failed and pending jobs).

    Raises:
        Interrupted: with a detail naming what finished and how to resume (rerun the same command).
    """
    outcome = drive(run_dir, [JobSpec(tag, jcfg) for tag, jcfg in work], cfg, verb, no_wait=no_wait)
    runs = {tag: {"tag": tag, "train_dir": st["train_dir"], "results_path": st["results_path"],
                  "results": st["results"], "seconds_per_step": st["seconds_per_step"],
                  "slurm_job_id": st.get("slurm_job_id"), "requeues": int(st.get("requeues") or 0)}
            for tag, st in outcome.done.items()}
    return runs, outcome


def run_protocol(cfg: DictConfig, no_wait: bool = False) -> tuple[dict[str, Any] | None, Path]:
    """Train and evaluate every job of ``cfg.protocol`` and write the protocol report.

    Args:
        cfg: the validated config; ``protocol.launcher`` says where the jobs run.
        no_wait: ``slurm`` only: submit the jobs and return (rerun the same command to wait and aggregate).
    Returns:
        ``(report, path of protocol.json)``; the report folder is ``<output_dir>/<name>-protocol/version_N`` (a rerun
        continues it). With ``no_wait``: ``(None, path of jobs.json)``.
    Raises:
        JobsFailed: some jobs failed (the report of the others was written).
    """
    check_trainer_settings(cfg)
    check_output_location(cfg)
    jobs = protocol_jobs(cfg)
    # every job checked before the first trains
    run_dir, work = open_report_folder(cfg, "protocol",
                                       lambda d: [(job.tag, job_config(cfg, job, d)) for job in jobs])
    log.info("protocol: %d training runs (%s) -> %s", len(jobs), ", ".join(j.tag for j in jobs), run_dir)
    done, outcome = run_jobs(run_dir, work, cfg, "protocol", no_wait=no_wait)
    if no_wait:
        return None, run_dir / TABLE
    runs = [{"job": job, **done[job.tag]} for job in jobs if job.tag in done]
    variants = list(cfg.protocol.variants)
    organs = list(get_dataset_info(cfg.data.dataset).labels)
    settings = {}
    for s in cfg.protocol.settings:
        srun = [r for r in runs if r["job"].setting == s]
        if srun:
            settings[int(s)] = aggregate(srun, organs, variants)
    ttt = [r["results"]["ttt_seconds_per_slice"] for r in runs if r["results"].get("ttt_seconds_per_slice")]
    report = {
        "name": cfg.name, "dataset": cfg.data.dataset, "fsl_med_version": __version__,
        "encoder": {"name": cfg.model.encoder.name, "weights": cfg.model.encoder.weights,
                    "finetune": cfg.model.encoder.finetune},
        "steps": cfg.trainer.max_steps, "seeds": list(cfg.protocol.seeds), "folds": list(cfg.protocol.folds),
        "variants": variants, "ttt": to_container(cfg)["ttt"],
        "ttt_seconds_per_slice": float(np.mean(ttt)) if ttt else None,
        "seconds_per_step": float(np.mean([r["seconds_per_step"] for r in runs if r["seconds_per_step"]] or [np.nan])),
        "settings": settings,
        "runs": [{"tag": r["job"].tag, "seed": r["job"].seed, "fold": r["job"].fold, "setting": r["job"].setting,
                  "organs": list(r["job"].organs), "train_dir": r["train_dir"], "results": r["results_path"],
                  "slurm_job_id": r["slurm_job_id"], "requeues": r["requeues"],
                  "dice": {v: r["results"]["variants"][v]["dice"] for v in variants}} for r in runs],
        "requeues": sum(r["requeues"] for r in runs),
        "failed": [{"tag": t, "error": e} for t, e in outcome.failed.items()],
        "launcher": str(cfg.protocol.launcher),
        "config": to_container(cfg),
    }
    path = _write_report(run_dir, report, runs, organs, variants, failed_jobs_section(outcome))
    log_report_to_wandb(cfg, "protocol", path)
    raise_if_failed(outcome, "protocol", path)
    return report, path


def _write_report(run_dir: Path, report: dict[str, Any], runs: list[dict[str, Any]], organs: list[str],
                  variants: list[str], failed: list[str]) -> Path:
    rows: list[dict[str, Any]] = []
    md = [f"# Protocol report: {report['name']}", "",
          f"Dataset `{report['dataset']}`, folds {report['folds']}, seeds {report['seeds']}, "
          f"{report['steps']} training steps per run. Encoder `{report['encoder']['name']}` (weights "
          f"`{report['encoder']['weights']}`, fine-tuning `{report['encoder']['finetune']}`). "
          f"TTT: {report['ttt']['steps']} steps, lr {report['ttt']['lr']}, params `{report['ttt']['params']}`, "
          f"mode `{report['ttt']['mode']}`; CCA mode `{report['config']['eval']['cca_mode']}`. fsl_med {report['fsl_med_version']}.",
          ""]
    for s, agg in report["settings"].items():
        cols = {VARIANT_TITLES.get(v, v): agg[v] for v in variants}
        std = {VARIANT_TITLES.get(v, v): agg[v]["dice_std"] for v in variants}
        md += [f"## Setting {s}", "", "Dice (%), mean ± std over folds and seeds:", "",
               metric_table(cols, organs, "dice", std), "", "HD95 (mm):", "", metric_table(cols, organs, "hd95"), "",
               "Seconds per query volume: " + ", ".join(f"{t} {c['seconds_per_volume']:.2f}" for t, c in cols.items()),
               "", f"![Dice per organ and variant](dice_bar_setting{s}.png)", ""]
        rows += variant_rows({v: agg[v] for v in variants}, organs, setting=s)
        errors = {v: agg[v]["dice_std"] for v in variants}
        write_dice_bar(run_dir, agg, organs, errors, bar_name=f"dice_bar_setting{s}.png")
        first = [r for r in runs if r["job"].setting == s and r["job"].seed == report["seeds"][0]
                 and r["job"].fold == report["folds"][0]]
        for r in first:  # overlays of the first fold and seed
            src = Path(r["results_path"]).parent / "overlays"
            for png in sorted(src.glob("*.png")):
                with atomic.atomic_path(run_dir / "overlays" / f"setting{s}" / png.name) as tmp:
                    shutil.copyfile(png, tmp)
    if report["ttt_seconds_per_slice"] is not None:
        md.append(f"TTT seconds per slice: {report['ttt_seconds_per_slice']:.3f}")
    md.append(f"Training seconds per step: {report['seconds_per_step']:.3f}")
    md.append(f"Launcher `{report['launcher']}`" + (f"; SLURM requeues (preemption, time limit or SIGTERM; each resumed "
                                                     f"from its last.ckpt): {report['requeues']}"
                                                     if report["launcher"] == "slurm" else "") + ".")
    folders = Table((text("tag", "run"), text("train", "train folder"), text("results", "results")),
                    tuple({"tag": r["tag"], "train": f"`{r['train_dir']}`", "results": f"`{r['results']}`"}
                          for r in report["runs"]))
    md += ["", "## Runs", "", folders.markdown(), *failed]
    md += ["", "Overlays (first fold and seed): `overlays/setting<s>/`. Organ names: "
           + ", ".join(ORGAN_TITLES.get(o, o) for o in organs) + "."]
    table = long_table(rows, (SETTING,), n_title="n_runs")
    return write_report(run_dir, "protocol", md, table, report)
