"""FewShotSegmenter: encoder + ALP head; support/query images in, 2-class logits out (method.md §3)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fsl_med.config import EMPTY_WINDOWS
from fsl_med.models.alp import EpisodePrototypes, episode_prototypes, episode_scores, merge_episode_prototypes


def tile3(x: torch.Tensor) -> torch.Tensor:
    """Encoder input from slices: ``[B, H, W]`` single slices are tiled ×3 (the reference) -> ``[B, 3, H, W]``;
    ``[B, 3, H, W]`` 3-slice stacks (z-1, z, z+1; ``data.three_slices``) are returned as they are."""
    if x.ndim == 4:
        return x
    return x[:, None].expand(-1, 3, -1, -1)


class FewShotSegmenter(nn.Module):
    """ALPNet with an arbitrary patch-feature encoder.

    Args:
        encoder: module mapping ``[B, 3, H, W]`` to ``[B, C, f, f]`` features (``f = feature_size``).
        feature_size: feature map side (32).
        proto_grid: training prototype grid (8 -> window ``feature_size // proto_grid`` = 4).
        test_window: local pooling window at evaluation (2).
        fg_thresh, bg_thresh: local-prototype thresholds (0.95).
        scale: cosine scale (20).
        mask_downsample: ``nearest`` ([D]) or ``bilinear`` ([A]) support-mask downsampling.
    """

    def __init__(self, encoder: nn.Module, feature_size: int = 32, proto_grid: int = 8, test_window: int = 2,
                 fg_thresh: float = 0.95, bg_thresh: float = 0.95, scale: float = 20.0,
                 mask_downsample: str = "nearest", empty_window: str = "fallback") -> None:
        super().__init__()
        if empty_window not in EMPTY_WINDOWS:
            raise ValueError(f"empty_window must be one of {', '.join(EMPTY_WINDOWS)}, got {empty_window!r}")
        self.empty_window = empty_window  # a training episode whose background finds no ALP window: see episode_loss
        self.skipped_episodes = 0
        self.encoder = encoder
        self.feature_size = feature_size
        self.train_window = feature_size // proto_grid
        self.test_window = test_window
        self.fg_thresh, self.bg_thresh, self.scale = fg_thresh, bg_thresh, scale
        self.mask_downsample = mask_downsample

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` -> ``[B, C, f, f]``."""
        return self.encoder(images)

    def downsample_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """``[S, H, W]`` binary masks -> ``[S, 1, f, f]`` at feature resolution."""
        m = mask[:, None].float()
        f = self.feature_size
        if self.mask_downsample == "nearest":
            return F.interpolate(m, size=(f, f), mode="nearest")
        return F.interpolate(m, size=(f, f), mode="bilinear", align_corners=False)

    def prototypes(self, feats: torch.Tensor, fg_mask_lowres: torch.Tensor, window: int) -> EpisodePrototypes:
        """Prototypes from ``[S, C, f, f]`` features and ``[S, 1, f, f]`` fg masks."""
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

    @staticmethod
    def upsample(scores: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Bilinearly upsample ``[Q, 2, f, f]`` scores to ``size`` (the reference's output step)."""
        return F.interpolate(scores, size=size, mode="bilinear", align_corners=False)

    def forward(self, support_images: torch.Tensor, support_fg: torch.Tensor, query_images: torch.Tensor,
                window: int | None = None) -> torch.Tensor:
        """One 1-way episode.

        Args:
            support_images: ``[S, 3, H, W]``; support_fg: ``[S, H, W]`` binary; query_images: ``[Q, 3, H, W]``.
            window: local pooling window (default: training window in train mode, test window in eval).
        Returns:
            ``[Q, 2, H, W]`` logits (background, foreground).
        """
        if window is None:
            window = self.train_window if self.training else self.test_window
        s = support_images.shape[0]
        feats = self.encode(torch.cat([support_images, query_images], dim=0))
        protos = self.prototypes(feats[:s], self.downsample_mask(support_fg), window)
        return self.upsample(self.scores(feats[s:], protos), query_images.shape[-2:])

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
        sup_pred = self.upsample(self.scores(support_feats, protos), support_fg.shape[-2:])
        return F.cross_entropy(sup_pred, support_fg.long())

    def align_prototypes(self, query_feats: torch.Tensor, query_scores: torch.Tensor) -> EpisodePrototypes:
        """The query prototypes of the alignment loss: from the query's own argmax prediction."""
        pred_fg = query_scores.argmax(dim=1, keepdim=True).float()  # [1, 1, f, f]
        return self.prototypes(query_feats, pred_fg, self.train_window)

    def episode_loss(self, support_images: torch.Tensor, support_fg: torch.Tensor, query_images: torch.Tensor,
                     query_labels: torch.Tensor, ce_weights: torch.Tensor, align_weight: float
                     ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """Training loss of B independent 1-way k-shot episodes (all B(k+1) images encoded in one call).

        Args:
            support_images: ``[B, 3, H, W]`` (1-shot) or ``[B, k, 3, H, W]``; support_fg: ``[B, H, W]`` or
                ``[B, k, H, W]`` binary; query_images: ``[B, 3, H, W]``; query_labels: ``[B, H, W]`` int64
                (255 = ignore); ce_weights: ``[2]`` (background, foreground).
        Returns:
            ``(loss, ce, align)``, each averaged over the B episodes; ``loss = ce + align_weight * align``.
            With ``empty_window="skip"`` (``compat=reference``) an episode whose background prototypes (of the
            support, or of the query in the alignment loss) find no ALP window above the threshold is skipped, as
            the reference's training loop skips the episode its ALP head raises on (:attr:`skipped_episodes`
            counts them); the averages are then over the other episodes, and ``loss`` is ``None`` when none is
            left. With ``"fallback"`` (the default) such a class uses its global prototype.
        """
        if support_images.ndim == 4:  # 1-shot batch
            support_images, support_fg = support_images[:, None], support_fg[:, None]
        b, k = support_images.shape[:2]
        feats = self.encode(torch.cat([support_images.flatten(0, 1), query_images], dim=0))
        s_feats, q_feats = feats[:b * k], feats[b * k:]
        fg = support_fg.flatten(0, 1)
        s_low = self.downsample_mask(fg)
        ce_total = feats.new_zeros(())
        align_total = feats.new_zeros(())
        skip = self.empty_window == "skip"
        used = 0
        for i in range(b):
            shots = slice(i * k, (i + 1) * k)
            protos = self.shot_prototypes(s_feats[shots], s_low[shots], self.train_window)
            if skip and protos.bg.mode == "mask":  # no background window: the reference raises here
                self.skipped_episodes += 1
                continue
            low = self.scores(q_feats[i:i + 1], protos)
            a_protos = self.align_prototypes(q_feats[i:i + 1], low) if align_weight > 0 else None
            if skip and a_protos is not None and a_protos.bg.mode == "mask":
                self.skipped_episodes += 1
                continue
            logits = self.upsample(low, query_images.shape[-2:])
            ce_total = ce_total + F.cross_entropy(logits.float(), query_labels[i:i + 1], weight=ce_weights,
                                                  ignore_index=255)
            if align_weight > 0:
                align_total = align_total + self.align_loss(q_feats[i:i + 1], low, s_feats[shots], fg[shots],
                                                            protos=a_protos)
            used += 1
        if used == 0:
            return None, ce_total, align_total
        ce, align = ce_total / used, align_total / used  # used == b unless episodes were skipped
        return ce + align_weight * align, ce, align

    @torch.inference_mode()
    def support_prototypes(self, support_images: np.ndarray, support_masks: np.ndarray,
                           device: torch.device | str = "cpu", shots: int = 1) -> list[EpisodePrototypes]:
        """Test-time prototypes of each support part (one encoder call for all parts and shots).

        Args:
            support_images: ``[P * shots, H, W]`` (or ``[P * shots, 3, H, W]`` 3-slice stacks) normalised
                support slices, part-major (the ``shots`` slices of part 0 first); support_masks:
                ``[P * shots, H, W]`` binary.
            shots: support slices per part (k-shot: their prototypes are merged, see :meth:`shot_prototypes`).
        Returns:
            ``P`` :class:`EpisodePrototypes`, pooled with the test window.
        """
        was_training = self.training
        self.eval()
        try:
            sup = tile3(torch.as_tensor(support_images, dtype=torch.float32, device=device))
            sup_m = torch.as_tensor(support_masks, device=device)
            feats = self.encode(sup)
            low = self.downsample_mask(sup_m)
            if sup.shape[0] % shots:
                raise ValueError(f"{sup.shape[0]} support slices are not a whole number of parts of {shots} shots")
            return [self.shot_prototypes(feats[p:p + shots], low[p:p + shots], self.test_window)
                    for p in range(0, sup.shape[0], shots)]
        finally:
            self.train(was_training)

    @torch.inference_mode()
    def encode_slices(self, images: np.ndarray, batch_size: int = 8,
                      device: torch.device | str = "cpu") -> torch.Tensor:
        """Eval-mode features of ``[n, H, W]`` normalised slices, encoded in batches: ``[n, C, f, f]`` on ``device``
        (float32 also under bf16 autocast). ``n == 0`` gives an empty tensor."""
        was_training = self.training
        self.eval()
        try:
            out = [self.encode(tile3(torch.as_tensor(images[s:s + batch_size], dtype=torch.float32,
                                                     device=device))).float()
                   for s in range(0, images.shape[0], batch_size)]
            if not out:
                f = self.feature_size
                return torch.empty(0, int(getattr(self.encoder, "out_channels", 0)), f, f, device=device)
            return torch.cat(out)
        finally:
            self.train(was_training)

    @torch.inference_mode()
    def predict_volume(self, protos: list[EpisodePrototypes], query_images: np.ndarray, part: np.ndarray,
                       batch_size: int = 8, device: torch.device | str = "cpu",
                       query_feats: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
        """EP1 prediction of a query volume.

        Args:
            protos: prototypes per support part (:meth:`support_prototypes`, computed once per support
                scan and organ, not per query volume).
            query_images: ``[n, H, W]`` normalised query slices (or ``[n, 3, H, W]`` 3-slice stacks), encoded in
                batches of ``batch_size``.
            part: ``[n]`` support part of each query slice.
            query_feats: ``[n, C, f, f]`` features of ``query_images`` already computed (e.g. by
                :class:`QueryFeatureCache`, shared by the organs of one query scan); then nothing is encoded.
        Returns:
            ``(pred [n, H, W] uint8, fg_prob [n, H, W] float32)``.
        """
        was_training = self.training
        self.eval()
        try:
            n, (h, w) = query_images.shape[0], query_images.shape[-2:]
            pred = np.zeros((n, h, w), dtype=np.uint8)
            prob = np.zeros((n, h, w), dtype=np.float32)
            part_t = torch.as_tensor(part, device=device)
            for start in range(0, n, batch_size):
                if query_feats is None:
                    qf = self.encode(tile3(torch.as_tensor(query_images[start:start + batch_size],
                                                           dtype=torch.float32, device=device)))
                else:
                    qf = query_feats[start:start + batch_size]
                pt = part_t[start:start + batch_size]
                low = torch.empty(qf.shape[0], 2, qf.shape[-2], qf.shape[-1], device=device, dtype=torch.float32)
                for p in torch.unique(pt).tolist():
                    sel = pt == p
                    low[sel] = self.scores(qf[sel], protos[p]).float()  # float32 under bf16 autocast too
                # bilinear upsampling is linear, so upsampling the fg-bg margin (1 channel) gives the same
                # argmax (margin > 0) and the same 2-class softmax (sigmoid of the margin) at half the cost
                margin = self.upsample(low[:, 1:2] - low[:, 0:1], (h, w))[:, 0]
                pred[start:start + qf.shape[0]] = (margin > 0).to(torch.uint8).cpu().numpy()
                prob[start:start + qf.shape[0]] = torch.sigmoid(margin).cpu().numpy()
            return pred, prob
        finally:
            self.train(was_training)


class QueryFeatureCache:
    """Eval-mode query features of one query scan, shared by all organs evaluated on it.

    EP1 scores each organ on its own slice range of the same query scan; the slices of different organs
    overlap (on CHAOS the four organs' ranges sum to 2.4x their union), so each query slice is encoded once
    per scan instead of once per organ. Holds one scan at a time; :meth:`clear` whenever the weights change.
    """

    def __init__(self, seg: FewShotSegmenter, batch_size: int = 8, device: torch.device | str = "cpu") -> None:
        self.seg, self.batch_size, self.device = seg, batch_size, device
        self.scan: str | None = None
        self.feats: dict[int, torch.Tensor] = {}
        self.encoded = 0  # slices encoded since the last clear (for timing per encoded slice)

    def clear(self) -> None:
        """Forget the cached scan (call after the model's weights changed)."""
        self.scan, self.feats, self.encoded = None, {}, 0

    def features(self, scan_id: str, z: np.ndarray, images: np.ndarray) -> torch.Tensor:
        """``[n, C, f, f]`` features of query slices ``images`` (``[n, H, W]``) at slice indices ``z`` (``[n]``)
        of scan ``scan_id``; slices seen before for the same scan are not encoded again. A new scan id replaces
        the cached scan."""
        if scan_id != self.scan:
            self.scan, self.feats = scan_id, {}
        if len(z) == 0:
            return self.seg.encode_slices(images, self.batch_size, self.device)
        missing = [i for i, zi in enumerate(z.tolist()) if zi not in self.feats]
        if missing:
            new = self.seg.encode_slices(images[missing], self.batch_size, self.device)
            for j, i in enumerate(missing):
                self.feats[int(z[i])] = new[j]
            self.encoded += len(missing)
        return torch.stack([self.feats[int(zi)] for zi in z.tolist()])
