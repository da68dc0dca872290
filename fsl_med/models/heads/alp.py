"""ALPNet's head: adaptive local prototype pooling (method.md §3), ``model.head.name=alp``.

Shapes: support features ``[S, C, h, w]`` (S shots), support masks ``[S, 1, h, w]`` at feature
resolution with values in [0, 1], query features ``[Q, C, h, w]``. Class scores are ``[Q, 1, h, w]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fsl_med.config import EMPTY_WINDOWS
from fsl_med.models.heads.base import FewShotHead, float32_features
from fsl_med.models.heads.registry import register_head

SAFE_NORM_EPS = 1e-4
GLOBAL_PROTO_EPS = 1e-5


def safe_norm(x: torch.Tensor, dim: int = 1, eps: float = SAFE_NORM_EPS) -> torch.Tensor:
    """L2-normalise along ``dim`` with the norm clamped to at least ``eps`` (zero vectors stay zero)."""
    return x / x.norm(p=2, dim=dim, keepdim=True).clamp_min(eps)


def local_prototypes(feats: torch.Tensor, mask: torch.Tensor, window: int, thresh: float) -> torch.Tensor:
    """Prototypes of the ``window``×``window`` windows whose mean mask value exceeds ``thresh``.

    Args:
        feats: ``[S, C, h, w]`` support features.
        mask: ``[S, 1, h, w]`` soft or binary mask.
        window: pooling window (and stride); ``h`` and ``w`` should be multiples of it.
        thresh: strict threshold on the pooled mask (0.95 in the reference).
    Returns:
        ``[N, C]`` pooled features of the selected windows (N may be 0).
    """
    pooled_f = F.avg_pool2d(feats, window)  # [S, C, h', w']
    pooled_m = F.avg_pool2d(mask, window)  # [S, 1, h', w']
    c = feats.shape[1]
    pf = pooled_f.permute(0, 2, 3, 1).reshape(-1, c)
    sel = pooled_m.reshape(-1) > thresh
    return pf[sel]


def global_prototype(feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked average of the features per shot: ``[S, C]`` = Σ(f·m) / (Σm + 1e-5)."""
    return (feats * mask).sum(dim=(-1, -2)) / (mask.sum(dim=(-1, -2)) + GLOBAL_PROTO_EPS)


def prototype_scores(query: torch.Tensor, protos: torch.Tensor, scale: float) -> torch.Tensor:
    """Softmax-weighted similarity to a set of prototypes.

    Args:
        query: ``[Q, C, h, w]`` query features (normalised inside).
        protos: ``[N, C]`` prototypes (N >= 1; normalised inside).
        scale: cosine scale (20).
    Returns:
        ``[Q, 1, h, w]``: Σ_k softmax_k(d) · d_k with d_k = scale · cos(q, p_k).
    """
    d = torch.einsum("qchw,nc->qnhw", safe_norm(query), safe_norm(protos, dim=1)) * scale
    return (torch.softmax(d, dim=1) * d).sum(dim=1, keepdim=True)


@dataclass
class ClassPrototypes:
    """Normalised prototypes of one class and how they were made (``mode``: gridconv, gridconv+ or mask)."""

    protos: torch.Tensor  # [N, C]
    mode: str


def class_prototypes(feats: torch.Tensor, mask: torch.Tensor, window: int, thresh: float, local: bool,
                     add_global: bool) -> ClassPrototypes:
    """Prototypes of one class from support features.

    Args:
        feats: ``[S, C, h, w]``; mask: ``[S, 1, h, w]``.
        window: pooling window of the local prototypes.
        thresh: local-window threshold.
        local: use local prototypes ('gridconv'); if False only the global one ('mask').
        add_global: with ``local``, also add the global prototype of each shot ('gridconv+').
    Returns:
        :class:`ClassPrototypes`. If ``local`` finds no window above ``thresh`` (e.g. a class covering
        no full window) it falls back to the global prototype (mode 'mask') instead of failing.
    """
    if local:
        protos = local_prototypes(feats, mask, window, thresh)
        if add_global:
            protos = torch.cat([protos, global_prototype(feats, mask)], dim=0)
            return ClassPrototypes(protos, "gridconv+")
        if protos.shape[0] > 0:
            return ClassPrototypes(protos, "gridconv")
    glob = global_prototype(feats, mask).mean(dim=0, keepdim=True)
    return ClassPrototypes(glob, "mask")


def fg_uses_local(mask: torch.Tensor, decision_window: int, thresh: float) -> bool:
    """The reference's fg mode rule: local+global if ``max(avg_pool2d(mask, 4)) >= thresh`` else global only."""
    return bool(F.avg_pool2d(mask, decision_window).max() >= thresh)


@dataclass
class EpisodePrototypes:
    """Background and foreground prototypes of one support set."""

    bg: ClassPrototypes
    fg: ClassPrototypes


