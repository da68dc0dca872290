"""Q-Net's head (``model.head.name=qnet``, method-zoo.md §4): fidelity to the equation-literal oracle
(``tests/heads_literal_qnet.py``) and the test-time refinement's contract.

Fidelity (§7 item 1): on §7's synthetic 256² episode with a seeded two-scale strided-conv encoder (stride 4 and 8)
and ``mask_pooling=adjoint``, the head's two-class output, L_q, L_align and the gradients of ``L_q + L_align``
w.r.t. the encoder and the τ layers match the oracle within 1e-5, for α = 0.9/0.1 and 0.6/0.4, 1 and 3 shots, with
the scales named either way round (the finer map gets α₀ whatever its name), and with an empty query prediction
(L_align zero and skipped). The evaluation output with 0 and 7 refinement steps matches the oracle's literal loop.

Refinement contract: it runs in inference mode (as ``predict_volume`` calls it), changes no parameter or buffer of
the model (bit for bit), does not run in training mode, refines each query slice independently of the others in its
batch, and is timed on the head.
"""

from __future__ import annotations

import pytest
import torch
from heads_literal import synthetic_episode
from heads_literal_qnet import TwoScaleConvEncoder, qnet_episode, qnet_predict

from fsl_med.errors import ConfigError
from fsl_med.models.features import EncoderOutput
from fsl_med.models.heads import create_head
from fsl_med.models.heads.qnet import QnetHead

TOL = 1e-5
S1, S2 = (0.9, 0.1), (0.6, 0.4)


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().double() - b.detach().double()).abs().max().item()


def _setup(seed: int, alpha=S1, refine_iters: int = 7, swap: bool = False, tau_bias: float | None = None
           ) -> tuple[TwoScaleConvEncoder, QnetHead, object]:
    """The stand-in encoder, a qnet head on it (τ layers seeded), and ``bundle(images) -> EncoderOutput`` naming the
    fine map "out" (the ResNet layout) or, with ``swap``, "aux" (a ViT's layout)."""
    enc = TwoScaleConvEncoder(seed)
    torch.manual_seed(1000 + seed)
    head = create_head("qnet", feature_size=32, scale=20.0, mask_pooling="adjoint",
                       options={"alpha": list(alpha), "refine_iters": refine_iters},
                       pooled_channels=enc.pooled_channels)
    assert isinstance(head, QnetHead) and head.alpha == tuple(alpha)
    if tau_bias is not None:
        with torch.no_grad():
            head.tau[-1].bias.fill_(tau_bias)

    def bundle(images: torch.Tensor) -> EncoderOutput:
        fine, coarse, pooled = enc(images)
        maps = {"out": coarse, "aux": fine} if swap else {"out": fine, "aux": coarse}
        return EncoderOutput(maps, pooled)

    return enc, head, bundle


