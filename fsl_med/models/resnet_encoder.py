"""ALPNet's original encoder: the DeepLabv3 ResNet-101 backbone with a 2048 -> 256 1×1 projection.

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

from fsl_med.errors import WeightsError
from fsl_med.models.encoder_base import DenseEncoder, EncoderSpec

logger = logging.getLogger(__name__)

RESNET_OUT_CHANNELS = 2048
PROJ_CHANNELS = 256
_IGNORED_PREFIXES = ("classifier.", "aux_classifier.", "fc.")


def build_backbone() -> nn.Module:
    """torchvision's DeepLabv3 ResNet-101 backbone (dilated, stride 8), random init, returning ``{"out": layer4}``."""
    from torchvision.models import resnet101
    from torchvision.models._utils import IntermediateLayerGetter

    resnet = resnet101(weights=None, replace_stride_with_dilation=[False, True, True])
    return IntermediateLayerGetter(resnet, return_layers={"layer4": "out"})


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` float -> ``[B, 256, h', w']`` with ``h', w' >= feature_size``."""
        self.check_input(x)
        return self.to_feature_size(self.proj(self.backbone(self.normalise_and_adapt(x))["out"]))


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
    target = {k: v for k, v in encoder.state_dict().items() if k.startswith(("backbone.", "proj."))}
    missing = [k for k in target if k.startswith("backbone.") and k not in kept]
    unexpected = [k for k in kept if k not in target]
    mismatched = [f"{k} {list(kept[k].shape)} vs {list(v.shape)}" for k, v in target.items()
                  if k in kept and tuple(kept[k].shape) != tuple(v.shape)]
    if missing or unexpected or mismatched:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape-mismatched", mismatched)):
            if items:
                parts.append(f"{len(items)} {label} ({', '.join(items[:3])}{', ...' if len(items) > 3 else ''})")
        raise WeightsError(f"weights file {source} does not fit encoder resnet101_deeplabv3: " + "; ".join(parts))
    encoder.load_state_dict(kept, strict=False)
    has_proj = "proj.weight" in kept
    logger.info("Loaded ResNet-101 DeepLabv3 weights from %s (%d tensors%s; ignored %d head tensors)", source,
                len(kept), "" if has_proj else ", projection randomly initialised", len(ignored))


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