def episode_prototypes(feats: torch.Tensor, fg_mask: torch.Tensor, window: int, decision_window: int,
                       fg_thresh: float = 0.95, bg_thresh: float = 0.95) -> EpisodePrototypes:
    """bg: local prototypes ('gridconv'); fg: 'gridconv+' or 'mask' by the reference's rule.

    Args:
        feats: ``[S, C, h, w]`` support features; fg_mask: ``[S, 1, h, w]`` (bg mask = 1 − fg).
        window: local pooling window (4 in training, 2 at test).
        decision_window: window of the fg mode rule (4, also at test).
    """
    bg = class_prototypes(feats, 1.0 - fg_mask, window, bg_thresh, local=True, add_global=False)
    use_local = fg_uses_local(fg_mask, decision_window, fg_thresh)
    fg = class_prototypes(feats, fg_mask, window, fg_thresh, local=use_local, add_global=use_local)
    return EpisodePrototypes(bg=bg, fg=fg)


def episode_scores(query: torch.Tensor, protos: EpisodePrototypes, scale: float) -> torch.Tensor:
    """``[Q, 2, h, w]`` scores (channel 0 background, 1 foreground) of query features."""
    return torch.cat([prototype_scores(query, protos.bg.protos, scale),
                      prototype_scores(query, protos.fg.protos, scale)], dim=1)


def merge_episode_prototypes(parts: list[EpisodePrototypes]) -> EpisodePrototypes:
    """Merge the prototypes of several support slices of one part (k-shot) into one set.

    Per class, local prototypes (rows of 'gridconv' sets, all rows but the last of 'gridconv+' sets) are
    concatenated and global prototypes (the last row of 'gridconv+', the row of 'mask') are averaged. The
    result is 'gridconv+' (locals, then the mean global), 'gridconv' (locals only) or 'mask' (mean global
    only). One set is returned as is.

    Raises:
        ValueError: ``parts`` is empty.
    """
    if not parts:
        raise ValueError("no prototypes to merge")
    if len(parts) == 1:
        return parts[0]

    def merge(sets: list[ClassPrototypes]) -> ClassPrototypes:
        local = [s.protos for s in sets if s.mode == "gridconv"] + [s.protos[:-1] for s in sets if s.mode == "gridconv+"]
        glob = [s.protos[-1:] for s in sets if s.mode == "gridconv+"] + [s.protos for s in sets if s.mode == "mask"]
        loc = torch.cat(local, dim=0) if local else None
        g = torch.cat(glob, dim=0).mean(dim=0, keepdim=True) if glob else None
        if loc is not None and g is not None:
            return ClassPrototypes(torch.cat([loc, g], dim=0), "gridconv+")
        if loc is not None:
            return ClassPrototypes(loc, "gridconv")
        assert g is not None
        return ClassPrototypes(g, "mask")

    return EpisodePrototypes(bg=merge([p.bg for p in parts]), fg=merge([p.fg for p in parts]))


