"""Run folders, loggers, checkpoint I/O and the Lightning ``Trainer`` shared by the verbs.

Every run gets a new ``<output_dir>/<name>/version_N/`` folder (created atomically with ``mkdir``, so two
runs started together never share one) holding ``config.yaml``, ``checkpoints/`` and the logger's files.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from omegaconf import DictConfig

from fsl_med import atomic
from fsl_med.config import to_container, to_yaml
from fsl_med.errors import ConfigError, FslMedError, WeightsError

log = logging.getLogger(__name__)

_VERSION_RE = re.compile(r"^version_(\d+)$")

# our run folder already holds config.yaml when the logger starts; the warnings below are expected
warnings.filterwarnings("ignore", message=".*exists and is not empty.*")
warnings.filterwarnings("ignore", message=".*overridden `transfer_batch_to_device`.*")
warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")


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


def is_rank_zero() -> bool:
    """True in the process that owns the outputs: not distributed, or global rank 0.

    Reads the launchers' environment: ``RANK`` (torchrun), ``SLURM_PROCID`` (SLURM with several tasks), or
    Lightning's own ``NODE_RANK``/``LOCAL_RANK`` (its launcher sets them for the processes it starts).
    """
    env = os.environ
    if "RANK" in env:
        return int(env["RANK"]) == 0
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return int(env["SLURM_PROCID"]) == 0
    return int(env.get("NODE_RANK", "0")) == 0 and int(env.get("LOCAL_RANK", "0")) == 0


def _job_id() -> str | None:
    env = os.environ
    job = env.get("TORCHELASTIC_RUN_ID") or env.get("SLURM_JOB_ID")
    return f"{job}-{env.get('SLURM_STEP_ID', '')}-{env.get('MASTER_PORT', '')}" if job else None


def shared_run_dir(output_dir: str | Path, name: str, timeout_s: float = 600.0) -> Path:
    """The run folder of this run on every process of a distributed job.

    Rank 0 creates a new ``version_N`` (:func:`new_run_dir`) and publishes it: in the environment (the
    processes Lightning's launcher starts inherit it) and, under torchrun or SLURM, in a marker file named
    by the job id. Other ranks read it from there (waiting up to ``timeout_s`` for the marker).

    Raises:
        FslMedError: a non-zero rank cannot learn rank 0's folder.
    """
    key = "FSL_MED_RUN_DIR_" + re.sub(r"\W", "_", name)
    marker = Path(output_dir) / name / f".job-{_job_id()}" if _job_id() else None
    if is_rank_zero():
        run = new_run_dir(output_dir, name)
        os.environ[key] = str(run)
        if marker is not None:
            atomic.write_text(marker, str(run))
        return run
    if key in os.environ:
        return Path(os.environ[key])
    deadline = time.time() + timeout_s
    while marker is not None and time.time() < deadline:
        if marker.is_file():
            return Path(marker.read_text(encoding="utf-8").strip())
        time.sleep(0.5)
    raise FslMedError(f"rank > 0 cannot find the run folder of rank 0 for '{name}' (set {key}, or launch with "
                      "torchrun/SLURM so the job id is known)")


def save_config(cfg: DictConfig, run_dir: Path) -> Path:
    """Write the resolved config to ``run_dir/config.yaml`` (atomically)."""
    return atomic.write_text(run_dir / "config.yaml", to_yaml(cfg))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints are written to a temporary file in the target folder and renamed into place."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike[str],
                        storage_options: Any | None = None) -> None:
        with atomic.atomic_path(path, suffix=".ckpt") as tmp:
            torch.save(checkpoint, tmp)


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

    offline = not (os.environ.get("WANDB_API_KEY") or Path("~/.netrc").expanduser().is_file())
    if offline:
        os.environ.setdefault("WANDB_MODE", "offline")
        log.warning("no W&B API key configured: logging offline to %s (sync later with 'wandb sync')", run_dir)
    os.environ.setdefault("WANDB_SILENT", "true")
    return WandbLogger(project=cfg.logging.wandb_project, entity=cfg.logging.wandb_entity, name=f"{name}-{version}",
                       save_dir=str(run_dir), offline=offline, config=to_container(cfg))


def make_trainer(cfg: DictConfig, run_dir: Path, *, with_val: bool, extra_callbacks: list[Callback] | None = None,
                 max_steps: int | None = None, progress_bar: bool | None = None) -> L.Trainer:
    """A ``Trainer`` from ``cfg.trainer`` writing logs and checkpoints into ``run_dir``.

    Checkpoints: ``checkpoints/last.ckpt`` every ``trainer.ckpt_every_n_steps`` (default: every
    ``val_check_interval``) steps; with validation also the best by ``val/dice``.
    The progress bar is shown only on a terminal (``progress_bar`` forces it on or off).
    """
    t = cfg.trainer
    every = t.ckpt_every_n_steps or t.val_check_interval
    callbacks: list[Callback] = [
        # last.ckpt every `every` steps (resume point after a crash), written atomically
        ModelCheckpoint(dirpath=run_dir / "checkpoints", save_last=True, save_top_k=0, every_n_train_steps=every),
    ]
    if with_val:  # the best checkpoint by val/dice
        callbacks.append(ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="best-step{step}",
                                         auto_insert_metric_name=False, monitor="val/dice", mode="max",
                                         save_last=False, save_top_k=1))
    logger = make_logger(cfg, run_dir)
    if logger:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    callbacks.extend(extra_callbacks or [])
    return L.Trainer(
        default_root_dir=str(run_dir),
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
        logger=logger,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
    )


def resolve_ckpt(cfg: DictConfig, key: str = "ckpt") -> Path | None:
    """The checkpoint named by ``cfg.<key>`` (``ckpt`` or ``resume``): a path, ``latest``/``last`` (newest
    ``last.ckpt`` of runs named ``cfg.name``), or ``None``.

    Raises:
        WeightsError: the file does not exist, or ``latest`` finds no checkpoint.
    """
    value = cfg.get(key)
    if value in (None, "", "none", "None"):
        return None
    if value in ("latest", "last"):
        base = Path(cfg.logging.output_dir) / cfg.name
        found = sorted(base.glob("version_*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise WeightsError(f"{key}={value}: no checkpoint found under {base}/version_*/checkpoints/")
        return found[-1]
    p = Path(value).expanduser()
    if not p.is_file():
        raise WeightsError(f"{key}={value}: checkpoint not found: {p}")
    return p


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a Lightning checkpoint of fsl_med.

    Raises:
        WeightsError: unreadable/truncated file, or not an fsl_med checkpoint (no stored config).
    """
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any failure to unpickle is a bad file
        raise WeightsError(f"{path}: cannot read checkpoint (truncated or not a PyTorch file)") from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise WeightsError(f"{path}: not a Lightning checkpoint (no 'state_dict')")
    if "config" not in (ckpt.get("hyper_parameters") or {}):
        raise WeightsError(f"{path}: not an fsl_med checkpoint (no stored config)")
    return ckpt


def check_compatible(ckpt_cfg: dict[str, Any], cfg: DictConfig, path: Path) -> None:
    """The checkpoint's encoder must be the one the config evaluates with.

    Raises:
        ConfigError: encoder name, fine-tuning mode, LoRA rank, adapter or 3-slice input differ.
    """
    enc_c, enc = ckpt_cfg["model"]["encoder"], cfg.model.encoder
    for key in ("name", "finetune", "lora_rank", "adapter"):
        if key == "lora_rank" and enc.finetune != "lora":
            continue
        if enc_c.get(key) != enc[key]:
            raise ConfigError(
                f"{path}: checkpoint has model.encoder.{key}={enc_c.get(key)!r} but the config says {enc[key]!r}"
            )
    three_c = bool(ckpt_cfg.get("data", {}).get("three_slices", False))
    if three_c != bool(cfg.data.three_slices):
        raise ConfigError(f"{path}: checkpoint has data.three_slices={three_c} but the config says "
                          f"{bool(cfg.data.three_slices)} (the model's input channels differ)")
