"""The ``compare`` verb: few-shot heads x encoders under one protocol, one report (issue 29 §4; docs "Methods":
Comparing heads in one command).

Every head of ``compare.heads`` with every encoder of ``compare.encoders`` (empty: ``model.encoder.name``) goes through
the ``protocol`` verb's jobs: the same folds, settings (Setting 2: one model per label group) and seeds, hence the same
training episodes (episode ``i`` is a function of ``(seed, i)``; no row may change the data, the seed or the
evaluation), each trained model evaluated with ``protocol.variants``. Each pair's configuration is loaded from the same
file and overrides with ``model.head.name`` and ``model.encoder.name`` set, so the head-dependent defaults
(``loss.ce_weights``, ``model.mask_pooling``) are each head's own unless the config sets them;
``compare.encoder_overrides`` then adds that encoder's settings (steps, lr, variants, weights, ...).

The report (``compare.md``, ``compare.csv``, ``compare.json``, ``compare_bar.png``) has one row per head x encoder and
columns Setting x variant (mean Dice over organs, mean ± std over folds and seeds), per-organ tables, seconds per
training step and per query volume, and a *reported* column holding only ``compare.reported`` numbers (each with its
source; never mixed with the re-runs). Its jobs run through ``protocol.launcher`` (inline, local processes or
SLURM jobs) from a job table, so a rerun of the same command continues an interrupted or partly failed comparison
(:mod:`fsl_med.job_table`).

Paper's protocol (issue 30 §5): a head named in ``compare.paper_protocol`` (head -> its preset, e.g.
``experiments/rpt_reference.yaml``) also runs as a twin row with that preset's protocol fields
(:data:`~fsl_med.config.PROTOCOL_KEYS`: episodes, Setting-2 exclusion, validation hold-out, support pick, parts,
scored slices) on top of the row's own configuration (same encoder, recipe and budget), so the main table shows how
much of a paper's number its protocol explains. A head x encoder pair the encoder cannot serve (a head needing a
feature map the encoder lacks, e.g. Q-Net's second scale on ``resnet101_deeplabv3``) is skipped with its reason in the
report.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from fsl_med import __version__
from fsl_med.config import PROTOCOL_KEYS, VARIANTS, apply_overrides, load_config, to_container
from fsl_med.errors import ConfigError
from fsl_med.evaluation.figures import dice_bar_chart
from fsl_med.evaluation.report import (
    ORGAN_TITLES,
    SETTING,
    VARIANT_TITLES,
    long_table,
    metric_table,
    variant_rows,
)
from fsl_med.evaluation.table import MISSING, Column, Table, text, write_report
from fsl_med.job_table import (
    TABLE,
    failed_jobs_section,
    log_report_to_wandb,
    open_report_folder,
    raise_if_failed,
)
from fsl_med.models.encoder_registry import get_encoder_spec, missing_maps
from fsl_med.models.heads import get_head_class
from fsl_med.models.module import has_trainable_parameters
from fsl_med.prepare.datasets import get_dataset_info
from fsl_med.protocol_run import aggregate, job_config, protocol_jobs, run_jobs
from fsl_med.run_config import load_run_config, validate_run
from fsl_med.runs import check_output_location, check_trainer_settings

log = logging.getLogger(__name__)

SHARED_KEYS = ("seed", "shots", "compat", "name", "ckpt", "resume", "resume_allow_other_data", "data", "eval",
               "protocol.folds", "protocol.settings", "protocol.seeds", "model.head.name", "model.encoder.name",
               "compare", "ablation", "logging")
"""Config keys every row of a comparison shares (what is compared, where it is written): an encoder override may not
set them, nor a section holding one."""
PER_ENCODER_EVAL_KEYS = ("eval.batch_size",)
"""``eval`` keys an encoder override may set: they change speed and memory, not the scores."""


@dataclass(frozen=True)
class Pair:
    """One row of the comparison: a head, an encoder, its validated configuration and its encoder overrides."""

    head: str
    encoder: str
    cfg: DictConfig
    overrides: tuple[str, ...]
    paper: str | None = None
    """The preset whose protocol this twin row runs (``compare.paper_protocol``); ``None``: fsl_med's protocol."""

    @property
    def label(self) -> str:
        """``head / encoder`` (+ `` (paper protocol)``)."""
        return f"{self.head} / {self.encoder}" + (" (paper protocol)" if self.paper else "")

    @property
    def slug(self) -> str:
        """``head-encoder[-paper]`` as one folder name (``timm:`` names have a colon)."""
        return re.sub(r"[^A-Za-z0-9._-]", "-", f"{self.head}-{self.encoder}" + ("-paper" if self.paper else ""))


