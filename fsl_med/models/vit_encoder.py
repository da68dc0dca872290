"""The ViT patch-feature encoder: a timm ViT's final LayerNorm-ed patch tokens as a dense feature map, with an
optional input adapter (:data:`ADAPTERS`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fsl_med.config import ADAPTERS
from fsl_med.errors import ConfigError
from fsl_med.models.encoder_base import DenseEncoder, EncoderSpec, upsample_to
from fsl_med.models.features import AUX_MAP, MAIN_MAP, EncoderOutput, FeatureRequest


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

    def _prepare(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """Checked input resized to a multiple of the patch, normalised and adapted; with its token grid ``(h, w)``."""
        self.check_input(x)
        p = self.patch_size
        h_in, w_in = int(x.shape[-2]), int(x.shape[-1])
        if h_in < p or w_in < p:
            raise ValueError(f"encoder input {h_in}x{w_in} is smaller than the patch size {p}")
        th, tw = (h_in // p) * p, (w_in // p) * p
        if (th, tw) != (h_in, w_in):
            x = F.interpolate(x, size=(th, tw), mode="bilinear", align_corners=False)
        return self.normalise_and_adapt(x), th // p, tw // p

    def _grid(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """``[B, prefix + h*w, C]`` tokens -> ``[B, C, h, w]`` patch features (prefix tokens dropped; NHWC strides)."""
        tokens = tokens[:, int(self.vit.num_prefix_tokens) :]
        return tokens.reshape(tokens.shape[0], h, w, tokens.shape[-1]).permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` float -> ``[B, out_channels, h', w']`` with ``h', w' >= feature_size``."""
        x, h, w = self._prepare(x)
        tokens = self.vit.forward_features(x)  # [B, prefix + h*w, C], final norm applied
        return self.to_feature_size(self._grid(tokens, h, w))

    @property
    def mid_block(self) -> int:
        """Index of the block whose output is the ``"aux"`` map: the last block of the first half (0 for 1-2 blocks)."""
        return max(0, len(self.vit.blocks) // 2 - 1)

    def bundle(self, x: torch.Tensor, request: FeatureRequest) -> EncoderOutput:
        """``[B, 3, H, W]`` -> :class:`EncoderOutput` with the requested maps: ``"out"`` (as :meth:`forward`),
        ``"aux"`` (the middle block's tokens with the final LayerNorm, upsampled to ``2 * feature_size``) and
        ``pooled`` ``[B, out_channels]`` (mean of the final patch tokens). One pass through the blocks."""
        x, h, w = self._prepare(x)
        vit = self.vit
        t = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
        mid = None
        for i, blk in enumerate(vit.blocks):
            t = blk(t)
            if i == self.mid_block and AUX_MAP in request.maps:
                mid = self._grid(vit.norm(t), h, w)
        final = self._grid(vit.norm(t), h, w)
        maps = {}
        for name in request.maps:
            if name == MAIN_MAP:
                maps[name] = self.to_feature_size(final)
            elif name == AUX_MAP:
                assert mid is not None
                maps[name] = upsample_to(mid, 2 * self.feature_size)
            else:
                raise ConfigError(f"model.encoder.name: encoder {self.spec.name} has no feature map {name!r} "
                                  f"(it has {MAIN_MAP!r} and {AUX_MAP!r})")
        pooled = final.mean(dim=(-2, -1)) if request.pooled else None
        return EncoderOutput(maps, pooled)