@register_head
class AlpHead(FewShotHead):
    """ALPNet (Ouyang et al.; DINOv2-ALPNet, method.md §3): local background and foreground prototypes plus the
    global foreground one, softmax-weighted 20·cos scores, weighted CE on the logits and the alignment loss.

    Args (``model.head.alp``):
        proto_grid: training prototype grid (8 -> window ``feature_size // proto_grid`` = 4).
        test_window: local pooling window at evaluation (2).
        fg_thresh, bg_thresh: local-prototype thresholds (0.95).
        empty_window: a training episode whose background finds no window: ``fallback`` (its global prototype) or
            ``skip`` (the reference's training loop skips it; :attr:`skips_episodes`).
    """

    name = "alp"
    prediction = "margin"

    def __init__(self, feature_size: int = 32, scale: float = 20.0, mask_pooling: str = "nearest",
                 proto_grid: int = 8, test_window: int = 2, fg_thresh: float = 0.95, bg_thresh: float = 0.95,
                 empty_window: str | None = "fallback") -> None:
        super().__init__(feature_size, scale, mask_pooling)
        empty_window = empty_window or "fallback"
        if empty_window not in EMPTY_WINDOWS:
            raise ValueError(f"empty_window must be one of {', '.join(EMPTY_WINDOWS)}, got {empty_window!r}")
        self.empty_window = empty_window
        self.skips_episodes = empty_window == "skip"
        self.train_window = self.feature_size // proto_grid
        self.test_window = test_window
        self.fg_thresh, self.bg_thresh = fg_thresh, bg_thresh

    def prototypes(self, feats: torch.Tensor, fg_mask_lowres: torch.Tensor, window: int) -> EpisodePrototypes:
        """Prototypes from ``[S, C, f, f]`` features and ``[S, 1, f, f]`` fg masks (the S slices as one support)."""
        return episode_prototypes(feats, fg_mask_lowres, window, self.train_window, self.fg_thresh, self.bg_thresh)

    def shot_prototypes(self, feats: torch.Tensor, fg_mask_lowres: torch.Tensor, window: int) -> EpisodePrototypes:
        """k-shot prototypes from ``[k, C, f, f]`` features and ``[k, 1, f, f]`` fg masks of k supports: each
        shot's prototypes as in 1-shot, local ones pooled over the shots and global ones averaged
        (:func:`merge_episode_prototypes`); ``k == 1`` is exactly :meth:`prototypes`."""
        return merge_episode_prototypes([self.prototypes(feats[j:j + 1], fg_mask_lowres[j:j + 1], window)
                                         for j in range(feats.shape[0])])

    def scores(self, query_feats: torch.Tensor, protos: EpisodePrototypes) -> torch.Tensor:
        """``[Q, 2, f, f]`` low-resolution class scores."""
        return episode_scores(query_feats, protos, self.scale)

    def support_state(self, feats: torch.Tensor, masks: torch.Tensor, training: bool) -> EpisodePrototypes:
        with float32_features(feats.device):
            window = self.train_window if training else self.test_window
            return self.shot_prototypes(feats.float(), self.feature_masks(masks), window)

    def decision_map(self, query_feats: torch.Tensor, state: EpisodePrototypes) -> torch.Tensor:
        with float32_features(query_feats.device):
            low = self.scores(query_feats.float(), state).float()
            return low[:, 1:2] - low[:, 0:1]

    def output(self, query_feats: torch.Tensor, state: EpisodePrototypes, size: tuple[int, int]) -> torch.Tensor:
        with float32_features(query_feats.device):
            return F.interpolate(self.scores(query_feats.float(), state), size=size, mode="bilinear",
                                 align_corners=False)

    def align_prototypes(self, query_feats: torch.Tensor, query_scores: torch.Tensor) -> EpisodePrototypes:
        """The query prototypes of the alignment loss: from the query's own argmax prediction."""
        pred_fg = query_scores.argmax(dim=1, keepdim=True).float()  # [1, 1, f, f]
        return self.prototypes(query_feats, pred_fg, self.train_window)

    def align_loss(self, query_feats: torch.Tensor, query_scores: torch.Tensor, support_feats: torch.Tensor,
                   support_fg: torch.Tensor, protos: EpisodePrototypes | None = None) -> torch.Tensor:
        """PANet-style prototype alignment loss of one episode (method.md §2.3).

        The query's own argmax prediction (at feature resolution) gives query prototypes, which
        segment the support(s); the loss is an unweighted CE against the support mask, averaged over the
        k supports.

        Args:
            query_feats: ``[1, C, f, f]``; query_scores: ``[1, 2, f, f]``;
            support_feats: ``[k, C, f, f]``; support_fg: ``[k, H, W]`` binary.
            protos: :meth:`align_prototypes` of ``query_feats``/``query_scores`` when already computed.
        """
        protos = self.align_prototypes(query_feats, query_scores) if protos is None else protos
        sup_pred = F.interpolate(self.scores(support_feats, protos), size=support_fg.shape[-2:], mode="bilinear",
                                 align_corners=False)
        return F.cross_entropy(sup_pred, support_fg.long())

    def episode_terms(self, support_feats: torch.Tensor, support_fg: torch.Tensor, query_feats: torch.Tensor,
                      query_label: torch.Tensor, ce_weights: torch.Tensor, align_weight: float
                      ) -> dict[str, torch.Tensor] | None:
        """CE of the upsampled logits (class weights ``ce_weights``) and the alignment loss. With
        ``empty_window="skip"`` an episode whose background prototypes (of the support, or of the query in the
        alignment loss) find no window above the threshold returns ``None``, as the reference's training loop
        skips the episode its ALP head raises on; with ``"fallback"`` such a class uses its global prototype."""
        with float32_features(query_feats.device):
            s_feats, q_feats = support_feats.float(), query_feats.float()
            protos = self.shot_prototypes(s_feats, self.feature_masks(support_fg), self.train_window)
            if self.skips_episodes and protos.bg.mode == "mask":  # no background window: the reference raises here
                return None
            low = self.scores(q_feats, protos)
            a_protos = self.align_prototypes(q_feats, low) if align_weight > 0 else None
            if self.skips_episodes and a_protos is not None and a_protos.bg.mode == "mask":
                return None
            logits = F.interpolate(low, size=query_label.shape[-2:], mode="bilinear", align_corners=False)
            ce = F.cross_entropy(logits.float(), query_label, weight=ce_weights, ignore_index=255)
            align = (self.align_loss(q_feats, low, s_feats, support_fg, protos=a_protos) if align_weight > 0
                     else ce.new_zeros(()))
            return {"ce": ce, "align": align}
