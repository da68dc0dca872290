"""Run folders, loggers, checkpoint I/O and the Lightning ``Trainer`` shared by the verbs.

Every run gets a new ``<output_dir>/<name>/version_N/`` folder (created atomically with ``mkdir``, so two
runs started together never share one) holding ``config.yaml``, ``checkpoints/`` and the logger's files.
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
from fsl_med.config import (
    HEAD_DEFAULTS,
    HeadConfig,
    follow_head,
    load_config,
    to_container,
    to_yaml,
    validate,
)
from fsl_med.data.provenance import CHECKPOINT_KEY, TrainedOn, scans_seen
from fsl_med.errors import ConfigError, FilesystemError, FslMedError, WeightsError, os_reason
from fsl_med.evaluation.scoring import Scoring
from fsl_med.interrupts import pending, raise_pending, reclaim, set_pending
from fsl_med.models.encoder_registry import get_encoder_spec, missing_maps
from fsl_med.models.module import FewShotModule
from fsl_med.prepare.datasets import check_data_settings, excluded_labels
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


def check_registries(cfg: DictConfig) -> None:
    """Check the names ``cfg`` takes from registries: the dataset, its folds and organs
    (:func:`~fsl_med.prepare.datasets.check_data_settings`) and the encoder
    (:func:`~fsl_med.models.encoder_registry.get_encoder_spec`).

    Raises:
        ConfigError: an unknown name (with the closest valid one) or a fold out of range.
    """
    check_data_settings(cfg)
    check_model_pairing(cfg)


def check_model_pairing(cfg: DictConfig) -> None:
    """The encoder exists, returns every feature map the head requests, and its main map fits ``model.feature_size``.

    Raises:
        ConfigError: an unknown encoder; a head needing a map the encoder lacks (e.g. Q-Net's second scale on the
            one-scale ``resnet101_deeplabv3``); a main map larger than ``model.feature_size`` (``resnet101_qnet`` at
            256 px has a 64x64 map: ``model.feature_size=64``), which the heads' mask pooling would not match.
    """
    from fsl_med.models.heads import get_head_class

    name, head = str(cfg.model.encoder.name), str(cfg.model.head.name)
    spec = get_encoder_spec(name)
    missing = missing_maps(name, get_head_class(head).request)
    if missing:
        raise ConfigError(f"config key 'model.encoder.name': head '{head}' needs feature map(s) {missing} that encoder "
                          f"{name} does not have (it has {list(spec.maps)}); use a ViT or resnet101_qnet")
    side = spec.map_side(int(cfg.data.image_size))
    if side > int(cfg.model.feature_size):
        raise ConfigError(f"config key 'model.feature_size': {cfg.model.feature_size} is below the {side}x{side} main "
                          f"map of encoder {name} at data.image_size {cfg.data.image_size}; set model.feature_size={side}")


def validate_run(cfg: DictConfig) -> None:
    """:func:`fsl_med.config.validate` (schema, ranges) and :func:`check_registries` (names)."""
    validate(cfg)
    check_registries(cfg)


def load_run_config(path: str | os.PathLike[str] | None = None, overrides: list[str] | None = None) -> DictConfig:
    """:func:`fsl_med.config.load_config`, then :func:`check_registries`: what every verb runs with."""
    cfg = load_config(path, overrides)
    check_registries(cfg)
    return cfg


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
    if p.is_dir():
        raise WeightsError(f"{key}={value}: is a folder; give a .ckpt file (e.g. <run>/checkpoints/last.ckpt) or last")
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


def _patch_grid(cfg_like: Any, size: int) -> str:
    """``"4x4 = 16"`` patch tokens of a ViT encoder of ``cfg_like`` at ``size`` pixels ("" for other encoders)."""
    from fsl_med.models.encoder_registry import get_encoder_spec

    try:
        spec = get_encoder_spec(str(cfg_like["model"]["encoder"]["name"]))
    except Exception:  # noqa: BLE001 - an unknown encoder is reported elsewhere
        return ""
    if spec.family != "vit":
        return ""
    g = int(size) // spec.patch_size
    return f"{g}x{g} = {g * g}"


def check_input_geometry(ckpt_cfg: dict[str, Any], cfg: DictConfig, path: Path) -> None:
    """The checkpoint's input geometry (``data.image_size``, ``data.three_slices``) must be the config's.

    Raises:
        ConfigError: names the setting, both values and what differs in the encoder's input.
    """
    data_c = ckpt_cfg.get("data") or {}
    size_c = data_c.get("image_size")
    if size_c is not None and int(size_c) != int(cfg.data.image_size):
        grid_c, grid = _patch_grid(ckpt_cfg, size_c), _patch_grid(cfg, cfg.data.image_size)
        what = f": the encoder would see {grid} patch tokens, not {grid_c}" if grid and grid_c else ""
        raise ConfigError(f"{path}: checkpoint was trained with data.image_size={size_c}, the config says "
                          f"{cfg.data.image_size}{what}; set data.image_size={size_c}")
    three_c = bool(data_c.get("three_slices", False))
    if three_c != bool(cfg.data.three_slices):
        raise ConfigError(f"{path}: checkpoint was trained with data.three_slices={three_c}, the config says "
                          f"{bool(cfg.data.three_slices)} (the encoder's input is {'z-1, z, z+1' if three_c else 'one slice x3'}"
                          f"); set data.three_slices={str(three_c).lower()}")


def check_compatible(ckpt_cfg: dict[str, Any], cfg: DictConfig, path: Path) -> None:
    """The checkpoint's model must be the one the config builds (resuming training, ablation reuse).

    Raises:
        ConfigError: head, encoder name, fine-tuning mode, LoRA rank, adapter, image size or 3-slice input differ
            (the message names the key and both values).
    """
    head_c = (ckpt_cfg["model"].get("head") or {}).get("name", HeadConfig().name)  # before the registry: the default
    if head_c != cfg.model.head.name:
        raise ConfigError(f"{path}: checkpoint has model.head.name={head_c!r} but the config says "
                          f"{cfg.model.head.name!r}; set model.head.name={head_c} to resume it")
    enc_c, enc = ckpt_cfg["model"]["encoder"], cfg.model.encoder
    for key in ("name", "finetune", "lora_rank", "adapter"):
        if key == "lora_rank" and enc.finetune != "lora":
            continue
        if enc_c.get(key) != enc[key]:
            raise ConfigError(
                f"{path}: checkpoint has model.encoder.{key}={enc_c.get(key)!r} but the config says {enc[key]!r}"
            )
    check_input_geometry(ckpt_cfg, cfg, path)


RUNTIME_MODEL_KEYS = ("model.compile",)
"""``model.*`` keys that say how to run the model, not what it is: never taken from a checkpoint."""


def _leaves(node: Any, prefix: str) -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_leaves(v, f"{prefix}.{k}"))
        return out
    return {prefix: node}


def stored_config(ckpt: dict[str, Any], path: Path) -> DictConfig:
    """The validated config stored in a checkpoint.

    Raises:
        WeightsError: the stored config is malformed (not a mapping, unknown keys, wrong types, bad values).
    """
    from fsl_med.config import from_container

    raw = (ckpt.get("hyper_parameters") or {}).get("config")
    if not isinstance(raw, dict):
        raise WeightsError(f"{path}: the checkpoint's stored config is malformed (a {type(raw).__name__}, not a "
                           "mapping)")
    try:
        return from_container(raw)
    except FslMedError as e:
        raise WeightsError(f"{path}: the checkpoint's stored config is malformed ({e})") from e


def adopt_checkpoint_model(cfg: DictConfig, ckpt: dict[str, Any], path: Path,
                           explicit: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The config to evaluate a checkpoint with: ``cfg`` with every ``model.*`` setting taken from the checkpoint
    (``model.compile`` excepted), so evaluating needs none of the training run's overrides repeated.

    Args:
        cfg: the config from the YAML file and command line (not modified).
        ckpt: the checkpoint (:func:`load_checkpoint`).
        explicit: the ``key=value`` overrides given on the command line; a ``model.*`` one that contradicts the
            checkpoint is an error (one from the YAML file is replaced, and listed in one note).
    Returns:
        A new validated config.
    Raises:
        ConfigError: an explicit ``model.*`` override contradicts the checkpoint, or the input geometry
            (:func:`check_input_geometry`) differs.
        WeightsError: the stored config is malformed.
    """

    stored = to_container(stored_config(ckpt, path))
    new = cfg.copy()
    ours = _leaves(to_container(cfg)["model"], "model")
    differ = []
    for key, value in _leaves(stored["model"], "model").items():
        if key in RUNTIME_MODEL_KEYS or ours.get(key) == value:
            continue
        if _is_explicit(key, explicit):
            raise ConfigError(f"{key}={ours.get(key)!r} on the command line contradicts the checkpoint {path}, which "
                              f"was trained with {key}={value!r}; drop the override (the checkpoint defines the model)")
        OmegaConf.update(new, key, value, merge=False)
        differ.append(f"{key}={value!r} (config: {ours.get(key)!r})")
    # the checkpoint's head: fields following the head (loss.ce_weights) take its defaults unless given explicitly
    follow_head(new, cfg.model.head.name, keep=tuple(k for k in HEAD_DEFAULTS[new.model.head.name]
                                                     if _is_explicit(k, explicit)))
    if differ:
        log.warning("note: the checkpoint %s defines the model; taken from it instead of the config: %s", path,
                    ", ".join(differ))
    check_input_geometry(stored, new, path)
    validate_run(new)
    return new


