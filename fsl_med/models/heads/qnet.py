"""Q-Net's head (Shen et al., arXiv 2208.11451; docs "Methods"), ``model.head.name=qnet``.

Reference: ZJLAB-AMMI/Q-Net @ 70a828d8, ``models/fewshot.py``. ADNet's foreground prototype on two feature scales,
with a threshold ``τ`` predicted from the *query* image instead of one learned scalar:

* ``τ = Linear(hidden → 1)(Linear(D → hidden)(pooled))`` of the query's pooled encoder vector (``tau_hidden`` =
  1000 as the reference's ResNet classifier + ``reduce1d``; 0: one ``Linear(D → 1)``), shared by both scales and by
  the support predictions of the alignment loss;
* per scale ``n``: ``p_n = MAP(U(F_s^n), M)`` (``model.mask_pooling=adjoint`` pools exactly as the reference's
  upsampled features), ``P_n = σ(10·cos(F_q^n, p_n) + τ/2)`` at the scale's grid;
* ``P = (α₀·up(P_0) + α₁·up(P_1)) / (α₀ + α₁)`` with ``up`` bilinear, align_corners=True, to the full size; index 0
  is the *finer* of the two maps (the larger grid: the reference's layer3 path), whatever its name in the bundle;
  output ``[1 − P, P]``, prediction ``P > 0.5``.

Loss ``L_q + L_align`` (no threshold loss): ``L_q`` = NLL of ``log clamp([1 − P, P], ε, 1 − ε)`` with
``loss.ce_weights``; ``L_align``: the query's prediction ``P > 0.5`` at full size gives per-scale query prototypes
(pooled at full size through the adjoint), whose probabilities on the support features (with the query's ``τ``) are
combined with ``α`` and scored by an unweighted NLL against the support masks; zero when the prediction is empty.

In evaluation (the head in eval mode), each query slice's prototypes are refined before the final prediction
(``refine_iters`` Adam steps, lr ``refine_lr``, per slice and per scale independently): with ``m = [P_n > 0.5]``,
``F' = F_q^n ⊙ (1 − m) + p ⊗ m``, the loss ``BCE(ν(F_q^n), ν(F'))`` with ``ν(x) = σ((x − min x)/(max x − min x))``
(min and max over the slice's whole map) reaches ``p`` only through the BCE target. The refinement leaves inference
mode on clones of the features and prototypes; it changes nothing of the model. Its cost is counted in
:attr:`QnetHead.refine_seconds` and :attr:`QnetHead.refined_slices`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fsl_med.errors import ConfigError
from fsl_med.models.features import AUX_MAP, MAIN_MAP, EncoderOutput, FeatureRequest
from fsl_med.models.heads.adnet import log_probs
from fsl_med.models.heads.base import FewShotHead, float32_features
from fsl_med.models.heads.pooling import masked_average
from fsl_med.models.heads.registry import register_head

SETTING1_ALPHA = (0.9, 0.1)  # the reference's training value (and the Q-Net README's Setting 1)


@dataclass(frozen=True)
class QnetState:
    """One support part's state: the shots' mean foreground prototype per scale (``[1, C_n]``, finer scale first)
    and the full-resolution ``size`` (the support masks'), at which predictions are combined."""

    protos: tuple[torch.Tensor, ...]
    size: tuple[int, int]


def paired_cosine(feats: torch.Tensor, protos: torch.Tensor, eps: float) -> torch.Tensor:
    """``cos(F_i(y), p_i)`` of ``[N, C, h, w]`` features and ``[N, C]`` (or ``[1, C]``) prototypes -> ``[N, 1, h, w]``;
    each norm clamped to at least ``eps`` (as :func:`~fsl_med.models.heads.base.cosine_scores`)."""
    f = feats / torch.linalg.vector_norm(feats, dim=1, keepdim=True).clamp_min(eps)
    p = protos / torch.linalg.vector_norm(protos, dim=1, keepdim=True).clamp_min(eps)
    return (f * p.expand(feats.shape[0], -1)[:, :, None, None]).sum(dim=1, keepdim=True)


def minmax_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """``σ((x − min x) / (max x − min x))`` with min and max over each ``[C, h, w]`` map of ``[N, C, h, w]``."""
    lo, hi = x.amin(dim=(1, 2, 3), keepdim=True), x.amax(dim=(1, 2, 3), keepdim=True)
    return torch.sigmoid((x - lo) / (hi - lo).clamp_min(torch.finfo(x.dtype).tiny))


@register_head
class QnetHead(FewShotHead):
    """Q-Net: per-scale foreground prototypes, a query-predicted threshold ``τ`` (:attr:`tau`) and test-time
    prototype refinement. Features: an :class:`~fsl_med.models.features.EncoderOutput` with maps ``"out"`` and
    ``"aux"`` (two scales) and the pooled vector ``[B, D]``. The support state is a :class:`QnetState`.

    Args (``model.head.qnet``; ``alpha`` resolved by :func:`fsl_med.config.head_options`):
        alpha: weights ``[fine, coarse]`` of the two scales (two non-negative numbers, positive sum; ``None``:
            Setting 1's ``[0.9, 0.1]``).
        refine_iters: refinement steps per query slice and scale in evaluation (7; 0: none).
        refine_lr: Adam's learning rate of the refinement (0.01).
        tau_hidden: hidden units of the ``τ`` predictor (1000; 0: a single linear layer).
        cos_eps: the cosine's eps (1e-8 as the reference).
        pooled_channels: size ``D`` of the encoder's pooled vector (passed by the registry).
    """

    name = "qnet"
    prediction = "probability"
    request = FeatureRequest(maps=(MAIN_MAP, AUX_MAP), pooled=True)

    def __init__(self, feature_size: int = 32, scale: float = 20.0, mask_pooling: str = "adjoint",
                 alpha: Sequence[float] | None = None, refine_iters: int = 7, refine_lr: float = 0.01,
                 tau_hidden: int = 1000, cos_eps: float = 1e-8, pooled_channels: int = 0) -> None:
        super().__init__(feature_size, scale, mask_pooling, pooled_channels=pooled_channels)
        a = tuple(float(v) for v in (SETTING1_ALPHA if alpha is None else alpha))
        if len(a) != 2 or min(a) < 0 or sum(a) <= 0:
            raise ConfigError(f"config key 'model.head.qnet.alpha': must be two non-negative weights [fine, coarse] "
                              f"with a positive sum, got {list(a)}")
        if int(pooled_channels) <= 0:
            raise ConfigError("config key 'model.encoder.name': the qnet head predicts its threshold from the encoder's pooled "
                              f"vector, but the encoder gives none (pooled_channels={pooled_channels})")
        if int(refine_iters) < 0 or not float(refine_lr) > 0:
            raise ConfigError(f"config key 'model.head.qnet.refine_iters'/'refine_lr': need iters >= 0 and lr > 0, "
                              f"got {refine_iters} and {refine_lr}")
        self.alpha: tuple[float, float] = (a[0], a[1])
        self.refine_iters, self.refine_lr, self.cos_eps = int(refine_iters), float(refine_lr), float(cos_eps)
        d, hidden = int(pooled_channels), int(tau_hidden)
        self.tau = nn.Sequential(nn.Linear(d, hidden), nn.Linear(hidden, 1)) if hidden > 0 else \
            nn.Sequential(nn.Linear(d, 1))
        self.refine_seconds = 0.0  # time spent refining prototypes (evaluation), and the query slices refined
        self.refined_slices = 0
        self._last_tau: torch.Tensor | None = None

    # -- pieces -----------------------------------------------------------------------------------------------------
    @staticmethod
    def scales(feats: EncoderOutput) -> list[torch.Tensor]:
        """The two maps, the finer (larger ``h·w``) first; equal sizes keep the request's order ("out" first)."""
        if not isinstance(feats, EncoderOutput) or MAIN_MAP not in feats.maps or AUX_MAP not in feats.maps:
            raise TypeError("the qnet head needs an EncoderOutput with maps 'out' and 'aux'")
        maps = [feats.maps[MAIN_MAP], feats.maps[AUX_MAP]]
        return sorted(maps, key=lambda m: -(m.shape[-2] * m.shape[-1]))

    def threshold(self, feats: EncoderOutput) -> torch.Tensor:
        """``[B, 1]`` threshold ``τ`` of each image from its ``[B, D]`` pooled vector (float32)."""
        if feats.pooled is None:
            raise TypeError("the qnet head needs the encoder's pooled vector (EncoderOutput.pooled)")
        return self.tau(feats.pooled.float())

    def probability(self, feats: torch.Tensor, proto: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        """``[N, 1, h, w]`` ``P = 1 − σ(0.5 (S − τ))``, ``S = −scale·cos(F, p)``, of ``[N, C, h, w]`` features,
        ``[N, C]`` or ``[1, C]`` prototypes and ``[N, 1]`` or ``[1, 1]`` thresholds."""
        score = -(paired_cosine(feats, proto, self.cos_eps) * self.scale)
        return 1.0 - torch.sigmoid(0.5 * (score - tau.reshape(-1, 1, 1, 1)))

    def mix_scales(self, probs: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """``(α₀ up(P_0) + α₁ up(P_1)) / (α₀ + α₁)``: ``[N, 1, H, W]`` at ``size`` from the two scales' maps."""
        a0, a1 = self.alpha
        up = [F.interpolate(p, size=tuple(size), mode="bilinear", align_corners=True) for p in probs]
        return (a0 * up[0] + a1 * up[1]) / (a0 + a1)

    def refine(self, feats: torch.Tensor, proto: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        """``[N, C]`` prototypes of ``[N, C, h, w]`` query features, each refined from ``[1, C]`` ``proto`` with the
        slice's ``[N, 1]`` ``tau`` (:attr:`refine_iters` Adam steps, module docstring); slices are independent (the
        loss is a sum of per-slice losses and Adam is elementwise). Runs outside inference mode on clones; the
        inputs and the model are untouched."""
        with torch.inference_mode(False), torch.enable_grad():
            f, t = feats.detach().clone(), tau.detach().clone().reshape(-1, 1, 1, 1)
            p = proto.detach().expand(f.shape[0], -1).clone().requires_grad_(True)
            opt = torch.optim.Adam([p], lr=self.refine_lr)
            # BCE(x, y) = −y·(log x − log(1 − x)) − log(1 − x) with the input x = ν(F) constant: only the first term
            # depends on the target y = ν(F'), so −mean(y·(log x − log(1 − x))) has the BCE's gradient (x lies in
            # [σ(0), σ(1)], far from the BCE's log clamp) at a fraction of its cost
            x = minmax_sigmoid(f)
            weight = torch.log(x) - torch.log(1 - x)
            unit = f / torch.linalg.vector_norm(f, dim=1, keepdim=True).clamp_min(self.cos_eps)

            def prob_of(proto_: torch.Tensor) -> torch.Tensor:  # self.probability with F's normalisation reused
                with torch.no_grad():
                    pn = proto_ / torch.linalg.vector_norm(proto_, dim=1, keepdim=True).clamp_min(self.cos_eps)
                    score = -((unit * pn[:, :, None, None]).sum(dim=1, keepdim=True) * self.scale)
                    return 1.0 - torch.sigmoid(0.5 * (score - t))

            prob = prob_of(p)
            for _ in range(self.refine_iters):
                filled = torch.where(prob > 0.5, p[:, :, None, None], f)  # F ⊙ (1 − m) + p ⊗ m
                loss = -(minmax_sigmoid(filled) * weight).mean(dim=(1, 2, 3)).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                prob = prob_of(p)
            return p.detach()

    def fg_probability(self, query_feats: EncoderOutput, state: QnetState, size: tuple[int, int]) -> torch.Tensor:
        """``[Q, 1, H, W]`` combined foreground probability at ``size``; in eval mode with ``refine_iters > 0`` the
        prototypes are refined per query slice first (timed in :attr:`refine_seconds`)."""
        q = query_feats.float()
        tau = self.threshold(q)
        maps = self.scales(q)
        protos: list[torch.Tensor] = list(state.protos)
        if not self.training and self.refine_iters > 0 and len(q) > 0:
            cuda = maps[0].device.type == "cuda"
            if cuda:  # the encoder's and tau's queued kernels are not the refinement's time
                torch.cuda.synchronize(maps[0].device)
            t0 = time.perf_counter()
            protos = [self.refine(f, p, tau) for f, p in zip(maps, protos, strict=True)]
            if cuda:
                torch.cuda.synchronize(maps[0].device)
            self.refine_seconds += time.perf_counter() - t0
            self.refined_slices += len(q)
        probs = [self.probability(f, p, tau) for f, p in zip(maps, protos, strict=True)]
        return self.mix_scales(probs, size)

    def reset_refine_timing(self) -> None:
        """Zero :attr:`refine_seconds` and :attr:`refined_slices`."""
        self.refine_seconds, self.refined_slices = 0.0, 0

    # -- the head interface -----------------------------------------------------------------------------------------
    def support_state(self, feats: EncoderOutput, masks: torch.Tensor, training: bool) -> QnetState:
        """Per scale the shots' mean foreground prototype (``[1, C_n]``); ``size`` = the masks' ``[H, W]``."""
        with float32_features(feats.device):
            protos = tuple(masked_average(f, masks.float(), self.mask_pooling).mean(dim=0, keepdim=True)
                           for f in self.scales(feats.float()))
            return QnetState(protos, (int(masks.shape[-2]), int(masks.shape[-1])))

    def decision_map(self, query_feats: EncoderOutput, state: QnetState) -> torch.Tensor:
        """``[Q, 1, H, W]``: the combined probability already at the support masks' size (the scales are combined
        after upsampling, so :meth:`to_prediction`'s upsampling is the identity)."""
        with float32_features(query_feats.device):
            return self.fg_probability(query_feats, state, state.size)

    def output(self, query_feats: EncoderOutput, state: QnetState, size: tuple[int, int]) -> torch.Tensor:
        with float32_features(query_feats.device):
            p = self.fg_probability(query_feats, state, size)
            return torch.cat([1.0 - p, p], dim=1)

    def align_loss(self, query_maps: list[torch.Tensor], query_prob: torch.Tensor, support_maps: list[torch.Tensor],
                   support_fg: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        """``[1, 1, H, W]`` query probability -> ``P > 0.5`` at full size -> per-scale query prototypes (pooled
        against the full-size mask) -> the ``k`` supports' combined probabilities with the query's ``τ``, scored by
        an unweighted NLL against the ``[k, H, W]`` masks. Zero when the prediction is empty."""
        fg = query_prob[:, 0] > 0.5  # argmax of [1 - P, P]: ties go to the background
        if not bool(fg.any()):
            return query_prob.new_zeros(())
        protos = [masked_average(f, fg.to(f.dtype), self.mask_pooling) for f in query_maps]
        probs = [self.probability(s, p, tau) for s, p in zip(support_maps, protos, strict=True)]
        sup = self.mix_scales(probs, tuple(support_fg.shape[-2:]))
        return F.nll_loss(log_probs(sup), support_fg.long(), ignore_index=255)

    def episode_terms(self, support_feats: EncoderOutput, support_fg: torch.Tensor, query_feats: EncoderOutput,
                      query_label: torch.Tensor, ce_weights: torch.Tensor, align_weight: float
                      ) -> dict[str, torch.Tensor]:
        """``ce`` (L_q) and ``align`` (L_align) of one episode; the prototypes are not refined in training."""
        with float32_features(query_feats.device):
            s, q = support_feats.float(), query_feats.float()
            state = self.support_state(s, support_fg, training=True)
            tau = self.threshold(q)
            q_maps = self.scales(q)
            probs = [self.probability(f, p, tau) for f, p in zip(q_maps, state.protos, strict=True)]
            up = self.mix_scales(probs, tuple(query_label.shape[-2:]))
            ce = F.nll_loss(log_probs(up), query_label, weight=ce_weights.float(), ignore_index=255)
            align = self.align_loss(q_maps, up, self.scales(s), support_fg, tau) if align_weight > 0 \
                else ce.new_zeros(())
            self._last_tau = tau.detach()
            return {"ce": ce, "align": align}

    def log_values(self) -> dict[str, float]:
        """``tau``: the threshold of the last training query."""
        return {} if self._last_tau is None else {"tau": float(self._last_tau.float().mean())}