def _encoder_key_error(key: str, err: ConfigError) -> ConfigError:
    """The encoder registry's one-line error (``model.encoder.name: unknown encoder ...``) for another config key."""
    return ConfigError(f"config key '{key}': {str(err).split(': ', 1)[-1]}")


def _shared_key(key: str) -> str | None:
    """The shared key (:data:`SHARED_KEYS`) that setting ``key`` would change, if any."""
    if key in PER_ENCODER_EVAL_KEYS:
        return None
    for fixed in SHARED_KEYS:
        if key == fixed or key.startswith(fixed + ".") or fixed.startswith(key + "."):
            return fixed
    return None


def _encoder_overrides(cfg: DictConfig, encoders: list[str]) -> dict[str, tuple[str, ...]]:
    """``compare.encoder_overrides`` checked: each key a registered encoder (one not compared is ignored), each item
    ``key=value`` on a key the rows do not share; returns encoder -> items for the compared encoders."""
    out: dict[str, tuple[str, ...]] = {}
    for enc, items in cfg.compare.encoder_overrides.items():
        try:
            get_encoder_spec(str(enc))
        except ConfigError as e:
            raise _encoder_key_error("compare.encoder_overrides", e) from None
        if enc not in encoders:
            log.info("compare.encoder_overrides[%s]: not compared (compare.encoders: %s), ignored", enc, encoders)
            continue
        where = f"compare.encoder_overrides[{enc}] override"
        apply_overrides(cfg, list(items), where=where)  # unknown keys, wrong types, malformed items
        for item in items:
            shared = _shared_key(item.split("=", 1)[0].strip())
            if shared is not None:
                raise ConfigError(f"{where} '{item}': changes {shared}, which every row of the comparison shares (data, "
                                  "seed, folds, settings, seeds, evaluation, output); set it for the whole comparison")
        out[str(enc)] = tuple(items)
    return out


def _check_trainable(pair: Pair) -> None:
    """A pair that has nothing to train (a frozen encoder without adapter and a head without learnable parameters,
    e.g. ALPNet or PANet on a frozen ViT) is refused: its training would stop with no parameter to optimise.
    (:func:`~fsl_med.models.module.has_trainable_parameters`: no memory, no weight file read)."""
    if not has_trainable_parameters(pair.cfg):
        e = pair.cfg.model.encoder
        raise ConfigError(f"compare: head '{pair.head}' with encoder '{pair.encoder}' has nothing to train "
                          f"(model.encoder.finetune={e.finetune}, adapter {e.adapter}, and the {pair.head} head has no "
                          "learnable parameter); use finetune full or lora or an adapter for this encoder "
                          "(compare.encoder_overrides), or leave the head out of compare.heads")


def _preset_path(path: str | Path | None, preset: str) -> Path:
    """``compare.paper_protocol``'s preset file: as given when it exists, else relative to the compare config's folder."""
    p = Path(preset).expanduser()
    if not p.is_absolute() and not p.is_file() and path is not None:
        p = Path(path).parent / preset
    return p


