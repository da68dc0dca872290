"""ADNet's head (Hansen et al., MedIA 2022; docs "Methods"), ``model.head.name=adnet``.

Reference: sha168/ADNet @ c6bba850, ``models/fewshot_anom.py``. One foreground prototype (masked average pooling
of the upsampled features, here exactly through ``model.mask_pooling=adjoint``), averaged over the shots; no
background model. Anomaly score ``S = −20·cos(F_q, p)``; foreground probability ``P = 1 − σ(0.5 (S − T))`` with a
learned scalar threshold ``T`` (init −10: foreground iff cos > 0.5). Prediction in probability space: ``P``
upsampled with align_corners=True, foreground iff ``P > 0.5``. Loss: ``L_q`` = NLL of ``log clamp([1 − P, P], ε,
1 − ε)`` (ε = float32 eps; ``loss.ce_weights``, ADNet's [0.1, 1]), the alignment loss with the same ``T`` (skipped
when the query prediction is empty) and ``L_T = threshold_weight · T / 20``; weight decay applies to ``T`` as in the
reference (the optimiser takes every trainable parameter).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fsl_med.models.heads.base import FewShotHead, cosine_scores, float32_features
from fsl_med.models.heads.pooling import MAP_EPS, masked_average
from fsl_med.models.heads.registry import register_head

EPS = float(torch.finfo(torch.float32).eps)


def log_probs(prob: torch.Tensor) -> torch.Tensor:
    """``[N, 1, H, W]`` foreground probability -> ``[N, 2, H, W]`` ``log clamp([1 − P, P], ε, 1 − ε)``."""
    return torch.log(torch.clamp(torch.cat([1.0 - prob, prob], dim=1), EPS, 1 - EPS))


@register_head
class AdnetHead(FewShotHead):
    """ADNet: one foreground prototype and a learned threshold :attr:`threshold` (``[1]``). The support state is
    the ``[1, C]`` prototype.

    Args (``model.head.adnet``):
        threshold_init: initial ``T`` (−10).
        threshold_weight: weight of ``L_T = T / 20`` (the reference's ``t_loss_scaler``, 1).
        cos_eps: the cosine's eps (1e-8 as the reference).
    """

    name = "adnet"
    prediction = "probability"

    def __init__(self, feature_size: int = 32, scale: float = 20.0, mask_pooling: str = "adjoint",
                 threshold_init: float = -10.0, threshold_weight: float = 1.0, cos_eps: float = 1e-8) -> None:
        super().__init__(feature_size, scale, mask_pooling)
        self.threshold = nn.Parameter(torch.tensor([float(threshold_init)]))
        self.threshold_weight, self.cos_eps = float(threshold_weight), float(cos_eps)

    def support_state(self, feats: torch.Tensor, masks: torch.Tensor, training: bool) -> torch.Tensor:
        """``[1, C]``: the shots' mean foreground prototype."""
        with float32_features(feats.device):
            return masked_average(feats.float(), masks.float(), self.mask_pooling).mean(dim=0, keepdim=True)

    def probability(self, feats: torch.Tensor, proto: torch.Tensor) -> torch.Tensor:
        """``[N, 1, h, w]`` foreground probability ``1 − σ(0.5 (S − T))`` of ``[N, C, h, w]`` features."""
        score = -cosine_scores(feats, proto, self.scale, self.cos_eps)
        return 1.0 - torch.sigmoid(0.5 * (score - self.threshold.float()))

    def decision_map(self, query_feats: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        with float32_features(query_feats.device):
            return self.probability(query_feats.float(), state)

    def output(self, query_feats: torch.Tensor, state: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        with float32_features(query_feats.device):
            p = F.interpolate(self.probability(query_feats.float(), state), size=size, mode="bilinear",
                              align_corners=True)
            return torch.cat([1.0 - p, p], dim=1)

    def align_loss(self, query_feats: torch.Tensor, query_prob: torch.Tensor, support_feats: torch.Tensor,
                   support_fg: torch.Tensor) -> torch.Tensor:
        """The query's prediction ``P > 0.5`` at ``h×w`` gives a foreground prototype (pooled at ``h×w``) whose
        probability on the ``[k, C, h, w]`` support features, upsampled, is scored by an unweighted NLL against the
        ``[k, H, W]`` masks, averaged over the shots. Zero when the prediction is empty."""
        fg = (query_prob[0, 0] > 0.5).to(query_feats.dtype)  # argmax of [1 - P, P]: ties go to the background
        if not bool(fg.any()):
            return query_prob.new_zeros(())
        proto = torch.einsum("chw,hw->c", query_feats[0], fg)[None] / (fg.sum() + MAP_EPS)
        sup = F.interpolate(self.probability(support_feats, proto), size=support_fg.shape[-2:], mode="bilinear",
                            align_corners=True)
        return F.nll_loss(log_probs(sup), support_fg.long(), ignore_index=255)

    def episode_terms(self, support_feats: torch.Tensor, support_fg: torch.Tensor, query_feats: torch.Tensor,
                      query_label: torch.Tensor, ce_weights: torch.Tensor, align_weight: float
                      ) -> dict[str, torch.Tensor]:
        with float32_features(query_feats.device):
            s_feats, q_feats = support_feats.float(), query_feats.float()
            proto = self.support_state(s_feats, support_fg, training=True)
            low = self.probability(q_feats, proto)
            up = F.interpolate(low, size=query_label.shape[-2:], mode="bilinear", align_corners=True)
            ce = F.nll_loss(log_probs(up), query_label, weight=ce_weights.float(), ignore_index=255)
            align = self.align_loss(q_feats, low, s_feats, support_fg) if align_weight > 0 else ce.new_zeros(())
            return {"ce": ce, "align": align,
                    "threshold": self.threshold_weight * self.threshold.float()[0] / self.scale}

    def combine(self, terms: dict[str, torch.Tensor], align_weight: float) -> torch.Tensor:
        """``L_q + align_weight · L_align + L_T`` (the reference's ``query_loss + align_loss + thresh_loss``)."""
        return terms["ce"] + align_weight * terms["align"] + terms["threshold"]

    def log_values(self) -> dict[str, float]:
        return {"T": float(self.threshold.detach()[0])}
