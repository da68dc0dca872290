"""The ``ablate`` verb: a grid of model variants trained and evaluated, one report (method ablations).

Every row of ``ablation.runs`` is the base configuration plus its ``overrides`` (encoder, fine-tuning,
slice adapter, 3-slice input, k-shot, ...). A row is trained on the base config's fold, setting and seed
and evaluated with the evaluation variants (plain, +CCA, +TTT, +TTT+CCA), or, with ``reuse``, evaluates an
earlier row's checkpoint (evaluation-time changes such as ``shots``). A row whose model has no trainable
parameter (a frozen encoder without adapter: ALPNet has no learnable head) is evaluated untrained.

The report (``ablation.md``, ``ablation.csv``, ``ablation.json``, ``dice_bar.png``) follows the protocol
report: Dice per organ and mean, HD95, seconds per volume, the runs' folders, and the steps and seed used.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fsl_med import __version__
from fsl_med.config import apply_overrides, to_container
from fsl_med.errors import ConfigError
from fsl_med.evaluate import write_dice_bar
from fsl_med.evaluation.report import (
    ORGAN_TITLES,
    RUN,
    VARIANT_TITLES,
    long_table,
    metric_table,
    variant_rows,
)
from fsl_med.evaluation.table import Column, Table, text, write_report
from fsl_med.job_table import (
    TABLE,
    drive,
    failed_jobs_section,
    log_report_to_wandb,
    open_report_folder,
    raise_if_failed,
)
from fsl_med.jobs import JobSpec
from fsl_med.models.module import has_trainable_parameters
from fsl_med.run_config import validate_run
from fsl_med.runs import check_output_location, check_trainer_settings

log = logging.getLogger(__name__)


def run_configs(cfg: DictConfig, out_dir: Path) -> list[tuple[str, DictConfig, str | None]]:
    """``(name, validated run config, reused row)`` of every ablation row, in order.

    Raises:
        ConfigError: no rows, a missing or duplicate name, a ``reuse`` of an unknown or later row or of a row
            that itself reuses, a bad override (named with its row), or a reused checkpoint's model differing.
    """
    rows = cfg.ablation.runs
    if not rows:
        raise ConfigError("config key 'ablation.runs' is empty: list the variants to train and evaluate")
    seen: dict[str, DictConfig] = {}
    reused: dict[str, str | None] = {}
    out = []
    for i, row in enumerate(rows):
        if OmegaConf.is_missing(row, "name") or not row.name:
            raise ConfigError(f"config key 'ablation.runs[{i}].name' is not set")
        if row.name in seen:
            raise ConfigError(f"config key 'ablation.runs[{i}].name': duplicate run name '{row.name}'")
        base = cfg.copy()
        OmegaConf.update(base, "ablation.runs", [], merge=False)  # a run's own config lists no runs
        rcfg = apply_overrides(base, list(row.overrides), where=f"ablation.runs[{i}] ({row.name}) override")
        variants = list(row.variants) if row.variants is not None else list(cfg.ablation.variants)
        for key, value in (("eval.variants", variants), ("name", f"{cfg.name}-{row.name}"),
                           ("logging.output_dir", str(out_dir / "runs"))):
            OmegaConf.update(rcfg, key, value, merge=False)
        OmegaConf.resolve(rcfg)
        validate_run(rcfg)
        if row.reuse is not None:
            if row.reuse not in seen:
                raise ConfigError(f"config key 'ablation.runs[{i}].reuse': '{row.reuse}' is not an earlier run "
                                  f"(earlier: {', '.join(seen) or 'none'})")
            if reused[row.reuse] is not None:
                raise ConfigError(f"config key 'ablation.runs[{i}].reuse': '{row.reuse}' reuses a checkpoint itself")
            src = seen[row.reuse]
            for key in ("model", "data.three_slices"):
                if OmegaConf.select(src, key) != OmegaConf.select(rcfg, key):
                    raise ConfigError(f"config key 'ablation.runs[{i}].reuse': run '{row.name}' changes {key} of "
                                      f"'{row.reuse}', so its checkpoint does not fit; train it instead")
        seen[row.name] = rcfg
        reused[row.name] = row.reuse
        out.append((row.name, rcfg, row.reuse))
    return out


def _describe(rcfg: DictConfig) -> dict[str, Any]:
    enc = rcfg.model.encoder
    return {"encoder": enc.name, "weights": enc.weights,
            "finetune": f"lora r={enc.lora_rank}" if enc.finetune == "lora" else enc.finetune,
            "adapter": enc.adapter, "three_slices": bool(rcfg.data.three_slices), "shots": int(rcfg.shots),
            "shots_source": rcfg.eval.shots_source}


def run_ablation(cfg: DictConfig, no_wait: bool = False) -> tuple[dict[str, Any] | None, Path]:
    """Train (or reuse) and evaluate every row of ``cfg.ablation.runs`` and write the ablation report.

    Rows run as jobs through ``protocol.launcher`` (a ``reuse`` row starts when the row it reuses has finished).

    Returns:
        ``(report, path of ablation.json)``; the folder is ``<output_dir>/<name>-ablation/version_N`` (a rerun continues
        it). With ``no_wait`` (``slurm`` only): ``(None, path of jobs.json)``.
    Raises:
        JobsFailed: some rows failed (the report of the others was written).
    """
    check_trainer_settings(cfg)
    check_output_location(cfg)
    run_dir, rows = open_report_folder(cfg, "ablation", lambda d: run_configs(cfg, d))  # every row checked first
    log.info("ablation: %d runs (%s) -> %s", len(rows), ", ".join(n for n, _, _ in rows), run_dir)
    specs = []
    for i, (name, rcfg, reuse) in enumerate(rows):
        if reuse is not None:
            specs.append(JobSpec(name, rcfg, "eval_ckpt", reuse, tuple(cfg.ablation.runs[i].overrides or [])))
        elif has_trainable_parameters(rcfg):
            specs.append(JobSpec(name, rcfg))
        else:  # a frozen encoder without adapter (ALPNet has no learnable head): evaluated untrained
            specs.append(JobSpec(name, rcfg, "eval_untrained"))
    outcome = drive(run_dir, specs, cfg, "ablation", no_wait=no_wait)
    if no_wait:
        return None, run_dir / TABLE
    done: dict[str, dict[str, Any]] = {}
    for name, rcfg, reuse in rows:
        st = outcome.done.get(name)
        if st is None:
            continue
        done[name] = {"name": name, **_describe(rcfg), "reuse": reuse, "variants": list(rcfg.eval.variants),
                      **{k: st.get(k) for k in ("steps", "trained", "seconds_per_step", "train_dir", "checkpoint")},
                      "results_path": st["results_path"], "results": st["results"]}
    organs = list(cfg.data.test_organs)
    report = {
        "name": cfg.name, "dataset": cfg.data.dataset, "fold": cfg.data.fold, "setting": cfg.data.setting,
        "seed": cfg.seed, "fsl_med_version": __version__, "variants": list(cfg.ablation.variants),
        "ttt": to_container(cfg)["ttt"], "organs": organs,
        "runs": [{k: v for k, v in e.items() if k != "results"} | {
            "dice": {v: e["results"]["variants"][v]["dice"] for v in e["variants"]},
            "dice_mean": {v: e["results"]["variants"][v]["dice_mean"] for v in e["variants"]},
            "hd95_mean": {v: e["results"]["variants"][v].get("hd95_mean") for v in e["variants"]},
            "seconds_per_volume": {v: e["results"]["variants"][v]["seconds_per_volume"] for v in e["variants"]},
            "ttt_seconds_per_slice": e["results"].get("ttt_seconds_per_slice")} for e in done.values()],
        "failed": [{"tag": t, "error": e} for t, e in outcome.failed.items()],
        "launcher": str(cfg.protocol.launcher),
        "config": to_container(cfg),
    }
    path = _write_report(run_dir, report, done, organs, failed_jobs_section(outcome))
    log_report_to_wandb(cfg, "ablation", path)
    raise_if_failed(outcome, "ablation", path)
    return report, path


def _runs_table(runs: list[dict[str, Any]], variants: list[str]) -> Table:
    """One row per run: what it is, its steps, mean Dice per variant, seconds per step and per volume."""
    rows = []
    for r in runs:
        rows.append({
            "run": r["name"], "encoder": f"`{r['encoder']}`", "weights": f"`{r['weights']}`", "finetune": r["finetune"],
            "adapter": r["adapter"], "three_slices": "yes" if r["three_slices"] else "no",
            "shots": f"{r['shots']} ({r['shots_source']})" if r["shots"] > 1 else "1",
            "steps": f"{r['steps']}" + (f" (= {r['reuse']})" if r["reuse"] else "") + ("" if r["trained"] else " (untrained)"),
            **{f"dice_{v}": r["dice_mean"].get(v) for v in variants},
            "seconds_per_step": r["seconds_per_step"], "seconds_per_volume": r["seconds_per_volume"][r["variants"][0]],
        })
    cols = (text("run", "run"), text("encoder", "encoder"), text("weights", "weights"), text("finetune", "fine-tuning"),
            text("adapter", "adapter"), text("three_slices", "3-slice"), text("shots", "shots"),
            Column("steps", "steps", digits=None), *(Column(f"dice_{v}", VARIANT_TITLES.get(v, v)) for v in variants),
            Column("seconds_per_step", "s/step", digits=3), Column("seconds_per_volume", "s/volume"))
    return Table(cols, tuple(rows))


def _folders_table(runs: list[dict[str, Any]]) -> Table:
    """One row per run: TTT seconds per slice, its training folder and its results file."""
    rows = [{"run": r["name"], "ttt": r["ttt_seconds_per_slice"], "train": f"`{r['train_dir'] or '–'}`",
             "results": f"`{r['results_path']}`"} for r in runs]
    return Table((text("run", "run"), Column("ttt", "TTT s/slice", digits=3), text("train", "train folder"),
                  text("results", "results")), tuple(rows))


def _write_report(run_dir: Path, report: dict[str, Any], done: dict[str, dict[str, Any]], organs: list[str],
                  failed: list[str]) -> Path:
    variants = report["variants"]
    runs = report["runs"]
    t = report["ttt"]
    md = [f"# Ablation report: {report['name']}", "",
          f"Dataset `{report['dataset']}`, fold {report['fold']}, Setting {report['setting']}, seed {report['seed']}. "
          f"TTT: {t['steps']} steps, lr {t['lr']}, params `{t['params']}`, mode `{t['mode']}`; CCA mode "
          f"`{report['config']['eval']['cca_mode']}`. fsl_med {report['fsl_med_version']}. Every row trains its own "
          "model unless it names the run whose checkpoint it evaluates.", "",
          "## Mean Dice (%) per run and evaluation variant", "", _runs_table(runs, variants).markdown()]
    md += ["", "`–`: variant not evaluated for that run. s/volume: seconds per query volume and organ, plain "
           "prediction (TTT adds its own time; TTT seconds per slice are listed per run below).", ""]
    rows: list[dict[str, Any]] = []
    for v in variants:
        cols = {r["name"]: done[r["name"]]["results"]["variants"][v] for r in runs if v in r["variants"]}
        if not cols:
            continue
        md += [f"## {VARIANT_TITLES.get(v, v)}: Dice (%) per organ", "", metric_table(cols, organs, "dice"), "",
               "HD95 (mm):", "", metric_table(cols, organs, "hd95"), ""]
        for name, summ in cols.items():
            rows += variant_rows({v: summ}, organs, run=name)
    bars = {r["name"]: done[r["name"]]["results"]["variants"][variants[0]] for r in runs
            if variants[0] in r["variants"]}
    write_dice_bar(run_dir, bars, organs, None, bar_name="dice_bar.png")
    md += [f"![Dice per organ and run, {VARIANT_TITLES.get(variants[0], variants[0])}](dice_bar.png)", "",
           "## Runs", "", _folders_table(runs).markdown(), *failed]
    md += ["", "Organs: " + ", ".join(ORGAN_TITLES.get(o, o) for o in organs) + "."]
    return write_report(run_dir, "ablation", md, long_table(rows, (RUN,)), report)
