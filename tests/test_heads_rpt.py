"""The RPT head (issue 30; method-zoo.md §5): fidelity to the equation-literal oracle, determinism, variants.

The oracle (``tests/heads_literal_rpt.py``) is written from method-zoo.md §5(b,c); it upsamples features to the
masks' resolution before every masked average pooling and runs farthest-point sampling, regions, attention heads and
morphology as explicit loops. fsl_med's ``rpt`` head (adjoint pooling, batched ops) must match it in eval mode
(dropout off) with the same seeded farthest-point sampling, on §7's synthetic episode at 128² with a seeded
strided-conv stand-in encoder (stride 2 -> the reference's 64×64 grid, C = 32, pooled vector = the map's mean): the
two-class output, every loss term, the total and the gradients w.r.t. the encoder and every head parameter
(threshold predictor, BaT LayerNorms, attention, MLP) within 1e-5 (and 1e-3 of each gradient's own scale; the
oracle runs in float64 on copies of the same weights); 1 and 3 shots, an empty query prediction (align and MSE
skipped), a support mask with fewer than K positions on the feature grid, ignored query pixels, the 2023 variant.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import fsl_subprocess
from heads_cli import head_state as _head_state
from heads_cli import last_ckpt as _ckpt
from heads_cli import phantom_env
from heads_cli import run_dir as _run_dir
from heads_cli import train_rows as _rows
from heads_literal import strided_conv_encoder, synthetic_episode
from heads_literal_rpt import rpt_episode

from fsl_med.cli import main
from fsl_med.errors import ConfigError
from fsl_med.models.features import EncoderOutput
from fsl_med.models.heads import create_head
from fsl_med.models.heads.rpt import RptHead
from fsl_med.segment import Segmenter

TOL = 1e-5
CHANNELS = 32
SIZE = 128  # §7's episode at half the side (discs scaled): 4x cheaper oracle
FEATURE_SIZE = 64  # 128 / stride 2, the reference's 64x64 grid
CE_WEIGHTS = torch.tensor([0.1, 1.0])
TERMS_2024 = ("ce", "periphery", "align", "mse", "self")


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().double() - b.detach().double()).abs().max().item()


def _setup(seed: int, **options) -> tuple[torch.nn.Conv2d, RptHead]:
    torch.manual_seed(seed)  # the head's initial weights
    enc = strided_conv_encoder(seed, channels=CHANNELS, stride=2)
    head = create_head("rpt", feature_size=FEATURE_SIZE, scale=20.0, mask_pooling="adjoint", options=options,
                       in_channels=CHANNELS, pooled_channels=CHANNELS)
    assert isinstance(head, RptHead)
    head.eval()  # dropout off (the oracle has none); FPS seeded by model.head.rpt.seed
    return enc, head


def _bundle(enc: torch.nn.Module, images: torch.Tensor) -> EncoderOutput:
    f = enc(images)
    return EncoderOutput({"out": f}, f.mean(dim=(2, 3)))


def _bat_tensors(head: RptHead) -> dict[str, torch.Tensor]:
    b = head.bat
    assert b is not None
    mods = {"ln_in": b.norm_in, "wq": b.attention.w_q, "wk": b.attention.w_k, "wv": b.attention.w_v,
            "fc": b.attention.fc, "ln_attn": b.attention.norm, "mlp1": b.mlp[0], "mlp2": b.mlp[2],
            "ln_out": b.norm_out}
    return {f"{k}.{p}": getattr(m, p) for k, m in mods.items() for p in ("weight", "bias")}


def _oracle(enc: torch.nn.Module, head: RptHead, ep: dict, **kwargs) -> tuple[dict, list[torch.Tensor]]:
    """The oracle in float64 on float64 copies of the encoder and the head: the periphery loss's literal Π, a
    difference of two nearly equal probabilities inside a log, loses up to three digits in float32 (the literal
    float32 gradient of that term was 5e-3 relative off float64; fsl_med computes Π stably, 1e-5). Returns its terms
    and the copies' parameters (encoder weight and bias, then the head's, in order)."""
    enc64, head64 = copy.deepcopy(enc).double(), copy.deepcopy(head).double()
    x = {k: v.double() if v.is_floating_point() else v for k, v in ep.items()}
    lit = rpt_episode(lambda im: (enc64(im), enc64(im).mean(dim=(2, 3))), lambda v: head64.tau(v[None])[0, 0],
                      _bat_tensors(head64), x["support_images"], x["support_masks"], x["query_image"],
                      x["query_label"], seed=head.seed, variant=head.variant, n_regions=head.fg_num,
                      ce_weights=CE_WEIGHTS.double(), eta=head.eta(), **kwargs)
    return lit, [enc64.weight, enc64.bias, *head64.parameters()]


def _compare(ep: dict, seed: int, variant: str = "2024", align_weight: float = 1.0, step: int = 0,
             **options) -> dict[str, dict[str, torch.Tensor]]:
    """fsl_med's head vs the oracle on one episode; asserts output, terms, total and gradients. Returns the terms."""
    enc, head = _setup(seed, variant=variant, **options)
    head.set_step(step)
    s, q = _bundle(enc, ep["support_images"]), _bundle(enc, ep["query_image"])
    masks, label = ep["support_masks"], ep["query_label"]

    state = head.support_state(s, masks, training=False)
    out = head.output(q, state, (SIZE, SIZE))
    terms = head.episode_terms(s, masks, q, label, CE_WEIGHTS, align_weight)
    loss = head.combine(terms, align_weight)

    lit, params64 = _oracle(enc, head, ep, align_weight=align_weight)
    assert out.shape == lit["output"].shape == (1, 2, SIZE, SIZE)
    d = _maxdiff(out, lit["output"])
    assert d <= TOL, f"output max|Δ| {d:.3e}"
    want = {k: v for k, v in lit.items() if k not in ("output", "total")}
    expected = TERMS_2024 if variant == "2024" else ("ce", "align", "boundary", "dice")
    assert set(terms) == set(expected)
    for name, value in want.items():
        d = abs(terms[name].item() - value.item())
        assert d <= TOL, f"{name}: fsl_med {terms[name].item():.7g} oracle {value.item():.7g} |Δ| {d:.3e}"
    assert abs(loss.item() - lit["total"].item()) <= TOL

    params = [enc.weight, enc.bias, *head.parameters()]
    names = ["encoder.weight", "encoder.bias"] + [n for n, _ in head.named_parameters()]
    g_f = torch.autograd.grad(loss, params)
    g_o = torch.autograd.grad(lit["total"], params64)
    for name, a, b in zip(names, g_f, g_o, strict=True):
        scale = b.abs().max().item()
        assert scale > 0, f"oracle gradient of {name} is zero (degenerate case)"
        d = _maxdiff(a, b)
        assert d <= TOL and d <= 1e-3 * scale, f"gradient of {name}: max|Δ| {d:.3e} (max|g| {scale:.3g})"
    return {"fsl_med": terms, "oracle": want}