def _paper_twin(pair: Pair, path: str | Path | None, preset: str) -> Pair:
    """``pair`` under the protocol of ``preset`` (:data:`~fsl_med.config.PROTOCOL_KEYS` taken from the preset as it
    loads, defaults chain included), validated; ConfigError naming the preset when it does not load or the result
    does not validate."""
    file = _preset_path(path, preset)
    try:
        ref = load_config(file, [f"data.root={pair.cfg.data.root}"])
    except ConfigError as e:
        raise ConfigError(f"compare.paper_protocol.{pair.head}: {e}") from None
    cfg = pair.cfg.copy()
    for key in PROTOCOL_KEYS:
        value = OmegaConf.select(ref, key)
        value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
        OmegaConf.update(cfg, key, value, merge=isinstance(value, dict))  # a section merges; a list replaces
    twin = Pair(pair.head, pair.encoder, cfg, pair.overrides, paper=str(file))
    OmegaConf.update(cfg, "name", f"{pair.cfg.name}-paper", merge=False)
    try:
        validate_run(cfg)
    except ConfigError as e:
        raise ConfigError(f"compare.paper_protocol.{pair.head} ({file}): {e}") from None
    return twin


def compare_pairs(path: str | Path | None, overrides: list[str]) -> tuple[DictConfig, list[Pair]]:
    """The base configuration and every head x encoder row, each validated, then the paper-protocol twins
    (``compare.paper_protocol``); nothing is written. A pair whose encoder lacks a feature map its head needs is left
    out (logged; :func:`skipped_pairs` gives the reasons for the report).

    Raises:
        ConfigError: an unknown or duplicate head or encoder, an empty head list, a bad encoder override, a pair with
            nothing to train, a ``compare.reported`` entry without source (or otherwise invalid), a paper preset that
            does not load.
    """
    base = load_run_config(path, overrides)  # compare.heads and compare.reported are checked here (config.validate)
    encoders = [str(e) for e in base.compare.encoders] or [str(base.model.encoder.name)]
    for enc in encoders:
        try:
            get_encoder_spec(enc)
        except ConfigError as e:
            raise _encoder_key_error("compare.encoders", e) from None
    per_encoder = _encoder_overrides(base, encoders)
    pairs = []
    for head, enc in product(list(base.compare.heads), encoders):
        if skip_reason(head, enc):
            log.warning("compare: %s / %s skipped: %s", head, enc, skip_reason(head, enc))
            continue
        items = per_encoder.get(enc, ())
        try:  # the base config loaded, so what fails here is this head or this encoder's overrides
            pcfg = load_run_config(path, [*overrides, f"model.head.name={head}", f"model.encoder.name={enc}", *items])
        except ConfigError as e:
            over = f" with compare.encoder_overrides[{enc}]" if items else ""
            raise ConfigError(f"compare: head '{head}', encoder '{enc}'{over}: {e}") from None
        pair = Pair(head, enc, pcfg, items)
        OmegaConf.update(pair.cfg, "name", f"{base.name}-{pair.slug}", merge=False)
        check_trainer_settings(pair.cfg)
        _check_trainable(pair)
        pairs.append(pair)
    chosen = base.compare.paper_protocol_encoders
    paper_encoders = encoders if chosen is None else [str(e) for e in chosen]
    pairs += [_paper_twin(p, path, str(base.compare.paper_protocol[p.head])) for p in list(pairs)
              if p.head in base.compare.paper_protocol and p.encoder in paper_encoders]
    if not pairs:
        raise ConfigError("compare: no head x encoder pair can run (" + "; ".join(
            f"{h} / {e}: {skip_reason(h, e)}" for h, e in product(list(base.compare.heads), encoders)) + ")")
    return base, pairs


def skip_reason(head: str, encoder: str) -> str | None:
    """Why ``head`` cannot run on ``encoder`` (a feature map it requests that the encoder lacks), or ``None``."""
    missing = missing_maps(encoder, get_head_class(head).request)
    if not missing:
        return None
    return (f"the {head} head needs feature map(s) {', '.join(repr(m) for m in missing)}, which {encoder} does not "
            f"have (it has {', '.join(repr(m) for m in get_encoder_spec(encoder).maps)})")


def _row_facts(pair: Pair) -> dict[str, Any]:
    c = pair.cfg
    enc = c.model.encoder
    return {"head": pair.head, "encoder": pair.encoder, "weights": enc.weights,
            "finetune": f"lora r={enc.lora_rank}" if enc.finetune == "lora" else enc.finetune,
            "steps": int(c.trainer.max_steps), "optim": f"{c.optim.name} lr {c.optim.lr:g}",
            "ce_weights": list(c.loss.ce_weights), "mask_pooling": c.model.mask_pooling,
            "ttt_steps": int(c.ttt.steps), "ttt_mode": c.ttt.mode, "variants": list(c.protocol.variants),
            "encoder_overrides": list(pair.overrides)}


