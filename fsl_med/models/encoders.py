"""The encoder registry and factory: ViT patch-feature encoders (DINOv2 family and any timm ViT) and
ALPNet's original ResNet-101 DeepLabv3 encoder.

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

import difflib
import logging
import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from fsl_med.errors import ConfigError, WeightsError
from fsl_med.models.encoder_base import DenseEncoder, EncoderSpec

__all__ = [
    "EncoderSpec",
    "DenseEncoder",
    "ViTPatchEncoder",
    "create_encoder",
    "get_encoder_spec",
    "list_encoders",
    "register_encoder",
    "FINETUNE_MODES",
    "ADAPTERS",
    "LORA_TARGETS",
]

logger = logging.getLogger(__name__)

FINETUNE_MODES: tuple[str, ...] = ("full", "frozen", "lora")
ADAPTERS: tuple[str, ...] = ("none", "conv1", "conv3")
LORA_TARGETS: tuple[str, ...] = ("qkv", "proj", "fc1", "fc2")



# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------


FAMILIES: tuple[str, ...] = ("vit", "resnet")
TIMM_PREFIX = "timm:"

_REGISTRY: dict[str, EncoderSpec] = {}


def register_encoder(spec: EncoderSpec) -> None:
    """Add ``spec`` to the registry under ``spec.name``.

    Re-registering an identical spec is a no-op. Raises ValueError if the name is already taken by a
    different spec, if the name is empty, or if timm does not know ``spec.timm_name``.
    """
    if not isinstance(spec, EncoderSpec):
        raise TypeError(f"register_encoder expects an EncoderSpec, got {type(spec).__name__}")
    if not spec.name:
        raise ValueError("EncoderSpec.name must be a non-empty string")
    if spec.family not in FAMILIES:
        raise ValueError(f"encoder {spec.name!r}: unknown family {spec.family!r} (valid: {', '.join(FAMILIES)})")
    if spec.family == "vit" and not timm.is_model(spec.timm_name):
        raise ValueError(f"encoder {spec.name!r}: timm {timm.__version__} has no model {spec.timm_name!r}")
    old = _REGISTRY.get(spec.name)
    if old is not None and old != spec:
        raise ValueError(f"encoder name {spec.name!r} is already registered with a different spec")
    _REGISTRY[spec.name] = spec


def list_encoders() -> list[str]:
    """Sorted names of all registered encoders."""
    return sorted(_REGISTRY)


def get_encoder_spec(name: str) -> EncoderSpec:
    """Look up a registered encoder.

    Raises ConfigError (naming ``model.encoder.name``, the bad value and the closest valid name) for an
    unknown name.
    """
    spec = _REGISTRY.get(name) if isinstance(name, str) else None
    if spec is None and isinstance(name, str) and name.startswith(TIMM_PREFIX):
        spec = _timm_vit_spec(name)
        register_encoder(spec)
    if spec is None:
        names = list_encoders()
        close = difflib.get_close_matches(str(name), names, n=1, cutoff=0.0)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"model.encoder.name: unknown encoder {name!r}{hint} (valid: {', '.join(names)})")
    return spec


def _timm_vit_spec(name: str) -> EncoderSpec:
    """Spec of ``timm:<architecture>[.<tag>]``: embed dim, patch size and prefix tokens read from the timm
    model built on the meta device (no memory, no download). ConfigError if timm does not know the
    architecture or it is not a ViT with a patch-token path (``patch_embed`` + ``num_prefix_tokens``)."""
    arch, _, tag = name[len(TIMM_PREFIX):].partition(".")
    if not arch or not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models("*vit*"), n=1, cutoff=0.0)
        hint = f"; did you mean 'timm:{close[0]}'?" if close else ""
        raise ConfigError(f"model.encoder.name: timm has no architecture {arch!r}{hint}")
    try:
        with torch.device("meta"):
            m = timm.create_model(arch, pretrained=False, num_classes=0, dynamic_img_size=True)
    except TypeError as exc:
        raise ConfigError(f"model.encoder.name: timm architecture {arch!r} is not a ViT with dynamic patch "
                          f"tokens ({_first_line(exc)})") from exc
    pe = getattr(m, "patch_embed", None)
    if pe is None or not hasattr(m, "num_prefix_tokens") or not hasattr(m, "forward_features"):
        raise ConfigError(f"model.encoder.name: timm architecture {arch!r} has no patch-token path "
                          "(needs patch_embed, num_prefix_tokens and forward_features)")
    ps = pe.patch_size
    patch = int(ps[0] if isinstance(ps, (tuple, list)) else ps)
    dim = int(getattr(m, "embed_dim", getattr(m, "num_features", 0)))
    return EncoderSpec(name, arch, dim, patch, tag or None, int(getattr(m, "num_reg_tokens", 0)))


def _register_builtin() -> None:
    sizes = (("s", "small", 384), ("b", "base", 768), ("l", "large", 1024), ("g", "giant", 1536))
    for letter, word, dim in sizes:
        register_encoder(
            EncoderSpec(f"dinov2_vit{letter}14", f"vit_{word}_patch14_dinov2", dim, 14, "lvd142m")
        )
        register_encoder(
            EncoderSpec(f"dinov2_vit{letter}14_reg", f"vit_{word}_patch14_reg4_dinov2", dim, 14, "lvd142m", 4)
        )
    # ALPNet's encoder: torchvision DeepLabv3 ResNet-101 backbone (stride 8) + 2048 -> 256 1x1 projection
    register_encoder(EncoderSpec("resnet101_deeplabv3", "", 256, 8, "coco", family="resnet"))
    tiny = {"embed_dim": 64, "depth": 2, "num_heads": 2}
    # NOT official weights: tiny DINOv2-shaped ViTs for tests and CPU demos.
    register_encoder(EncoderSpec("vit_tiny_patch14", "vit_small_patch14_dinov2", 64, 14, None, 0, dict(tiny)))
    register_encoder(
        EncoderSpec("vit_tiny_patch14_reg", "vit_small_patch14_reg4_dinov2", 64, 14, None, 4, dict(tiny))
    )


_register_builtin()


# --------------------------------------------------------------------------------------------------
# Encoder module
# --------------------------------------------------------------------------------------------------


def _make_adapter(adapter: str) -> nn.Module | None:
    """Input adapter applied before the ViT (3 -> 3 channels, spatial size kept)."""
    if adapter == "none":
        return None
    if adapter == "conv1":
        return nn.Sequential(nn.Conv2d(3, 3, 1), nn.InstanceNorm2d(3, affine=True))
    if adapter == "conv3":
        return nn.Sequential(
            nn.Conv2d(3, 32, 1),
            nn.InstanceNorm2d(32, affine=True),
            nn.ReLU(inplace=True),
            nn.Conv2d(32, 8, 1),
            nn.InstanceNorm2d(8, affine=True),
            nn.ReLU(inplace=True),
            nn.Conv2d(8, 3, 1),
        )
    raise ConfigError(f"model.encoder.adapter: unknown adapter {adapter!r} (valid: {', '.join(ADAPTERS)})")


class ViTPatchEncoder(DenseEncoder):
    """Dense patch-feature encoder around a timm ViT.

    ``forward``: input ``[B, 3, H, W]`` float -> ``[B, embed_dim, fs, fs]`` (``fs = feature_size``).

    Steps: bilinear resize to ``(H//p*p, W//p*p)`` (e.g. 256 -> 252 for p=14; skipped when already a
    multiple), optional ImageNet normalisation, optional adapter, timm ``forward_features``, keep the
    final LayerNorm-ed patch tokens (cls and register tokens dropped), reshape to ``[B, C, h, w]``
    (``h = H'//p``), and bilinearly upsample to ``feature_size`` when the grid is smaller (a side that
    is already >= ``feature_size`` keeps its size). Inputs of any size >= patch work (the ViT is
    built with dynamic position-embedding resampling).

    Attributes:
        spec: the :class:`EncoderSpec`.
        vit: the timm VisionTransformer (LoRA-injected when ``finetune == "lora"``).
        adapter: the input adapter or None.
        out_channels: ``spec.embed_dim``.
        feature_size: minimum output grid side.
        patch_size: ``spec.patch_size``.
        imagenet_norm: whether ImageNet mean/std normalisation is applied.
        finetune: ``"full"``, ``"frozen"`` or ``"lora"`` (set by :func:`create_encoder`).
    """

    def __init__(
        self,
        vit: nn.Module,
        spec: EncoderSpec,
        feature_size: int = 32,
        adapter: nn.Module | None = None,
        imagenet_norm: bool = False,
        finetune: str = "full",
    ) -> None:
        super().__init__(spec, feature_size, adapter, imagenet_norm, finetune, spec.embed_dim)
        self.vit = vit
        self.patch_size: int = int(spec.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` float -> ``[B, out_channels, h', w']`` with ``h', w' >= feature_size``."""
        self.check_input(x)
        p = self.patch_size
        h_in, w_in = int(x.shape[-2]), int(x.shape[-1])
        if h_in < p or w_in < p:
            raise ValueError(f"encoder input {h_in}x{w_in} is smaller than the patch size {p}")
        th, tw = (h_in // p) * p, (w_in // p) * p
        if (th, tw) != (h_in, w_in):
            x = F.interpolate(x, size=(th, tw), mode="bilinear", align_corners=False)
        x = self.normalise_and_adapt(x)
        tokens = self.vit.forward_features(x)  # [B, prefix + h*w, C], final norm applied
        tokens = tokens[:, int(self.vit.num_prefix_tokens) :]
        h, w = th // p, tw // p
        feats = tokens.reshape(tokens.shape[0], h, w, tokens.shape[-1]).permute(0, 3, 1, 2)  # NHWC strides
        return self.to_feature_size(feats)


# --------------------------------------------------------------------------------------------------
# Weight loading
# --------------------------------------------------------------------------------------------------

_WRAPPER_KEYS = ("state_dict", "model", "teacher", "module", "model_ema", "student")
_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.")


def _unwrap_state_dict(obj: Any, path: str) -> dict[str, torch.Tensor]:
    """Find the tensor dict inside a checkpoint (``{"model": sd}``, ``{"teacher": ...}``, ...)."""
    for _ in range(4):
        if not isinstance(obj, Mapping):
            break
        if any(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"weights file {path}: no state dict of tensors found in it")
    sd = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    # Strip a common prefix such as "module." or "backbone." (DINOv2 training checkpoints).
    anchor = "patch_embed.proj.weight"
    prefixes = [k[: -len(anchor)] for k in sd if k.endswith(anchor)]
    if len(prefixes) == 1 and prefixes[0]:
        pre = prefixes[0]
        sd = {k[len(pre) :]: v for k, v in sd.items() if k.startswith(pre)}
    # Flatten DINOv2 "block chunks" (blocks.<chunk>.<i>.*) into blocks.<i>.*
    if any(_CHUNKED_BLOCK.match(k) for k in sd):
        sd = {_CHUNKED_BLOCK.sub(r"blocks.\1.", k): v for k, v in sd.items()}
    return sd


def _read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``path`` (.safetensors via safetensors, else torch.load weights_only)."""
    if not path.exists():
        raise WeightsError(f"model.encoder.weights: file {path} does not exist")
    if not path.is_file():
        raise WeightsError(f"model.encoder.weights: {path} is not a file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # any read failure is the file's fault
        raise WeightsError(
            f"weights file {path} is unreadable or truncated ({type(exc).__name__}: {_first_line(exc)})"
        ) from exc
    return _unwrap_state_dict(obj, str(path))


def _first_line(exc: BaseException, limit: int = 160) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _is_meta_format(sd: Mapping[str, torch.Tensor]) -> bool:
    return "mask_token" in sd or "register_tokens" in sd or any(".mlp.w12." in k for k in sd)


def _meta_to_timm(sd: dict[str, torch.Tensor], vit: nn.Module) -> dict[str, torch.Tensor]:
    """Convert Meta DINOv2 keys to timm's (register tokens, cls + pos[0], SwiGLU w12/w3)."""
    from timm.models.vision_transformer import _convert_dinov2

    return _convert_dinov2(dict(sd), vit)  # it pops from its argument: give it a copy


def _examples(items: list[str], n: int = 3) -> str:
    shown = ", ".join(items[:n])
    return shown + (", ..." if len(items) > n else "")


def _check_compatible(sd: Mapping[str, torch.Tensor], vit: nn.Module, path: str, name: str) -> None:
    """Strict key/shape check before loading; raises a one-line WeightsError on any mismatch.

    ``pos_embed`` may differ in its number of grid tokens (it is resampled), but not in its channel
    count or prefix-token layout.
    """
    target = vit.state_dict()
    missing = [k for k in target if k not in sd]  # model order: the first ones are the most telling
    unexpected = [k for k in sd if k not in target]
    mismatched: list[str] = []
    n_prefix = 0 if getattr(vit, "no_embed_class", False) else int(getattr(vit, "num_prefix_tokens", 1))
    for k in (k for k in target if k in sd):
        have, want = tuple(sd[k].shape), tuple(target[k].shape)
        if k == "pos_embed":
            grid = have[1] - n_prefix if len(have) == 3 else -1
            ok = len(have) == 3 and have[0] == 1 and have[2] == want[2] and grid > 0
            ok = ok and math.isqrt(grid) ** 2 == grid
        else:
            ok = have == want
        if not ok:
            mismatched.append(f"{k} {list(have)} vs {list(want)}")
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({_examples(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({_examples(unexpected)})")
        if mismatched:
            parts.append(f"{len(mismatched)} shape-mismatched ({_examples(mismatched)}; file vs model)")
        raise WeightsError(f"weights file {path} does not fit encoder {name}: " + "; ".join(parts))


def _load_file_into(vit: nn.Module, path: Path, spec: EncoderSpec) -> None:
    """Load a Meta-format or timm-format weight file into ``vit`` (strict; pos_embed resampled)."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    sd = _read_weights_file(path)
    fmt = "Meta DINOv2"
    if _is_meta_format(sd):
        sd = _meta_to_timm(sd, vit)
    else:
        fmt = "timm"
    _check_compatible(sd, vit, str(path), spec.name)
    # timm's filter resamples pos_embed to the model grid (bicubic, antialiased), as its hub path does.
    sd = checkpoint_filter_fn(dict(sd), vit)
    try:
        vit.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise WeightsError(
            f"weights file {path} does not fit encoder {spec.name}: {_first_line(exc)}"
        ) from exc
    logger.info("Loaded %s-format weights for encoder %s from %s", fmt, spec.name, path)


# --------------------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------------------


def _lora_regex(targets: Sequence[str]) -> str:
    """Regex (fullmatch on module names) for Linear layers inside transformer blocks."""
    attn = [t for t in LORA_TARGETS[:2] if t in targets]
    mlp = [t for t in LORA_TARGETS[2:] if t in targets]
    alts = []
    if attn:
        alts.append(rf"attn\.({'|'.join(attn)})")
    if mlp:
        alts.append(rf"mlp\.({'|'.join(mlp)})")
    return rf"blocks\.\d+\.({'|'.join(alts)})"


RESNET_LORA_REGEX = r"layer\d\.\d+\.conv[13]"
"""LoRA targets of the ResNet backbone: the 1×1 convolutions of its bottleneck blocks (peft's Conv2d LoRA does
not carry the dilation of the 3×3 ones in the dilated layer3/layer4)."""


def _inject_lora(vit: nn.Module, rank: int, targets: Sequence[str], regex: str | None = None) -> nn.Module:
    """Freeze ``vit`` and inject peft LoRA (scale 1, gaussian init, no dropout) on the layers ``regex``
    (default: the ViT Linear layers ``targets``) matches; returns the model."""
    from peft import LoraConfig, inject_adapter_in_model

    vit.requires_grad_(False)
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        lora_dropout=0.0,
        init_lora_weights="gaussian",
        target_modules=regex or _lora_regex(targets),
        bias="none",
    )
    vit = inject_adapter_in_model(config, vit)
    n_lora = 0
    for n, p in vit.named_parameters():
        p.requires_grad = "lora_" in n
        n_lora += int("lora_" in n)
    if n_lora == 0:
        raise ConfigError(
            f"model.encoder.lora_targets: {list(targets)} matched no Linear layer of the encoder"
        )
    return vit


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
        lora_targets: subset of ``("qkv", "proj", "fc1", "fc2")``; LoRA goes on those Linear layers
            of every transformer block.
        feature_size: minimum side of the output feature map (token grids below are upsampled).
        input_size: expected input side; the ViT position embedding is built for
            ``(input_size // patch) * patch`` (other sizes still work, with runtime resampling).
        adapter: ``"none"`` | ``"conv1"`` | ``"conv3"`` input adapter.
        imagenet_norm: normalise inputs with ImageNet mean/std before the adapter/ViT.
        arch_overrides: extra timm architecture kwargs of a ViT (e.g. ``{"depth": 1}`` for a cheap model with
            the same key format in tests); not for the ResNet.

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
    adapter_module = _make_adapter(adapter)
    if weights is None:
        weights = "none"
    weights_str = os.fspath(weights)
    if not weights_str:
        raise ConfigError("model.encoder.weights: empty value (use 'none', a hub tag or a file path)")

    if spec.family == "resnet":
        return _create_resnet(spec, weights_str, finetune, lora_rank, feature_size, adapter_module, imagenet_norm)

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
                f"failed ({type(exc).__name__}: {_first_line(exc)}); pass a local file path as "
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
        _load_file_into(vit, path, spec)

    if finetune == "frozen":
        vit.requires_grad_(False)
    elif finetune == "lora":
        vit = _inject_lora(vit, lora_rank, tuple(lora_targets))
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
                   adapter: nn.Module | None, imagenet_norm: bool) -> nn.Module:
    """ALPNet's ResNet-101 DeepLabv3 encoder with weights ``none`` | ``coco`` | a file, then fine-tuning."""
    from fsl_med.models import resnet_encoder as rn

    enc = rn.ResNetDeepLabEncoder(spec, feature_size=feature_size, adapter=adapter, imagenet_norm=imagenet_norm,
                                  finetune=finetune)
    if weights == "none":
        _random_init_warning(spec.name)
    elif weights == spec.hub_tag:
        rn.load_weights(enc, rn.coco_state_dict(), "torchvision COCO (download)")
    else:
        path = Path(weights).expanduser()
        rn.load_weights(enc, _read_weights_file(path), str(path))  # missing/unreadable file: one-line error
    if finetune == "frozen":
        enc.backbone.requires_grad_(False)
    elif finetune == "lora":
        enc.backbone = _inject_lora(enc.backbone, lora_rank, (), regex=RESNET_LORA_REGEX)
    return enc.train(enc.training)
