"""The encoder registry: one :class:`~fsl_med.models.encoder_base.EncoderSpec` per name (DINOv2 family, the tiny
test ViTs, ALPNet's ResNet-101 DeepLabv3) plus ``timm:<architecture>[.<tag>]`` names registered on first use.
:func:`fsl_med.models.encoders.create_encoder` builds what a spec names."""

from __future__ import annotations

import difflib

import timm
import torch

from fsl_med.errors import ConfigError, first_line
from fsl_med.models.encoder_base import EncoderSpec

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
                          f"tokens ({first_line(exc)})") from exc
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
    register_encoder(EncoderSpec("resnet101_deeplabv3", "", 256, 8, "coco", family="resnet", maps=("out",)))
    # the Q-Net/RPT reference ResNet-101 (dilation [T, T, F]): layer3 -> 512 at stride 4, layer4 -> 512 at stride 8
    register_encoder(EncoderSpec("resnet101_qnet", "", 512, 4, "coco", family="resnet"))
    tiny = {"embed_dim": 64, "depth": 2, "num_heads": 2}
    # NOT official weights: tiny DINOv2-shaped ViTs for tests and CPU demos.
    register_encoder(EncoderSpec("vit_tiny_patch14", "vit_small_patch14_dinov2", 64, 14, None, 0, dict(tiny)))
    register_encoder(
        EncoderSpec("vit_tiny_patch14_reg", "vit_small_patch14_reg4_dinov2", 64, 14, None, 4, dict(tiny))
    )


_register_builtin()


def missing_maps(name: str, request: object) -> list[str]:
    """The feature maps of ``request`` (a :class:`~fsl_med.models.features.FeatureRequest`) that encoder ``name``
    cannot return (empty: it serves the request)."""
    spec = get_encoder_spec(name)
    return [m for m in getattr(request, "maps", ()) if m not in spec.maps]
