"""Issue 29: everything works with every head. PANet and ADNet (``model.head.name``) through the real entry points
(``fsl-med train|run|eval|segment`` in-process or in subprocesses, :meth:`Segmenter.from_checkpoint`): training
(ADNet's learned threshold ``T`` trained, logged and stored; the head's ``loss.ce_weights`` and ``model.mask_pooling``),
2-process DDP training and sharded evaluation, k-shot, resume, CCA/TTT (TTT adapts ``T``), prediction files,
``segment``, a checkpoint evaluated as another head, ``compat=reference``, bf16, and a checkpoint written before the
head registry (ALP; its config in the old layout) giving the same results. ALP is covered by the rest of the suite.

One tiny random-init ViT per head is trained for 6 steps on a 6-scan 64-pixel phantom (module fixture ``trained``)
and shared by the tests.
"""

from __future__ import annotations

import copy
import json
import math
import subprocess
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import error_line, fsl_subprocess
from heads_cli import last_ckpt as _ckpt
from heads_cli import phantom_env
from heads_cli import run_dir as _run_dir
from heads_cli import train_rows as _train_rows
from omegaconf import OmegaConf

from fsl_med.checkpoints import load_checkpoint, module_from_checkpoint, stored_config
from fsl_med.cli import main
from fsl_med.config import HEAD_DEFAULTS
from fsl_med.data.datamodule import FewShotDataModule
from fsl_med.models.segmenter import FewShotSegmenter
from fsl_med.refine.ttt import TestTimeTrainer, adapted_parameters
from fsl_med.segment import Segmenter

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "experiments" / "demo.yaml")
HEADS = ("panet", "adnet")
FOUR = ["eval.variants=[plain,cca,ttt,ttt_cca]", "ttt.steps=2", "eval.save_predictions=true"]
LIVER = 1  # CHAOS-T2 label id (the phantom's layout)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A 6-scan 64-pixel phantom and the overrides every command here shares."""
    return phantom_env(tmp_path_factory, "heads")


def _train(env: SimpleNamespace, name: str, *extra: str, verb: str = "train") -> Path:
    """``fsl-med train`` (or ``run``) in-process; the run folder."""
    assert main([verb, DEMO, *env.over, f"name={name}", *extra]) == 0
    return _run_dir(env, name)


def _head_args(head: str) -> list[str]:
    return [f"model.head.name={head}", "loss.align_weight=1"]  # the alignment loss on (demo.yaml has it off)


@pytest.fixture(scope="module")
def trained(env: SimpleNamespace) -> dict[str, Path]:
    """head -> run folder of 6 training steps (validation at 3 and 6, every step logged)."""
    return {h: _train(env, h, *_head_args(h), "trainer.max_steps=6", "trainer.val_check_interval=3",
                      "trainer.log_every_n_steps=1") for h in HEADS}


def _threshold(path: Path) -> torch.Tensor:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]["model.head.threshold"]


def _strip(x):
    """A results.json value without its timings (``*seconds*`` keys)."""
    if isinstance(x, dict):
        return {k: _strip(v) for k, v in x.items() if "seconds" not in k}
    if isinstance(x, list):
        return [_strip(v) for v in x]
    return x


def _same_results(a: dict, b: dict) -> None:
    assert _strip(a["variants"]) == _strip(b["variants"])
    assert _strip(a["volumes"]) == _strip(b["volumes"]) and a["volumes"]


def _predictions(run_dir: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(run_dir)): np.asarray(nib.load(p).dataobj)
            for p in sorted((run_dir / "predictions").rglob("*.nii.gz"))}


