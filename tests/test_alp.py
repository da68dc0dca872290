"""ALP pooling on constructed masks: prototype counts, values, modes and scores."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fsl_med.models.heads.alp import (
    episode_prototypes,
    episode_scores,
    global_prototype,
    local_prototypes,
    prototype_scores,
    safe_norm,
)


def _feats(c: int = 3, h: int = 8, w: int = 8) -> torch.Tensor:
    return torch.arange(c * h * w, dtype=torch.float32).reshape(1, c, h, w)


def test_local_prototypes_select_full_windows_only():
    f = _feats()
    m = torch.zeros(1, 1, 8, 8)
    m[..., :4, :4] = 1.0  # one full 4x4 window
    m[..., 4:8, 4:7] = 1.0  # 12/16 = 0.75 of another: below 0.95
    p = local_prototypes(f, m, window=4, thresh=0.95)
    assert p.shape == (1, 3)
    assert torch.allclose(p[0], f[0, :, :4, :4].mean(dim=(-1, -2)))
    # window 2: the full 4x4 block gives 4 windows, the 4x3 block gives 2 full 2x2 windows + partial ones
    p2 = local_prototypes(f, m, window=2, thresh=0.95)
    assert p2.shape == (4 + 2, 3)


def test_local_prototypes_threshold_is_strict():
    f = _feats()
    m = torch.full((1, 1, 8, 8), 0.95)
    assert local_prototypes(f, m, 4, 0.95).shape[0] == 0
    assert local_prototypes(f, m, 4, 0.94).shape[0] == 4


def test_global_prototype_is_masked_mean_per_shot():
    f = torch.cat([_feats(), -_feats()])
    m = torch.zeros(2, 1, 8, 8)
    m[0, 0, 0, 0] = 1
    m[1, 0, 7, 7] = 1
    g = global_prototype(f, m)
    assert g.shape == (2, 3)
    assert torch.allclose(g[0], f[0, :, 0, 0] / (1 + 1e-5))
    assert torch.allclose(g[1], f[1, :, 7, 7] / (1 + 1e-5))


def test_prototype_scores_single_and_softmax_weighted():
    q = torch.randn(2, 5, 4, 4)
    p1 = torch.randn(1, 5)
    s1 = prototype_scores(q, p1, 20.0)
    cos = F.cosine_similarity(q, p1[0][None, :, None, None], dim=1)
    assert torch.allclose(s1[:, 0], 20 * cos, atol=1e-4)
    p2 = torch.randn(2, 5)
    d = torch.stack([20 * F.cosine_similarity(q, p2[k][None, :, None, None], dim=1) for k in range(2)], dim=1)
    expected = (torch.softmax(d, dim=1) * d).sum(dim=1)
    assert torch.allclose(prototype_scores(q, p2, 20.0)[:, 0], expected, atol=1e-4)


def test_safe_norm_keeps_zero_vectors_finite():
    x = torch.zeros(1, 4, 2, 2)
    assert torch.equal(safe_norm(x), x)
    y = torch.tensor([[3.0, 4.0]])
    assert torch.allclose(safe_norm(y, dim=1), torch.tensor([[0.6, 0.8]]))


def test_episode_modes_follow_reference_rule():
    f = torch.randn(1, 6, 32, 32)
    big = torch.zeros(1, 1, 32, 32)
    big[..., 8:20, 8:20] = 1  # covers full 4x4 windows
    pr = episode_prototypes(f, big, window=4, decision_window=4)
    assert pr.fg.mode == "gridconv+"
    assert pr.fg.protos.shape[0] == 9 + 1  # 3x3 full windows of 4 + 1 global prototype
    assert pr.bg.mode == "gridconv"
    assert pr.bg.protos.shape[0] == 64 - 9  # 8x8 windows minus the 9 covered by the aligned fg block
    small = torch.zeros(1, 1, 32, 32)
    small[..., 3:5, 3:5] = 1  # no full 4x4 window: global prototype only
    pr2 = episode_prototypes(f, small, window=4, decision_window=4)
    assert pr2.fg.mode == "mask" and pr2.fg.protos.shape[0] == 1
    scores = episode_scores(torch.randn(3, 6, 32, 32), pr2, 20.0)
    assert scores.shape == (3, 2, 32, 32)
    assert torch.isfinite(scores).all()


def test_background_without_full_window_falls_back_to_global():
    f = torch.randn(1, 6, 8, 8)
    fg = torch.ones(1, 1, 8, 8)
    fg[..., 0, 0] = 0  # background is a single pixel: no window above 0.95
    pr = episode_prototypes(f, fg, window=4, decision_window=4)
    assert pr.bg.mode == "mask" and pr.bg.protos.shape == (1, 6)
