"""ALPNet's original encoder, the DeepLabv3 ResNet-101 backbone with a 2048 -> 256 1×1 projection
(``resnet101_deeplabv3``), and the Q-Net/RPT reference's two-scale variant (``resnet101_qnet``).

``resnet101_qnet`` (Q-Net's reference code, ``models/encoder.py``): ResNet-101 with dilation [True, True, False]
(layer2 and layer3 dilated: stride 4 after layer3, 8 after layer4), ``reduce1`` (1×1 1024 -> 512, no bias) on layer3
as the main map ``"out"`` (64×64 at 256 px), ``reduce2`` (1×1 2048 -> 512, no bias) on layer4 as ``"aux"`` (32×32),
and ``pooled`` = global average of layer4 (2048). The reduce convolutions are Kaiming-initialised (fan_out), as the
reference; ``reduce2`` exists only when a head asks for ``"aux"`` (RPT does not: no unused parameter under DDP). The
reference's ``fc``/``reduce1d`` threshold layers belong to the heads (:mod:`fsl_med.models.heads`). The same weight
files load (the backbone's keys are the same; the dilation differs).

method.md §3: torchvision's ``deeplabv3_resnet101`` backbone (ResNet-101 with dilated layer3/layer4, output
stride 8; no ASPP head), whose ``out`` features (2048 channels, 32×32 at 256 px) go through a bias-free
1×1 convolution to 256 channels. The module's keys are torchvision's (``backbone.conv1.weight``, ...,
``backbone.layer4.2.bn3.running_var``) plus ``proj.weight``, so the official COCO checkpoint
(``deeplabv3_resnet101_coco-586e9e4e.pth``) loads without renaming.

Weights (``model.encoder.weights``): ``none`` (random init, loud warning), ``coco`` (torchvision's download
of the official COCO weights) or a local file holding any of: a torchvision DeepLabv3 state dict
(``backbone.*``; ``classifier.*``/``aux_classifier.*``, the unused ASPP heads, are ignored), an ImageNet
ResNet-101 state dict (``conv1.weight``, ``layer1...``; ``fc.*`` ignored) or an fsl_med encoder state dict
(``backbone.*`` and ``proj.weight``). The projection is randomly initialised unless the file has it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import nn

from fsl_med.errors import ConfigError, WeightsError
from fsl_med.models.encoder_base import DenseEncoder, EncoderSpec
from fsl_med.models.features import AUX_MAP, MAIN_MAP, EncoderOutput, FeatureRequest

logger = logging.getLogger(__name__)

RESNET_OUT_CHANNELS = 2048
PROJ_CHANNELS = 256
_IGNORED_PREFIXES = ("classifier.", "aux_classifier.", "fc.")


QNET_CHANNELS = 512
LAYER3_CHANNELS = 1024


def build_backbone(dilation: tuple[bool, bool, bool] = (False, True, True),
                   return_layers: dict[str, str] | None = None) -> nn.Module:
    """torchvision's ResNet-101 with ``dilation`` (DeepLabv3's default: stride 8), random init, returning
    ``return_layers`` (default ``{"layer4": "out"}``)."""
    from torchvision.models import resnet101
    from torchvision.models._utils import IntermediateLayerGetter

    resnet = resnet101(weights=None, replace_stride_with_dilation=list(dilation))
    return IntermediateLayerGetter(resnet, return_layers=return_layers or {"layer4": "out"})


class ResNetDeepLabEncoder(DenseEncoder):
    """Dense features of the DeepLabv3 ResNet-101 backbone, projected to 256 channels.

    ``forward``: ``[B, 3, H, W]`` float -> ``[B, 256, h, w]`` with ``h = ceil(H / 8)``, bilinearly upsampled
    when a side is below ``feature_size`` (32×32 at 256 px, as ALPNet). Optional ImageNet normalisation and
    slice adapter come first, as for the ViT encoders.

    With ``finetune`` ``frozen`` or ``lora`` the backbone's BatchNorm layers stay in eval mode (their running
    statistics are not updated); the projection and the adapter always train.
    """

    def __init__(self, spec: EncoderSpec, feature_size: int = 32, adapter: nn.Module | None = None,
                 imagenet_norm: bool = False, finetune: str = "full") -> None:
        super().__init__(spec, feature_size, adapter, imagenet_norm, finetune, PROJ_CHANNELS)
        self.backbone = build_backbone()
        self.proj = nn.Conv2d(RESNET_OUT_CHANNELS, PROJ_CHANNELS, kernel_size=1, bias=False)
        self.patch_size = 8  # output stride

    def train(self, mode: bool = True) -> ResNetDeepLabEncoder:
        """As ``nn.Module.train``, but a frozen or LoRA backbone keeps its BatchNorm statistics fixed."""
        super().train(mode)
        if mode and self.finetune in ("frozen", "lora"):
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    own_prefixes: tuple[str, ...] = ("proj.",)
    """Key prefixes of the encoder's own layers after the backbone (loaded when a weight file has them)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` float -> ``[B, 256, h', w']`` with ``h', w' >= feature_size``."""
        self.check_input(x)
        return self.to_feature_size(self.proj(self.backbone(self.normalise_and_adapt(x))["out"]))

    @property
    def pooled_channels(self) -> int:
        return RESNET_OUT_CHANNELS

    def bundle(self, x: torch.Tensor, request: FeatureRequest) -> EncoderOutput:
        """``[B, 3, H, W]`` -> :class:`EncoderOutput`: ``"out"`` (as :meth:`forward`) and ``pooled`` (global average of
        layer4, ``[B, 2048]``). ConfigError for any other map (this encoder has one scale)."""
        self.check_input(x)
        bad = [m for m in request.maps if m != MAIN_MAP]
        if bad:
            raise ConfigError(f"model.encoder.name: encoder {self.spec.name} has no feature map {bad[0]!r} (it has only "
                              f"{MAIN_MAP!r}; resnet101_qnet or a ViT has a second scale)")
        layer4 = self.backbone(self.normalise_and_adapt(x))["out"]
        return EncoderOutput({MAIN_MAP: self.to_feature_size(self.proj(layer4))},
                             layer4.mean(dim=(-2, -1)) if request.pooled else None)


