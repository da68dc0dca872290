"""The configuration a verb runs with: the schema's checks (:func:`fsl_med.config.validate`) plus the names it takes
from the registries (dataset, folds, organs, encoder, head), and which keys the command line gave explicitly."""

from __future__ import annotations

import os

from omegaconf import DictConfig

from fsl_med.config import load_config, validate
from fsl_med.errors import ConfigError
from fsl_med.models.encoder_registry import get_encoder_spec, missing_maps
from fsl_med.prepare.datasets import check_data_settings


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


def is_explicit(key: str, explicit: list[str] | tuple[str, ...]) -> bool:
    """Whether ``key`` (or a section holding it) is set by one of the ``key=value`` overrides in ``explicit``."""
    given = [item.split("=", 1)[0].strip().lstrip("+") for item in explicit if "=" in item]
    return any(key == g or key.startswith(g + ".") for g in given)