# -- training ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("head", HEADS)
def test_training_trains_logs_and_stores_the_head(head, trained):
    run = trained[head]
    rows = _train_rows(run)
    assert len(rows) == 6 and all(math.isfinite(float(r["train/loss"])) for r in rows)
    assert any(float(r["train/align"]) > 0 for r in rows)  # the alignment loss ran (zero when a prediction is empty)
    assert json.loads((run / "train_summary.json").read_text())["steps"] == 6
    ck = torch.load(_ckpt(run), map_location="cpu", weights_only=False)
    cfg = ck["hyper_parameters"]["config"]
    assert cfg["model"]["head"]["name"] == head
    assert cfg["loss"]["ce_weights"] == HEAD_DEFAULTS[head]["loss.ce_weights"] == ([1.0, 1.0] if head == "panet"
                                                                                    else [0.1, 1.0])
    assert cfg["model"]["mask_pooling"] == "adjoint"
    head_keys = [k for k in ck["state_dict"] if k.startswith("model.head.")]
    if head == "panet":  # no parameters of its own, nothing of its own logged
        assert head_keys == [] and "train/T" not in rows[0] and "train/threshold" not in rows[0]
        return
    assert head_keys == ["model.head.threshold"]
    t = [float(r["train/T"]) for r in rows]
    assert t[0] == -10.0 and len(set(t)) == 6  # logged before each step's update: -10 first, then it moves
    for r in rows:  # L_T = threshold_weight * T / scale, part of the loss
        assert float(r["train/threshold"]) == pytest.approx(float(r["train/T"]) / 20, rel=1e-6)
        assert float(r["train/loss"]) == pytest.approx(float(r["train/ce"]) + float(r["train/align"])
                                                       + float(r["train/threshold"]), abs=1e-5)
    assert float(_threshold(_ckpt(run))[0]) not in (-10.0, t[-1])  # the last step's update is stored too


@pytest.mark.parametrize("head", HEADS)
def test_resume_continues_with_the_head_restored(head, env, trained):
    last = _ckpt(trained[head])
    run = _train(env, f"{head}-resumed", *_head_args(head), f"resume={last}", "trainer.max_steps=9",
                 "trainer.val_check_interval=3", "trainer.log_every_n_steps=1")
    before = torch.load(last, map_location="cpu", weights_only=False)["state_dict"]
    after = torch.load(_ckpt(run), map_location="cpu", weights_only=False)
    assert after["global_step"] == 9 and after["hyper_parameters"]["config"]["model"]["head"]["name"] == head
    assert any(not torch.equal(v, after["state_dict"][k]) for k, v in before.items()
               if k.startswith("model.encoder."))  # it trained on
    if head == "adnet":
        rows = _train_rows(run)
        assert len(rows) == 3
        assert float(rows[0]["train/T"]) == float(before["model.head.threshold"][0])  # restored, not -10
        assert not torch.equal(after["state_dict"]["model.head.threshold"], before["model.head.threshold"])


@pytest.mark.parametrize("trained_as, resumed_as", [("adnet", "panet"), ("panet", "alp")])
def test_resuming_as_another_head_is_a_one_line_error_naming_both(trained_as, resumed_as, env, trained, capsys):
    rc = main(["train", DEMO, *env.over, f"resume={_ckpt(trained[trained_as])}", f"model.head.name={resumed_as}",
               "trainer.max_steps=7", f"name={trained_as}-as-{resumed_as}"])
    err = capsys.readouterr().err
    assert rc == 2
    error_line(err, "model.head.name", repr(trained_as), repr(resumed_as))


