"""PANet's head (Wang et al., ICCV 2019; docs "Methods"), ``model.head.name=panet``.

Reference: kaixin96/PANet @ 1695bf37, ``models/fewshot.py``. One global background and one global foreground
prototype per support (masked average pooling of the features upsampled to the mask, here exactly through
``model.mask_pooling=adjoint``), averaged over the shots; scores ``20·cos(F_q, p_c)`` with ``F.cosine_similarity``'s
eps 1e-8, bilinearly upsampled logits, argmax. Loss: CE (``loss.ce_weights``, PANet's own is unweighted [1, 1]) plus
the prototype alignment loss (PAR): prototypes of the query's own argmax prediction at feature resolution segment
the support; skipped when that prediction has no foreground.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fsl_med.models.heads.base import FewShotHead, cosine_scores, float32_features
from fsl_med.models.heads.pooling import MAP_EPS, masked_average
from fsl_med.models.heads.registry import register_head


@register_head
class PanetHead(FewShotHead):
    """PANet: two global prototypes. The support state is ``[2, C]`` (background, foreground).

    Args (``model.head.panet``): cos_eps: the cosine's eps (1e-8 as the reference).
    """

    name = "panet"
    prediction = "margin"

    def __init__(self, feature_size: int = 32, scale: float = 20.0, mask_pooling: str = "adjoint",
                 cos_eps: float = 1e-8) -> None:
        super().__init__(feature_size, scale, mask_pooling)
        self.cos_eps = float(cos_eps)

    def support_state(self, feats: torch.Tensor, masks: torch.Tensor, training: bool) -> torch.Tensor:
        """``[2, C]``: the shots' mean background and foreground prototypes."""
        with float32_features(feats.device):
            f, m = feats.float(), masks.float()
            bg = masked_average(f, 1.0 - m, self.mask_pooling).mean(dim=0)
            fg = masked_average(f, m, self.mask_pooling).mean(dim=0)
            return torch.stack([bg, fg])

    def scores(self, query_feats: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
        """``[Q, 2, h, w]``: ``scale · cos`` to the background and foreground prototypes."""
        return cosine_scores(query_feats, protos, self.scale, self.cos_eps)

    def decision_map(self, query_feats: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        with float32_features(query_feats.device):
            s = self.scores(query_feats.float(), state)
            return s[:, 1:2] - s[:, 0:1]

    def output(self, query_feats: torch.Tensor, state: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        with float32_features(query_feats.device):
            return F.interpolate(self.scores(query_feats.float(), state), size=size, mode="bilinear",
                                 align_corners=False)

    def align_loss(self, query_feats: torch.Tensor, query_scores: torch.Tensor, support_feats: torch.Tensor,
                   support_fg: torch.Tensor) -> torch.Tensor:
        """PAR: ``[1, C, h, w]`` query features and ``[1, 2, h, w]`` scores give prototypes of the query's argmax
        classes (pooled at ``h×w``), whose upsampled scores on the ``[k, C, h, w]`` support features are scored by
        an unweighted CE against the ``[k, H, W]`` masks, averaged over the shots. Zero when the argmax has no
        foreground."""
        pred = query_scores.argmax(dim=1)[0]  # [h, w]
        if not bool((pred == 1).any()):
            return query_scores.new_zeros(())
        onehot = torch.stack([pred == 0, pred == 1]).to(query_feats.dtype)  # [2, h, w]
        protos = torch.einsum("chw,nhw->nc", query_feats[0], onehot) / (onehot.sum(dim=(-1, -2))[:, None] + MAP_EPS)
        sup = F.interpolate(self.scores(support_feats, protos), size=support_fg.shape[-2:], mode="bilinear",
                            align_corners=False)
        return F.cross_entropy(sup, support_fg.long(), ignore_index=255)

    def episode_terms(self, support_feats: torch.Tensor, support_fg: torch.Tensor, query_feats: torch.Tensor,
                      query_label: torch.Tensor, ce_weights: torch.Tensor, align_weight: float
                      ) -> dict[str, torch.Tensor]:
        with float32_features(query_feats.device):
            s_feats, q_feats = support_feats.float(), query_feats.float()
            protos = self.support_state(s_feats, support_fg, training=True)
            low = self.scores(q_feats, protos)
            logits = F.interpolate(low, size=query_label.shape[-2:], mode="bilinear", align_corners=False)
            ce = F.cross_entropy(logits, query_label, weight=ce_weights.float(), ignore_index=255)
            align = self.align_loss(q_feats, low, s_feats, support_fg) if align_weight > 0 else ce.new_zeros(())
            return {"ce": ce, "align": align}
