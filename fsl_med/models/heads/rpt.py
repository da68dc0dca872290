"""RPT's head (Zhu et al., MICCAI 2023; docs "Methods"), ``model.head.name=rpt``.

Reference: YazhouZhu19/RPT @ a74c7bcb (the head of 2024-03, ``model.head.rpt.variant=2024``, default) and @ 831ba82
(the MICCAI-2023 release, ``variant=2023``), ``models/fewshot.py`` and ``models/attention.py``. Per support shot:

- coarse prototype ``p = MAP(U(F_s), M)`` (here exactly through ``model.mask_pooling=adjoint``), averaged over the
  shots; for the periphery loss also ``p_D = MAP(U(F_s), D)`` with ``D`` = 3×3 dilation of ``M``;
- ``K`` regional prototypes: the mask brought to the feature grid (bilinear, then any positive value counts; fewer
  than ``K`` such positions: the first ``K`` flattened positions are added), farthest-point sampling of ``K`` centres
  over these positions (squared distance; the first centre drawn at random, ties to the lowest index), Voronoi
  assignment (ties to the lowest centre index), ``P_k`` = mean of the raw features of region ``k``.

Per query slice: a threshold ``τ_q`` from the query's pooled encoder vector (``Linear(tau_hidden→1)∘Linear(D→
tau_hidden)``, the reference's ``reduce1d∘fc``); ``P_q = σ(½ (scale·cos(F_q, p) + τ_q))``; soft query prototype
``q = Σ F_q P_q / (Σ P_q + 1e-5)``; then ``bat_passes`` times the BaT block (shared weights) on each shot's ``P``
followed by ``p* = mean_shots mean_k P_k (+ p for 2024)``, ``P_q`` from ``p*`` and a new ``q``. Output: ``P_q``
upsampled with align_corners=True, ``[1 − P, P]``, foreground iff ``P > 0.5``.

BaT: ``A = P q`` (raw dot products), ``κ = floor((min A + mean A) / 2)``, ``w = softmax_k(A − 10⁴·[A < κ])``,
``X = LN(w q + P)``; attention with ``attn_heads`` heads of ``d_k = d_v = C`` each (Q/K/V projections ``C → heads·C``
followed by ReLU, temperature ``√C``, dropout on the attention weights, output Linear + dropout + ReLU, residual,
LayerNorm); ``X = LN(X + Linear(GELU(Linear_{C→2C}(X))))``. Dropout is active in training only.

Losses (2024): ``L_q + periphery_weight·L_per + align_weight·L_align + mse_weight·L_mse + self_weight·L_self``
(the reference's 1 / 0.1 / 1 / 0.1 / 1), every NLL on ``log clamp([1 − P, P], ε, 1 − ε)`` with ε = float32 eps.
Losses (2023): ``L_q + (1 − η)·L_boundary + η·L_dice`` with ``η = max(0, 1 − 0.01·⌊step / 5000⌋)`` (the global step
from :meth:`set_step`); both losses treat the probabilities ``[1 − P, P]`` as logits, as the reference's ``losses.py``.

Where this differs from the reference (all documented in the methods, none on the reference's own 1-shot path):

- Farthest-point sampling's first centre: at evaluation a fresh ``numpy.random.RandomState(seed)`` per
  :meth:`support_state` call (one ``choice`` per shot, in shot order), so a prediction never depends on which parts or
  slices were predicted before (the reference's sampler advances across calls; re-seeded, it draws the same centre);
  in training (and whenever the head is in train mode) torch's global CPU generator, seeded by the run's ``seed``.
- The support side (``P``, ``p``; ``p_D`` only for the periphery loss) is computed once per support part and reused
  for every query slice; each query slice is refined on its own (no batch effects).
- k shots (the reference runs 1 shot only: its dilation reshape fails for k > 1, and its prediction uses shot 0's
  refined prototypes): each shot's ``P`` goes through the BaT block, ``p*`` averages over shots and regions; the
  periphery loss is the mean over shots of each shot's ``Π`` (with the shots' mean ``p``, ``p_D`` and the shot's own
  ``τ_s``) against its periphery; the MSE and query-self terms are counted once (the reference's loop would add the
  MSE k times and divide the self term by k).
- Ignored query pixels (255): the query-self prototype pools ``y_q == 1``; the 2023 Dice/boundary terms leave ignored
  pixels out (the reference's training labels have none).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fsl_med.errors import ConfigError
from fsl_med.models.features import MAIN_MAP, EncoderOutput, FeatureRequest
from fsl_med.models.heads.adnet import log_probs
from fsl_med.models.heads.base import FewShotHead, float32_features
from fsl_med.models.heads.pooling import MAP_EPS, masked_average
from fsl_med.models.heads.registry import register_head

VARIANT_REGIONS = {"2024": 100, "2023": 10}
"""The reference's ``fg_num`` per variant (``model.head.rpt.fg_num=null``)."""
MASK_OUT = 1e4
"""BaT's self-selection: regions with ``A < κ`` get ``−10⁴`` before the softmax."""
ETA_EPOCH = 5000
"""2023 variant: η decreases by :data:`ETA_STEP` every ``ETA_EPOCH`` training steps (the reference's epoch)."""
ETA_STEP = 0.01
BOUNDARY_THETA0, BOUNDARY_THETA = 3, 5
"""Boundary-F1 loss (Bokhovkin et al.): boundary width and its extension, as the reference's ``losses.py``."""
BF1_EPS = 1e-7