@pytest.mark.parametrize("seed", [0, 1])
def test_rpt_matches_oracle_one_shot(seed):
    r = _compare(synthetic_episode(seed, size=SIZE), seed)
    for name in TERMS_2024:  # every term is exercised
        assert r["oracle"][name].item() > 0, name


def test_rpt_matches_oracle_three_shots_with_ignored_pixels():
    ep = synthetic_episode(2, shots=3, size=SIZE)
    ep["query_label"][:, 100:140, :] = 255  # a band across the query disc: ignored by L_q, L_self
    r = _compare(ep, 2, align_weight=0.5)
    assert r["oracle"]["align"].item() > 0


def test_rpt_empty_prediction_skips_align_and_mse():
    """A threshold predictor biased to −60: P = σ(10 cos − 30 + …) < 0.5 everywhere, so the query prediction is empty
    and L_align, L_mse are 0 with no gradient; L_q, L_per and L_self remain."""
    ep = synthetic_episode(3, size=SIZE)
    enc, head = _setup(3)
    with torch.no_grad():
        head.tau[1].bias.fill_(-60.0)
    s, q = _bundle(enc, ep["support_images"]), _bundle(enc, ep["query_image"])
    terms = head.episode_terms(s, ep["support_masks"], q, ep["query_label"], CE_WEIGHTS, 1.0)
    out = head.output(q, head.support_state(s, ep["support_masks"], False), (SIZE, SIZE))
    assert not bool((out[:, 1] > 0.5).any())
    assert terms["align"].item() == 0.0 and terms["mse"].item() == 0.0
    assert not terms["align"].requires_grad and not terms["mse"].requires_grad
    assert terms["ce"].item() > 1.0 and terms["self"].item() > 0

    lit, params64 = _oracle(enc, head, ep)
    assert lit["align"].item() == 0.0 and lit["mse"].item() == 0.0
    for name in TERMS_2024:
        assert abs(terms[name].item() - lit[name].item()) <= TOL, name
    g_f = torch.autograd.grad(head.combine(terms, 1.0), [enc.weight, enc.bias])
    g_o = torch.autograd.grad(lit["total"], params64[:2])
    assert max(_maxdiff(a, b) for a, b in zip(g_f, g_o, strict=True)) <= TOL