def _mean_std(runs: list[dict[str, Any]], variant: str, organs: list[str]) -> float:
    """Std over (fold, seed) of the organ mean of ``variant`` (Setting 2: both label groups' runs of a fold and seed)."""
    means = []
    for key in sorted({(r["job"].fold, r["job"].seed) for r in runs}):
        dice = {o: d for r in runs if (r["job"].fold, r["job"].seed) == key
                for o, d in r["results"]["variants"][variant]["dice"].items() if o in organs}
        if dice:
            means.append(float(np.mean(list(dice.values()))))
    return float(np.std(means)) if means else float("nan")


def _reported_cells(entries: list[dict[str, Any]], pairs: list[Pair]) -> dict[tuple[str, str, int], dict[str, Any]]:
    """(head, encoder, setting) -> the ``compare.reported`` entry shown there (``config.validate`` allows one)."""
    cells = {}
    for r in entries:
        for p in pairs:
            if p.head == r["head"] and r["encoder"] in (None, p.encoder):
                cells[(p.head, p.encoder, int(r["setting"]))] = r
    return cells


def run_compare(path: str | Path | None, overrides: list[str] | None = None,
                no_wait: bool = False) -> tuple[dict[str, Any] | None, Path]:
    """Train and evaluate every head x encoder through the protocol's jobs and write the comparison report.

    Args:
        path: the config file (an ``experiments/`` preset); overrides: ``key=value`` strings, as on the command line.
        no_wait: ``protocol.launcher=slurm`` only: submit the jobs and return (rerun to wait and aggregate).

    Returns:
        ``(report, path of compare.json)``; the folder is ``<output_dir>/<name>-compare/version_N`` (a rerun continues
        it), each run's training and evaluation folders under its ``runs/``. With ``no_wait``: ``(None, jobs.json)``.
    Raises:
        JobsFailed: some jobs failed (the report of the others was written).
    """
    base, pairs = compare_pairs(path, list(overrides or []))
    check_output_location(base)
    # every job of every pair checked before the first one trains
    run_dir, work = open_report_folder(base, "compare", lambda d: [
        (pair, job, job_config(pair.cfg, job, d)) for pair in pairs for job in protocol_jobs(pair.cfg)])
    log.info("compare: %d rows (%s) x %d jobs -> %s", len(pairs), ", ".join(p.label for p in pairs),
             len(protocol_jobs(base)), run_dir)
    done, outcome = run_jobs(run_dir, [(f"{p.slug}-{j.tag}", jcfg) for p, j, jcfg in work], base, "compare",
                             no_wait=no_wait)
    if no_wait:
        return None, run_dir / TABLE
    runs = [{"pair": p, "job": j, **done[f"{p.slug}-{j.tag}"]} for p, j, _ in work if f"{p.slug}-{j.tag}" in done]
    organs = list(get_dataset_info(base.data.dataset).labels)
    settings = [int(s) for s in base.protocol.settings]
    variants = [v for v in VARIANTS if any(v in p.cfg.protocol.variants for p in pairs)]
    reported = [dict(r) for r in to_container(base)["compare"]["reported"]]
    rows = []
    for p in pairs:
        pruns = [r for r in runs if r["pair"] is p]
        if len(pruns) < len(protocol_jobs(p.cfg)):  # a row with a failed job is listed under "Failed jobs" only
            continue
        pvars = list(p.cfg.protocol.variants)
        agg = {s: aggregate([r for r in pruns if r["job"].setting == s], organs, pvars) for s in settings}
        for s in settings:
            for v in pvars:
                agg[s][v]["dice_mean_std"] = _mean_std([r for r in pruns if r["job"].setting == s], v, organs)
        ttt = [r["results"]["ttt_seconds_per_slice"] for r in pruns if r["results"].get("ttt_seconds_per_slice")]
        rows.append({
            **_row_facts(p), "label": p.label, "paper_protocol": p.paper,
            "steps_trained": sorted({int(r["results"]["global_step"]) for r in pruns}),
            "seconds_per_step": float(np.mean([r["seconds_per_step"] for r in pruns if r["seconds_per_step"]] or [np.nan])),
            "seconds_per_volume": float(np.mean([r["results"]["variants"][pvars[0]]["seconds_per_volume"] for r in pruns])),
            "ttt_seconds_per_slice": float(np.mean(ttt)) if ttt else None,
            "settings": agg,
            "runs": [{"tag": f"{p.slug}-{r['job'].tag}", "seed": r["job"].seed, "fold": r["job"].fold,
                      "setting": r["job"].setting, "organs": list(r["job"].organs), "train_dir": r["train_dir"],
                      "results": r["results_path"],
                      "dice": {v: r["results"]["variants"][v]["dice"] for v in pvars}} for r in pruns],
        })
    encoders = [str(e) for e in base.compare.encoders] or [str(base.model.encoder.name)]
    report = {
        "name": base.name, "dataset": base.data.dataset, "fsl_med_version": __version__,
        "heads": list(base.compare.heads), "encoders": list(dict.fromkeys(p.encoder for p in pairs)),
        "skipped": [{"head": h, "encoder": e, "reason": skip_reason(h, e)}
                    for h, e in product(list(base.compare.heads), encoders) if skip_reason(h, e)],
        "paper_protocol_keys": list(PROTOCOL_KEYS),
        "folds": list(base.protocol.folds), "seeds": list(base.protocol.seeds), "settings": settings,
        "variants": variants, "organs": organs, "rows": rows,
        "reported": reported,
        "failed": [{"tag": t, "error": e} for t, e in outcome.failed.items()],
        "launcher": str(base.protocol.launcher),
        "config": to_container(base),
    }
    path = _write_report(run_dir, report, _reported_cells(reported, pairs), failed_jobs_section(outcome))
    log_report_to_wandb(base, "compare", path)
    raise_if_failed(outcome, "compare", path)
    return report, path


