"""What a few-shot head is: the interface :class:`~fsl_med.models.segmenter.FewShotSegmenter` delegates to.

A head turns encoder features into a prediction and a training loss; the segmenter owns the encoder, batching,
caching and the numpy/torch boundary, and never asks which head runs. Shapes: support features ``[k, C, h, w]``
(``k`` shots of one part), support masks ``[k, H, W]`` at full resolution with values in {0, 1}, query features
``[Q, C, h, w]``. A head's *support state* is opaque to everything but the head (ALP: local and global prototypes;
PANet: two global prototypes; ADNet: one foreground prototype).

Numerics: heads compute their cosines, sigmoids, log-clamps and losses in float32 with autocast off
(:func:`float32_features`), so bf16/fp16 training and evaluation change only the encoder's precision.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from fsl_med.data.masks import mask_at_feature_size
from fsl_med.models.features import FeatureRequest

PredictionSpace = Literal["margin", "probability"]


@contextlib.contextmanager
def float32_features(device: torch.device) -> Iterator[None]:
    """Autocast off on ``device`` inside the block (the head's arithmetic in float32 under bf16/fp16 autocast)."""
    with torch.autocast(device_type=device.type, enabled=False):
        yield


def cosine_scores(feats: torch.Tensor, protos: torch.Tensor, scale: float, eps: float) -> torch.Tensor:
    """``scale · cos(F(y), p_n)`` of ``[Q, C, h, w]`` features and ``[N, C]`` prototypes -> ``[Q, N, h, w]``.

    ``F.cosine_similarity``'s definition (each norm clamped to at least ``eps``; the references' 1e-8), computed as
    one einsum of the normalised features and prototypes: the features are normalised once for all prototypes
    (``F.cosine_similarity`` per prototype costs ~3x more in training, mostly in its backward)."""
    f = feats / torch.linalg.vector_norm(feats, dim=1, keepdim=True).clamp_min(eps)
    p = protos / torch.linalg.vector_norm(protos, dim=1, keepdim=True).clamp_min(eps)
    return torch.einsum("qchw,nc->qnhw", f, p) * scale


class FewShotHead(nn.Module):
    """Base class of the heads of :mod:`fsl_med.models.heads` (registered with
    :func:`~fsl_med.models.heads.registry.register_head`).

    Args:
        feature_size: the encoder's feature map side ``f`` (``h = w = f``).
        scale: cosine scale (20 in every reference).
        mask_pooling: ``nearest`` | ``bilinear`` | ``adjoint`` (:mod:`fsl_med.data.masks`).
        in_channels: channels ``C`` of the encoder's main map (heads with learned layers over features use it).
        pooled_channels: size ``D`` of the encoder's pooled vector (heads that request it).

    Subclasses set :attr:`name` and :attr:`prediction` and implement :meth:`support_state`,
    :meth:`decision_map`, :meth:`output` and :meth:`episode_terms`; :meth:`combine` and :meth:`log_values` have
    defaults.
    """

    name: ClassVar[str] = ""
    prediction: ClassVar[PredictionSpace] = "margin"
    """``margin``: :meth:`decision_map` is the fg−bg logit margin, upsampled with align_corners=False, pred = margin
    > 0, prob = sigmoid(margin). ``probability``: it is the fg probability P, upsampled with align_corners=True
    (ADNet's lineage), pred = P > 0.5, prob = P."""
    skips_episodes: bool = False
    """True when :meth:`episode_terms` may return ``None`` (an episode the reference's training loop skips)."""
    request: ClassVar[FeatureRequest] = FeatureRequest()
    """The encoder outputs the head uses (:mod:`fsl_med.models.features`): by default the main map alone, which the
    head receives as a ``[B, C, h, w]`` tensor; otherwise an :class:`~fsl_med.models.features.EncoderOutput`."""

    def __init__(self, feature_size: int, scale: float, mask_pooling: str, in_channels: int = 0,
                 pooled_channels: int = 0) -> None:
        super().__init__()
        self.feature_size, self.scale, self.mask_pooling = int(feature_size), float(scale), str(mask_pooling)
        self.in_channels, self.pooled_channels = int(in_channels), int(pooled_channels)

    def feature_masks(self, masks: torch.Tensor) -> torch.Tensor:
        """``[S, H, W]`` masks -> ``[S, 1, f, f]`` at feature resolution with :attr:`mask_pooling`."""
        return mask_at_feature_size(masks, self.feature_size, self.mask_pooling)[:, None]

    def support_state(self, feats: torch.Tensor, masks: torch.Tensor, training: bool) -> Any:
        """The state of one support part from its ``k`` shots: ``[k, C, h, w]`` features, ``[k, H, W]`` masks.
        ``training`` selects the training variant where a head has one (ALP's pooling window)."""
        raise NotImplementedError

    def decision_map(self, query_feats: torch.Tensor, state: Any) -> torch.Tensor:
        """``[Q, 1, h, w]`` float32 map that :meth:`to_prediction` upsamples (see :attr:`prediction`)."""
        raise NotImplementedError

    def output(self, query_feats: torch.Tensor, state: Any, size: tuple[int, int]) -> torch.Tensor:
        """``[Q, 2, H, W]`` two-class output at ``size``: logits (``margin`` heads) or probabilities ``[1 − P, P]``."""
        raise NotImplementedError

    def episode_terms(self, support_feats: torch.Tensor, support_fg: torch.Tensor, query_feats: torch.Tensor,
                      query_label: torch.Tensor, ce_weights: torch.Tensor, align_weight: float
                      ) -> dict[str, torch.Tensor] | None:
        """Loss terms of one training episode: ``[k, C, h, w]`` support features, ``[k, H, W]`` support masks,
        ``[1, C, h, w]`` query features, ``[1, H, W]`` int64 query label (255 = ignore), ``[2]`` class weights.
        Returns scalar tensors, at least ``ce`` (query loss) and ``align`` (alignment loss, zero when
        ``align_weight`` is 0 or the term is skipped), or ``None`` to skip the episode (:attr:`skips_episodes`)."""
        raise NotImplementedError

    def combine(self, terms: dict[str, torch.Tensor], align_weight: float) -> torch.Tensor:
        """The loss from episode-averaged terms: ``ce + align_weight · align`` (+ the head's own terms)."""
        return terms["ce"] + align_weight * terms["align"]

    def log_values(self) -> dict[str, float]:
        """Scalars to log during training besides the loss terms (e.g. ADNet's threshold); none by default."""
        return {}

    def set_step(self, step: int) -> None:
        """Told the global training step before each training step (a loss schedule, e.g. RPT-2023's η); no-op."""

    def to_prediction(self, low: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``[Q, 1, h, w]`` :meth:`decision_map` -> ``(pred [Q, H, W] bool, prob [Q, H, W] float32)``."""
        if self.prediction == "margin":
            # bilinear upsampling is linear, so upsampling the fg-bg margin gives the same argmax (margin > 0) and
            # the same 2-class softmax (sigmoid of the margin) as upsampling both logits, at half the cost
            margin = F.interpolate(low, size=size, mode="bilinear", align_corners=False)[:, 0]
            return margin > 0, torch.sigmoid(margin)
        prob = F.interpolate(low, size=size, mode="bilinear", align_corners=True)[:, 0]
        return prob > 0.5, prob