# -- k-shot ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("head", HEADS)
def test_kshot_training_and_evaluation(head, env, monkeypatch):
    """``fsl-med run`` with ``shots=3``: 3-shot training episodes, then 3-shot evaluation (supports from 3 scans)."""
    seen: dict[str, set] = {"train": set(), "eval": set()}
    episode_loss, support_prototypes = FewShotSegmenter.episode_loss, FewShotSegmenter.support_prototypes

    def spy_loss(self, support_images, *args, **kwargs):
        seen["train"].add(tuple(support_images.shape[:2]))
        return episode_loss(self, support_images, *args, **kwargs)

    def spy_protos(self, support_images, support_masks, device="cpu", shots=1):
        seen["eval"].add((shots, support_images.shape[0]))
        return support_prototypes(self, support_images, support_masks, device, shots)

    monkeypatch.setattr(FewShotSegmenter, "episode_loss", spy_loss)
    monkeypatch.setattr(FewShotSegmenter, "support_prototypes", spy_protos)
    run = _train(env, f"{head}-k3", *_head_args(head), "shots=3", "trainer.max_steps=3",
                 "trainer.val_check_interval=3", "trainer.log_every_n_steps=1", verb="run")
    assert seen == {"train": {(1, 3)}, "eval": {(3, 9)}}  # [B=1, k=3] training supports; 3 parts x 3 shots
    rows = _train_rows(run)
    assert len(rows) == 3 and all(math.isfinite(float(r["train/loss"])) for r in rows)
    res = json.loads((_run_dir(env, f"{head}-k3-eval") / "results.json").read_text())
    assert res["config"]["shots"] == 3 and res["config"]["model"]["head"]["name"] == head
    assert len(res["volumes"]) == 4 * len(res["variants"]) and all(0.0 <= d <= 100.0 for d in res["dice"].values())


@pytest.mark.parametrize("head", HEADS)
def test_k_identical_supports_predict_as_one(head, env, trained):
    """The prototype is a mean over the shots: 3 copies of one support give the 1-shot prediction, in the model
    (support states, predict_volume) and through :meth:`Segmenter.segment` (3 identical support pairs)."""
    seg = Segmenter.from_checkpoint(_ckpt(trained[head]))
    model = seg.module.model
    rng = np.random.default_rng(0)
    img = rng.normal(size=(3, 64, 64)).astype(np.float32)
    mask = np.zeros((3, 64, 64), np.uint8)
    mask[0, 8:40, 8:40], mask[1, 20:60, 10:30], mask[2, 30:34, 30:34] = 1, 1, 1
    rep = np.repeat(np.arange(3), 3)
    one, three = model.support_prototypes(img, mask), model.support_prototypes(img[rep], mask[rep], shots=3)
    for a, b in zip(one, three, strict=True):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-6)
    query, part = rng.normal(size=(6, 64, 64)).astype(np.float32), np.repeat(np.arange(3), 2)
    p1, q1 = model.predict_volume(one, query, part)
    p3, q3 = model.predict_volume(three, query, part)
    assert np.allclose(q1, q3, atol=1e-5) and (p1 != p3).mean() < 1e-3
    s, m = env.root / "image_2.nii.gz", env.root / "label_2.nii.gz"
    r1 = seg.segment(env.root / "image_1.nii.gz", [(s, m)], label=LIVER, cca="none")
    r3 = seg.segment(env.root / "image_1.nii.gz", [(s, m)] * 3, label=LIVER, cca="none")
    assert np.allclose(r1.probability, r3.probability, atol=1e-5) and (r1.mask != r3.mask).mean() < 1e-3


# -- evaluation: CCA, TTT, prediction files ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def evaluated(env: SimpleNamespace, trained: dict[str, Path]) -> dict[str, Path]:
    """head -> run folder of a one-process ``fsl-med eval`` of its checkpoint: plain, CCA, TTT (2 steps), TTT+CCA,
    prediction files."""
    out = {}
    for h in HEADS:
        assert main(["eval", DEMO, *env.over, f"ckpt={_ckpt(trained[h])}", *FOUR, f"name={h}-one"]) == 0
        out[h] = _run_dir(env, f"{h}-one-eval")
    return out


@pytest.mark.parametrize("head", HEADS)
def test_eval_variants_and_prediction_files(head, evaluated):
    res = json.loads((evaluated[head] / "results.json").read_text())
    assert res["config"]["model"]["head"]["name"] == head and res["ttt"]["steps"] == 2
    assert list(res["variants"]) == ["plain", "cca", "ttt", "ttt_cca"]
    for v in res["variants"].values():
        assert len(v["dice"]) == 4 and all(0.0 <= d <= 100.0 for d in v["dice"].values())
    assert len(res["volumes"]) == 16
    preds = _predictions(evaluated[head])
    assert sorted(preds) == [f"predictions/{v}/pred_1.nii.gz" for v in ("cca", "plain", "ttt", "ttt_cca")]
    for arr in preds.values():
        assert arr.shape == (64, 64, 10) and set(np.unique(arr)) <= set(range(5))  # organ ids of one query scan
    assert preds["predictions/plain/pred_1.nii.gz"].any()