def _cell(agg: dict[str, Any], v: str) -> str:
    if v not in agg:
        return MISSING
    return f"{agg[v]['dice_mean']:.2f} ± {agg[v]['dice_mean_std']:.2f}"


def _paper_twin_row(report: dict[str, Any], row: dict[str, Any]) -> dict[str, Any] | None:
    """The paper-protocol twin of an fsl_med-protocol row (same head and encoder), if it ran."""
    return next((t for t in report["rows"] if t.get("paper_protocol") and t["head"] == row["head"]
                 and t["encoder"] == row["encoder"]), None)


def _main_table(report: dict[str, Any], cells: dict[tuple[str, str, int], dict[str, Any]]) -> Table:
    """Rows head x encoder (fsl_med's protocol); per setting one column per variant (mean Dice ± std), the paper's
    protocol column (the twin row's first variant) when any head has one, and the *reported* column."""
    cols: list[Column] = [text("head", "head"), text("encoder", "encoder"), text("weights", "weights"),
                          Column("steps", "steps", digits=None)]
    out = []
    any_paper = any(r.get("paper_protocol") for r in report["rows"])
    for r in report["rows"]:
        if r.get("paper_protocol"):
            continue
        twin = _paper_twin_row(report, r)
        row: dict[str, Any] = {"head": r["head"], "encoder": f"`{r['encoder']}`", "weights": f"`{r['weights']}`",
                               "steps": r["steps"], "seconds_per_step": r["seconds_per_step"],
                               "seconds_per_volume": r["seconds_per_volume"]}
        for s in report["settings"]:
            for v in report["variants"]:
                row[f"s{s}_{v}"] = _cell(r["settings"][s], v)
            rep = cells.get((r["head"], r["encoder"], s))
            row[f"s{s}_reported"] = f"*{rep['dice']:.2f}*" if rep else MISSING
            if any_paper:
                tv = twin["variants"][0] if twin else None
                row[f"s{s}_paper"] = (f"{_cell(twin['settings'][s], tv)} ({VARIANT_TITLES.get(tv, tv)})"
                                      if twin else MISSING)
        out.append(row)
    for s in report["settings"]:
        cols += [text(f"s{s}_{v}", f"S{s} {VARIANT_TITLES.get(v, v)}") for v in report["variants"]]
        if any_paper:
            cols.append(text(f"s{s}_paper", f"S{s} paper's protocol"))
        cols.append(text(f"s{s}_reported", f"S{s} *reported by its paper*"))
    cols += [Column("seconds_per_step", "s/step", digits=3), Column("seconds_per_volume", "s/volume")]
    return Table(tuple(cols), tuple(out))


