"""The encoder factory, :func:`create_encoder` (the one way to build an encoder, like timm's ``create_model``):
ViT patch-feature encoders (DINOv2 family and any timm ViT) and ALPNet's original ResNet-101 DeepLabv3 encoder.

Its parts: the registry of names (:mod:`~fsl_med.models.encoder_registry`), the ViT encoder module
(:mod:`~fsl_med.models.vit_encoder`), weight files (:mod:`~fsl_med.models.encoder_weights`), LoRA
(:mod:`~fsl_med.models.lora`) and the ResNet (:mod:`~fsl_med.models.resnet_encoder`).

An encoder maps an image batch ``[B, 3, H, W]`` to a dense feature map
``[B, C, feature_size, feature_size]``: for a ViT the final (LayerNorm-ed) patch tokens, bilinearly
upsampled when the token grid is coarser than ``feature_size``; for ``resnet101_deeplabv3`` the stride-8
backbone features projected 2048 -> 256 (:mod:`fsl_med.models.resnet_encoder`).

Names: the registered ones (:func:`list_encoders`: ``dinov2_vit{s,b,l,g}14[_reg]``, ``resnet101_deeplabv3``,
tiny test ViTs) or ``timm:<architecture>[.<tag>]`` for any timm ViT with a patch-token path (e.g.
``timm:vit_small_patch16_224.dino``), registered on first use.

Weights come from one of three sources (``model.encoder.weights``):

* ``"none"``: random initialisation (loud warning; results will be far below the paper);
* a hub tag of the encoder (``"lvd142m"``): official weights through timm's Hugging Face hub;
* a local file: an official Meta ``dinov2_vit*14[_reg4]_pretrain.pth`` or a timm-format state dict
  (``.pth``/``.pt``/``.bin``/``.safetensors``), converted and position-resampled on load and checked
  strictly against the architecture.

Fine-tuning modes (``model.encoder.finetune``): ``full``, ``frozen`` and ``lora`` (LoRA via peft on
the Linear layers of the transformer blocks).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import timm
from torch import nn

from fsl_med.config import FINETUNE_MODES, LORA_TARGETS
from fsl_med.errors import ConfigError, WeightsError, first_line
from fsl_med.models.encoder_base import EncoderSpec
from fsl_med.models.encoder_registry import get_encoder_spec
from fsl_med.models.encoder_weights import load_weights_file_into, read_weights_file
from fsl_med.models.features import AUX_MAP, FeatureRequest
from fsl_med.models.lora import RESNET_LORA_REGEX, inject_lora
from fsl_med.models.vit_encoder import ViTPatchEncoder, make_adapter

logger = logging.getLogger(__name__)

def _validate_int(value: Any, key: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


def create_encoder(
    name: str,
    weights: str | os.PathLike[str] = "none",
    finetune: str = "full",
    lora_rank: int = 4,
    lora_targets: Sequence[str] = LORA_TARGETS,
    feature_size: int = 32,
    input_size: int = 256,
    adapter: str = "none",
    imagenet_norm: bool = False,
    arch_overrides: Mapping[str, Any] | None = None,
    request: FeatureRequest | None = None,
) -> nn.Module:
    """Build an encoder: a :class:`ViTPatchEncoder`, or a
    :class:`~fsl_med.models.resnet_encoder.ResNetDeepLabEncoder` for ``resnet101_deeplabv3``.

    Args:
        name: registry name (``model.encoder.name``), see :func:`list_encoders`.
        weights: ``"none"`` (random init, warns), the spec's hub tag (e.g. ``"lvd142m"``: timm hub
            download) or a path to a Meta-format or timm-format weight file (relative paths are
            resolved against the current directory, ``~`` is expanded).
        finetune: ``"full"`` | ``"frozen"`` (ViT frozen, adapter trainable) | ``"lora"`` (ViT frozen,
            LoRA weights and adapter trainable).
        lora_rank: LoRA rank r (> 0; ``lora_alpha = r``); checked only when ``finetune == "lora"``.
        lora_targets: subset of :data:`fsl_med.config.LORA_TARGETS`; LoRA goes on those Linear layers
            of every transformer block.
        feature_size: minimum side of the output feature map (token grids below are upsampled).
        input_size: expected input side; the ViT position embedding is built for
            ``(input_size // patch) * patch`` (other sizes still work, with runtime resampling).
        adapter: ``"none"`` | ``"conv1"`` | ``"conv3"`` input adapter.
        imagenet_norm: normalise inputs with ImageNet mean/std before the adapter/ViT.
        arch_overrides: extra timm architecture kwargs of a ViT (e.g. ``{"depth": 1}`` for a cheap model with
            the same key format in tests); not for the ResNet.
        request: the outputs the head will ask for (:class:`~fsl_med.models.features.FeatureRequest`); an encoder
            builds no layer that only an unrequested map uses (``resnet101_qnet``'s ``reduce2``). Default: the main map.

    Raises:
        ConfigError: unknown name / finetune / adapter / lora target, or bad sizes / rank.
        WeightsError: missing, unreadable or incompatible weight file; failed hub download.
    """
    spec = get_encoder_spec(name)
    if finetune not in FINETUNE_MODES:
        raise ConfigError(
            f"model.encoder.finetune: unknown mode {finetune!r} (valid: {', '.join(FINETUNE_MODES)})"
        )
    if finetune == "lora":
        lora_rank = _validate_int(lora_rank, "model.encoder.lora_rank", 1)
        if isinstance(lora_targets, str):
            lora_targets = (lora_targets,)
        bad = [t for t in lora_targets if t not in LORA_TARGETS]
        if not lora_targets or bad:
            raise ConfigError(
                f"model.encoder.lora_targets: {list(lora_targets)} must be a non-empty subset of "
                f"{list(LORA_TARGETS)}"
            )
    feature_size = _validate_int(feature_size, "model.encoder.feature_size", 1)
    input_size = _validate_int(input_size, "model.encoder.input_size", spec.patch_size)
    adapter_module = make_adapter(adapter)
    if weights is None:
        weights = "none"
    weights_str = os.fspath(weights)
    if not weights_str:
        raise ConfigError("model.encoder.weights: empty value (use 'none', a hub tag or a file path)")

    if spec.family == "resnet":
        return _create_resnet(spec, weights_str, finetune, lora_rank, feature_size, adapter_module, imagenet_norm,
                              request or FeatureRequest())

    img_size = (input_size // spec.patch_size) * spec.patch_size
    kwargs: dict[str, Any] = dict(spec.timm_kwargs)
    kwargs.update(arch_overrides or {})
    kwargs.update(img_size=img_size, num_classes=0, dynamic_img_size=True)

    if weights_str == "none":
        vit = timm.create_model(spec.timm_name, pretrained=False, **kwargs)
        _random_init_warning(spec.name)
    elif spec.hub_tag is not None and weights_str == spec.hub_tag:
        try:
            vit = timm.create_model(f"{spec.timm_name}.{spec.hub_tag}", pretrained=True, **kwargs)
        except Exception as exc:  # network/cache failures come in many types
            raise WeightsError(
                f"model.encoder.weights={weights_str!r}: hub download of the official {spec.name} weights "
                f"failed ({type(exc).__name__}: {first_line(exc)}); pass a local file path as "
                "model.encoder.weights instead"
            ) from exc
        logger.info("Loaded hub weights %s.%s for encoder %s", spec.timm_name, spec.hub_tag, spec.name)
    else:
        path = Path(weights_str).expanduser()
        looks_like_tag = os.sep not in weights_str and "/" not in weights_str and not path.suffix
        if looks_like_tag and not path.exists():
            tags = f"its hub tag is {spec.hub_tag!r}" if spec.hub_tag else "it has no hub weights"
            raise WeightsError(
                f"model.encoder.weights={weights_str!r} is neither a file nor a hub tag of encoder "
                f"{spec.name} ({tags}); use 'none', the hub tag or a weight file path"
            )
        vit = timm.create_model(spec.timm_name, pretrained=False, **kwargs)
        load_weights_file_into(vit, path, spec)

    if finetune == "frozen":
        vit.requires_grad_(False)
    elif finetune == "lora":
        vit = inject_lora(vit, lora_rank, tuple(lora_targets))
    else:
        vit.requires_grad_(True)
    return ViTPatchEncoder(
        vit,
        spec,
        feature_size=feature_size,
        adapter=adapter_module,
        imagenet_norm=imagenet_norm,
        finetune=finetune,
    )


def _random_init_warning(name: str) -> None:
    msg = (
        f"encoder {name} is RANDOMLY INITIALISED (model.encoder.weights='none'): "
        "results will be far below the paper; pass pretrained (e.g. official DINOv2) weights for real runs"
    )
    warnings.warn(msg, UserWarning, stacklevel=3)
    logger.warning(msg)


def _create_resnet(spec: EncoderSpec, weights: str, finetune: str, lora_rank: int, feature_size: int,
                   adapter: nn.Module | None, imagenet_norm: bool, request: FeatureRequest) -> nn.Module:
    """A ResNet-101 encoder (ALPNet's DeepLabv3 one, or ``resnet101_qnet``) with weights ``none`` | ``coco`` | a
    file, then fine-tuning."""
    from fsl_med.models import resnet_encoder as rn

    if spec.name == "resnet101_qnet":
        enc = rn.ResNetQnetEncoder(spec, feature_size=feature_size, adapter=adapter, imagenet_norm=imagenet_norm,
                                   finetune=finetune, with_aux=AUX_MAP in request.maps,
                                   with_layer4=request.pooled)
    else:
        enc = rn.ResNetDeepLabEncoder(spec, feature_size=feature_size, adapter=adapter, imagenet_norm=imagenet_norm,
                                      finetune=finetune)
    if weights == "none":
        _random_init_warning(spec.name)
    elif weights == spec.hub_tag:
        rn.load_weights(enc, rn.coco_state_dict(), "torchvision COCO (download)")
    else:
        path = Path(weights).expanduser()
        rn.load_weights(enc, read_weights_file(path), str(path))  # missing/unreadable file: one-line error
    if finetune == "frozen":
        enc.backbone.requires_grad_(False)
    elif finetune == "lora":
        enc.backbone = inject_lora(enc.backbone, lora_rank, (), regex=RESNET_LORA_REGEX)
    return enc.train(enc.training)