def check_state_dict(state: dict[str, Any], model: torch.nn.Module, path: Path) -> None:
    """The checkpoint's tensors must be the model's: same names and shapes.

    Raises:
        WeightsError: one line naming the first differing tensor and, for a ViT, what it means (position
            embedding tokens, patch size, width, depth), or the counts of missing/unexpected tensors.
    """
    bad = [k for k, t in state.items() if not hasattr(t, "shape")]
    if bad:
        raise WeightsError(f"{path}: entry {bad[0]} of the state dict is not a tensor (cut or damaged checkpoint)")
    own = model.state_dict()
    for key, t in state.items():
        if key in own and hasattr(t, "shape") and tuple(t.shape) != tuple(own[key].shape):
            a, b = tuple(t.shape), tuple(own[key].shape)
            hint = ""
            if key.endswith("pos_embed"):
                hint = f": the position embedding has {a[1]} tokens in the checkpoint, {b[1]} in the model"
            elif key.endswith("patch_embed.proj.weight"):
                hint = (f": patch {a[-1]}x{a[-2]} and {a[1]} input channels in the checkpoint, patch {b[-1]}x{b[-2]} "
                        f"and {b[1]} in the model")
            elif len(a) >= 1 and len(b) >= 1 and a[0] != b[0]:
                hint = f": width {a[0]} in the checkpoint, {b[0]} in the model"
            raise WeightsError(f"{path}: tensor {key} has shape {list(a)} in the checkpoint but {list(b)} in the "
                               f"model{hint} (cut or from another architecture)")
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        depth = ""
        blocks_c = {k.split("blocks.")[1].split(".")[0] for k in state if ".blocks." in k}
        blocks_m = {k.split("blocks.")[1].split(".")[0] for k in own if ".blocks." in k}
        if blocks_c != blocks_m and blocks_c and blocks_m:
            depth = f"; depth {len(blocks_c)} blocks in the checkpoint, {len(blocks_m)} in the model"
        raise WeightsError(f"{path}: weights do not fit the model ({len(missing)} missing tensors, e.g. "
                           f"{missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]}{depth})")

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