@pytest.mark.parametrize("head", HEADS)
def test_eval_of_a_checkpoint_adapts_with_its_heads_loss(head, evaluated):
    res = json.loads((evaluated[head] / "results.json").read_text())
    assert res["config"]["loss"]["ce_weights"] == HEAD_DEFAULTS[head]["loss.ce_weights"]


class _SpyTrainer(TestTimeTrainer):
    """TTT recording ADNet's threshold right after each adaptation (before a restore)."""

    seen: list[float]

    def _adapt(self, *args, **kwargs) -> None:
        super()._adapt(*args, **kwargs)
        self.seen.append(float(self.seg.head.threshold.detach()[0]))


def test_adnets_threshold_is_optimised_with_weight_decay_as_the_reference():
    """ADNet's optimizer takes ``model.parameters()``: T is in the SGD group with weight decay 5e-4 (experiments/adnet.yaml),
    so one step moves T by lr * (dL/dT + 5e-4 * T)."""
    from fsl_med.config import load_config
    from fsl_med.models.module import FewShotModule

    cfg = load_config(REPO / "experiments" / "adnet.yaml", ["data.root=/nonexistent", "model.encoder.name=vit_tiny_patch14",
                                                              "model.encoder.weights=none", "data.image_size=64"])
    module = FewShotModule.from_config(cfg)
    opt = module.configure_optimizers()["optimizer"]
    t = module.model.head.threshold
    group = next(g for g in opt.param_groups if any(p is t for p in g["params"]))
    assert group["weight_decay"] == 5e-4 and group["lr"] == 1e-3 and isinstance(opt, torch.optim.SGD)
    t.grad = torch.full_like(t, 0.05)  # L_T's constant gradient alone
    others = [p for p in module.parameters() if p is not t]
    for p in others:
        p.requires_grad_(False)
    before = float(t.detach()[0])
    opt.step()
    assert float(t.detach()[0]) == pytest.approx(before - 1e-3 * (0.05 + 5e-4 * before), rel=1e-6)


def test_ttt_adapts_adnets_threshold(trained):
    """TTT trains what the head trains: ADNet's T is among the adapted parameters and changes during adaptation;
    with ``ttt.restore`` (the fsl_med default) the model is bit-identical afterwards, without it T keeps the change."""
    path = _ckpt(trained["adnet"])
    ck = load_checkpoint(path)
    cfg = stored_config(ck, path)
    module, _ = module_from_checkpoint(path, cfg, ck)
    seg = module.model.eval()
    assert any(p is seg.head.threshold for p in adapted_parameters(seg, "all"))
    assert module.ce_weights.tolist() == pytest.approx([0.1, 1.0])
    dm = FewShotDataModule(cfg)
    dm.setup("test")
    for it in dm.test_set.items:
        pred, prob = seg.predict_volume(seg.support_prototypes(it.support_images, it.support_masks, shots=it.shots),
                                        it.query_images, it.part)
        if pred.any():
            break
    else:
        pytest.fail("no item with a non-empty plain prediction")
    t0 = float(seg.head.threshold.detach()[0])
    state = {k: v.clone() for k, v in seg.state_dict().items()}
    args = (it.query_images, pred, prob, it.part, it.support_images, it.support_masks)
    for restore in (True, False):
        tt = _SpyTrainer.from_config(seg, cfg, module.ce_weights, OmegaConf.merge(cfg.ttt, {"steps": 2,
                                                                                             "restore": restore}))
        tt.seen = []
        tt.refine(*args, np.random.default_rng(0), shots=it.shots)
        assert tt.seen and all(t != t0 for t in tt.seen), (restore, t0, tt.seen)
        after = seg.state_dict()
        if restore:
            assert all(torch.equal(state[k], after[k]) for k in state)
            assert float(seg.head.threshold.detach()[0]) == t0 and not seg.training
        else:
            assert float(seg.head.threshold.detach()[0]) == tt.seen[-1] != t0


