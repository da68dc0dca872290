"""FewShotSegmenter: an encoder and a few-shot head (:mod:`fsl_med.models.heads`); support/query images in, prediction
out."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from fsl_med.config import HeadConfig
from fsl_med.models.features import Features, join
from fsl_med.models.heads import FewShotHead, create_head


def tile3(x: torch.Tensor) -> torch.Tensor:
    """Encoder input from slices: ``[B, H, W]`` single slices are tiled ×3 (the reference) -> ``[B, 3, H, W]``;
    ``[B, 3, H, W]`` 3-slice stacks (z-1, z, z+1; ``data.three_slices``) are returned as they are."""
    if x.ndim == 4:
        return x
    return x[:, None].expand(-1, 3, -1, -1)


class FewShotSegmenter(nn.Module):
    """An encoder and a few-shot head (:mod:`fsl_med.models.heads`): support/query images in, prediction out.

    The segmenter owns the encoder, the batching of episodes and slices and the numpy/torch boundary; everything
    specific to a method (prototypes, scores, prediction space, losses) is the head's.

    Features: a head whose :attr:`~FewShotHead.request` is the plain default gets the encoder's ``forward`` output,
    ``[B, C, f, f]``; any other head gets the encoder's :class:`~fsl_med.models.features.EncoderOutput` bundle
    (``encoder.bundle(images, request)``), also in the query-feature cache.

    Args:
        encoder: module mapping ``[B, 3, H, W]`` to ``[B, C, f, f]`` features (``f = feature_size``); with a
            ``bundle`` method for heads that request more.
        head: the head (default: the config's default head, ALPNet, with its defaults).
        feature_size: feature map side (32).
    """

    def __init__(self, encoder: nn.Module, head: FewShotHead | None = None, feature_size: int = 32) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head if head is not None else create_head(HeadConfig().name, feature_size=feature_size)
        self.feature_size = feature_size
        self.skipped_episodes = 0  # training episodes the head skipped (FewShotHead.skips_episodes)
        self.last_terms: dict[str, torch.Tensor] = {}  # loss terms of the last episode_loss, averaged over episodes

    def encode(self, images: torch.Tensor) -> Features:
        """``[B, 3, H, W]`` -> ``[B, C, f, f]``, or the bundle the head requests (class docstring)."""
        request = self.head.request
        if request.plain:
            return self.encoder(images)
        return self.encoder.bundle(images, request)

    def forward(self, support_images: torch.Tensor, support_fg: torch.Tensor, query_images: torch.Tensor
                ) -> torch.Tensor:
        """One 1-way episode: ``[S, 3, H, W]`` support images (S shots of one support), ``[S, H, W]`` binary masks,
        ``[Q, 3, H, W]`` queries -> ``[Q, 2, H, W]`` output of the head (logits for ALP/PANet, probabilities
        ``[1 − P, P]`` for ADNet), with the training variant of the head in train mode."""
        s = support_images.shape[0]
        feats = self.encode(torch.cat([support_images, query_images], dim=0))
        state = self.head.support_state(feats[:s], support_fg, training=self.training)
        return self.head.output(feats[s:], state, query_images.shape[-2:])

    def episode_loss(self, support_images: torch.Tensor, support_fg: torch.Tensor, query_images: torch.Tensor,
                     query_labels: torch.Tensor, ce_weights: torch.Tensor, align_weight: float
                     ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """Training loss of B independent 1-way k-shot episodes (all B(k+1) images encoded in one call).

        Args:
            support_images: ``[B, 3, H, W]`` (1-shot) or ``[B, k, 3, H, W]``; support_fg: ``[B, H, W]`` or
                ``[B, k, H, W]`` binary; query_images: ``[B, 3, H, W]``; query_labels: ``[B, H, W]`` int64
                (255 = ignore); ce_weights: ``[2]`` (background, foreground).
        Returns:
            ``(loss, ce, align)``, each averaged over the B episodes; ``loss`` combines the averaged terms as the
            head does (:meth:`FewShotHead.combine`, e.g. ``ce + align_weight * align``), and every term is in
            :attr:`last_terms`. An episode the head skips (ALP with ``empty_window="skip"``, as the reference's
            training loop) is counted in :attr:`skipped_episodes` and left out of the averages; ``loss`` is ``None``
            when none is left.
        """
        if support_images.ndim == 4:  # 1-shot batch
            support_images, support_fg = support_images[:, None], support_fg[:, None]
        b, k = support_images.shape[:2]
        feats = self.encode(torch.cat([support_images.flatten(0, 1), query_images], dim=0))
        s_feats, q_feats = feats[:b * k], feats[b * k:]
        fg = support_fg.flatten(0, 1)
        totals: dict[str, torch.Tensor] = {}
        used = 0
        for i in range(b):
            shots = slice(i * k, (i + 1) * k)
            terms = self.head.episode_terms(s_feats[shots], fg[shots], q_feats[i:i + 1], query_labels[i:i + 1],
                                            ce_weights, align_weight)
            if terms is None:
                self.skipped_episodes += 1
                continue
            for name, value in terms.items():
                totals[name] = totals[name] + value if name in totals else torch.zeros((), dtype=value.dtype,
                                                                                       device=value.device) + value
            used += 1
        if used == 0:
            zero = torch.zeros((), dtype=torch.float32, device=query_images.device)
            self.last_terms = {}
            return None, zero, zero
        avg = {name: value / used for name, value in totals.items()}  # used == b unless episodes were skipped
        self.last_terms = avg
        return self.head.combine(avg, align_weight), avg["ce"], avg["align"]

    @torch.inference_mode()
    def support_prototypes(self, support_images: np.ndarray, support_masks: np.ndarray,
                           device: torch.device | str = "cpu", shots: int = 1) -> list[Any]:
        """Test-time support states of each support part (one encoder call for all parts and shots).

        Args:
            support_images: ``[P * shots, H, W]`` (or ``[P * shots, 3, H, W]`` 3-slice stacks) normalised
                support slices, part-major (the ``shots`` slices of part 0 first); support_masks:
                ``[P * shots, H, W]`` binary.
            shots: support slices per part (k-shot: the head merges their prototypes).
        Returns:
            ``P`` head support states (:meth:`FewShotHead.support_state`, evaluation variant), opaque outside the head.
        """
        was_training = self.training
        self.eval()
        try:
            sup = tile3(torch.as_tensor(support_images, dtype=torch.float32, device=device))
            sup_m = torch.as_tensor(support_masks, device=device)
            feats = self.encode(sup)
            if sup.shape[0] % shots:
                raise ValueError(f"{sup.shape[0]} support slices are not a whole number of parts of {shots} shots")
            return [self.head.support_state(feats[p:p + shots], sup_m[p:p + shots], training=False)
                    for p in range(0, sup.shape[0], shots)]
        finally:
            self.train(was_training)

    @torch.inference_mode()
    def encode_slices(self, images: np.ndarray, batch_size: int = 8,
                      device: torch.device | str = "cpu") -> Features:
        """Eval-mode features of ``[n, H, W]`` normalised slices, encoded in batches: ``[n, C, f, f]`` on ``device``
        (float32 also under bf16 autocast), or the head's bundle. ``n == 0`` gives an empty tensor (bundle)."""
        was_training = self.training
        self.eval()
        try:
            out = [self.encode(tile3(torch.as_tensor(images[s:s + batch_size], dtype=torch.float32,
                                                     device=device))).float()
                   for s in range(0, images.shape[0], batch_size)]
            if not out:
                if not self.head.request.plain:  # the bundle's shapes: encode one blank slice, keep none
                    blank = torch.zeros(1, 3, *images.shape[-2:], dtype=torch.float32, device=device)
                    return self.encode(blank).float()[:0]
                f = self.feature_size
                return torch.empty(0, int(getattr(self.encoder, "out_channels", 0)), f, f, device=device)
            return join(out)
        finally:
            self.train(was_training)

    @torch.inference_mode()
    def predict_volume(self, protos: list[Any], query_images: np.ndarray, part: np.ndarray,
                       batch_size: int = 8, device: torch.device | str = "cpu",
                       query_feats: Features | None = None) -> tuple[np.ndarray, np.ndarray]:
        """EP1 prediction of a query volume.

        Args:
            protos: support states per part (:meth:`support_prototypes`, computed once per support
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
                nb = len(qf)
                low: torch.Tensor | None = None
                for p in torch.unique(pt).tolist():
                    sel = pt == p
                    dm = self.head.decision_map(qf[sel], protos[p])  # float32 under bf16 autocast too
                    if low is None:
                        low = torch.empty(nb, *dm.shape[1:], device=dm.device, dtype=torch.float32)
                    low[sel] = dm
                assert low is not None
                p_pred, p_prob = self.head.to_prediction(low, (h, w))
                pred[start:start + nb] = p_pred.to(torch.uint8).cpu().numpy()
                prob[start:start + nb] = p_prob.cpu().numpy()
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
        self.feats: dict[int, Features] = {}
        self.encoded = 0  # slices encoded since the last clear (for timing per encoded slice)

    def clear(self) -> None:
        """Forget the cached scan (call after the model's weights changed)."""
        self.scan, self.feats, self.encoded = None, {}, 0

    def features(self, scan_id: str, z: np.ndarray, images: np.ndarray) -> Features:
        """``[n, C, f, f]`` features (or the head's bundle, :class:`~fsl_med.models.features.EncoderOutput`) of query
        slices ``images`` (``[n, H, W]``) at slice indices ``z`` (``[n]``) of scan ``scan_id``; slices seen before for
        the same scan are not encoded again. A new scan id replaces the cached scan."""
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
        return join([self.feats[int(zi)] for zi in z.tolist()], stack=True)
