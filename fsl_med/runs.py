"""Run folders, loggers and the Lightning ``Trainer`` shared by the verbs.

Every run gets a new ``<output_dir>/<name>/version_N/`` folder (created atomically with ``mkdir``, so two
runs started together never share one) holding ``config.yaml``, ``checkpoints/`` and the logger's files.
Reading checkpoints and the checks of their compatibility are :mod:`fsl_med.checkpoints`; what a model was trained
on, and the refusals that guards, :mod:`fsl_med.trained_on`; the config a verb runs with, :mod:`fsl_med.run_config`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from fsl_med import atomic
from fsl_med.config import to_container, to_yaml
from fsl_med.errors import ConfigError, FilesystemError, FslMedError, os_reason
from fsl_med.evaluation.scoring import Scoring
from fsl_med.interrupts import pending, raise_pending, reclaim, set_pending
from fsl_med.ranks import is_rank_zero

log = logging.getLogger(__name__)

_VERSION_RE = re.compile(r"^version_(\d+)$")

# our run folder already holds config.yaml when the logger starts; the warnings below are expected
warnings.filterwarnings("ignore", message=".*exists and is not empty.*")
warnings.filterwarnings("ignore", message=".*overridden `transfer_batch_to_device`.*")
warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
# a machine with SLURM installed (a login node, the test cluster): a run outside a SLURM job is not a mistake
warnings.filterwarnings("ignore", message=".*`srun` command is available on your system but is not used.*")


def new_run_dir(output_dir: str | Path, name: str) -> Path:
    """Create and return the next free ``output_dir/name/version_N`` (never reuses an existing one).

    Raises:
        FslMedError: the output folder cannot be created or written.
    """
    base = Path(output_dir) / name
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FslMedError(f"cannot create output folder {base}: {e.strerror or e}") from e
    if not os.access(base, os.W_OK):
        raise FslMedError(f"output folder {base} is not writable (set logging.output_dir)")
    for _ in range(1000):
        existing = [int(m.group(1)) for p in base.iterdir() if (m := _VERSION_RE.match(p.name))]
        n = max(existing, default=-1) + 1
        run = base / f"version_{n}"
        try:
            run.mkdir()
            return run
        except FileExistsError:
            continue
        except OSError as e:
            raise FslMedError(f"cannot create run folder {run}: {e.strerror or e}") from e
    raise FslMedError(f"could not allocate a run folder under {base}")


class RunFolder(Callback):
    """The run folder of a fit or test, created by global rank 0 when Lightning sets up and sent to every other
    rank with ``trainer.strategy.broadcast`` (so each process of a DDP, torchrun or SLURM job uses the same folder).

    In ``setup`` (after the data module's ``setup``, so bad data fails before a folder exists) rank 0 allocates
    ``<output_dir>/<name>/version_N`` (:func:`new_run_dir`) and writes ``config.yaml``; then every rank points the
    checkpoint callbacks without a folder at ``<run>/checkpoints``, attaches the configured logger, and binds each
    callback that has a ``bind_run_dir(path)`` method. ``path`` is ``None`` until then.

    Args:
        fixed: an existing folder to use instead of allocating one (single-process tools: bench, gpu-check).
    """

    def __init__(self, cfg: DictConfig, name: str | None = None, fixed: Path | None = None) -> None:
        self.cfg, self.name = cfg, name or str(cfg.name)
        self.path: Path | None = Path(fixed) if fixed is not None else None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.path is None:  # once: a later stage of the same trainer keeps the folder
            made = None
            if trainer.is_global_zero:
                made = new_run_dir(self.cfg.logging.output_dir, self.name)
                try:
                    save_config(self.cfg, made)
                except BaseException:
                    discard_run_dir(made)  # a write fault (full disk): no empty run folder left behind
                    raise
                log.info("run folder %s", made)
            self.path = Path(trainer.strategy.broadcast(str(made) if made is not None else None, src=0))
        for cb in trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(cb, ModelCheckpoint) and cb.dirpath is None:
                cb.dirpath = str(self.path / "checkpoints")
            bind = getattr(cb, "bind_run_dir", None)
            if callable(bind):
                bind(self.path)
        logger = make_logger(self.cfg, self.path)
        trainer.loggers = [logger] if logger else []


def save_config(cfg: DictConfig, run_dir: Path) -> Path:
    """Write the resolved config to ``run_dir/config.yaml`` (atomically)."""
    return atomic.write_text(run_dir / "config.yaml", to_yaml(cfg))


class StopOnSignal(Callback):
    """Raises a pending SIGINT/SIGTERM (:mod:`fsl_med.interrupts`) at the end of a training, validation or test
    batch: a checkpoint saved then holds a completed step.

    With several processes the stop is collective: after every training batch the ranks all-reduce (max) the
    signal each has received, so all of them stop after the same step even when only rank 0 was signalled (as
    Kubernetes does); one small all-reduce per step. During evaluation (items are sharded unevenly, so no
    per-item collective), rank 0 relays the signal to the processes Lightning launched.
    """

    def on_train_start(self, *args: Any, **kwargs: Any) -> None:
        reclaim()

    def on_validation_start(self, *args: Any, **kwargs: Any) -> None:
        reclaim()

    def on_test_start(self, *args: Any, **kwargs: Any) -> None:
        reclaim()

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            sig = torch.tensor([pending() or 0], dtype=torch.int32, device=trainer.strategy.root_device)
            torch.distributed.all_reduce(sig, op=torch.distributed.ReduceOp.MAX)
            if int(sig.item()) == 0:
                return
            set_pending(int(sig.item()))
        raise_pending()

    def _eval_batch_end(self, trainer: L.Trainer) -> None:
        sig = pending()
        if sig is None:
            return
        launcher = trainer.strategy.launcher
        if trainer.is_global_zero and launcher is not None and hasattr(launcher, "kill"):
            launcher.kill(sig)  # the other ranks stop after their current item too
        raise_pending()

    def on_validation_batch_end(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        self._eval_batch_end(trainer)

    def on_test_batch_end(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        self._eval_batch_end(trainer)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints are written to a temporary file in the target folder and renamed into place."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike[str],
                        storage_options: Any | None = None) -> None:
        try:
            with atomic.atomic_path(path, suffix=".ckpt") as tmp, open(tmp, "wb") as f:
                torch.save(checkpoint, f)  # a file object: a failed write surfaces as the OSError it is
        except Exception as e:
            reason = os_reason(e)
            if reason is None:
                raise
            raise FilesystemError(f"cannot write checkpoint {path}: {reason.strerror or reason} (the previous "
                                  "checkpoint, if any, is untouched)") from e


def has_wandb_key() -> bool:
    """Whether W&B credentials are configured: ``WANDB_API_KEY``, or an entry for the W&B host (``WANDB_BASE_URL``,
    default api.wandb.ai) in the netrc file (``NETRC`` or ``~/.netrc``) that ``wandb login`` writes."""
    import netrc
    from urllib.parse import urlparse

    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    path = Path(os.environ.get("NETRC") or "~/.netrc").expanduser()
    try:
        entry = netrc.netrc(str(path)).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def make_logger(cfg: DictConfig, run_dir: Path) -> Any:
    """The configured Lightning logger writing into ``run_dir`` (``False`` for ``logging.logger=none``)."""
    kind = cfg.logging.logger
    save_dir, name, version = str(run_dir.parent.parent), run_dir.parent.name, run_dir.name
    if kind == "none":
        return False
    if kind == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(save_dir=save_dir, name=name, version=version)
    if kind == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        return TensorBoardLogger(save_dir=save_dir, name=name, version=version)
    from lightning.pytorch.loggers import WandbLogger

    offline = not has_wandb_key()
    if offline:
        os.environ.setdefault("WANDB_MODE", "offline")
        log.warning("no W&B API key configured: logging offline to %s (sync later with 'wandb sync')", run_dir)
    os.environ.setdefault("WANDB_SILENT", "true")
    return WandbLogger(project=cfg.logging.wandb_project, entity=cfg.logging.wandb_entity, name=f"{name}-{version}",
                       save_dir=str(run_dir), offline=offline, config=to_container(cfg), group=cfg.logging.wandb_group)


def make_trainer(cfg: DictConfig, folder: RunFolder | Path, *, with_val: bool,
                 extra_callbacks: list[Callback] | None = None, max_steps: int | None = None,
                 progress_bar: bool | None = None) -> L.Trainer:
    """A ``Trainer`` from ``cfg.trainer`` writing logs and checkpoints into the run folder (a :class:`RunFolder`,
    created when Lightning sets up, or an existing folder).

    Checkpoints: ``checkpoints/last.ckpt`` every ``trainer.ckpt_every_n_steps`` (default: every
    ``val_check_interval``) steps; with validation also the best by ``val/dice``.
    The progress bar is shown only on a terminal (``progress_bar`` forces it on or off).
    """
    t = cfg.trainer
    every = t.ckpt_every_n_steps or t.val_check_interval
    folder = folder if isinstance(folder, RunFolder) else RunFolder(cfg, fixed=folder)
    callbacks: list[Callback] = [
        folder,  # first: the folder exists before any other callback's setup
        # last.ckpt every `every` steps (resume point after a crash), written atomically; folder set by RunFolder
        ModelCheckpoint(dirpath=None, save_last=True, save_top_k=0, every_n_train_steps=every),
    ]
    if with_val:  # validation: the plain prediction scored (val/dice), and the best checkpoint by it
        callbacks.append(Scoring(hd95=False))
        callbacks.append(ModelCheckpoint(dirpath=None, filename="best-step{step}",
                                         auto_insert_metric_name=False, monitor="val/dice", mode="max",
                                         save_last=False, save_top_k=1))
    if cfg.logging.logger != "none":
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    callbacks.extend(extra_callbacks or [])
    callbacks.append(StopOnSignal())  # SIGINT/SIGTERM stop at a batch boundary
    return L.Trainer(
        default_root_dir=str(folder.path) if folder.path is not None else str(cfg.logging.output_dir),
        max_steps=max_steps if max_steps is not None else t.max_steps,
        max_epochs=-1,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=t.precision,
        val_check_interval=min(t.val_check_interval, max_steps or t.max_steps) if with_val else None,
        check_val_every_n_epoch=None if with_val else 1,
        limit_val_batches=None if with_val else 0,
        num_sanity_val_steps=0,
        log_every_n_steps=t.log_every_n_steps,
        deterministic=t.deterministic,
        gradient_clip_val=t.gradient_clip_val,
        enable_progress_bar=(t.enable_progress_bar and sys.stderr.isatty()) if progress_bar is None else progress_bar,
        enable_model_summary=False,
        use_distributed_sampler=False,
        logger=False,  # attached by RunFolder once the folder exists
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
    )


_INDEX_MAX = sys.maxsize
"""The largest step count or interval accepted (an index-sized integer, 2**63 - 1 on 64-bit Python)."""


def check_trainer_settings(cfg: DictConfig) -> None:
    """Check every ``trainer.*`` value before anything is written, by our rules and by building the Lightning
    objects they describe (accelerator, devices, strategy, nodes, precision) the way :func:`make_trainer` will.

    Raises:
        ConfigError: one line naming the first bad ``trainer.*`` key and what is wrong with it.
    """
    t = cfg.trainer
    for key in ("max_steps", "val_check_interval", "log_every_n_steps", "ckpt_every_n_steps"):
        v = t[key]
        if v is None and key == "ckpt_every_n_steps":
            continue
        lo = 0 if key == "log_every_n_steps" else 1
        if not lo <= int(v) <= _INDEX_MAX:
            raise ConfigError(f"config key 'trainer.{key}': must be an integer in {lo}..{_INDEX_MAX} (2**63 - 1), "
                              f"got {v}")
    if t.gradient_clip_val is not None and not (0 < float(t.gradient_clip_val) < float("inf")):
        raise ConfigError(f"config key 'trainer.gradient_clip_val': must be a finite value > 0 (or null: no "
                          f"clipping), got {t.gradient_clip_val}")
    if int(t.num_nodes) < 1:
        raise ConfigError(f"config key 'trainer.num_nodes': must be >= 1, got {t.num_nodes}")
    # each Lightning argument added in turn: the first construction that fails names its key
    args: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for key in ("accelerator", "devices", "num_nodes", "strategy", "precision"):
            args[key] = t[key]
            try:
                L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False, max_steps=1, **args)
            except Exception as e:  # noqa: BLE001 - Lightning raises ValueError, TypeError, Misconfiguration...
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ConfigError(f"config key 'trainer.{key}': {t[key]!r} is not usable here: {first}") from e


def discard_run_dir(run_dir: Path) -> bool:
    """Remove a run folder that a failed or interrupted start leaves without a checkpoint or results
    (rank zero only); returns True if it was removed. A folder holding ``*.ckpt`` or ``results.json`` is kept."""
    import shutil

    if not is_rank_zero() or not run_dir.is_dir():
        return False
    if any(run_dir.rglob("*.ckpt")) or (run_dir / "results.json").exists():
        return False
    shutil.rmtree(run_dir, ignore_errors=True)
    parent = run_dir.parent
    with contextlib.suppress(OSError):  # the <name> folder too, when this run was its only content
        if not any(p for p in parent.iterdir() if not p.name.startswith(".job-")):
            shutil.rmtree(parent)
    return not run_dir.exists()


def check_output_location(cfg: DictConfig) -> None:
    """Outputs must be kept apart from the inputs. The superpixel cache (``data.cache_dir``) may not be or lie
    inside the data folder (``data.root``). Run folders (``logging.output_dir/<name>/version_N``): the output folder
    may not be, or lie inside, the data folder (``data.root``) or the superpixel cache (``data.cache_dir``), and
    the runs' folder ``<output_dir>/<name>`` may not contain them. (An output folder that merely holds an input
    beside the runs, e.g. ``.`` with data in ``./data``, is fine.)

    Raises:
        DataError: naming the setting, both folders and how they overlap.
    """
    from fsl_med.atomic import refuse_nested

    root, out = cfg.data.root, cfg.logging.output_dir
    if cfg.data.cache_dir:
        refuse_nested(cfg.data.cache_dir, root, "config key 'data.cache_dir':", "the data.root folder", may_contain=True)
    for key in ("data.root", "data.cache_dir"):
        folder = OmegaConf.select(cfg, key)
        if folder:
            refuse_nested(out, folder, "config key 'logging.output_dir':", f"the {key} folder", may_contain=True)
            refuse_nested(Path(out) / cfg.name, folder, "config key 'logging.output_dir': the run folders",
                          f"the {key} folder")