def test_rpt_2023_variant_matches_oracle():
    """K = 10, no "+ p", L = L_q + (1 − η) L_boundary + η L_dice at step 15 000 (η = 0.97); ignored query pixels."""
    ep = synthetic_episode(1, size=SIZE)
    ep["query_label"][:, :, 60:70] = 255
    r = _compare(ep, 1, variant="2023", step=15_000)
    assert set(r["fsl_med"]) == {"ce", "align", "boundary", "dice"} and r["fsl_med"]["align"].item() == 0.0
    assert 0 < r["oracle"]["boundary"].item() < 1 and 0 < r["oracle"]["dice"].item() < 1


def test_rpt_support_mask_with_fewer_than_k_positions():
    """A support disc of radius 3 covers fewer than K = 100 positions of the 64×64 grid: the first K flattened
    positions join them (the reference's rule), as in the oracle."""
    ep = synthetic_episode(0, size=SIZE)
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    small = (((yy - 75) ** 2 + (xx - 70) ** 2) <= 9).float()
    ep["support_masks"] = small[None]
    grid = torch.nn.functional.interpolate(small[None, None], size=(64, 64), mode="bilinear") != 0
    assert 0 < int(grid.sum()) < 100
    _compare(ep, 0)


def test_rpt_empty_mask_regions_are_the_first_k_positions():
    """An empty support mask: exactly the first K flattened positions, one region each (every centre is its own
    Voronoi cell), so the regional prototypes are those positions' features."""
    _, head = _setup(0, fg_num=20)
    feats = torch.randn(1, CHANNELS, 8, 8)
    regions = head.regional_prototypes(feats, torch.zeros(1, 32, 32), training=False)
    want = feats[0].flatten(1)[:, :20].T  # [20, C]
    got = regions[0]
    assert got.shape == want.shape
    order = [int(torch.argmin((want - r).abs().sum(dim=1))) for r in got]
    assert sorted(order) == list(range(20))
    assert torch.allclose(got, want[order], atol=0)


# ------------------------------------------------------------------------------------------------ determinism


def _random_bundle(n: int, seed: int, side: int = 32) -> EncoderOutput:
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(n, CHANNELS, side, side, generator=g)
    return EncoderOutput({"out": f}, torch.randn(n, CHANNELS, generator=g))


def _disc_masks(n: int, seed: int, size: int = 128) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    c = 40 + 50 * torch.rand(n, 2, generator=g)
    return torch.stack([(((yy - cy) ** 2 + (xx - cx) ** 2) <= 30 ** 2).float() for cy, cx in c.tolist()])