# -- segment, and a checkpoint evaluated as another head -------------------------------------------------------------

@pytest.mark.parametrize("head", HEADS)
def test_segment_cli_equals_the_api(head, env, trained, tmp_path, capsys):
    ckpt = _ckpt(trained[head])
    out = tmp_path / "mask.nii.gz"
    files = ["--support-image", str(env.root / "image_2.nii.gz"), "--support-mask", str(env.root / "label_2.nii.gz"),
             "--label", str(LIVER), "--query", str(env.root / "image_1.nii.gz")]
    assert main(["segment", "--ckpt", str(ckpt), *files, "--out", str(out)]) == 0, capsys.readouterr().err
    cli = np.asarray(nib.load(out).dataobj)
    res = Segmenter.from_checkpoint(ckpt).segment(env.root / "image_1.nii.gz",
                                                  [(env.root / "image_2.nii.gz", env.root / "label_2.nii.gz")],
                                                  label=LIVER)
    assert cli.shape == res.mask.shape == (64, 64, 10) and np.array_equal(cli, res.mask)
    assert res.mask.any() and np.isin(res.mask, (0, 1)).all()
    assert ((res.probability >= 0.5) >= res.mask.astype(bool)).all()  # CCA only removes; prob is the fg probability


def test_eval_as_another_head_is_a_one_line_error_naming_both(env, trained, capsys):
    rc = main(["eval", DEMO, *env.over, f"ckpt={_ckpt(trained['adnet'])}", "model.head.name=alp", "name=mismatch"])
    err = capsys.readouterr().err
    assert rc == 2
    error_line(err, "model.head.name", "'alp'", "'adnet'")
    assert not (env.runs / "mismatch-eval").exists()


# -- compat=reference, bf16 ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("head", HEADS)
def test_compat_reference_trains(head, env):
    """ALP's ``empty_window=skip`` (compat=reference) is ALP's: these heads skip no episode and log no skips."""
    run = _train(env, f"{head}-ref", *_head_args(head), "compat=reference", "trainer.max_steps=3",
                 "trainer.val_check_interval=3", "trainer.log_every_n_steps=1")
    rows = _train_rows(run)
    assert len(rows) == 3 and all(math.isfinite(float(r["train/loss"])) for r in rows)
    assert "train/skipped_episodes" not in rows[0]
    cfg = torch.load(_ckpt(run), map_location="cpu", weights_only=False)["hyper_parameters"]["config"]
    assert cfg["compat"] == "reference" and cfg["model"]["head"]["name"] == head
    assert cfg["loss"]["ce_weights"] == HEAD_DEFAULTS[head]["loss.ce_weights"]


