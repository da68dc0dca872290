"""The ``train`` verb: build data and model from the config, fit, write the run folder."""

from __future__ import annotations

import logging
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig

from fsl_med import atomic, interrupts
from fsl_med.checkpoints import adopt_checkpoint, resolve_ckpt
from fsl_med.config import to_container
from fsl_med.data.datamodule import FewShotDataModule
from fsl_med.errors import ConfigError, TrainingDiverged
from fsl_med.measure import sync
from fsl_med.models.module import FewShotModule, has_trainable_parameters
from fsl_med.prepare.datasets import excluded_labels
from fsl_med.runs import (
    RunFolder,
    check_output_location,
    check_trainer_settings,
    discard_run_dir,
    make_trainer,
)

log = logging.getLogger(__name__)


class StepTimer(Callback):
    """Wall-clock seconds of each training batch (data wait excluded), for the run summary.

    ``synchronize=True`` (what ``bench`` and ``gpu-check`` ask for) synchronises the device at the start and end of
    each batch, so a time on CUDA is the batch's kernels, not their launch. Without it (ordinary training: a
    synchronisation after every step stalls the host's queueing of the next one) the times are host-side:
    accurate on the CPU; on CUDA they end when the host has queued the step (it waits within the step where a
    value is read, e.g. the loss's finiteness check), and a step's unfinished kernels land in the next step's time
    or gap. ``gaps`` holds the seconds from the end of one batch to the start of the next:
    the wait for the DataLoader plus the loop's own work between batches (logging, checkpoint callbacks).

    With ``log_every > 0`` it also logs a progress line every ``log_every`` steps (used when there is
    no terminal for a progress bar, e.g. batch jobs and CI logs).
    """

    def __init__(self, log_every: int = 0, synchronize: bool = False) -> None:
        self.times: list[float] = []
        self.gaps: list[float] = []
        self._t0 = 0.0
        self._t_end: float | None = None
        self.log_every = log_every
        self.synchronize = synchronize

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.synchronize:
            sync(pl_module.device)
        self._t0 = time.perf_counter()
        if self._t_end is not None:
            self.gaps.append(self._t0 - self._t_end)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.synchronize:
            sync(pl_module.device)
        self._t_end = time.perf_counter()
        self.times.append(self._t_end - self._t0)
        step = trainer.global_step
        if self.log_every and (step % self.log_every == 0 or step == trainer.max_steps):
            loss = trainer.callback_metrics.get("train/loss")
            log.info("step %d/%d  loss %s  %.3f s/step", step, trainer.max_steps,
                     f"{float(loss):.4f}" if loss is not None else "n/a", statistics.median(self.times[-self.log_every:]))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t_end = None  # validation or an epoch boundary lies between these batches: not a data wait

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t_end = None

    def median(self, skip: int = 3) -> float | None:
        """Median seconds per step after ``skip`` warm-up steps (None if no step ran)."""
        t = self.times[skip:] if len(self.times) > skip else self.times
        return statistics.median(t) if t else None


def _stopped_by_signal(trainer: L.Trainer | None, run_dir: Path | None, cfg: DictConfig,
                       sig: int) -> interrupts.Interrupted:
    """Save ``last.ckpt`` at the step reached (atomically), mark a W&B run failed (and preempted for SIGTERM),
    and return the :class:`Interrupted` whose message says what was saved and how to resume."""
    step = int(trainer.global_step) if trainer is not None else 0
    if trainer is not None:
        mark_logger_interrupted(trainer, sig)
    if step == 0 or run_dir is None:
        if run_dir is not None:
            discard_run_dir(run_dir)
        return interrupts.Interrupted(sig, "before the first training step; nothing was saved")
    last = run_dir / "checkpoints" / "last.ckpt"
    try:
        assert trainer is not None
        trainer.save_checkpoint(last)  # further signals are ignored while stopping: never cut off
    except Exception as e:  # noqa: BLE001 - report what is on disk instead
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        if last.is_file():
            return interrupts.Interrupted(sig, f"at step {step} of {cfg.trainer.max_steps}; saving {last} failed "
                                          f"({why}); it holds the last periodic checkpoint: resume=last continues "
                                          "from there")
        removed = discard_run_dir(run_dir)
        return interrupts.Interrupted(sig, f"at step {step} of {cfg.trainer.max_steps}; saving {last} failed ({why}) "
                                      f"and no earlier checkpoint exists{f' ({run_dir} was removed)' if removed else ''}")
    return interrupts.Interrupted(sig, f"at step {step} of {cfg.trainer.max_steps}: saved {last}; resume with the "
                                  "same command and resume=last")


def mark_logger_interrupted(trainer: L.Trainer, sig: int) -> None:
    """A W&B run of ``trainer`` is finished as failed (exit code ``128 + sig``) and, for SIGTERM, marked as
    preempting, so that W&B and sweep agents never record it as finished. Other loggers: nothing (Lightning
    has already finalised them with status ``failed``)."""
    import signal

    for lg in trainer.loggers:
        run = getattr(lg, "_experiment", None)
        if type(lg).__name__ != "WandbLogger" or run is None:
            continue
        try:
            if sig == signal.SIGTERM:
                run.mark_preempting()
            run.finish(exit_code=128 + sig)
        except Exception as e:  # noqa: BLE001 - the interruption is reported either way
            log.warning("could not mark the W&B run as interrupted: %s", e)


@dataclass(frozen=True)
class TrainResult:
    """What a training run produced."""

    run_dir: Path
    last_ckpt: Path
    best_ckpt: Path | None
    seconds_per_step: float | None
    steps: int
    val_dice: float | None
    config: DictConfig | None = None  # the config trained with (a resumed run's data settings come from its checkpoint)
    module: FewShotModule | None = None  # the trained module (built from ``config`` unless one was given)


