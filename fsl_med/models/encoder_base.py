"""What every encoder is: its registry description (:class:`EncoderSpec`) and the module base class
(:class:`DenseEncoder`). The registry and the one factory, ``create_encoder``, are in
:mod:`fsl_med.models.encoders`; the ViT and ResNet encoders subclass :class:`DenseEncoder`."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class EncoderSpec:
    """Static description of a registered encoder.

    Attributes:
        name: registry name used in configs (``model.encoder.name``), e.g. ``"dinov2_vits14"``.
        timm_name: timm architecture name, e.g. ``"vit_small_patch14_dinov2"``.
        embed_dim: channel count of the patch tokens (= encoder ``out_channels``).
        patch_size: ViT patch size in pixels.
        hub_tag: timm pretrained tag of the official weights (``"lvd142m"``), or None if none exist.
        num_register_tokens: register tokens of the architecture (0 or 4 for DINOv2).
        timm_kwargs: extra kwargs to ``timm.create_model`` (used for tiny test models).
        family: ``"vit"`` (timm ViT, patch tokens) or ``"resnet"`` (DeepLabv3 ResNet-101 + projection).
        maps: the feature maps its ``bundle`` can return (:mod:`fsl_med.models.features`): ``("out", "aux")`` for a
            ViT and ``resnet101_qnet``, ``("out",)`` for ALPNet's one-scale ResNet.
    """

    name: str
    timm_name: str
    embed_dim: int
    patch_size: int
    hub_tag: str | None
    num_register_tokens: int = 0
    timm_kwargs: dict = field(default_factory=dict)
    family: str = "vit"
    maps: tuple[str, ...] = ("out", "aux")

    def map_side(self, image_size: int) -> int:
        """Side of the main map for ``image_size`` inputs before any upsampling (a ViT's token grid, a ResNet's
        ``ceil(image_size / stride)``)."""
        return image_size // self.patch_size if self.family == "vit" else -(-image_size // self.patch_size)


class DenseEncoder(nn.Module):
    """What every encoder shares: input checks, optional ImageNet normalisation and slice adapter, trainable
    parameters, and the bilinear upsampling of a coarse feature grid to ``feature_size``."""

    def __init__(self, spec: EncoderSpec, feature_size: int, adapter: nn.Module | None, imagenet_norm: bool,
                 finetune: str, out_channels: int) -> None:
        super().__init__()
        self.spec = spec
        self.adapter = adapter
        self.out_channels: int = int(out_channels)
        self.feature_size: int = int(feature_size)
        self.imagenet_norm: bool = bool(imagenet_norm)
        self.finetune: str = finetune
        self.register_buffer("_mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def pooled_channels(self) -> int:
        """Size ``D`` of the pooled vector of :meth:`bundle` (``out_channels`` unless an encoder pools another layer)."""
        return self.out_channels

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters with ``requires_grad`` (backbone, LoRA, projection or adapter weights by ``finetune``)."""
        return [p for p in self.parameters() if p.requires_grad]

    @staticmethod
    def check_input(x: torch.Tensor) -> None:
        """ValueError unless ``x`` is a float ``[B, 3, H, W]`` tensor."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"encoder input must be [B, 3, H, W], got {list(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"encoder input must be a float tensor, got {x.dtype}")

    def normalise_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet mean/std (when ``imagenet_norm``), then the adapter (when set); a new tensor."""
        if self.imagenet_norm:
            x = (x - self._mean.to(x.dtype)) / self._std.to(x.dtype)
        if self.adapter is not None:
            x = self.adapter(x)
        return x

    def to_feature_size(self, feats: torch.Tensor) -> torch.Tensor:
        """Bilinearly upsample ``[B, C, h, w]`` so that both sides are >= ``feature_size`` (larger sides kept).

        The result is in channels-last memory format (same shape): the ALP head normalises and compares
        feature vectors along C, which is then the contiguous dimension (its forward and backward run ~30 %
        faster on a CPU than on NCHW features)."""
        feats = feats.contiguous(memory_format=torch.channels_last)
        h, w = feats.shape[-2:]
        fs = self.feature_size
        if h < fs or w < fs:
            feats = F.interpolate(feats, size=(max(h, fs), max(w, fs)), mode="bilinear", align_corners=False)
        return feats


def upsample_to(feats: torch.Tensor, size: int) -> torch.Tensor:
    """``[B, C, h, w]`` bilinearly upsampled (align_corners=False) so that both sides are >= ``size`` (larger kept)."""
    h, w = feats.shape[-2:]
    if h < size or w < size:
        feats = F.interpolate(feats, size=(max(h, size), max(w, size)), mode="bilinear", align_corners=False)
    return feats
