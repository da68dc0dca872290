"""Fidelity of fsl_med's PANet and ADNet heads to their equation-literal oracles (method-zoo.md §7 item 1).

The oracle (``tests/heads_literal.py``) is written from method-zoo.md §2–3 and was checked once against the reference
code (kaixin96/PANet @ 1695bf37, sha168/ADNet @ c6bba850; outputs, losses and encoder gradients bit-identical on these
episodes). Here fsl_med's ``FewShotSegmenter`` with the ``panet`` / ``adnet`` head and ``mask_pooling=adjoint`` must
match it on §7's synthetic 256² episode with a seeded strided-conv encoder: the two-class output, every loss term,
and the gradients of the total loss w.r.t. the encoder's weights and (ADNet) the threshold T, within 1e-5; with
k = 3 shots, a batch of two episodes, and an empty query prediction (alignment term zero and skipped).

Adjoint pooling: ``masked_average(..., "adjoint")`` equals pooling the explicitly upsampled features, and never
allocates a tensor of the upsampled features' size (every op's output shape is recorded with a
``TorchDispatchMode``, torch's own dispatch hook).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from heads_literal import adnet_episode, panet_episode, strided_conv_encoder, synthetic_episode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from fsl_med.models.heads import create_head
from fsl_med.models.heads.pooling import masked_average
from fsl_med.models.segmenter import FewShotSegmenter

TOL = 1e-5
FEATURE_SIZE = 32  # 256 / stride 8
CE_WEIGHTS = {"panet": (1.0, 1.0), "adnet": (0.1, 1.0)}  # the references' own


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().double() - b.detach().double()).abs().max().item()


def _segmenter(head: str, seed: int, t0: float = -10.0, threshold_weight: float = 1.0) -> FewShotSegmenter:
    options = {"threshold_init": t0, "threshold_weight": threshold_weight} if head == "adnet" else {}
    h = create_head(head, feature_size=FEATURE_SIZE, scale=20.0, mask_pooling="adjoint", options=options)
    seg = FewShotSegmenter(strided_conv_encoder(seed), head=h, feature_size=FEATURE_SIZE)
    seg.train()
    return seg


def _oracle(head: str, encoder, ep: dict, ce_weights: torch.Tensor, T: torch.Tensor | None,
            threshold_weight: float) -> dict[str, torch.Tensor]:
    args = (encoder, ep["support_images"], ep["support_masks"], ep["query_image"], ep["query_label"])
    if head == "panet":
        return panet_episode(*args, ce_weights=ce_weights)
    return adnet_episode(*args, threshold=T, ce_weights=ce_weights, threshold_weight=threshold_weight)


def _compare(head: str, episodes: list[dict], seed: int, align_weight: float = 1.0, t0: float = -10.0,
             threshold_weight: float = 1.0, align_skipped: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    """fsl_med vs the oracle on B = len(episodes) episodes (one ``episode_loss`` call, oracle averaged over them).
    Asserts outputs, every term, the total loss and the gradients within TOL; with ``align_skipped``, that both
    sides' alignment term is exactly 0 with no gradient. Returns both sides' terms."""
    seg = _segmenter(head, seed, t0, threshold_weight)
    enc = seg.encoder
    ce_w = torch.tensor(CE_WEIGHTS[head])
    params = [enc.weight, enc.bias]
    names = ["encoder.weight", "encoder.bias"]
    T = None
    if head == "adnet":
        assert seg.head.threshold.shape == (1,) and seg.head.threshold.item() == t0
        T = torch.tensor([t0], requires_grad=True)

    # --- outputs, episode by episode (train-mode forward)
    for i, ep in enumerate(episodes):
        out = seg(ep["support_images"], ep["support_masks"], ep["query_image"])
        lit = _oracle(head, enc, ep, ce_w, T, threshold_weight)
        assert out.shape == lit["output"].shape == (1, 2, 256, 256)
        d = _maxdiff(out, lit["output"])
        # relative to the output's scale: PANet's logits reach ±20 (a float32 ulp there is 1.9e-6)
        assert d <= TOL * max(1.0, lit["output"].abs().max().item()), f"{head} episode {i}: output max|Δ| {d:.3e}"

    # --- loss terms and gradients of one batched episode_loss call
    stack = lambda key: torch.stack([ep[key] for ep in episodes])  # noqa: E731
    loss, ce, align = seg.episode_loss(stack("support_images"), stack("support_masks"),
                                       torch.cat([ep["query_image"] for ep in episodes]),
                                       torch.cat([ep["query_label"] for ep in episodes]), ce_w, align_weight)
    terms = dict(seg.last_terms)
    lits = [_oracle(head, enc, ep, ce_w, T, threshold_weight) for ep in episodes]
    want = {name: sum(lit[name] for lit in lits) / len(lits) for name in lits[0] if name != "output"}
    assert set(terms) == set(want), (sorted(terms), sorted(want))
    assert torch.equal(terms["ce"], ce) and torch.equal(terms["align"], align)
    for name in want:
        d = abs(terms[name].item() - want[name].item())
        assert d <= TOL, f"{head}: term {name} fsl_med {terms[name].item():.7g} oracle {want[name].item():.7g} |Δ| {d:.3e}"
    total = want["ce"] + align_weight * want["align"] + want.get("threshold", 0.0)
    assert abs(loss.item() - total.item()) <= TOL, f"{head}: total {loss.item():.7g} vs oracle {total.item():.7g}"

    if head == "adnet":
        params, names = params + [seg.head.threshold], names + ["T"]
    if align_skipped:
        assert want["align"].item() == 0.0  # the case really is empty on the oracle's side
        assert terms["align"].item() == 0.0, f"{head}: alignment term {terms['align'].item():.7g}, expected skipped"
        if terms["align"].requires_grad:  # skipped: no gradient reaches the encoder or T through it
            grads = torch.autograd.grad(terms["align"], params, retain_graph=True, allow_unused=True)
            assert all(g is None or not g.any() for g in grads), f"{head}: skipped alignment term has a gradient"
    g_f = torch.autograd.grad(loss, params)
    g_o = torch.autograd.grad(total, params[:2] + ([T] if T is not None else []))
    for name, a, b in zip(names, g_f, g_o, strict=True):
        assert b.abs().max().item() > 0, f"{head}: oracle gradient of {name} is zero (degenerate case)"
        d = _maxdiff(a, b)
        assert d <= TOL, f"{head}: gradient of {name} max|Δ| {d:.3e} (max|g| {b.abs().max().item():.3g})"
    return {"fsl_med": terms, "oracle": want}


SEEDS = [0, 1, 2, 3]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("head", ["panet", "adnet"])
def test_head_matches_oracle_one_shot(head, seed):
    r = _compare(head, [synthetic_episode(seed)], seed)
    assert r["oracle"]["align"].item() > 0  # the alignment term is exercised, not skipped
    if head == "adnet":
        assert r["fsl_med"]["threshold"].item() == pytest.approx(-0.5)  # L_T = T / 20 at T = −10


@pytest.mark.parametrize("seed", [0, 2])
@pytest.mark.parametrize("head", ["panet", "adnet"])
def test_head_matches_oracle_three_shots(head, seed):
    r = _compare(head, [synthetic_episode(seed, shots=3)], seed)
    assert r["oracle"]["align"].item() > 0


@pytest.mark.parametrize("head", ["panet", "adnet"])
def test_head_matches_oracle_batch_of_two_episodes_weighted(head):
    """Two different episodes in one call (terms averaged over B), align_weight 0.5, ADNet threshold_weight 0.5."""
    _compare(head, [synthetic_episode(1, shots=2), synthetic_episode(3, shots=2)], seed=1, align_weight=0.5,
             threshold_weight=0.5)


@pytest.mark.parametrize("head", ["panet", "adnet"])
def test_head_matches_oracle_with_ignored_query_pixels(head):
    ep = synthetic_episode(0)
    ep["query_label"][:, 100:140, :] = 255  # a band across the query disc
    _compare(head, [ep], seed=0)


@pytest.mark.parametrize("seed", SEEDS)
def test_panet_empty_prediction_skips_alignment(seed):
    """An all-zero query image: its features are the encoder's bias, closer to the background prototype everywhere,
    so the query argmax has no foreground and PAR is skipped; the label still has the disc (large query CE)."""
    r = _compare("panet", [synthetic_episode(seed, query_noise=0.0, query_contrast=0.0)], seed, align_skipped=True)
    assert r["oracle"]["ce"].item() > 0.5


@pytest.mark.parametrize("seed", SEEDS)
def test_adnet_empty_prediction_skips_alignment(seed):
    """T = −30: P = σ(10·cos + T/2) < σ(−5) < 0.5 everywhere, so [P > 0.5] is empty and L_align is skipped.
    (T = +30 would be the opposite: P > 0.5 everywhere.)"""
    r = _compare("adnet", [synthetic_episode(seed)], seed, t0=-30.0, align_skipped=True)
    assert r["fsl_med"]["threshold"].item() == pytest.approx(-1.5)


def test_adnet_full_prediction_matches_oracle():
    """T = +30: every query position is foreground (the alignment prototype is the mean query feature)."""
    r = _compare("adnet", [synthetic_episode(0)], 0, t0=30.0)
    assert r["oracle"]["align"].item() > 1.0


# ------------------------------------------------------------------------------------------------ adjoint pooling


def _pool_masks(dtype: torch.dtype, size: int = 256) -> torch.Tensor:
    """[4, H, W]: the §7 support disc, a sparse random mask, a one-pixel mask at the border and an empty mask."""
    g = torch.Generator().manual_seed(7)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    disc = ((yy - 120) ** 2 + (xx - 130) ** 2 <= 40 ** 2)
    rand = torch.rand(size, size, generator=g) > 0.8
    corner = torch.zeros(size, size, dtype=torch.bool)
    corner[0, size - 1] = True
    empty = torch.zeros(size, size, dtype=torch.bool)
    return torch.stack([disc, rand, corner, empty]).to(dtype)


def _explicit_pool(feats: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    up = F.interpolate(feats, size=masks.shape[-2:], mode="bilinear", align_corners=False)
    return (up * masks[:, None]).sum(dim=(2, 3)) / (masks[:, None].sum(dim=(2, 3)) + 1e-5)


class _OpShapes(TorchDispatchMode):
    """Records the shape of every tensor each aten op returns while active."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.shapes.append((str(func), tuple(t.shape)))
        return out