@pytest.mark.parametrize("head", HEADS)
def test_bf16_heads_compute_in_float32_and_training_runs(head, env, trained):
    seg = Segmenter.from_checkpoint(_ckpt(trained[head])).module.model.eval()
    g = torch.Generator().manual_seed(0)
    sup, qry = torch.randn(2, 3, 64, 64, generator=g), torch.randn(2, 3, 64, 64, generator=g)
    fg = torch.zeros(2, 64, 64)
    fg[0, 10:40, 12:44], fg[1, 20:56, 8:30] = 1, 1
    w = torch.tensor(HEAD_DEFAULTS[head]["loss.ce_weights"])
    bf16 = torch.autocast("cpu", dtype=torch.bfloat16)
    with torch.no_grad():
        feats32 = seg.encode(torch.cat([sup, qry]))
        # the head, given float32 or bf16 features under autocast: float32 results, bit-identical to its results
        # without autocast (its arithmetic runs with autocast off)
        for feats in (feats32, feats32.to(torch.bfloat16)):
            with bf16:
                state = seg.head.support_state(feats[:1], fg[:1], training=False)
                low = seg.head.decision_map(feats[2:], state)
                out = seg.head.output(feats[2:], state, (64, 64))
                terms = seg.head.episode_terms(feats[1:2], fg[1:2], feats[3:4], fg[:1].long(), w, 1.0)
            f32 = feats.float()
            state_ref = seg.head.support_state(f32[:1], fg[:1], training=False)
            assert state.dtype == torch.float32 and torch.equal(state, state_ref)
            assert low.dtype == torch.float32 and torch.equal(low, seg.head.decision_map(f32[2:], state_ref))
            assert out.dtype == torch.float32 and torch.equal(out, seg.head.output(f32[2:], state_ref, (64, 64)))
            ref_terms = seg.head.episode_terms(f32[1:2], fg[1:2], f32[3:4], fg[:1].long(), w, 1.0)
            assert set(terms) == set(ref_terms) and all(t.dtype == torch.float32 for t in terms.values())
            assert all(torch.equal(terms[k], ref_terms[k]) for k in terms), (terms, ref_terms)
        # the segmenter: float32 loss and predictions, close to float32's
        with bf16:
            loss = seg.episode_loss(sup, fg, qry, fg.long(), w, 1.0)
        loss32 = seg.episode_loss(sup, fg, qry, fg.long(), w, 1.0)
    assert all(t.dtype == torch.float32 for t in loss)
    assert float(loss[0]) == pytest.approx(float(loss32[0]), rel=0.1, abs=0.05)
    rng = np.random.default_rng(0)
    s_img, q_img = rng.normal(size=(1, 64, 64)).astype(np.float32), rng.normal(size=(4, 64, 64)).astype(np.float32)
    s_mask = fg[:1].numpy().astype(np.uint8)
    part = np.zeros(4, np.int64)
    with bf16:
        pred, prob = seg.predict_volume(seg.support_prototypes(s_img, s_mask), q_img, part)
    pred32, prob32 = seg.predict_volume(seg.support_prototypes(s_img, s_mask), q_img, part)
    assert prob.dtype == np.float32 and pred.dtype == np.uint8
    assert np.abs(prob - prob32).mean() < 0.05 and (pred != pred32).mean() < 0.1
    # bf16-mixed training
    run = _train(env, f"{head}-bf16", *_head_args(head), "trainer.precision=bf16-mixed", "trainer.max_steps=3",
                 "trainer.val_check_interval=3", "trainer.log_every_n_steps=1")
    rows = _train_rows(run)
    assert len(rows) == 3 and all(math.isfinite(float(r["train/loss"])) for r in rows)
    if head == "adnet":
        assert _threshold(_ckpt(run)).dtype == torch.float32 and float(_threshold(_ckpt(run))[0]) != -10.0


# -- a checkpoint made before the head registry ----------------------------------------------------------------------

LEGACY_ALP_KEYS = ("proto_grid", "test_window", "fg_thresh", "bg_thresh", "empty_window")


def _legacy_config(config: dict) -> dict:
    """A stored config in the layout of fsl_med before the head registry (3effe78): ALP's settings at model level,
    ``model.mask_downsample``, no ``model.head`` (the keys of a checkpoint that version wrote)."""
    old = copy.deepcopy(config)
    m = old["model"]
    head = m.pop("head")
    assert head["name"] == "alp"
    for k in LEGACY_ALP_KEYS:
        m[k] = head["alp"][k]
    m["mask_downsample"] = m.pop("mask_pooling")
    old["loss"]["ce_weights"] = list(config["loss"]["ce_weights"])
    return old