class ResNetQnetEncoder(ResNetDeepLabEncoder):
    """The Q-Net/RPT reference ResNet-101 (module docstring): ``forward`` -> ``[B, 512, H/4, W/4]`` (``reduce1`` of
    layer3), :meth:`bundle` adds ``"aux"`` (``reduce2`` of layer4, ``[B, 512, H/8, W/8]``) and ``pooled``.

    Args:
        with_aux: build ``reduce2`` (only when a head requests ``"aux"``).
        with_layer4: build layer4 (when a head requests ``"aux"`` or ``pooled``; the main map needs only layer3).
    """

    own_prefixes = ("reduce1.", "reduce2.")

    def __init__(self, spec: EncoderSpec, feature_size: int = 64, adapter: nn.Module | None = None,
                 imagenet_norm: bool = False, finetune: str = "full", with_aux: bool = True,
                 with_layer4: bool = True) -> None:
        DenseEncoder.__init__(self, spec, feature_size, adapter, imagenet_norm, finetune, QNET_CHANNELS)
        with_layer4 = with_layer4 or with_aux
        layers = {"layer3": "layer3", "layer4": "layer4"} if with_layer4 else {"layer3": "layer3"}
        self.backbone = build_backbone((True, True, False), layers)
        self.reduce1 = nn.Conv2d(LAYER3_CHANNELS, QNET_CHANNELS, kernel_size=1, bias=False)
        self.reduce2 = nn.Conv2d(RESNET_OUT_CHANNELS, QNET_CHANNELS, kernel_size=1, bias=False) if with_aux else None
        self.skipped_prefixes = (() if with_layer4 else ("backbone.layer4.",)) + (() if with_aux else ("reduce2.",))
        """Keys of a weight file for layers this instance did not build (ignored on load)."""
        for conv in (self.reduce1, self.reduce2):
            if conv is not None:
                nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        self.patch_size = 4  # output stride of the main map

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` float -> ``[B, 512, h', w']`` (layer3 reduced; ``h', w' >= feature_size``)."""
        self.check_input(x)
        return self.to_feature_size(self.reduce1(self.backbone(self.normalise_and_adapt(x))["layer3"]))

    def bundle(self, x: torch.Tensor, request: FeatureRequest) -> EncoderOutput:
        """``[B, 3, H, W]`` -> :class:`EncoderOutput` with ``"out"`` (layer3 reduced), ``"aux"`` (layer4 reduced, when
        requested and built) and ``pooled`` (GAP of layer4, ``[B, 2048]``)."""
        self.check_input(x)
        feats = self.backbone(self.normalise_and_adapt(x))
        maps = {}
        for name in request.maps:
            if name == MAIN_MAP:
                maps[name] = self.to_feature_size(self.reduce1(feats["layer3"]))
            elif name == AUX_MAP and self.reduce2 is not None:
                maps[name] = self.reduce2(feats["layer4"])
            else:
                raise ConfigError(f"model.encoder.name: encoder {self.spec.name} was built without feature map "
                                  f"{name!r} (maps: {MAIN_MAP!r}{'' if self.reduce2 is None else ', ' + repr(AUX_MAP)})")
        if request.pooled and "layer4" not in feats:
            raise ConfigError(f"model.encoder.name: encoder {self.spec.name} was built without layer4 (no pooled vector)")
        return EncoderOutput(maps, feats["layer4"].mean(dim=(-2, -1)) if request.pooled else None)


def to_encoder_keys(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map a torchvision DeepLabv3, ImageNet ResNet or fsl_med state dict to this module's keys.

    Returns:
        ``(state dict with backbone.* and maybe proj.weight, ignored keys)``.
    """
    ignored = [k for k in sd if k.startswith(_IGNORED_PREFIXES)]
    kept = {k: v for k, v in sd.items() if not k.startswith(_IGNORED_PREFIXES)}
    if "conv1.weight" in kept and "backbone.conv1.weight" not in kept:  # ImageNet ResNet layout
        kept = {f"backbone.{k}": v for k, v in kept.items()}
    return kept, ignored


def load_weights(encoder: ResNetDeepLabEncoder, sd: Mapping[str, torch.Tensor], source: str) -> None:
    """Load ``sd`` (any layout :func:`to_encoder_keys` knows) strictly into ``encoder``'s backbone (and its
    projection when present). Raises a one-line WeightsError naming ``source`` on any key or shape mismatch."""
    kept, ignored = to_encoder_keys(sd)
    skipped = tuple(getattr(encoder, "skipped_prefixes", ()))
    if skipped:  # layers this instance does not build (resnet101_qnet without layer4 / reduce2)
        ignored += [k for k in kept if k.startswith(skipped)]
        kept = {k: v for k, v in kept.items() if not k.startswith(skipped)}
    own = encoder.own_prefixes
    target = {k: v for k, v in encoder.state_dict().items() if k.startswith(("backbone.", *own))}
    missing = [k for k in target if k.startswith("backbone.") and k not in kept]
    unexpected = [k for k in kept if k not in target]
    mismatched = [f"{k} {list(kept[k].shape)} vs {list(v.shape)}" for k, v in target.items()
                  if k in kept and tuple(kept[k].shape) != tuple(v.shape)]
    if missing or unexpected or mismatched:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape-mismatched", mismatched)):
            if items:
                parts.append(f"{len(items)} {label} ({', '.join(items[:3])}{', ...' if len(items) > 3 else ''})")
        raise WeightsError(f"weights file {source} does not fit encoder {encoder.spec.name}: " + "; ".join(parts))
    encoder.load_state_dict(kept, strict=False)
    has_proj = any(k.startswith(own) for k in kept)
    logger.info("Loaded ResNet-101 weights into %s from %s (%d tensors%s; ignored %d head tensors)", encoder.spec.name,
                source, len(kept), "" if has_proj else ", projection randomly initialised", len(ignored))


def coco_state_dict() -> dict[str, torch.Tensor]:
    """torchvision's official COCO DeepLabv3 ResNet-101 weights (downloads; WeightsError when it cannot)."""
    from torchvision.models.segmentation import DeepLabV3_ResNet101_Weights

    try:
        return DeepLabV3_ResNet101_Weights.COCO_WITH_VOC_LABELS_V1.get_state_dict(progress=False)
    except Exception as exc:  # network/cache failures come in many types
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise WeightsError(
            f"model.encoder.weights='coco': download of the official DeepLabv3 ResNet-101 COCO weights failed "
            f"({type(exc).__name__}: {first}); pass a local file path as model.encoder.weights instead") from exc