DATA_KEYS_FROM_CHECKPOINT = ("data.fold", "data.setting", "data.test_organs")
"""The data settings evaluation (and resumed training) take from a checkpoint unless given on the command line."""


def _is_explicit(key: str, explicit: list[str] | tuple[str, ...]) -> bool:
    """Whether ``key`` (or a section holding it) is set by one of the ``key=value`` overrides in ``explicit``."""
    given = [item.split("=", 1)[0].strip().lstrip("+") for item in explicit if "=" in item]
    return any(key == g or key.startswith(g + ".") for g in given)


def checkpoint_trained_on(ckpt: dict[str, Any], path: Path, cfg: DictConfig) -> TrainedOn | None:
    """What a checkpoint was trained on: its record (:mod:`fsl_med.data.provenance`), or for a checkpoint written
    before records existed, the fold split its stored config gives on ``cfg.data.root`` (logged as inferred;
    label digests unknown, so equal scan ids count as seen). None when neither is available (another dataset).

    Raises:
        WeightsError: the record or the stored config is malformed.
    """
    from fsl_med.prepare.datasets import fold_split, get_dataset_info, scan_files, validation_split

    raw = ckpt.get(CHECKPOINT_KEY)
    if raw is not None:
        try:
            return TrainedOn.from_dict(raw)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise WeightsError(f"{path}: the checkpoint's record of its training data ({CHECKPOINT_KEY}) is "
                               f"malformed ({type(e).__name__}: {e})") from e
    stored = stored_config(ckpt, path)
    if stored.data.dataset != cfg.data.dataset:
        return None
    try:
        ids = scan_files(cfg.data.root).scan_ids()
        split = fold_split(get_dataset_info(stored.data.dataset), ids, int(stored.data.fold))
    except FslMedError:
        return None  # the evaluation's own checks report a bad folder
    train, val = validation_split(split.train, int(stored.data.num_val_scans))

    log.warning("note: %s predates training records; assuming it was trained on fold %s of this folder (its stored "
                "config)", path, stored.data.fold)
    return TrainedOn(dataset=str(stored.data.dataset), fingerprint="", fold=int(stored.data.fold),
                     setting=int(stored.data.setting), excluded_labels=[int(x) for x in excluded_labels(stored)],
                     test_organs=[str(o) for o in stored.data.test_organs], train_scans=dict.fromkeys(train),
                     val_scans=dict.fromkeys(val))


