"""The ``eval`` verb: EP1 evaluation of a checkpoint (or of the configured encoder) on the fold's queries."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
from omegaconf import DictConfig

from fsl_med import __version__, interrupts
from fsl_med.callbacks import find, refinements, test_time_callbacks
from fsl_med.checkpoints import adopt_checkpoint, module_from_checkpoint, resolve_ckpt
from fsl_med.config import to_container
from fsl_med.data.datamodule import FewShotDataModule
from fsl_med.evaluation.figures import dice_bar_chart
from fsl_med.evaluation.overlays import Overlays
from fsl_med.evaluation.predictions import PredictionWriter
from fsl_med.evaluation.report import ORGAN_TITLES, VARIANT_TITLES, build_results, write_results
from fsl_med.evaluation.scoring import Scoring
from fsl_med.models.module import FewShotModule
from fsl_med.refine.base import Refinement
from fsl_med.refine.ttt import TestTimeTraining
from fsl_med.runs import (
    RunFolder,
    check_output_location,
    check_trainer_settings,
    discard_run_dir,
    make_trainer,
)
from fsl_med.trained_on import in_sample_scans

log = logging.getLogger(__name__)


class EvalOutcome(NamedTuple):
    """What :func:`evaluate` returns: the ``results.json`` document, its path, and the overlay samples."""

    results: dict[str, Any]
    path: Path
    samples: list[dict[str, Any]]


def evaluate(cfg: DictConfig, module: FewShotModule | None = None, name_suffix: str = "-eval",
             global_step: int | None = None, explicit: list[str] | tuple[str, ...] = (),
             extra: list[Refinement] | tuple[Refinement, ...] = ()) -> EvalOutcome:
    """Evaluate with the EP1 protocol on the configured fold and write the results.

    Args:
        cfg: run configuration; ``cfg.ckpt`` names the checkpoint (a path, ``latest``, or unset to
            evaluate the encoder as configured, e.g. frozen official weights).
        module: evaluate this module instead of loading one.
        name_suffix: the run folder is ``<output_dir>/<name><suffix>/version_N``.
        global_step: trained steps of ``module`` (reported).
        explicit: the command line's ``key=value`` overrides. With a checkpoint every ``model.*`` setting comes
            from it (:func:`fsl_med.checkpoints.adopt_checkpoint_model`); an explicit one that contradicts it is an error.
            ``data.fold``, ``data.setting`` and ``data.test_organs`` come from it unless explicit
            (:func:`fsl_med.trained_on.adopt_checkpoint_data`).
        extra: refinement callbacks run after those of the config (scored after ``eval.variants``).
    Returns:
        ``(results, path of results.json, overlay samples)``; the test-time stage is the callbacks of
        :func:`fsl_med.callbacks.test_time_callbacks`.
    Raises:
        DataError: a query or support scan was trained or validated on by the checkpoint (or by ``module``), unless
            ``eval.allow_train_scans`` (then ``results["in_sample"]`` and the report's first line say so).
    """
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    check_trainer_settings(cfg)
    check_output_location(cfg)
    ckpt_path = None
    init_weights = cfg.model.encoder.weights
    trained = module.trained_on if module is not None else None
    source = "the trained model"
    if module is None:
        ckpt_path = resolve_ckpt(cfg)
        if ckpt_path is not None:
            cfg, ckpt, trained = adopt_checkpoint(cfg, ckpt_path, explicit)
            source = f"checkpoint {ckpt_path}"
            module, ckpt = module_from_checkpoint(ckpt_path, cfg, ckpt)
            global_step = int(ckpt.get("global_step", 0))
            init_weights = ckpt["hyper_parameters"]["config"]["model"]["encoder"]["weights"]
        else:
            module = FewShotModule.from_config(cfg)
            global_step = 0
    refs = refinements(cfg, extra)  # a bad eval.refinements entry fails before any folder is made
    dm = FewShotDataModule(cfg)
    in_sample = in_sample_scans(cfg, trained, dm, source)  # before any query volume is read
    # Lightning calls dm.setup("test") (no scorable query volume: a DataError before any folder exists), then
    # RunFolder creates the run folder on rank 0 and broadcasts it; the callbacks write into it
    folder = RunFolder(cfg, f"{cfg.name}{name_suffix}")
    callbacks = test_time_callbacks(cfg, True, refs=refs)
    scoring = find(callbacks, Scoring)[0]
    try:
        trainer = make_trainer(cfg, folder, with_val=False, extra_callbacks=callbacks)
        with interrupts.deferred():  # SIGINT/SIGTERM: stop after the current query volume
            trainer.test(module, datamodule=dm, verbose=False)
    except BaseException as exc:
        if folder.path is not None:
            discard_run_dir(folder.path)  # no results: no run folder left behind
        sig = interrupts.signal_of(exc)
        if sig is None:
            raise
        done = scoring.volumes_scored("test")
        total = len(dm.test_set.items) if dm.test_set is not None else 0
        raise interrupts.Interrupted(sig, f"after {done} of {total} query volumes; nothing was "
                                     "written (rerun the same command)") from None
    run_dir = folder.path
    assert run_dir is not None
    volumes = scoring.results["test"]
    organs = list(cfg.data.test_organs)
    variants = scoring.summaries(organs)
    summary = variants[scoring.variant_order("test")[0]]
    ttt = find(callbacks, TestTimeTraining)
    ttt_sps = ttt[0].seconds_per_slice if ttt else None
    overlays = find(callbacks, Overlays)[0]
    writers = find(callbacks, PredictionWriter)
    assert dm.split is not None
    meta = {
        "name": cfg.name,
        "dataset": cfg.data.dataset,
        "fold": cfg.data.fold,
        "setting": cfg.data.setting,
        "seed": cfg.seed,
        "support_scan": dm.split.support,
        "query_scans": list(dm.split.query),
        "checkpoint": str(ckpt_path) if ckpt_path else None,
        "global_step": global_step,
        "encoder": {"name": cfg.model.encoder.name, "weights": init_weights,
                    "finetune": cfg.model.encoder.finetune},
        "fsl_med_version": __version__,
        "config": to_container(cfg),
    }
    meta["trained_on"] = trained.to_dict() if trained is not None else None
    meta["ttt"] = to_container(cfg)["ttt"] if ttt_sps is not None else None
    meta["predictions"] = str(writers[0].dirpath) if writers else None
    meta["refine_seconds_per_slice"] = module.refine_seconds_per_slice  # a head's test-time refinement, or None
    results = build_results(summary, volumes, dm.skipped["test"], meta, variants=variants,
                            ttt_seconds_per_slice=ttt_sps)
    results = {"in_sample": in_sample, **results}  # the first key of results.json
    path = run_dir / "results.json"
    if trainer.is_global_zero:  # results were gathered from every rank; one process writes them
        try:
            figures = [write_dice_bar(run_dir, variants, organs), *overlays.written]
            path = write_results(run_dir, results, organs)
        except BaseException:
            discard_run_dir(run_dir)  # a write fault (full disk): no half-written run folder
            raise
        log_to_wandb(trainer.logger, variants, organs, figures, ttt_sps)
    return EvalOutcome(results, path, overlays.samples)


def log_to_wandb(logger: Any, variants: dict[str, dict[str, Any]], organs: list[str], figures: list[Path],
                 ttt_seconds_per_slice: float | None) -> None:
    """With ``logging.logger=wandb``: the results table (variant x organ Dice and HD95), the figures and the
    TTT cost, in the run that logged the metrics. Other loggers: nothing."""
    from lightning.pytorch.loggers import WandbLogger

    if not isinstance(logger, WandbLogger):
        return
    rows = [[v, o, s["dice"].get(o), s["hd95"].get(o)] for v, s in variants.items() for o in organs]
    rows += [[v, "mean", s["dice_mean"], s["hd95_mean"]] for v, s in variants.items()]
    logger.log_table(key="results", columns=["variant", "organ", "dice", "hd95_mm"], data=rows)
    logger.log_image(key="figures", images=[str(p) for p in figures], caption=[p.stem for p in figures])
    if ttt_seconds_per_slice is not None:
        logger.log_metrics({"test/ttt_seconds_per_slice": ttt_seconds_per_slice})


def write_dice_bar(run_dir: Path, variants: dict[str, dict[str, Any]], organs: list[str],
                   errors: dict[str, dict[str, float]] | None = None, bar_name: str = "dice_bar.png") -> Path:
    """``<run_dir>/<bar_name>``: Dice per organ and variant (or run), with optional error bars."""
    titled = {VARIANT_TITLES.get(v, v): s for v, s in variants.items()}
    err = {VARIANT_TITLES.get(v, v): e for v, e in errors.items()} if errors else None
    return dice_bar_chart(titled, organs, Path(run_dir) / bar_name, ORGAN_TITLES, err)