def test_rpt_prediction_does_not_depend_on_call_order():
    """The same query slices predicted in two different orders, and after other parts' calls, give identical
    probabilities: the support state is seeded per call (model.head.rpt.seed) and each slice is refined alone."""
    torch.manual_seed(0)
    head = create_head("rpt", feature_size=32, mask_pooling="adjoint", in_channels=CHANNELS,
                       pooled_channels=CHANNELS, options={"fg_num": 30})
    head.eval()
    sup, masks = _random_bundle(4, 1), _disc_masks(4, 2)
    query = _random_bundle(6, 3)
    with torch.inference_mode():
        part0 = head.support_state(sup[0:2], masks[0:2], training=False)  # 2 shots per part
        first = head.decision_map(query, part0)
        part1 = head.support_state(sup[2:4], masks[2:4], training=False)
        head.decision_map(query[3:], part1)
        again = head.support_state(sup[0:2], masks[0:2], training=False)
        order = torch.tensor([5, 2, 4, 0, 3, 1])
        second = torch.empty_like(first)
        second[order[:3]] = head.decision_map(query[order[:3]], again)
        second[order[3:]] = head.decision_map(query[order[3:]], part0)
    assert torch.equal(again.regions, part0.regions)
    assert torch.equal(first, second)
    # the seed decides the first centre: another seed gives other regions
    head.seed = 7
    other = head.support_state(sup[0:2], masks[0:2], training=False)
    assert not torch.equal(other.regions, part0.regions)


def test_rpt_training_draws_reproducible_under_the_run_seed():
    """In training the first FPS centre comes from torch's global generator (seeded by the run's seed): the same
    seed gives the same regions, the next draw other regions."""
    _, head = _setup(0, fg_num=30)
    sup, masks = _random_bundle(1, 4), _disc_masks(1, 5)
    torch.manual_seed(11)
    a = head.regional_prototypes(sup.main, masks, training=True)
    b = head.regional_prototypes(sup.main, masks, training=True)
    torch.manual_seed(11)
    c = head.regional_prototypes(sup.main, masks, training=True)
    assert torch.equal(a, c) and not torch.equal(a, b)


def test_rpt_dropout_only_in_training():
    enc, head = _setup(0, fg_num=30)
    ep = synthetic_episode(0, size=SIZE)
    s, q = _bundle(enc, ep["support_images"]), _bundle(enc, ep["query_image"])
    with torch.no_grad():
        state = head.support_state(s, ep["support_masks"], training=False)
        e1, e2 = head.decision_map(q, state), head.decision_map(q, state)
        head.train()
        t1, t2 = head.decision_map(q, state), head.decision_map(q, state)
    assert torch.equal(e1, e2)
    assert not torch.equal(t1, t2)


# ------------------------------------------------------------------------------------------------ modules, config


@pytest.mark.parametrize("variant", ["2024", "2023"])
def test_rpt_every_parameter_gets_a_gradient(variant):
    """DDP without find_unused_parameters: every parameter of the head is in the loss's graph (both variants, train
    mode with dropout); with bat_passes=0 no BaT module exists at all."""
    enc, head = _setup(0, variant=variant, fg_num=30)
    head.train()
    ep = synthetic_episode(0, size=SIZE)
    s, q = _bundle(enc, ep["support_images"]), _bundle(enc, ep["query_image"])
    terms = head.episode_terms(s, ep["support_masks"], q, ep["query_label"], CE_WEIGHTS, 1.0)
    grads = torch.autograd.grad(head.combine(terms, 1.0), list(head.parameters()), allow_unused=True)
    missing = [n for (n, _), g in zip(head.named_parameters(), grads, strict=True) if g is None]
    assert not missing, f"parameters outside the loss graph: {missing}"
    bare = create_head("rpt", feature_size=64, mask_pooling="adjoint", in_channels=CHANNELS, pooled_channels=CHANNELS,
                       options={"bat_passes": 0, "tau_hidden": 0})
    assert [n for n, _ in bare.named_parameters()] == ["tau.weight", "tau.bias"]