def adopt_checkpoint_data(cfg: DictConfig, trained: TrainedOn | None, path: Path,
                          explicit: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """``cfg`` with ``data.fold``, ``data.setting`` and ``data.test_organs`` taken from what the checkpoint was trained
    on, except those given on the command line (``explicit``); one note lists what was taken. A checkpoint of
    another dataset (cross-domain evaluation) gives nothing. Returns a new validated config (``cfg`` untouched)."""

    if trained is None or trained.dataset != cfg.data.dataset:
        return cfg
    values = {"data.fold": trained.fold, "data.setting": trained.setting, "data.test_organs": list(trained.test_organs)}
    new = cfg.copy()
    taken = []
    for key in DATA_KEYS_FROM_CHECKPOINT:
        ours = OmegaConf.select(cfg, key)
        ours = list(ours) if key == "data.test_organs" else ours
        if ours == values[key] or _is_explicit(key, explicit):
            continue
        OmegaConf.update(new, key, values[key], merge=False)
        taken.append(f"{key}={values[key]} (config: {ours})")
    if taken:
        log.warning("note: as the checkpoint %s was trained, taken from it: %s (give them on the command line to "
                    "override)", path, ", ".join(taken))
        validate_run(new)
    return new


def check_resume_data(cfg: DictConfig, trained: TrainedOn | None, trained_root: str, path: Path) -> None:
    """Refuse to resume a run on a data folder holding other scans than the one it trained on (a copy of the folder
    elsewhere is the same data), unless ``resume_allow_other_data=true`` (then one warning says so).

    Args:
        cfg: the new run's config (``data.root``, ``resume_allow_other_data``).
        trained: the checkpoint's record of its data (None or without a fingerprint: nothing to compare).
        trained_root: the checkpoint's ``data.root``, for the message.
        path: the checkpoint.
    Raises:
        DataError: one line naming both folders and what differs.
    """
    from fsl_med.data.provenance import folder_fingerprint, label_digest
    from fsl_med.errors import DataError
    from fsl_med.prepare.datasets import scan_files

    if trained is None or not trained.fingerprint:
        return
    if trained.dataset != cfg.data.dataset:
        what = f"dataset {trained.dataset}, this run's data.dataset is {cfg.data.dataset}"
    else:
        scans = scan_files(cfg.data.root).scans
        if folder_fingerprint(scans) == trained.fingerprint:
            return
        seen = {**trained.val_scans, **trained.train_scans}
        missing = [s for s in seen if s not in scans]
        other = [s for s, d in seen.items() if s in scans and d is not None and label_digest(scans[s][1]) != d]
        bits = [f"scan(s) {', '.join(missing)} it trained on are missing"] if missing else []
        bits += [f"scan(s) {', '.join(other)} have other label files"] if other else []
        what = "; ".join(bits) or f"{len(scans)} scans whose ids or file sizes differ from the run's folder"
    same = Path(trained_root).expanduser().resolve() == Path(cfg.data.root).expanduser().resolve()
    now = f"now holds other data ({what})" if same else f"holds other data ({what})"
    line = f"resume={path}: the run trained on data.root {trained_root}, and data.root {cfg.data.root} {now}"
    if cfg.resume_allow_other_data:
        log.warning("%s; continuing on it (resume_allow_other_data=true): the checkpoint records both", line)
        return
    raise DataError(f"{line}; resuming would mix two datasets in one model: give the run's data.root, start a new "
                    "run, or set resume_allow_other_data=true")


def in_sample_scans(cfg: DictConfig, trained: TrainedOn | None, dm: Any, source: str) -> str | None:
    """Refuse to score, or take the fold's support from, scans the model trained or validated on. (The extra support
    scans of k-shot evaluation from scans are the fold's first training scans by design and are not checked.)

    Args:
        cfg: the evaluation config (``eval.allow_train_scans`` permits it).
        trained: what the model was trained on (None: untrained or unknown, nothing to check).
        dm: the evaluation's :class:`~fsl_med.data.datamodule.FewShotDataModule` (its split is resolved here).
        source: what the model is, for the message (``checkpoint <path>`` or ``the trained model``).
    Returns:
        None when no evaluated scan was seen in training; with ``eval.allow_train_scans=true`` the line the report
        and ``results.json`` begin with.
    Raises:
        DataError: a query or support scan was trained or validated on (one line naming the scans).
    """
    from fsl_med.errors import DataError

    if trained is None or trained.dataset != cfg.data.dataset:
        return None
    fingerprint = dm.fingerprint()
    assert dm.split is not None
    # the fold's support scan; k-shot's extra support scans are the fold's training scans by design (support_ids)
    overlap = scans_seen(trained, fingerprint, {s: p[1] for s, p in dm.scan_paths.items()}, dm.split.query,
                         [dm.split.support])
    if overlap.uncertain:
        log.warning("%s was trained on another data folder of %s whose scans %s share ids with scans evaluated here "
                    "but have other label files (other patients, or prepared differently): not counted as seen",
                    source, trained.dataset, ", ".join(overlap.uncertain))
    if not overlap:
        return None
    what = (f"{source} was trained on fold {trained.fold} (setting {trained.setting}) of {trained.dataset}; "
            f"evaluating fold {cfg.data.fold} uses {overlap.describe()}")
    if cfg.eval.allow_train_scans:
        line = f"IN-SAMPLE evaluation (eval.allow_train_scans=true): {what}; these Dice are not a test result"
        log.warning("%s", line)
        return line
    raise DataError(f"{what}: that would be in-sample Dice; evaluate fold {trained.fold} (drop the "
                    "data.fold override) or set eval.allow_train_scans=true for a deliberate in-sample analysis")


def module_from_checkpoint(path: Path, cfg: DictConfig, ckpt: dict[str, Any] | None = None
                           ) -> tuple[FewShotModule, dict[str, Any]]:
    """Build the module of ``cfg`` and load a checkpoint's weights into it (``ckpt``: the checkpoint already
    read from ``path``, to read it once).

    Raises:
        WeightsError: unreadable checkpoint or weights of another architecture.
        ConfigError: the checkpoint's encoder differs from the config's.
    """
    ckpt = load_checkpoint(path) if ckpt is None else ckpt
    check_compatible(to_container(stored_config(ckpt, path)), cfg, path)
    with warnings.catch_warnings():  # the encoder's random init is replaced by the checkpoint right away
        warnings.simplefilter("ignore")
        enc_logger = logging.getLogger("fsl_med.models.encoders")
        level = enc_logger.level
        enc_logger.setLevel(logging.ERROR)
        try:
            module = FewShotModule(to_container(cfg), weights="none")
        finally:
            enc_logger.setLevel(level)
    check_state_dict(ckpt["state_dict"], module, path)
    module.load_state_dict(ckpt["state_dict"])
    return module, ckpt
