"""Checkpoints: finding and reading them, the config stored in them, the checks that a checkpoint fits the config
(model, input geometry, tensors), the model and data settings taken from it, and the module built from it.

:func:`adopt_checkpoint` is the one sequence every verb that starts from a checkpoint runs (``eval``, a resumed
``train``, the jobs of ``protocol``/``ablate``/``compare`` through them); :func:`load_for_eval` is that sequence for
Python users: the module and data module ``fsl-med eval`` would test, for a ``Trainer`` of their own callbacks.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import torch
from omegaconf import DictConfig, OmegaConf

from fsl_med.config import HEAD_DEFAULTS, HeadConfig, follow_head, to_container
from fsl_med.data.datamodule import FewShotDataModule
from fsl_med.data.provenance import CHECKPOINT_KEY, TrainedOn
from fsl_med.errors import ConfigError, FslMedError, WeightsError
from fsl_med.models.module import FewShotModule
from fsl_med.prepare.datasets import excluded_labels
from fsl_med.run_config import check_registries, is_explicit, load_run_config, validate_run
from fsl_med.trained_on import adopt_checkpoint_data, check_resume_data, in_sample_scans

log = logging.getLogger(__name__)


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
    return _checkpoint_file(str(value), key)


def _checkpoint_file(value: str, key: str) -> Path:
    """``value`` as an existing checkpoint file (``~`` expanded); the errors name ``key=value``."""
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
        if is_explicit(key, explicit):
            raise ConfigError(f"{key}={ours.get(key)!r} on the command line contradicts the checkpoint {path}, which "
                              f"was trained with {key}={value!r}; drop the override (the checkpoint defines the model)")
        OmegaConf.update(new, key, value, merge=False)
        differ.append(f"{key}={value!r} (config: {ours.get(key)!r})")
    # the checkpoint's head: fields following the head (loss.ce_weights) take its defaults unless given explicitly
    follow_head(new, cfg.model.head.name, keep=tuple(k for k in HEAD_DEFAULTS[new.model.head.name]
                                                     if is_explicit(k, explicit)))
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


class Adopted(NamedTuple):
    """What :func:`adopt_checkpoint` returns."""

    cfg: DictConfig
    """The config to run with (a new validated config; the caller's is not modified)."""
    ckpt: dict[str, Any]
    """The checkpoint as read (:func:`load_checkpoint`)."""
    trained: TrainedOn | None
    """What the checkpoint was trained on (:func:`checkpoint_trained_on`); None when unknown."""


def adopt_checkpoint(cfg: DictConfig, path: Path, explicit: list[str] | tuple[str, ...] = (), *,
                     resume: bool = False, ckpt: dict[str, Any] | None = None) -> Adopted:
    """Read the checkpoint ``path`` and the config to run it with: the sequence that evaluation and resumed training
    share. In order: read it (:func:`load_checkpoint`); evaluation takes every ``model.*`` setting from it
    (:func:`adopt_checkpoint_model`), resuming requires the config's model to be the checkpoint's
    (:func:`check_compatible`); what it was trained on (:func:`checkpoint_trained_on`); resuming refuses another data
    folder (:func:`~fsl_med.trained_on.check_resume_data`); ``data.fold``, ``data.setting`` and ``data.test_organs``
    come from it unless explicit (:func:`~fsl_med.trained_on.adopt_checkpoint_data`).

    Args:
        cfg: the config from the YAML file and command line (not modified).
        path: the checkpoint file (:func:`resolve_ckpt`).
        explicit: the command line's ``key=value`` overrides.
        resume: resuming training (``train``) instead of evaluating (``eval``).
        ckpt: the checkpoint already read from ``path``, to read it once.
    Raises:
        WeightsError: unreadable checkpoint, or a malformed stored config or training record.
        ConfigError: the model differs (resume) or an explicit ``model.*`` override contradicts it (evaluation).
        DataError: resuming on a data folder holding other scans (unless ``resume_allow_other_data``).
    """
    ckpt = load_checkpoint(path) if ckpt is None else ckpt
    if resume:
        stored = stored_config(ckpt, path)
        check_compatible(to_container(stored), cfg, path)
    else:
        cfg = adopt_checkpoint_model(cfg, ckpt, path, explicit)
    trained = checkpoint_trained_on(ckpt, path, cfg)
    if resume:
        check_resume_data(cfg, trained, str(stored.data.root), path)
    return Adopted(adopt_checkpoint_data(cfg, trained, path, explicit), ckpt, trained)


class ForEval(NamedTuple):
    """What :func:`load_for_eval` returns: ``module, datamodule = load_for_eval(...)``."""

    module: FewShotModule
    """The checkpoint's model, its weights loaded (``module.trained_on``: what it was trained on)."""
    datamodule: FewShotDataModule
    """The evaluation data of ``datamodule.cfg`` (the config used, checkpoint settings adopted); not set up yet:
    ``Trainer.test`` calls its ``setup("test")``."""


def load_for_eval(ckpt: str | os.PathLike[str], overrides: list[str] | tuple[str, ...] = (), *,
                  config: str | os.PathLike[str] | None = None) -> ForEval:
    """The module and data module that ``fsl-med eval`` tests, to run through a ``Trainer`` of your own callbacks::

        module, datamodule = load_for_eval("lightning_logs/mri/version_0/checkpoints/last.ckpt",
                                           overrides=["data.root=data/chaos_mr_t2"])
        results = L.Trainer(logger=False, callbacks=[CCA("2d"), Closing(), Scoring()]).test(module,
                                                                                            datamodule=datamodule)

    (``logger=False``: Lightning's default logger, ``logger=True``, writes ``lightning_logs/version_N`` into the
    working folder, its ``default_root_dir``. Nothing here can tell that logger from one passed on purpose, so it is
    left to the Trainer's caller. ``results[0]`` holds the logged Dice: ``test/dice_closing`` and per organ.)

    Args:
        ckpt: a checkpoint file written by ``fsl-med train`` (``~`` expanded). With ``config``, also
            ``latest``/``last`` as on the command line (the newest ``last.ckpt`` of the config's runs).
        overrides: ``key=value`` settings, as on the command line and counted as given there: typically
            ``data.root`` when the data folder is not where training found it, a ``data.fold`` to evaluate,
            ``eval.*``. A ``model.*`` override that contradicts the checkpoint is an error (the checkpoint defines
            the model).
        config: the YAML file ``fsl-med eval CONFIG`` would read. ``None``: the config stored in the checkpoint
            (the training run's settings), so only what differs needs an override.
    Returns:
        ``(module, datamodule)``: the checkpoint's model with its weights, and the data module of the config
        ``fsl-med eval`` would use (``model.*`` and ``data.fold``/``setting``/``test_organs`` from the checkpoint
        unless overridden); ``datamodule.cfg`` is that config.
    Raises:
        WeightsError: ``ckpt`` missing, a folder, unreadable, or not an fsl_med checkpoint; weights of another
            architecture.
        ConfigError: a bad override or config file; ``ckpt`` ``latest`` without ``config``; a ``model.*`` override
            that contradicts the checkpoint; ``overrides`` given as one string.
        DataError: the evaluation would score, or take its support from, scans the model trained or validated on
            (override ``data.fold`` to evaluate another fold, or ``eval.allow_train_scans=true`` for a deliberate
            in-sample analysis, which is logged). The data folder itself is read by ``Trainer.test``, which reports
            a folder with no scorable query volume.
    """
    from fsl_med.config import apply_overrides, from_container

    if isinstance(overrides, str):
        raise ConfigError(f"overrides: a list of key=value strings, got the string {overrides!r} (write [{overrides!r}])")
    over = list(overrides)
    value = os.fspath(ckpt)
    if config is not None:
        cfg = load_run_config(config, over)
        OmegaConf.update(cfg, "ckpt", value, merge=False)
        path = resolve_ckpt(cfg)
        assert path is not None
        raw = load_checkpoint(path)
    else:
        if value in ("latest", "last"):
            raise ConfigError(f"ckpt={value}: needs config= (the YAML file whose runs are searched); or give the "
                              "checkpoint file")
        path = _checkpoint_file(value, "ckpt")
        raw = load_checkpoint(path)
        cfg = from_container(to_container(apply_overrides(stored_config(raw, path), over)))
        check_registries(cfg)
    cfg, raw, trained = adopt_checkpoint(cfg, path, over, ckpt=raw)
    module, _ = module_from_checkpoint(path, cfg, raw)
    module.trained_on = trained
    datamodule = FewShotDataModule(cfg)
    in_sample_scans(cfg, trained, datamodule, f"checkpoint {path}")  # before any query volume is read
    return ForEval(module, datamodule)