def test_rpt_module_sizes_follow_the_encoder():
    """512 channels (resnet101_qnet's main map) and a 2048 pooled vector: the reference's 4.2 M BaT parameters plus
    the 2048 -> 1000 -> 1 threshold predictor; K by variant."""
    head = create_head("rpt", feature_size=64, mask_pooling="adjoint", in_channels=512, pooled_channels=2048)
    bat = sum(p.numel() for p in head.bat.parameters())
    assert bat == 3 * (512 * 1536 + 1536) + 1536 * 512 + 512 + 2 * (512 * 1024) + 1024 + 512 + 3 * 1024
    assert 4.19e6 < bat < 4.21e6
    assert sum(p.numel() for p in head.tau.parameters()) == 2048 * 1000 + 1000 + 1000 + 1
    assert head.fg_num == 100
    assert create_head("rpt", feature_size=64, in_channels=8, pooled_channels=8,
                       options={"variant": "2023"}).fg_num == 10


def test_rpt_eta_schedule_and_logged_value():
    head = create_head("rpt", feature_size=32, in_channels=8, pooled_channels=8, options={"variant": "2023"})
    values = []
    for step in (0, 4999, 5000, 39_999, 1_000_000):
        head.set_step(step)
        values.append(head.log_values()["eta"])
    assert values == pytest.approx([1.0, 1.0, 0.99, 0.93, 0.0])
    assert create_head("rpt", feature_size=32, in_channels=8, pooled_channels=8).log_values() == {}


def test_rpt_bad_settings_are_one_line_errors():
    with pytest.raises(ConfigError, match="model.head.rpt.fg_num"):
        create_head("rpt", feature_size=8, in_channels=8, pooled_channels=8)  # 100 regions > 64 positions
    with pytest.raises(ConfigError, match="model.head.rpt.variant"):
        create_head("rpt", feature_size=32, in_channels=8, pooled_channels=8, options={"variant": "2022"})
    with pytest.raises(ConfigError, match="model.head.name"):
        create_head("rpt", feature_size=32, in_channels=8)  # an encoder without a pooled vector
    head = create_head("rpt", feature_size=32, in_channels=8, pooled_channels=8, options={"fg_num": 10})
    with pytest.raises(TypeError, match="EncoderOutput"):
        head.support_state(torch.zeros(1, 8, 32, 32), torch.zeros(1, 64, 64), training=False)


def test_rpt_inputs_are_not_modified():
    enc, head = _setup(0, fg_num=30)
    ep = synthetic_episode(0, size=SIZE)
    masks = torch.zeros_like(ep["support_masks"])  # empty: takes the "< K positions" path
    s = _bundle(enc, ep["support_images"])
    before = [t.clone() for t in (s.main, s.pooled, masks)]
    with torch.no_grad():
        head.support_state(s, masks, training=False)
    assert all(torch.equal(a, b) for a, b in zip(before, (s.main, s.pooled, masks), strict=True))
    assert np.isfinite(head.support_state(s, masks, training=False).regions.detach().numpy()).all()


# ------------------------------------------------------------------------------------------------ entry points

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "experiments" / "demo.yaml")
RPT = ["model.head.name=rpt", "loss.align_weight=1", "model.feature_size=16"]  # ViT-tiny at 64 px: "out" 16² ≥ K
STEPS = ["trainer.val_check_interval=2", "trainer.log_every_n_steps=1"]
LIVER, SPLEEN = 1, 4  # CHAOS-T2 label ids (the phantom's layout)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A 6-scan 64-pixel phantom and the overrides every command here shares."""
    return phantom_env(tmp_path_factory, "rpt")


def _train(env: SimpleNamespace, name: str, *extra: str) -> Path:
    assert main(["train", DEMO, *env.over, *RPT, *STEPS, f"name={name}", *extra]) == 0
    return _run_dir(env, name)


@pytest.fixture(scope="module")
def trained(env: SimpleNamespace) -> Path:
    return _train(env, "rpt", "trainer.max_steps=4")