def _rows_table(report: dict[str, Any]) -> Table:
    """What each row ran: fine-tuning, optimiser, loss weights, pooling, TTT, variants, its encoder overrides."""
    rows = [{"row": r["label"], "finetune": r["finetune"], "optim": r["optim"], "steps": ", ".join(map(str, r["steps_trained"])),
             "ce": str(r["ce_weights"]), "pool": r["mask_pooling"], "ttt": f"{r['ttt_steps']} steps ({r['ttt_mode']})",
             "ttt_s": r["ttt_seconds_per_slice"], "variants": ", ".join(VARIANT_TITLES.get(v, v) for v in r["variants"]),
             "over": ", ".join(f"`{o}`" for o in r["encoder_overrides"]) or MISSING} for r in report["rows"]]
    return Table((text("row", "head / encoder"), text("finetune", "fine-tuning"), text("optim", "optimiser"),
                  text("steps", "steps trained"), text("ce", "loss.ce_weights"), text("pool", "mask pooling"),
                  text("ttt", "TTT"), Column("ttt_s", "TTT s/slice", digits=3), text("variants", "variants"),
                  text("over", "encoder overrides")), tuple(rows))


def _write_report(run_dir: Path, report: dict[str, Any], cells: dict[tuple[str, str, int], dict[str, Any]],
                  failed: list[str]) -> Path:
    organs, settings, variants = report["organs"], report["settings"], report["variants"]
    rows = report["rows"]
    md = [f"# Head comparison: {report['name']}", "",
          f"Dataset `{report['dataset']}`, folds {report['folds']}, seeds {report['seeds']}, Settings {settings}: every "
          "row is trained and evaluated on the same folds, settings (Setting 2: one model per label group) and seeds, "
          "so on the same training episodes (episode i is a function of the seed and i; see below) and the same EP1 "
          f"query and support slices; each trained model is evaluated with every variant of its row. fsl_med "
          f"{report['fsl_med_version']}.", "",
          "## Mean Dice (%) over organs, mean ± std over folds and seeds", "",
          _main_table(report, cells).markdown(), "",
          "s/step: training seconds per step (median of each run, mean over the row's runs); s/volume: seconds per "
          "query volume and organ, plain prediction (TTT adds its own time, per slice below)."]
    pools = sorted({r["mask_pooling"] for r in rows})
    md += ["", f"Training episodes: the same for every row (mask pooling {', '.join(pools)}). Episode i is a function "
           "of the seed and i; an episode whose augmented support mask vanishes on the feature grid is redrawn, and "
           "that check is `nearest`'s for every head with nearest or adjoint pooling (`bilinear` may redraw a few "
           "more)."]
    missing = [f"{r['label']}: {', '.join(VARIANT_TITLES.get(v, v) for v in variants if v not in r['variants'])} not "
               f"run (its protocol.variants is [{', '.join(r['variants'])}]"
               + (f", set by compare.encoder_overrides[{r['encoder']}])" if r["encoder_overrides"] else ")")
               for r in rows if set(variants) - set(r["variants"])]
    if missing:
        md += ["", "`–` in a re-run column: " + "; ".join(missing) + "."]
    md += ["", "*reported by its paper*: " + (
        "numbers from `compare.reported`, each with the source below, in italics; they are the papers' own runs "
        "(their protocol, encoder, weights and recipe), not re-run here, and never enter the re-run columns, the CSV "
        "or the chart." if report["reported"] else
        "none verified: `compare.reported` is empty, so the column is empty (docs \"Methods\": Comparing heads; "
        "the papers' tables have not been read from the PDFs yet; numbers recalled from memory are not filled in).")]
    papers = [r for r in rows if r.get("paper_protocol")]
    if papers:
        md += ["", "*paper's protocol*: the same head, encoder, recipe and budget trained and evaluated under its paper's "
               "protocol, the fields " + ", ".join(f"`{k}`" for k in report["paper_protocol_keys"]) + " taken from "
               + ", ".join(sorted({f"`{Path(r['paper_protocol']).name}` ({r['head']})" for r in papers}))
               + "; its first variant is shown (all variants in the per-organ tables, rows marked *(paper protocol)*). "
               "Its query scans, support scan and scored slices differ from fsl_med's (support pick, parts, organ-only "
               "slices), so the difference between the two columns is what the protocol alone changes."]
    md += ["", "Head and encoder pairs: a head reads the encoder's main feature map (C x h x w), Q-Net also a second "
           "scale and Q-Net and RPT a pooled vector; a pair whose encoder lacks a map its head needs is skipped, and a "
           "head without learnable parameters on a frozen encoder without adapter is refused before training."]
    if report.get("skipped"):
        md += ["", "Skipped pairs: " + "; ".join(f"{x['head']} / `{x['encoder']}`: {x['reason']}"
                                                 for x in report["skipped"]) + "."]
    long_rows: list[dict[str, Any]] = []
    for s in settings:
        for v in variants:
            cols = {r["label"]: r["settings"][s].get(v, {"dice": {}, "dice_mean": None}) for r in rows}
            std = {r["label"]: r["settings"][s][v]["dice_std"] for r in rows if v in r["settings"][s]}
            md += ["", f"## Setting {s}, {VARIANT_TITLES.get(v, v)}: Dice (%) per organ, mean ± std over folds and "
                   "seeds", "", metric_table(cols, organs, "dice", std)]
        for r in rows:
            for row in variant_rows(r["settings"][s], organs, head=r["head"], encoder=r["encoder"], setting=s):
                if row["organ"] == "mean":
                    row["dice_std"] = r["settings"][s][row["variant"]]["dice_mean_std"]
                long_rows.append(row)
    groups = {f"s{s}_{v}": f"S{s} {VARIANT_TITLES.get(v, v)}" for s in settings for v in variants}
    bars = {r["label"]: {"dice": {g: r["settings"][int(g[1])][g.split("_", 1)[1]]["dice_mean"] for g in groups
                                  if g.split("_", 1)[1] in r["settings"][int(g[1])]}} for r in rows}
    errors = {r["label"]: {g: r["settings"][int(g[1])][g.split("_", 1)[1]]["dice_mean_std"] for g in groups
                           if g.split("_", 1)[1] in r["settings"][int(g[1])]} for r in rows}
    dice_bar_chart(bars, list(groups), run_dir / "compare_bar.png", groups, errors)
    md += ["", "![Mean Dice per row, setting and variant (re-runs only)](compare_bar.png)", "",
           "## What each row ran", "", _rows_table(report).markdown()]
    if report["reported"]:
        src = Table((text("head", "head"), text("encoder", "encoder"), Column("setting", "setting", digits=None),
                     text("dice", "Dice %"), text("source", "source")),
                    tuple({"head": e["head"], "encoder": f"`{e['encoder']}`" if e["encoder"] else "any",
                           "setting": e["setting"], "dice": f"*{e['dice']:.2f}*", "source": e["source"]}
                          for e in report["reported"]))
        md += ["", "## Reported numbers (not re-run)", "", src.markdown()]
    folders = Table((text("tag", "run"), text("train", "train folder"), text("results", "results")),
                    tuple({"tag": x["tag"], "train": f"`{x['train_dir']}`", "results": f"`{x['results']}`"}
                          for r in rows for x in r["runs"]))
    md += ["", "## Runs", "", folders.markdown(), *failed, "",
           "Organs: " + ", ".join(ORGAN_TITLES.get(o, o) for o in organs) + "."]
    table = long_table(long_rows, (text("head", "head"), text("encoder", "encoder"), SETTING), n_title="n_runs")
    return write_report(run_dir, "compare", md, table, report)