def test_legacy_checkpoint_loads_and_predicts_the_same(env, tmp_path):
    """An ALP checkpoint with non-default ALP settings, its stored config rewritten into the old layout: eval (all
    variants, prediction files) and segment give what the original gives, and the settings reach the head."""
    alp = ["model.head.alp.proto_grid=4", "model.head.alp.test_window=4", "model.head.alp.fg_thresh=0.9",
           "model.mask_pooling=bilinear"]
    orig = _ckpt(_train(env, "alp-new", *alp, "trainer.max_steps=3", "trainer.val_check_interval=3"))
    ck = torch.load(orig, map_location="cpu", weights_only=False)
    ck["hyper_parameters"]["config"] = _legacy_config(ck["hyper_parameters"]["config"])
    model_cfg = ck["hyper_parameters"]["config"]["model"]
    assert "head" not in model_cfg and "mask_pooling" not in model_cfg and model_cfg["proto_grid"] == 4
    legacy = tmp_path / "legacy.ckpt"
    torch.save(ck, legacy)
    variants = ["eval.variants=[plain,cca,ttt,ttt_cca]", "ttt.steps=1", "eval.save_predictions=true",
                "data.test_organs=[liver,spleen]"]
    results = {}
    for name, path in (("orig", orig), ("legacy", legacy)):
        assert main(["eval", DEMO, *env.over, f"ckpt={path}", *variants, f"name={name}"]) == 0
        results[name] = _run_dir(env, f"{name}-eval")
    a, b = (json.loads((results[n] / "results.json").read_text()) for n in ("orig", "legacy"))
    _same_results(a, b)
    assert {k: v for k, v in a["config"].items() if k not in ("name", "ckpt")} == \
        {k: v for k, v in b["config"].items() if k not in ("name", "ckpt")}
    pa, pb = _predictions(results["orig"]), _predictions(results["legacy"])
    assert len(pa) == 4 and pa.keys() == pb.keys() and all(np.array_equal(pa[k], pb[k]) for k in pa)
    segs = [Segmenter.from_checkpoint(p) for p in (orig, legacy)]
    h = segs[1].module.model.head
    assert (h.name, h.train_window, h.test_window, h.fg_thresh, h.mask_pooling) == ("alp", 8, 4, 0.9, "bilinear")
    masks = [s.segment(env.root / "image_1.nii.gz", [(env.root / "image_2.nii.gz", env.root / "label_2.nii.gz")],
                       label=LIVER) for s in segs]
    assert np.array_equal(masks[0].mask, masks[1].mask) and np.array_equal(masks[0].probability, masks[1].probability)


# -- two processes ---------------------------------------------------------------------------------------------------

DDP = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp"]


def _fsl(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return fsl_subprocess(*args, cwd=cwd, timeout=600)


@pytest.mark.slow
def test_two_process_ddp_adnet_training_and_sharded_evaluation(env, trained, evaluated):
    """ADNet's threshold is a parameter outside the encoder: 2-process DDP (no find_unused_parameters) trains it
    (every step's backward reaches every parameter, or DDP stops at the next step), and a 2-process evaluation of the
    one-process checkpoint gives exactly the one-process results and prediction files."""
    p = _fsl("train", DEMO, *env.over, *DDP, *_head_args("adnet"), "trainer.max_steps=4",
             "trainer.val_check_interval=2", "trainer.log_every_n_steps=1", "name=adnet-ddp", cwd=env.base)
    assert "2 per step in all" in p.stderr and p.stdout.count("trained 4 steps") == 1
    run = _run_dir(env, "adnet-ddp")
    rows = _train_rows(run)
    assert len(rows) == 4 and float(rows[0]["train/T"]) == -10.0 and float(rows[-1]["train/T"]) != -10.0
    ck = torch.load(_ckpt(run), map_location="cpu", weights_only=False)
    assert ck["global_step"] == 4 and float(ck["state_dict"]["model.head.threshold"][0]) != -10.0

    _fsl("eval", DEMO, *env.over, *DDP, f"ckpt={_ckpt(trained['adnet'])}", *FOUR, "name=adnet-two", cwd=env.base)
    one_dir, two_dir = evaluated["adnet"], _run_dir(env, "adnet-two-eval")
    one, two = (json.loads((d / "results.json").read_text()) for d in (one_dir, two_dir))
    _same_results(one, two)
    assert len(two["volumes"]) == 16
    p1, p2 = _predictions(one_dir), _predictions(two_dir)
    assert len(p1) == 4 and p1.keys() == p2.keys() and all(np.array_equal(p1[k], p2[k]) for k in p1)
