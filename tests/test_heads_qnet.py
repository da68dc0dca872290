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

Entry points: a tiny random-init ViT (``model.feature_size=8``: "out" 8², "aux" 16², 2 refinement steps, to stay
fast) trained for 4 steps on a 64-pixel phantom (module fixture ``trained``): τ trained and logged, α resolved from
``data.setting`` in training and evaluation, resume, eval with CCA/TTT reporting the refinement's seconds per slice,
``segment`` CLI = :class:`Segmenter`, bf16 (the head's results float32 and identical to autocast off) and 2-process
DDP without ``find_unused_parameters`` (slow).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import fsl_subprocess
from heads_cli import head_state as _tau_state
from heads_cli import last_ckpt as _ckpt
from heads_cli import phantom_env
from heads_cli import run_dir as _run_dir
from heads_cli import train_rows as _rows
from heads_literal import synthetic_episode
from heads_literal_qnet import TwoScaleConvEncoder, qnet_episode, qnet_predict

from fsl_med.cli import main
from fsl_med.config import load_config
from fsl_med.errors import ConfigError
from fsl_med.models.features import EncoderOutput
from fsl_med.models.heads import create_head
from fsl_med.models.heads.qnet import QnetHead
from fsl_med.models.module import FewShotModule
from fsl_med.segment import Segmenter

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
    assert a["oracle"]["align"].item() > 0
    _, head, bundle = _setup(2, S2, swap=True)
    feats = bundle(torch.cat([ep["support_images"], ep["query_image"]]))
    assert feats.maps["aux"].shape[-1] == 64 and feats.maps["out"].shape[-1] == 32  # the fine map is "aux"
    with torch.no_grad():
        b = head.train().episode_terms(feats[:3], ep["support_masks"], feats[3:], ep["query_label"],
                                       torch.tensor([0.1, 1.0]), 1.0)
    assert all(torch.equal(a["fsl_med"][k], b[k]) for k in ("ce", "align"))


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


# -- through the entry points ------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "experiments" / "demo.yaml")
LIVER = 1
QNET = ["model.head.name=qnet", "loss.align_weight=1", "model.feature_size=8", "model.head.qnet.refine_iters=2"]
STEPS = ["trainer.val_check_interval=2", "trainer.log_every_n_steps=1"]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    return phantom_env(tmp_path_factory, "qnet")


def _train(env: SimpleNamespace, name: str, *extra: str) -> Path:
    assert main(["train", DEMO, *env.over, *QNET, *STEPS, f"name={name}", *extra]) == 0
    return _run_dir(env, name)


@pytest.fixture(scope="module")
def trained(env: SimpleNamespace) -> Path:
    return _train(env, "qnet", "trainer.max_steps=4")


def test_training_trains_and_logs_tau(trained):
    rows = _rows(trained)
    assert len(rows) == 4 and all(math.isfinite(float(r["train/loss"])) for r in rows)
    for r in rows:  # no threshold loss: L = L_q + L_align
        assert float(r["train/loss"]) == pytest.approx(float(r["train/ce"]) + float(r["train/align"]), abs=1e-5)
        assert "train/threshold" not in r or r["train/threshold"] == ""
    assert any(float(r["train/align"]) > 0 for r in rows) and len({r["train/tau"] for r in rows}) == 4
    ck = torch.load(_ckpt(trained), map_location="cpu", weights_only=False)
    cfg = ck["hyper_parameters"]["config"]
    assert cfg["model"]["head"]["name"] == "qnet" and cfg["model"]["head"]["qnet"]["alpha"] is None
    assert cfg["loss"]["ce_weights"] == [0.1, 1.0] and cfg["model"]["mask_pooling"] == "adjoint"
    keys = sorted(_tau_state(_ckpt(trained)))
    assert keys == ["model.head.tau.0.bias", "model.head.tau.0.weight", "model.head.tau.1.bias",
                    "model.head.tau.1.weight"]
    d = Segmenter.from_checkpoint(_ckpt(trained)).module.model.encoder.pooled_channels  # ViT-tiny's pooled vector
    assert _tau_state(_ckpt(trained))["model.head.tau.0.weight"].shape == (1000, d) and d > 0


def test_alpha_follows_the_setting_in_training_and_evaluation(trained):
    """α null: Setting 1 [0.9, 0.1], Setting 2 [0.6, 0.4]; an explicit α wins; a checkpoint evaluates with its own."""
    base = [f"data.root={REPO}", "model.encoder.name=vit_tiny_patch14", "model.encoder.weights=none",
            "data.image_size=64", *QNET]
    for extra, want in (([], S1), (["data.setting=2"], S2), (["data.setting=2", "model.head.qnet.alpha=[1,0]"],
                                                              (1.0, 0.0))):
        module = FewShotModule.from_config(load_config(DEMO, base + extra), weights="none")
        assert module.model.head.alpha == want, extra
    assert Segmenter.from_checkpoint(_ckpt(trained)).module.model.head.alpha == S1


def test_resume_continues_with_tau_restored(env, trained):
    before = _tau_state(_ckpt(trained))
    run = _train(env, "qnet-resumed", f"resume={_ckpt(trained)}", "trainer.max_steps=6")
    after = torch.load(_ckpt(run), map_location="cpu", weights_only=False)
    assert after["global_step"] == 6 and len(_rows(run)) == 2
    assert all(not torch.equal(v, after["state_dict"][k]) for k, v in before.items())  # trained on from there


def test_eval_variants_report_the_refinement_cost(env, trained):
    assert main(["eval", DEMO, *env.over, f"ckpt={_ckpt(trained)}", "eval.variants=[plain,cca,ttt]", "ttt.steps=1",
                 "eval.save_predictions=true", "data.test_organs=[liver,spleen]", "name=qnet-one"]) == 0
    run = _run_dir(env, "qnet-one-eval")
    res = json.loads((run / "results.json").read_text())
    assert list(res["variants"]) == ["plain", "cca", "ttt"] and res["ttt_seconds_per_slice"] > 0
    assert all(0.0 <= d <= 100.0 for v in res["variants"].values() for d in v["dice"].values())
    assert res["refine_seconds_per_slice"] > 0
    assert "test-time refinement, seconds per query slice" in (run / "results.md").read_text()
    pred = np.asarray(nib.load(run / "predictions" / "plain" / "pred_1.nii.gz").dataobj)
    assert pred.shape == (64, 64, 10) and pred.any()
    # a head without refinement reports none
    assert FewShotModule.from_config(load_config(DEMO, [f"data.root={REPO}", "model.encoder.weights=none"]),
                                     weights="none").refine_seconds_per_slice is None


def test_segment_cli_equals_the_api(env, trained, tmp_path, capsys):
    out = tmp_path / "mask.nii.gz"
    files = ["--support-image", str(env.root / "image_2.nii.gz"), "--support-mask", str(env.root / "label_2.nii.gz"),
             "--label", str(LIVER), "--query", str(env.root / "image_1.nii.gz")]
    assert main(["segment", "--ckpt", str(_ckpt(trained)), *files, "--out", str(out)]) == 0, capsys.readouterr().err
    cli = np.asarray(nib.load(out).dataobj)
    seg = Segmenter.from_checkpoint(_ckpt(trained))
    res = seg.segment(env.root / "image_1.nii.gz", [(env.root / "image_2.nii.gz", env.root / "label_2.nii.gz")],
                      label=LIVER)
    assert cli.shape == res.mask.shape == (64, 64, 10) and np.array_equal(cli, res.mask) and res.mask.any()
    assert seg.module.model.head.refined_slices > 0  # the API's prediction refined its slices too


def test_bf16_head_results_are_float32_and_equal_autocast_off(trained):
    seg = Segmenter.from_checkpoint(_ckpt(trained)).module.model.eval()
    head = seg.head
    g = torch.Generator().manual_seed(0)
    images = torch.randn(4, 3, 64, 64, generator=g)
    fg = torch.zeros(2, 64, 64)
    fg[0, 10:40, 12:44], fg[1, 20:56, 8:30] = 1, 1
    w = torch.tensor([0.1, 1.0])
    with torch.no_grad():
        f32 = seg.encode(images)
        for feats in (f32, f32.apply(lambda t: t.to(torch.bfloat16))):
            with torch.autocast("cpu", dtype=torch.bfloat16), torch.inference_mode():
                state = head.support_state(feats[:1], fg[:1], training=False)
                low = head.decision_map(feats[2:], state)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                terms = head.episode_terms(feats[1:2], fg[1:2], feats[3:4], fg[:1].long(), w, 1.0)
            ref = head.decision_map(f32[2:], head.support_state(f32[:1], fg[:1], training=False)) \
                if feats is f32 else head.decision_map(feats.float()[2:], head.support_state(feats.float()[:1],
                                                                                                 fg[:1], False))
            ref_terms = head.episode_terms(feats.float()[1:2], fg[1:2], feats.float()[3:4], fg[:1].long(), w, 1.0)
            assert all(p.dtype == torch.float32 for p in state.protos) and low.dtype == torch.float32
            assert low.shape == (2, 1, 64, 64) and torch.equal(low, ref)
            assert all(t.dtype == torch.float32 and torch.equal(t, ref_terms[k]) for k, t in terms.items())


DDP = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp"]


@pytest.mark.slow
def test_two_process_ddp_training(env):
    """Every parameter (encoder and τ layers) is in every step's backward: DDP without find_unused_parameters
    trains (an unused parameter stops it at the next step)."""
    p = fsl_subprocess("train", DEMO, *env.over, *DDP, *QNET, "trainer.max_steps=3", "trainer.val_check_interval=3",
                       "trainer.log_every_n_steps=1", "name=qnet-ddp", cwd=env.base, timeout=600)
    assert p.stdout.count("trained 3 steps") == 1
    run = _run_dir(env, "qnet-ddp")
    assert len(_rows(run)) == 3
    ck = torch.load(_ckpt(run), map_location="cpu", weights_only=False)
    assert ck["global_step"] == 3 and "find_unused_parameters" not in json.dumps(ck["hyper_parameters"])