def _feats(side: int, dtype: torch.dtype, channels: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(side)
    return torch.randn(4, channels, side, side, generator=g, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("side", [18, 32, 64])
def test_adjoint_pooling_equals_upsample_then_pool(side, dtype):
    feats, masks = _feats(side, dtype), _pool_masks(dtype)
    got = masked_average(feats, masks, "adjoint")
    want = _explicit_pool(feats, masks)
    assert got.shape == want.shape == (4, 16) and got.dtype == dtype
    d = _maxdiff(got, want)
    assert d <= 1e-6, f"side {side} {dtype}: max|Δ| {d:.3e}"
    assert torch.count_nonzero(got[3]) == 0  # empty mask -> zero vector


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("side", [18, 32, 64])
def test_adjoint_pooling_never_builds_full_resolution_features(side, dtype):
    feats = _feats(side, dtype)[:2]  # S = 2 masks, C = 16
    masks = _pool_masks(dtype)[:2]
    limit = feats.shape[1] * 256 * 256  # C·H·W: one support's features at the mask's resolution
    rec = _OpShapes()
    with rec:
        masked_average(feats, masks, "adjoint")
    assert rec.shapes, "no op recorded: the dispatch hook did not see the computation"
    big = [(op, s) for op, s in rec.shapes if math.prod(s) >= limit]
    assert not big, f"tensors with >= C·256² = {limit} elements: {big}"

    control = _OpShapes()  # the hook does see a full-resolution upsampling
    with control:
        _explicit_pool(feats, masks)
    assert any(math.prod(s) >= limit for _, s in control.shapes)