def test_training_logs_the_five_terms_and_stores_the_head(trained):
    rows = _rows(trained)
    assert len(rows) == 4
    for r in rows:  # L = L_q + 0.1 L_per + 1 L_align + 0.1 L_mse + 1 L_self
        t = {k: float(r[f"train/{k}"]) for k in ("loss", "ce", "periphery", "align", "mse", "self")}
        assert all(math.isfinite(v) for v in t.values())
        want = t["ce"] + 0.1 * t["periphery"] + t["align"] + 0.1 * t["mse"] + t["self"]
        assert t["loss"] == pytest.approx(want, rel=1e-5, abs=1e-6)
    ck = torch.load(_ckpt(trained), map_location="cpu", weights_only=False)
    cfg = ck["hyper_parameters"]["config"]
    assert cfg["model"]["head"]["name"] == "rpt" and cfg["model"]["head"]["rpt"]["variant"] == "2024"
    assert cfg["loss"]["ce_weights"] == [0.1, 1.0] and cfg["model"]["mask_pooling"] == "adjoint"
    state = _head_state(_ckpt(trained))
    assert {k.split(".")[2] for k in state} == {"tau", "bat"}
    c = state["model.head.bat.norm_in.weight"].shape[0]
    assert state["model.head.bat.attention.w_q.weight"].shape == (3 * c, c)  # 3 heads of d_k = C
    assert state["model.head.tau.0.weight"].shape[0] == 1000


def test_resume_continues_training_the_head(env, trained):
    before = _head_state(_ckpt(trained))
    run = _train(env, "rpt-resumed", f"resume={_ckpt(trained)}", "trainer.max_steps=6")
    after = torch.load(_ckpt(run), map_location="cpu", weights_only=False)
    assert after["global_step"] == 6 and len(_rows(run)) == 2
    changed = [k for k, v in before.items() if not torch.equal(v, after["state_dict"][k])]
    assert "model.head.bat.attention.w_v.weight" in changed and "model.head.tau.1.weight" in changed


def test_eval_plain_cca_ttt(env, trained):
    assert main(["eval", DEMO, *env.over, f"ckpt={_ckpt(trained)}", "eval.variants=[plain,cca,ttt]", "ttt.steps=1",
                 "eval.save_predictions=true", "data.test_organs=[liver]", "name=rpt-one"]) == 0
    run = _run_dir(env, "rpt-one-eval")
    res = json.loads((run / "results.json").read_text())
    assert list(res["variants"]) == ["plain", "cca", "ttt"] and res["ttt_seconds_per_slice"] > 0
    assert all(0.0 <= d <= 100.0 for v in res["variants"].values() for d in v["dice"].values())
    pred = np.asarray(nib.load(run / "predictions" / "plain" / "pred_1.nii.gz").dataobj)
    assert pred.shape == (64, 64, 10) and pred.any()


def test_segment_cli_equals_the_api_and_repeats_after_other_calls(env, trained, tmp_path, capsys):
    """``segment`` = :class:`Segmenter`; the same query segmented again after another query and organ gives the
    identical probability (the support state is seeded per call), while another FPS seed changes it."""
    out = tmp_path / "mask.nii.gz"
    sup = (env.root / "image_2.nii.gz", env.root / "label_2.nii.gz")
    files = ["--support-image", str(sup[0]), "--support-mask", str(sup[1]), "--label", str(LIVER),
             "--query", str(env.root / "image_1.nii.gz")]
    assert main(["segment", "--ckpt", str(_ckpt(trained)), *files, "--out", str(out)]) == 0, capsys.readouterr().err
    cli = np.asarray(nib.load(out).dataobj)
    seg = Segmenter.from_checkpoint(_ckpt(trained))
    first = seg.segment(env.root / "image_1.nii.gz", [sup], label=LIVER)
    assert cli.shape == first.mask.shape == (64, 64, 10) and np.array_equal(cli, first.mask) and first.mask.any()
    seg.segment(env.root / "image_3.nii.gz", [sup], label=SPLEEN)
    again = seg.segment(env.root / "image_1.nii.gz", [sup], label=LIVER)
    assert np.array_equal(again.probability, first.probability)
    seg.module.model.head.seed = 7
    other = seg.segment(env.root / "image_1.nii.gz", [sup], label=LIVER)
    assert not np.array_equal(other.probability, first.probability)


