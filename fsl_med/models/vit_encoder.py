"""The ViT patch-feature encoder: a timm ViT's final LayerNorm-ed patch tokens as a dense feature map, with an
optional input adapter (:data:`ADAPTERS`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fsl_med.config import ADAPTERS
from fsl_med.errors import ConfigError
from fsl_med.models.encoder_base import DenseEncoder, EncoderSpec


def make_adapter(adapter: str) -> nn.Module | None:
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