@dataclass(frozen=True)
class RptSupport:
    """RPT's state of one support part of ``k`` shots: ``regions`` ``[k, K, C]`` regional prototypes, ``proto``
    ``[1, C]`` coarse prototype ``p`` (mean over shots), ``dilated`` ``[1, C]`` prototype ``p_D`` of the dilated masks
    (only computed for the periphery loss, else ``None``)."""

    regions: torch.Tensor
    proto: torch.Tensor
    dilated: torch.Tensor | None = None


class BatAttention(nn.Module):
    """RPT's attention over ``[B, N, C]`` tokens: ``heads`` heads with ``d_k = d_v = C`` each, ReLU after the Q/K/V
    projections, temperature ``√C``, dropout on the attention weights, output Linear + dropout + ReLU, residual and
    LayerNorm. Output ``[B, N, C]``."""

    def __init__(self, channels: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.channels, self.heads = int(channels), int(heads)
        c, hc = self.channels, self.channels * self.heads
        self.w_q, self.w_k, self.w_v = nn.Linear(c, hc), nn.Linear(c, hc), nn.Linear(c, hc)
        for lin in (self.w_q, self.w_k, self.w_v):  # the reference's init: N(0, 2 / (d_model + d_k))
            nn.init.normal_(lin.weight, mean=0.0, std=math.sqrt(2.0 / (c + c)))
        self.fc = nn.Linear(hc, c)
        nn.init.xavier_normal_(self.fc.weight)
        self.attn_dropout, self.dropout = nn.Dropout(dropout), nn.Dropout(dropout)
        self.norm = nn.LayerNorm(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:  # [B, N, heads·C] -> [B, heads, N, C]
            return F.relu(t).view(b, n, self.heads, c).transpose(1, 2)

        q, k, v = split(self.w_q(x)), split(self.w_k(x)), split(self.w_v(x))
        attn = self.attn_dropout(torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(c), dim=-1))
        out = (attn @ v).transpose(1, 2).reshape(b, n, self.heads * c)
        return self.norm(F.relu(self.dropout(self.fc(out))) + x)


class BatBlock(nn.Module):
    """One BaT pass (shared weights across passes): ``[B, K, C]`` regional prototypes and ``[B, C]`` (or ``[1, C]``)
    query prototypes -> ``[B, K, C]`` refined regional prototypes."""

    def __init__(self, channels: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.norm_in = nn.LayerNorm(channels)
        self.attention = BatAttention(channels, heads, dropout)
        self.mlp = nn.Sequential(nn.Linear(channels, 2 * channels), nn.GELU(), nn.Linear(2 * channels, channels))
        self.norm_out = nn.LayerNorm(channels)

    def forward(self, regions: torch.Tensor, query_proto: torch.Tensor) -> torch.Tensor:
        q = query_proto.expand(regions.shape[0], -1)  # [B, C]
        a = torch.einsum("bkc,bc->bk", regions, q)  # raw dot products
        kappa = torch.floor((a.amin(dim=1, keepdim=True) + a.mean(dim=1, keepdim=True)) / 2)
        w = torch.softmax(torch.where(a < kappa, a - MASK_OUT, a), dim=1)  # self-selection
        x = self.norm_in(w[..., None] * q[:, None, :] + regions)
        x = self.attention(x)
        return self.norm_out(self.mlp(x) + x)


def region_labels(fg: torch.Tensor, k: int, first: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Farthest-point sampling of ``k`` centres over the positions of the ``[h, w]`` bool mask ``fg`` (row-major
    order, squared distances, first centre ``first``, ties to the lowest index) and Voronoi assignment of every
    position to its nearest centre (ties to the lowest centre index). Returns ``(flat position indices [N],
    region label [N] in 0..k-1)``. Needs ``N >= k`` positions."""
    flat = torch.nonzero(fg.reshape(-1)).squeeze(1)  # [N]
    w = fg.shape[1]
    pts = torch.stack([flat // w, flat % w], dim=1)  # [N, 2] (y, x), int64: exact distances
    chosen = torch.empty(k, dtype=torch.long, device=fg.device)
    chosen[0] = first
    d = ((pts - pts[first]) ** 2).sum(dim=1)
    for i in range(1, k):
        j = torch.argmax(d)  # the first of equal maxima
        chosen[i] = j
        d = torch.minimum(d, ((pts - pts[j]) ** 2).sum(dim=1))
    centres = pts[chosen]  # [k, 2]
    labels = torch.argmin(((pts[:, None, :] - centres[None]) ** 2).sum(dim=-1), dim=1)  # first of equal minima
    return flat, labels


@register_head
class RptHead(FewShotHead):
    """RPT: regional prototypes refined by the BaT block against the query, a query-predicted threshold. The
    support state is a :class:`RptSupport`; the head reads the encoder's main map and pooled vector.

    Args (``model.head.rpt``):
        variant: ``2024`` (released head) or ``2023`` (MICCAI release: K = 10, no "+ p", boundary + Dice losses).
        fg_num: regional prototypes ``K`` (``None``: 100 for 2024, 10 for 2023).
        bat_passes: BaT applications (3; 0: ``p*`` from the unrefined regions).
        attn_heads, dropout: the attention's heads (3) and dropout (0.1).
        seed: farthest-point sampling's first centre at evaluation (1289, the reference's).
        periphery_weight, mse_weight, self_weight: 2024 loss weights (0.1, 0.1, 1; align uses ``loss.align_weight``).
        tau_hidden: hidden size of the threshold predictor (1000; 0: one Linear).
        cos_eps: the cosine's eps (1e-8).
        in_channels, pooled_channels: the encoder's main-map channels ``C`` and pooled-vector size ``D``.
    """

    name = "rpt"
    prediction = "probability"
    request = FeatureRequest(maps=(MAIN_MAP,), pooled=True)

    def __init__(self, feature_size: int = 64, scale: float = 20.0, mask_pooling: str = "adjoint",
                 variant: str = "2024", fg_num: int | None = None, bat_passes: int = 3, attn_heads: int = 3,
                 dropout: float = 0.1, seed: int = 1289, periphery_weight: float = 0.1, mse_weight: float = 0.1,
                 self_weight: float = 1.0, tau_hidden: int = 1000, cos_eps: float = 1e-8, in_channels: int = 0,
                 pooled_channels: int = 0) -> None:
        super().__init__(feature_size, scale, mask_pooling, in_channels, pooled_channels)
        variant = str(variant)
        if variant not in VARIANT_REGIONS:
            raise ConfigError(f"config key 'model.head.rpt.variant': must be one of {', '.join(VARIANT_REGIONS)}, "
                              f"got {variant!r}")
        if self.in_channels < 1 or self.pooled_channels < 1:
            raise ConfigError("config key 'model.head.name': rpt needs an encoder with a main map and a pooled vector "
                              f"(got {self.in_channels} channels and a pooled vector of {self.pooled_channels})")
        self.variant = variant
        self.fg_num = int(VARIANT_REGIONS[variant] if fg_num is None else fg_num)
        if self.fg_num > self.feature_size ** 2:
            raise ConfigError(f"config key 'model.head.rpt.fg_num': {self.fg_num} regions exceed the "
                              f"{self.feature_size}x{self.feature_size} feature positions; lower it or raise "
                              "model.feature_size")
        self.bat_passes, self.seed = int(bat_passes), int(seed)
        self.periphery_weight, self.mse_weight = float(periphery_weight), float(mse_weight)
        self.self_weight, self.cos_eps = float(self_weight), float(cos_eps)
        c, d = self.in_channels, self.pooled_channels
        self.tau = nn.Linear(d, 1) if int(tau_hidden) == 0 else nn.Sequential(nn.Linear(d, int(tau_hidden)),
                                                                              nn.Linear(int(tau_hidden), 1))
        # no BaT modules when they would be unused (DDP without find_unused_parameters)
        self.bat = BatBlock(c, int(attn_heads), float(dropout)) if self.bat_passes > 0 else None
        self.train_step = 0  # global training step (set_step), for the 2023 variant's η

    # ------------------------------------------------------------------------------------------------ inputs

    @staticmethod
    def _bundle(feats: object) -> EncoderOutput:
        if not isinstance(feats, EncoderOutput) or feats.pooled is None:
            raise TypeError("the rpt head needs an EncoderOutput with the main map and the pooled vector "
                            "(FeatureRequest(pooled=True)), got " + type(feats).__name__)
        return feats.float()

    def threshold(self, pooled: torch.Tensor) -> torch.Tensor:
        """``[B, D]`` pooled encoder vectors -> ``[B]`` thresholds ``τ``."""
        return self.tau(pooled.float())[:, 0]

    def unit(self, x: torch.Tensor) -> torch.Tensor:
        """``x / max(‖x‖, cos_eps)`` along axis 1 (features ``[N, C, h, w]`` or prototypes ``[N, C]``): the cosine's
        normalisation, as ``F.cosine_similarity`` (each norm clamped). Computed once per feature map and reused."""
        return x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(self.cos_eps)

    def probability(self, unit_feats: torch.Tensor, proto: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        """``[N, 1, h, w]`` ``P = 1 − σ(½ (S − τ))`` with ``S = −scale·cos(F, p)``: ``[N, C, h, w]`` normalised features
        (:meth:`unit`), ``[1, C]`` prototype, ``[N]`` (or ``[1]``) thresholds."""
        score = -torch.einsum("qchw,nc->qnhw", unit_feats, self.unit(proto)) * self.scale
        return 1.0 - torch.sigmoid(0.5 * (score - tau[:, None, None, None]))

    # ------------------------------------------------------------------------------------------------ support

    def regional_prototypes(self, feats: torch.Tensor, masks: torch.Tensor, training: bool,
                            firsts: list[int] | None = None) -> torch.Tensor:
        """``[k, K, C]`` regional prototypes of ``[k, C, h, w]`` features under ``[k, H, W]`` masks.

        ``firsts``: the first centre's index per shot (into the shot's positions); ``None`` draws them: with
        ``training`` from torch's global generator, else from a fresh ``RandomState(seed)`` (one draw per shot, in
        shot order). Masks with fewer than ``K`` positions on the feature grid (empty ones too) take the first ``K``
        flattened positions in addition to theirs (the reference's rule)."""
        k_regions = self.fg_num
        h, w = feats.shape[-2:]
        if h * w < k_regions:
            raise ConfigError(f"config key 'model.head.rpt.fg_num': {k_regions} regions exceed the {h}x{w} feature "
                              "positions; lower it or raise model.feature_size")
        grid = F.interpolate(masks[:, None].float(), size=(h, w), mode="bilinear", align_corners=False)[:, 0] != 0
        rng = None if firsts is not None or training else np.random.RandomState(self.seed)
        out = []
        for j in range(feats.shape[0]):
            fg = grid[j]
            if int(fg.sum()) < k_regions:
                fg = fg.clone()
                fg.view(-1)[:k_regions] = True
            n = int(fg.sum())
            if firsts is not None:
                first = int(firsts[j])
            elif rng is not None:
                first = int(rng.choice(n))
            else:
                first = int(torch.randint(n, ()))  # torch's global generator, seeded by the run's seed
            flat, labels = region_labels(fg, k_regions, first)
            onehot = F.one_hot(labels, k_regions).T.to(feats.dtype)  # [K, N]
            pix = feats[j].flatten(1)[:, flat].T  # [N, C]
            out.append(onehot @ pix / onehot.sum(dim=1, keepdim=True))
        return torch.stack(out)

    def _support(self, feats: torch.Tensor, masks: torch.Tensor, dilated: bool, training: bool,
                 firsts: list[int] | None = None) -> RptSupport:
        m = masks.float()
        proto = masked_average(feats, m, self.mask_pooling).mean(dim=0, keepdim=True)
        p_d = None
        if dilated:
            d = F.max_pool2d(m[:, None], kernel_size=3, stride=1, padding=1)[:, 0]
            p_d = masked_average(feats, d, self.mask_pooling).mean(dim=0, keepdim=True)
        return RptSupport(self.regional_prototypes(feats, m, training, firsts), proto, p_d)

    def support_state(self, feats: EncoderOutput, masks: torch.Tensor, training: bool) -> RptSupport:  # type: ignore[override]
        """The regional and coarse prototypes of one support part (``[k]`` bundle, ``[k, H, W]`` masks); computed
        once per part and reused for every query slice. ``training`` draws the first FPS centre from torch's global
        generator, else from a fresh ``RandomState(seed)``."""
        b = self._bundle(feats)
        with float32_features(b.device):
            return self._support(b.main, masks, dilated=False, training=training)

    # ------------------------------------------------------------------------------------------------ query

    def refine(self, feats: torch.Tensor, tau: torch.Tensor, state: RptSupport,
               unit: torch.Tensor | None = None) -> torch.Tensor:
        """``[1, 1, h, w]`` final ``P_q`` of one query slice (``[1, C, h, w]`` features, ``[1]`` threshold; ``unit``:
        the features normalised, when already computed)."""
        unit = self.unit(feats) if unit is None else unit
        prob = self.probability(unit, state.proto, tau)
        regions = state.regions
        for _ in range(self.bat_passes):
            p = prob[0, 0]
            query_proto = torch.einsum("chw,hw->c", feats[0], p)[None] / (p.sum() + MAP_EPS)  # soft MAP
            regions = self.bat(regions, query_proto)  # type: ignore[misc]
            prob = self.probability(unit, self._refined(regions, state), tau)
        if self.bat_passes == 0:
            prob = self.probability(unit, self._refined(regions, state), tau)
        return prob

    def _refined(self, regions: torch.Tensor, state: RptSupport) -> torch.Tensor:
        """``p*`` ``[1, C]``: mean over shots and regions (+ ``p`` for the 2024 variant)."""
        p = regions.mean(dim=1).mean(dim=0, keepdim=True)
        return p + state.proto if self.variant == "2024" else p

    def _query(self, feats: EncoderOutput, state: RptSupport) -> torch.Tensor:
        b = self._bundle(feats)
        main, pooled = b.main, b.pooled
        # one slice at a time (its threshold too): a slice's prediction never depends on the other slices of its
        # batch (a batched matmul may round differently with another batch size)
        return torch.cat([self.refine(main[i:i + 1], self.threshold(pooled[i:i + 1]), state)  # type: ignore[index]
                          for i in range(main.shape[0])])

    def decision_map(self, query_feats: EncoderOutput, state: RptSupport) -> torch.Tensor:  # type: ignore[override]
        with float32_features(query_feats.device):
            return self._query(query_feats, state)

    def output(self, query_feats: EncoderOutput, state: RptSupport,  # type: ignore[override]
               size: tuple[int, int]) -> torch.Tensor:
        with float32_features(query_feats.device):
            p = F.interpolate(self._query(query_feats, state), size=size, mode="bilinear", align_corners=True)
            return torch.cat([1.0 - p, p], dim=1)

    # ------------------------------------------------------------------------------------------------ losses

    def _up(self, prob: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
        return F.interpolate(prob, size=size, mode="bilinear", align_corners=True)

    def periphery_loss(self, s_unit: torch.Tensor, s_tau: torch.Tensor, masks: torch.Tensor,
                       state: RptSupport) -> torch.Tensor:
        """Mean over shots of the unweighted NLL of ``[1 − Π, Π]``, ``Π = up(P(F_s, p_D)) − up(P(F_s, p))`` with the
        shot's ``τ_s`` (``s_unit``: the ``[k, C, h, w]`` support features normalised), against the periphery ``D − M`` (``Π`` may be negative: the clamp handles it).

        ``Π`` is computed as ``up(σ(a) − σ(b))`` with ``σ(a) − σ(b) = −σ(a)·σ(−b)·expm1(b − a)`` and ``b − a =
        −½·scale·F̂·(p̂_D − p̂)`` from the difference of the normalised prototypes (equal in exact arithmetic; the
        literal difference of two nearly equal probabilities inside a log loses up to three digits in float32: the
        literal float32 gradient of this term was 5e-3 relative off its float64 value, this one 1e-5)."""
        size = masks.shape[-2:]
        m = masks.float()
        ring = (F.max_pool2d(m[:, None], kernel_size=3, stride=1, padding=1) - m[:, None]).long()  # [k, 1, H, W]
        f = s_unit
        p, p_d = self.unit(state.proto)[0], self.unit(state.dilated)[0]  # type: ignore[arg-type]
        cos_p = torch.einsum("kchw,c->khw", f, p)
        d_cos = torch.einsum("kchw,c->khw", f, p_d - p)
        tau = s_tau[:, None, None]
        b = 0.5 * (self.scale * cos_p + tau)
        a = b + 0.5 * self.scale * d_cos
        pi = self._up((-torch.sigmoid(a) * torch.sigmoid(-b) * torch.expm1(b - a))[:, None], size)
        return torch.stack([F.nll_loss(log_probs(pi[j:j + 1]), ring[j], ignore_index=255)
                            for j in range(pi.shape[0])]).mean()

    def _nll(self, prob_up: torch.Tensor, label: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        return F.nll_loss(log_probs(prob_up), label, weight=weight, ignore_index=255)

    def episode_terms(self, support_feats: EncoderOutput, support_fg: torch.Tensor,  # type: ignore[override]
                      query_feats: EncoderOutput, query_label: torch.Tensor, ce_weights: torch.Tensor,
                      align_weight: float, firsts: list[int] | None = None) -> dict[str, torch.Tensor]:
        """2024: ``ce``, ``periphery``, ``align``, ``mse``, ``self``; 2023: ``ce``, ``align`` (0), ``boundary``,
        ``dice``. ``align`` and ``mse`` are 0 (skipped, no gradient) when the query prediction ``P↑ > 0.5`` is empty;
        a term whose weight is 0 is 0. ``firsts``: the first FPS centre per shot (tests), else drawn as
        :meth:`regional_prototypes` does (in train mode from torch's global generator, in eval mode seeded)."""
        s, q = self._bundle(support_feats), self._bundle(query_feats)
        size = tuple(query_label.shape[-2:])
        with float32_features(q.device):
            s_feats, q_feats = s.main, q.main
            fg = support_fg.float()
            v2024 = self.variant == "2024"
            state = self._support(s_feats, fg, dilated=v2024 and self.periphery_weight > 0, training=self.training,
                                  firsts=firsts)
            q_tau = self.threshold(q.pooled)  # type: ignore[arg-type]
            q_unit = self.unit(q_feats)
            low = self.refine(q_feats, q_tau, state, q_unit)
            up = self._up(low, size)
            ce = self._nll(up, query_label, ce_weights.float())
            zero = ce.new_zeros(())
            if not v2024:
                two = torch.cat([1.0 - up, up], dim=1)
                return {"ce": ce, "align": zero, "boundary": boundary_loss(two, query_label),
                        "dice": dice_loss(two, query_label)}
            s_unit = self.unit(s_feats)
            periphery = zero
            if self.periphery_weight > 0:
                periphery = self.periphery_loss(s_unit, self.threshold(s.pooled), fg, state)  # type: ignore[arg-type]
            align, mse = zero, zero
            pred = (up[:, 0] > 0.5).float()  # argmax of [1 − P, P] at full resolution (ties: background)
            if (align_weight > 0 or self.mse_weight > 0) and bool(pred.any()):
                q_proto = masked_average(q_feats, pred, self.mask_pooling)  # [1, C]
                if align_weight > 0:
                    sup = self._up(self.probability(s_unit, q_proto, q_tau.expand(s_feats.shape[0])), size)
                    align = torch.stack([self._nll(sup[j:j + 1], fg[j:j + 1].long())
                                         for j in range(sup.shape[0])]).mean()
                if self.mse_weight > 0:
                    mse = F.mse_loss(q_proto, state.proto)
            own = zero
            if self.self_weight > 0:
                proto = masked_average(q_feats, (query_label == 1).float(), self.mask_pooling)
                own = self._nll(self._up(self.probability(q_unit, proto, q_tau), size), query_label)
            return {"ce": ce, "periphery": periphery, "align": align, "mse": mse, "self": own}

    def combine(self, terms: dict[str, torch.Tensor], align_weight: float) -> torch.Tensor:
        """2024: ``L_q + w_per·L_per + align_weight·L_align + w_mse·L_mse + w_self·L_self``; 2023:
        ``L_q + (1 − η)·L_boundary + η·L_dice``."""
        if self.variant == "2023":
            eta = self.eta()
            return terms["ce"] + (1.0 - eta) * terms["boundary"] + eta * terms["dice"]
        return (terms["ce"] + self.periphery_weight * terms["periphery"] + align_weight * terms["align"]
                + self.mse_weight * terms["mse"] + self.self_weight * terms["self"])

    def set_step(self, step: int) -> None:
        """The global training step (the 2023 variant's η schedule)."""
        self.train_step = int(step)

    def eta(self) -> float:
        """2023 variant: ``η = max(0, 1 − 0.01·⌊step / 5000⌋)`` (1 before any :meth:`set_step`)."""
        return max(0.0, 1.0 - ETA_STEP * (self.train_step // ETA_EPOCH))

    def log_values(self) -> dict[str, float]:
        return {"eta": self.eta()} if self.variant == "2023" else {}


def boundary_loss(prob_up: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Boundary-F1 loss of the ``[N, 2, H, W]`` output ``[1 − P, P]`` treated as logits (softmax applied, as the
    reference's ``losses.py``) against ``[N, H, W]`` labels: per class, the boundary (3×3) of the prediction and of the
    one-hot label, precision/recall against the other's boundary extended (5×5), ``1 − BF1`` averaged over images
    and classes. Ignored pixels (255) belong to neither class and are left out of the sums."""
    pred = torch.softmax(prob_up, dim=1)
    valid = (label != 255).to(pred.dtype)[:, None]
    onehot = torch.stack([(label == c) for c in range(pred.shape[1])], dim=1).to(pred.dtype)

    def edge(x: torch.Tensor) -> torch.Tensor:
        inv = 1.0 - x
        return F.max_pool2d(inv, BOUNDARY_THETA0, stride=1, padding=(BOUNDARY_THETA0 - 1) // 2) - inv

    def extend(x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(x, BOUNDARY_THETA, stride=1, padding=(BOUNDARY_THETA - 1) // 2)

    gt_b, pred_b = edge(onehot), edge(pred)
    gt_ext, pred_ext = extend(gt_b), extend(pred_b)
    gt_b, pred_b, gt_ext, pred_ext = (t * valid for t in (gt_b, pred_b, gt_ext, pred_ext))
    precision = (pred_b * gt_ext).sum(dim=(2, 3)) / (pred_b.sum(dim=(2, 3)) + BF1_EPS)
    recall = (pred_ext * gt_b).sum(dim=(2, 3)) / (gt_b.sum(dim=(2, 3)) + BF1_EPS)
    bf1 = 2 * precision * recall / (precision + recall + BF1_EPS)
    return (1.0 - bf1).mean()


def dice_loss(prob_up: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """``1 − (2 Σ σ(P) y + 1) / (Σ σ(P) + Σ y + 1)`` of the ``[N, 2, H, W]`` output's foreground channel treated as a
    logit (the reference's ``losses.py``) against ``[N, H, W]`` labels; ignored pixels (255) left out."""
    valid = (label != 255).to(prob_up.dtype)
    pred = torch.sigmoid(prob_up[:, 1]) * valid
    truth = (label == 1).to(prob_up.dtype)
    return 1.0 - (2.0 * (pred * truth).sum() + 1.0) / (pred.sum() + truth.sum() + 1.0)