def test_predict_volume_is_independent_of_slice_order(trained):
    model = Segmenter.from_checkpoint(_ckpt(trained)).module.model
    g = np.random.default_rng(0)
    sup = g.normal(size=(2, 64, 64)).astype(np.float32)
    masks = np.zeros((2, 64, 64), np.float32)
    masks[0, 10:40, 12:44], masks[1, 20:56, 8:30] = 1, 1
    query = g.normal(size=(7, 64, 64)).astype(np.float32)
    part = np.array([0, 1, 0, 1, 1, 0, 0])
    protos = model.support_prototypes(sup, masks, shots=1)
    pred, prob = model.predict_volume(protos, query, part, batch_size=3)
    perm = np.array([6, 3, 0, 5, 1, 4, 2])
    protos2 = model.support_prototypes(sup[::-1].copy(), masks[::-1].copy(), shots=1)[::-1]  # other call order
    pred2, prob2 = model.predict_volume(protos2, query[perm], part[perm], batch_size=2)
    assert np.array_equal(prob2, prob[perm]) and np.array_equal(pred2, pred[perm])


def test_variant_2023_trains_with_boundary_and_dice(env):
    run = _train(env, "rpt-2023", "model.head.rpt.variant=2023", "trainer.max_steps=2")
    rows = _rows(run)
    assert len(rows) == 2
    for r in rows:  # η = 1 before step 5000: L = L_q + L_dice
        t = {k: float(r[f"train/{k}"]) for k in ("loss", "ce", "boundary", "dice", "eta")}
        assert t["eta"] == 1.0 and 0 < t["dice"] < 1 and 0 <= t["boundary"] <= 1
        assert t["loss"] == pytest.approx(t["ce"] + t["dice"], rel=1e-5, abs=1e-6)
    model = Segmenter.from_checkpoint(_ckpt(run)).module.model
    assert model.head.variant == "2023" and model.head.fg_num == 10


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
        bf = f32.apply(lambda t: t.to(torch.bfloat16))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            state = head.support_state(bf[:1], fg[:1], training=False)
            low = head.decision_map(bf[2:], state)
            terms = head.episode_terms(bf[1:2], fg[1:2], bf[3:4], fg[:1].long(), w, 1.0)
        ref_state = head.support_state(bf.float()[:1], fg[:1], training=False)
        ref = head.decision_map(bf.float()[2:], ref_state)
        ref_terms = head.episode_terms(bf.float()[1:2], fg[1:2], bf.float()[3:4], fg[:1].long(), w, 1.0)
    assert state.regions.dtype == state.proto.dtype == low.dtype == torch.float32
    assert low.shape == (2, 1, 16, 16) and torch.equal(low, ref)
    assert all(t.dtype == torch.float32 and torch.equal(t, ref_terms[k]) for k, t in terms.items())


DDP = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp"]


@pytest.mark.slow
def test_two_process_ddp_training(env):
    """Every parameter (encoder, τ layers, BaT block) is in every step's backward: DDP without
    find_unused_parameters trains (an unused parameter stops it at the next step). The 2023 variant has the same
    modules, each in its loss's graph (test_rpt_every_parameter_gets_a_gradient)."""
    p = fsl_subprocess("train", DEMO, *env.over, *DDP, *RPT, "trainer.max_steps=3", "trainer.val_check_interval=3",
                       "trainer.log_every_n_steps=1", "name=rpt-ddp", cwd=env.base, timeout=600)
    assert p.stdout.count("trained 3 steps") == 1
    run = _run_dir(env, "rpt-ddp")
    assert len(_rows(run)) == 3
    ck = torch.load(_ckpt(run), map_location="cpu", weights_only=False)
    assert ck["global_step"] == 3 and "find_unused_parameters" not in json.dumps(ck["hyper_parameters"])