def resumed_config(cfg: DictConfig, explicit: list[str] | tuple[str, ...] = ()) -> tuple[DictConfig, Path | None]:
    """The config a run trains with and the checkpoint it resumes (``resume=`` or ``ckpt=``; None: a new run).
    Resuming continues the checkpoint's data: ``data.fold``, ``data.setting`` and ``data.test_organs`` come from it
    unless given in ``explicit`` (:func:`fsl_med.checkpoints.adopt_checkpoint`). :func:`train` builds its module from
    the returned config (so the module's stored config says what it trained on) unless one is given.

    Raises:
        WeightsError, ConfigError: the checkpoint is unreadable or its model differs from the config's.
    """
    resume = resolve_ckpt(cfg, "resume") or resolve_ckpt(cfg, "ckpt")
    if resume is None:
        return cfg, None
    return adopt_checkpoint(cfg, resume, explicit, resume=True).cfg, resume


def train(cfg: DictConfig, module: FewShotModule | None = None,
          explicit: list[str] | tuple[str, ...] = (), sync_timing: bool = False) -> TrainResult:
    """Train on self-supervised episodes of the configured fold.

    Args:
        cfg: validated run configuration. ``cfg.ckpt`` (a path or ``latest``) resumes that run's
            checkpoint (optimiser, scheduler and step included).
        module: an already built module to train (default: built from ``cfg``).
        explicit: the command line's ``key=value`` overrides: resuming takes ``data.fold``, ``data.setting`` and
            ``data.test_organs`` from the checkpoint unless given here.
        sync_timing: synchronise the device around every training step so that the median seconds per step
            (``seconds_per_step``, ``train_summary.json``) are the device's (what ``gpu-check`` asks for). Off by
            default: a synchronisation after every step costs throughput on CUDA, and without it the seconds per
            step are the host-side time (accurate on the CPU; see :class:`StepTimer`).
    Returns:
        A :class:`TrainResult` (run folder, checkpoints, median seconds per step).
    """
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    check_trainer_settings(cfg)
    check_output_location(cfg)
    if module is None and not has_trainable_parameters(cfg):  # before anything is written
        e = cfg.model.encoder
        raise ConfigError(f"model: nothing to train: the {cfg.model.head.name} head has no learnable parameter and "
                          f"model.encoder.finetune={e.finetune} with adapter {e.adapter}; use model.encoder.finetune="
                          "full or lora, a model.encoder.adapter, or a head with learnable parameters")
    cfg, resume = resumed_config(cfg, explicit)
    if resume is not None:
        log.info("resuming from %s", resume)
    excl = excluded_labels(cfg)
    dm = FewShotDataModule(cfg)
    with_val = bool(dm.resolve_split().val_ids)  # data.num_val_scans > 0 and enough training scans to hold them out
    if module is None:
        module = FewShotModule.from_config(cfg)
    # Lightning calls dm.prepare_data (superpixel files) and dm.setup (datasets; bad data fails there, before a run
    # folder exists); RunFolder then creates the folder on rank 0 and broadcasts it to every rank
    folder = RunFolder(cfg)
    log.info("setting %d, test organs %s, excluded training labels %s", cfg.data.setting, list(cfg.data.test_organs),
             excl or "none")
    interactive = sys.stderr.isatty()
    timer = StepTimer(log_every=0 if interactive and cfg.trainer.enable_progress_bar else cfg.trainer.log_every_n_steps,
                      synchronize=sync_timing)
    trainer: L.Trainer | None = None
    try:
        trainer = make_trainer(cfg, folder, with_val=with_val, extra_callbacks=[timer])
        with interrupts.deferred():  # SIGINT/SIGTERM: stop after the current step
            trainer.fit(module, datamodule=dm, ckpt_path=str(resume) if resume else None)
    except BaseException as exc:
        sig = interrupts.signal_of(exc)
        run_dir = folder.path
        if sig is None:
            removed = run_dir is not None and discard_run_dir(run_dir)  # a failed start leaves no empty folder
            if removed:
                log.info("removed %s (the run stopped before its first checkpoint)", run_dir)
            if isinstance(exc, TrainingDiverged):
                last = run_dir / "checkpoints" / "last.ckpt" if run_dir is not None else None
                kept = f"the last good checkpoint is {last} (untouched)" if last is not None and last.is_file() else \
                    "no checkpoint had been written" + (f"; {run_dir} was removed" if removed else "")
                raise TrainingDiverged(f"{exc}; {kept}") from None
            raise
        raise _stopped_by_signal(trainer, run_dir, cfg, sig) from None
    run_dir = folder.path
    assert run_dir is not None
    ckpt_cb = next((c for c in trainer.checkpoint_callbacks if getattr(c, "monitor", None) == "val/dice"), None)
    last = (run_dir / "checkpoints" / "last.ckpt").resolve()
    trainer.save_checkpoint(last)  # the final state, whatever step the last validation ran at
    best = Path(ckpt_cb.best_model_path).resolve() if ckpt_cb is not None and ckpt_cb.best_model_path else None
    val = trainer.callback_metrics.get("val/dice")
    result = TrainResult(run_dir, last, best, timer.median(), int(trainer.global_step),
                         float(val) if val is not None else None, cfg, module)
    if not trainer.is_global_zero:
        return result
    atomic.write_json(run_dir / "train_summary.json", {
        "steps": result.steps, "seconds_per_step_median": result.seconds_per_step,
        "last_ckpt": str(last), "best_ckpt": str(best) if best else None, "val_dice": result.val_dice,
        "seed": cfg.seed, "config": to_container(cfg),
        "trained_on": module.trained_on.to_dict() if module.trained_on is not None else None,
    })
    return result