def _compare(seed: int, ep: dict, alpha=S1, swap: bool = False, tau_bias: float | None = None,
             align_skipped: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    """One training episode: the head's output, terms and gradients vs the oracle's (asserted within TOL)."""
    enc, head, bundle = _setup(seed, alpha, swap=swap, tau_bias=tau_bias)
    head.train()
    ce_w = torch.tensor([0.1, 1.0])
    k = ep["support_images"].shape[0]
    feats = bundle(torch.cat([ep["support_images"], ep["query_image"]]))
    terms = head.episode_terms(feats[:k], ep["support_masks"], feats[k:], ep["query_label"], ce_w, 1.0)
    out = head.output(feats[k:], head.support_state(feats[:k], ep["support_masks"], training=True), (256, 256))
    lit = qnet_episode(enc, list(head.tau), ep["support_images"], ep["support_masks"], ep["query_image"],
                       ep["query_label"], alpha, ce_w)
    assert set(terms) == {"ce", "align"}
    assert out.shape == lit["output"].shape == (1, 2, 256, 256) and out.dtype == torch.float32
    d = _maxdiff(out, lit["output"])
    assert d <= TOL, f"output max|Δ| {d:.3e}"
    for name in ("ce", "align"):
        d = abs(terms[name].item() - lit[name].item())
        assert d <= TOL, f"{name}: fsl_med {terms[name].item():.7g} oracle {lit[name].item():.7g} |Δ| {d:.3e}"
    assert head.log_values()["tau"] == pytest.approx(lit["tau"].item(), abs=1e-5)
    params = [*enc.parameters(), *head.tau.parameters()]
    if align_skipped:
        assert lit["align"].item() == 0.0 and terms["align"].item() == 0.0
        assert not terms["align"].requires_grad or not any(
            g is not None and g.any() for g in torch.autograd.grad(terms["align"], params, retain_graph=True,
                                                                     allow_unused=True))
    g_f = torch.autograd.grad(terms["ce"] + terms["align"], params)
    g_o = torch.autograd.grad(lit["ce"] + lit["align"], params)
    names = ["conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias"] + \
        [f"tau.{n}" for n, _ in head.tau.named_parameters()]
    for name, a, b in zip(names, g_f, g_o, strict=True):
        assert b.abs().max().item() > 0, f"oracle gradient of {name} is zero (degenerate case)"
        d = _maxdiff(a, b)
        assert d <= TOL, f"gradient of {name} max|Δ| {d:.3e} (max|g| {b.abs().max().item():.3g})"
    return {"fsl_med": terms, "oracle": lit}


@pytest.mark.parametrize("alpha", [S1, S2])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_training_episode_matches_oracle(seed, alpha):
    r = _compare(seed, synthetic_episode(seed), alpha)
    assert r["oracle"]["align"].item() > 0  # the alignment term is exercised


def test_three_shots_and_the_finer_map_by_size_not_name():
    """k = 3; and the fine map named "aux" (a ViT's layout) still gets α₀: same numbers as named "out"."""
    ep = synthetic_episode(2, shots=3)
    a = _compare(2, ep, S2)
    b = _compare(2, ep, S2, swap=True)
    assert a["oracle"]["align"].item() > 0
    assert all(torch.equal(a["fsl_med"][k], b["fsl_med"][k]) for k in ("ce", "align"))


def test_ignored_query_pixels_match_oracle():
    ep = synthetic_episode(0)
    ep["query_label"][:, 100:140, :] = 255
    _compare(0, ep)


@pytest.mark.parametrize("seed", [0, 3])
def test_empty_prediction_skips_alignment(seed):
    """τ = −24: P ≤ σ(10 − 12) < 0.5 everywhere, so L_align is skipped (zero, no gradient); L_q is large."""
    r = _compare(seed, synthetic_episode(seed), tau_bias=-24.0, align_skipped=True)
    assert r["oracle"]["ce"].item() > 1.0


# -- test-time refinement ----------------------------------------------------------------------------------------


def _eval_output(head: QnetHead, bundle, ep: dict, queries: torch.Tensor) -> torch.Tensor:
    """The head's eval-mode ``decision_map`` for ``queries`` ``[Q, 3, H, W]`` under inference mode, as
    ``FewShotSegmenter.predict_volume`` calls it."""
    head.eval()
    with torch.inference_mode():
        s = bundle(ep["support_images"])
        state = head.support_state(s, ep["support_masks"], training=False)
        return head.decision_map(bundle(queries), state)


@pytest.mark.parametrize("iters", [0, 7])
@pytest.mark.parametrize("seed,alpha", [(0, S1), (1, S2)])
def test_refined_prediction_matches_oracle(seed, alpha, iters):
    ep = synthetic_episode(seed)
    enc, head, bundle = _setup(seed, alpha, refine_iters=iters)
    low = _eval_output(head, bundle, ep, ep["query_image"])
    assert low.shape == (1, 1, 256, 256) and low.dtype == torch.float32
    pred, prob = head.to_prediction(low, (256, 256))
    assert torch.equal(prob, low[:, 0])  # combined at full size already: to_prediction's upsampling is the identity
    lit = qnet_predict(enc, list(head.tau), ep["support_images"], ep["support_masks"], ep["query_image"], alpha, iters)
    d = _maxdiff(prob, lit[:, 1])
    assert d <= TOL, f"refined ({iters} steps) output max|Δ| {d:.3e}"
    assert torch.equal(pred, prob > 0.5)
    if iters:  # the refinement really moves the prediction
        plain = qnet_predict(enc, list(head.tau), ep["support_images"], ep["support_masks"], ep["query_image"],
                             alpha, 0)
        assert _maxdiff(lit[:, 1], plain[:, 1]) > 1e-3
        assert head.refined_slices == 1 and head.refine_seconds > 0
    else:
        assert head.refined_slices == 0


def test_refinement_changes_nothing_of_the_model_and_slices_are_independent():
    ep = synthetic_episode(1, shots=2)
    queries = torch.cat([synthetic_episode(s)["query_image"] for s in (0, 1, 2)])
    enc, head, bundle = _setup(1, S2)
    before = {k: v.clone() for k, v in [*enc.state_dict().items(), *head.state_dict().items()]}
    grads_before = [p.grad for p in [*enc.parameters(), *head.parameters()]]
    together = _eval_output(head, bundle, ep, queries)
    after = dict([*enc.state_dict().items(), *head.state_dict().items()])
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert [p.grad for p in [*enc.parameters(), *head.parameters()]] == grads_before  # no gradient left behind
    assert all(p.requires_grad for p in head.parameters())
    assert head.refined_slices == 3
    alone = torch.cat([_eval_output(head, bundle, ep, queries[i:i + 1]) for i in range(3)])
    assert head.refined_slices == 6
    d = _maxdiff(together, alone)
    assert d <= 1e-6, f"a slice's refined prediction depends on its batch: max|Δ| {d:.3e}"
    # refinement happens in eval mode only: the training-mode output is the unrefined prediction
    head.train()
    with torch.no_grad():
        s = bundle(ep["support_images"])
        trained_out = head.output(bundle(queries), head.support_state(s, ep["support_masks"], True), (256, 256))
    head.refine_iters = 0
    plain = _eval_output(head, bundle, ep, queries)
    assert head.refined_slices == 6  # neither call refined
    assert torch.equal(trained_out[:, 1:], plain) and _maxdiff(plain, together) > 1e-3


def test_bad_options_are_one_line_config_errors():
    with pytest.raises(ConfigError, match=r"^config key 'model.head.qnet.alpha': .*got \[0.5\]$"):
        create_head("qnet", options={"alpha": [0.5]}, pooled_channels=8)
    with pytest.raises(ConfigError, match=r"^config key 'model.encoder.name': .*pooled vector"):
        create_head("qnet")
    h = create_head("qnet", options={"tau_hidden": 0}, pooled_channels=8)
    assert [tuple(p.shape) for p in h.tau.parameters()] == [(1, 8), (1,)]
    assert create_head("qnet", pooled_channels=8).alpha == S1  # alpha null (unresolved): Setting 1's
