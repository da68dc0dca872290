"""The test-time stage as Lightning callbacks: the numbers equal the pre-callback computation, callbacks compose in
any order a user gives (Python API and config), TTT restores the model and does not depend on item order, and
prediction files lie on the right grids (prepared, and the source grid through manifest.json).

The reference for every number is ``old_style``: the pre-callback ``FewShotModule._eval_item`` (fsl_med 46d3a54),
written out with the same public building blocks (support prototypes once per organ, query features once per scan,
CCA, TTT keyed by organ and scan, TP/FP/FN, HD95) in one loop.
"""

from __future__ import annotations

import json
import re
import sys
import zlib
from pathlib import Path

import lightning as L
import nibabel as nib
import numpy as np
import pytest
import torch
from docs_text import page
from omegaconf import OmegaConf

from fsl_med import callbacks as cbs
from fsl_med.checkpoints import module_from_checkpoint
from fsl_med.cli import main
from fsl_med.config import load_config
from fsl_med.data.datamodule import EvalDataset, FewShotDataModule
from fsl_med.data.phantom import generate_phantom
from fsl_med.data.phantom_raw import write_raw_sabs
from fsl_med.data.protocol import EvalItem
from fsl_med.errors import ConfigError
from fsl_med.evaluation.metrics import confusion_counts, hd95
from fsl_med.evaluation.predictions import PredictionWriter
from fsl_med.evaluation.scoring import Scoring
from fsl_med.models.prediction import ItemPrediction
from fsl_med.models.segmenter import QueryFeatureCache
from fsl_med.prepare.geometry import to_original_grid
from fsl_med.prepare.nifti import write_nifti
from fsl_med.prepare.sabs import prepare_sabs
from fsl_med.refine.base import Refinement
from fsl_med.refine.cca import CCA, largest_mass_component
from fsl_med.refine.ttt import TestTimeTrainer, TestTimeTraining
from fsl_med.train import train

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "experiments" / "demo.yaml"
FOUR = "eval.variants=[plain,cca,ttt,ttt_cca]"


class Dilate(Refinement):
    """A refinement of the test's own: one binary dilation per slice."""

    name = "dilate"

    def refine(self, pred, prob, item, module):
        from scipy import ndimage
        return ndimage.binary_dilation(pred, np.ones((1, 3, 3), bool)).astype(np.uint8), prob


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny ViT trained 6 steps on a 6-scan phantom inside the test: ``(overrides, checkpoint, tmp)``."""
    tmp = tmp_path_factory.mktemp("callbacks")
    root = generate_phantom(tmp / "ph", n_scans=6, size=64, depth=10, seed=0)
    over = [f"data.root={root}", "data.image_size=64", "data.num_workers=0", "data.batch_size=1",
            f"logging.output_dir={tmp / 'runs'}", "trainer.enable_progress_bar=false", "logging.logger=csv",
            f"data.cache_dir={tmp_path_factory.getbasetemp() / 'sp_cache'}"]
    res = train(load_config(DEMO, [*over, "trainer.max_steps=6", "trainer.val_check_interval=3", "name=cb"]))
    return over, res.last_ckpt, tmp


def _module_dm(run, *extra: str):
    over, ckpt, _ = run
    cfg = load_config(DEMO, [*over, f"ckpt={ckpt}", *extra])
    module, _ = module_from_checkpoint(ckpt, cfg)
    dm = FewShotDataModule(cfg)
    dm.setup("test")
    return cfg, module, dm


def old_style(module, cfg, items: list[EvalItem], ttt_steps: int = 2, extra: Refinement | None = None):
    """``{(organ, query, variant): (tp, fp, fn, hd95)}`` and the predictions, as the module computed them before."""
    module.eval()
    seg, dev, bs = module.model, module.device, cfg.eval.batch_size
    protos: dict = {}
    cache = QueryFeatureCache(seg, bs, dev)
    tt = TestTimeTrainer.from_config(seg, cfg, module.ce_weights, OmegaConf.merge(cfg.ttt, {"steps": ttt_steps}))
    rows, preds = {}, {}
    with torch.inference_mode():
        for it in items:
            key = (it.support_id, it.organ)
            if key not in protos:
                protos[key] = seg.support_prototypes(it.support_images, it.support_masks, dev, it.shots)
            feats = cache.features(it.query_id, it.z, it.query_images)
            pred, prob = seg.predict_volume(protos[key], it.query_images, it.part, batch_size=bs, device=dev,
                                            query_feats=feats)
            out = {"plain": pred, "cca": largest_mass_component(pred, prob, cfg.eval.cca_mode)}
            rng = np.random.default_rng([cfg.seed, zlib.crc32(f"{it.organ}/{it.query_id}".encode())])
            tpred, tprob = tt.refine(it.query_images, pred, prob, it.part, it.support_images, it.support_masks, rng,
                                     dev, bs, shots=it.shots)
            out["ttt"], out["ttt_cca"] = tpred, largest_mass_component(tpred, tprob, cfg.eval.cca_mode)
            if extra is not None:
                out[extra.name] = extra.refine(pred, prob, it, module)[0]
                out[extra.name + "_cca"] = largest_mass_component(out[extra.name], prob, cfg.eval.cca_mode)
            for v, p in out.items():
                c = confusion_counts(p, it.query_labels)
                rows[(it.organ, it.query_id, v)] = (c.tp, c.fp, c.fn, hd95(p, it.query_labels, it.spacing))
                preds[(it.organ, it.query_id, v)] = (p, prob if v in ("plain", "cca") else None)
    return rows, preds


@pytest.fixture(scope="module")
def expected(run):
    cfg, module, dm = _module_dm(run)
    return old_style(module, cfg, dm.test_set.items, extra=Dilate())


def _rows_of_results(res: dict) -> dict:
    return {(v["organ"], v["query"], v["variant"]): (v["tp"], v["fp"], v["fn"],
                                                     float("nan") if v["hd95"] is None else v["hd95"])
            for v in res["volumes"]}


def _same(got: dict, want: dict, variants: list[str]) -> None:
    want = {k: v for k, v in want.items() if k[2] in variants}
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k][:3] == want[k][:3], k
        assert (np.isnan(got[k][3]) and np.isnan(want[k][3])) or got[k][3] == want[k][3], k


def _eval(run, *extra: str) -> tuple[dict, Path]:
    over, ckpt, _ = run
    assert main(["eval", str(DEMO), *over, f"ckpt={ckpt}", *extra]) == 0
    runs = sorted((Path(over[4].split("=", 1)[1])).glob(f"{_name(extra)}-eval/version_*"))
    path = runs[-1] / "results.json"
    return json.loads(path.read_text()), path


def _name(extra: tuple[str, ...]) -> str:
    return next(x.split("=", 1)[1] for x in extra if x.startswith("name="))


def _test(module, dm, callbacks) -> None:
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
    trainer.test(module, datamodule=dm, verbose=False)


def _rows(scoring: Scoring) -> dict:
    return {(r.organ, r.query_id, r.variant): (r.counts.tp, r.counts.fp, r.counts.fn, r.hd95)
            for r in scoring.results["test"]}


def test_fsl_med_eval_equals_the_pre_callback_numbers(run, expected):
    """All four variants (TTT 2 steps) through ``fsl-med eval``: TP/FP/FN and HD95 of every (organ, query, variant)
    equal the pre-callback computation to the last digit; TTT seconds per slice are reported."""
    res, _ = _eval(run, FOUR, "ttt.steps=2", "name=four")
    _same(_rows_of_results(res), expected[0], ["plain", "cca", "ttt", "ttt_cca"])
    assert list(res["variants"]) == ["plain", "cca", "ttt", "ttt_cca"] and res["ttt_seconds_per_slice"] > 0
    assert len(res["volumes"]) == 16


@pytest.mark.parametrize("make,variants", [
    (lambda: [], ["plain"]),
    (lambda: [CCA("2d")], ["plain", "cca"]),
    (lambda: [TestTimeTraining(steps=2)], ["plain", "ttt"]),
], ids=["plain-only", "cca-only", "ttt-without-cca"])
def test_callbacks_compose_through_the_python_api(run, expected, make, variants):
    cfg, module, dm = _module_dm(run)
    scoring = Scoring()
    _test(module, dm, [*make(), scoring])
    assert scoring.variant_order("test") == variants
    _same(_rows(scoring), expected[0], variants)


def test_user_refinement_order_is_respected(run, expected):
    """A user refinement, then CCA of it: both scored as the pre-callback loop computes them. The other order is a
    one-line error naming the missing variant, and so is a refinement listed after Scoring."""
    cfg, module, dm = _module_dm(run)
    scoring = Scoring()
    _test(module, dm, [Dilate(), CCA("2d", source="dilate"), scoring])
    assert scoring.variant_order("test") == ["plain", "dilate", "dilate_cca"]
    _same(_rows(scoring), expected[0], ["plain", "dilate", "dilate_cca"])
    with pytest.raises(ConfigError, match="derives from variant 'dilate', which no earlier callback produced"):
        _test(module, dm, [CCA("2d", source="dilate"), Dilate(), Scoring()])
    with pytest.raises(ConfigError, match="come after Scoring"):
        _test(module, dm, [Scoring(), Dilate()])
    with pytest.raises(ConfigError, match="produced twice"):
        cbs.refinements(load_config(DEMO, ["eval.variants=[plain,cca]"]), [CCA("3d")])


def test_readme_refinement_example_runs_through_fsl_med_eval(run, expected, tmp_path):
    """The docs' ``Closing`` example (Test-time stage page), copied verbatim into a file and named in ``eval.refinements``: scored after
    ``eval.variants``, logged as ``test/dice_closing``, and equal to applying it to the plain prediction."""
    code = re.search(r"<!-- refinement-example -->\n```python\n(.*?)```", page("test-time.md"), re.S).group(1)
    assert len(code.strip().splitlines()) <= 15
    path = tmp_path / "closing.py"
    path.write_text(code)
    res, out = _eval(run, "eval.variants=[plain,cca]", f"eval.refinements=[{path}:Closing]", "name=readme")
    assert list(res["variants"]) == ["plain", "cca", "closing"]
    closing = cbs.load_refinement(f"{path}:Closing")
    got = _rows_of_results(res)
    cfg, module, dm = _module_dm(run)
    for it in dm.test_set.items:
        pred = expected[1][(it.organ, it.query_id, "plain")][0]
        c = confusion_counts(closing.refine(pred, None, it, module)[0], it.query_labels)
        assert got[(it.organ, it.query_id, "closing")][:3] == (c.tp, c.fp, c.fn)
    assert "closing" in out.with_name("results.md").read_text()
    assert "test/dice_closing" in out.with_name("metrics.csv").read_text().splitlines()[0]


COMPOSED = re.search(r"<!-- compose-example -->\n```python\n(.*?)```", page("test-time.md"), re.S).group(1)
"""The docs' composed example (Test-time stage page, ``fsl_med.checkpoints.load_for_eval``), run as written by
:func:`test_composed_example_runs_in_a_working_folder_and_leaves_nothing_there`."""


def _working_folder(run, folder: Path, monkeypatch) -> Path:
    """``folder`` laid out as the example expects (the checkpoint where ``fsl-med train experiments/mri.yaml`` puts
    it, the scans in ``data/chaos_mr_t2``, the docs' ``closing.py``), made the working folder."""
    over, ckpt, _ = run
    (folder / "lightning_logs/mri/version_0/checkpoints").mkdir(parents=True)
    (folder / "lightning_logs/mri/version_0/checkpoints/last.ckpt").symlink_to(ckpt)
    (folder / "data").mkdir()
    (folder / "data/chaos_mr_t2").symlink_to(over[0].split("=", 1)[1], target_is_directory=True)
    (folder / "closing.py").write_text(re.search(r"<!-- refinement-example -->\n```python\n(.*?)```",
                                                 page("test-time.md"), re.S).group(1))
    monkeypatch.chdir(folder)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, "closing", raising=False)
    return folder


def _tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if "__pycache__" not in p.parts)


def test_composed_example_runs_in_a_working_folder_and_leaves_nothing_there(run, tmp_path, monkeypatch):
    """The composed example, as written (:data:`COMPOSED`), from a working folder: the user's refinement is scored
    after CCA (``test/dice_closing``), and nothing is written there. Without ``logger=False`` the same Trainer leaves
    ``lightning_logs/version_0`` there: Lightning's default logger (``logger=True``: TensorBoard, or CSV without
    tensorboard) writes into ``default_root_dir``, the working folder, which is why the example turns it off."""
    folder = _working_folder(run, tmp_path / "work", monkeypatch)
    before = _tree(folder)
    ns: dict = {}
    exec(compile(COMPOSED, "composed_example.py", "exec"), ns)
    metrics = ns["results"][0]
    assert {"test/dice", "test/dice_cca", "test/dice_closing"} <= set(metrics)
    assert 0.0 <= metrics["test/dice_closing"] <= 100.0  # Dice in percent
    assert ns["datamodule"].cfg.data.root == "data/chaos_mr_t2" and ns["module"].trained_on is not None
    assert _tree(folder) == before  # no lightning_logs/version_0, no checkpoints, nothing

    other = _working_folder(run, tmp_path / "default_logger", monkeypatch)
    exec(compile(COMPOSED.replace("logger=False, ", ""), "composed_example.py", "exec"), {})
    assert (other / "lightning_logs" / "version_0").is_dir()


def test_load_for_eval_is_what_fsl_med_eval_evaluates(run, tmp_path):
    """From the stored config or from a YAML file (as ``fsl-med eval CONFIG ckpt=...``): the same weights, the
    checkpoint's model and data settings; the command line's rules and messages for everything else."""
    from fsl_med.checkpoints import load_for_eval
    from fsl_med.errors import WeightsError

    over, ckpt, _ = run
    module, dm = load_for_eval(ckpt)
    cfg, ref, _ = _module_dm(run)
    m2, dm2 = load_for_eval(ckpt, [*over, "name=other"], config=DEMO)
    for m in (module, m2):
        assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), ref.state_dict().values(), strict=True))
    for d in (dm, dm2):
        assert (d.cfg.data.fold, d.cfg.data.setting, list(d.cfg.data.test_organs), d.cfg.data.root) == \
            (cfg.data.fold, cfg.data.setting, list(cfg.data.test_organs), cfg.data.root)
        assert d.cfg.model.encoder.name == cfg.model.encoder.name
    with pytest.raises(ConfigError, match="model.encoder.name='vit_tiny_patch14_reg' on the command line "
                                          "contradicts the checkpoint"):
        load_for_eval(ckpt, ["model.encoder.name=vit_tiny_patch14_reg"])
    with pytest.raises(ConfigError, match="a list of key=value strings"):
        load_for_eval(ckpt, "data.fold=0")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="ckpt=latest: needs config="):
        load_for_eval("latest")
    with pytest.raises(WeightsError, match="is a folder"):
        load_for_eval(tmp_path)
    with pytest.raises(WeightsError, match="checkpoint not found"):
        load_for_eval(tmp_path / "no.ckpt")


@pytest.mark.parametrize("spec,needle", [
    ("nothing_here", "must be 'package.module:Class'"),
    ("/no/such/file.py:Closing", "does not exist"),
    ("os.path:join", "has no Refinement subclass named join"),
    ("no_such_module_xyz:Closing", "cannot import no_such_module_xyz"),
])
def test_bad_refinement_names_are_one_line_errors(run, spec, needle, capsys):
    over, ckpt, tmp = run
    rc = main(["eval", str(DEMO), *over, f"ckpt={ckpt}", f"eval.refinements=[{spec}]", "name=badref"])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp / "runs" / "badref-eval").exists()  # nothing made


def test_ttt_callback_keys_randomness_by_organ_and_scan_and_restores_the_model(run, expected):
    """Items in reverse order give the same TTT predictions; afterwards every parameter, buffer, requires_grad flag
    and the train/eval mode are as before."""
    cfg, module, dm = _module_dm(run)
    dm.test_set = EvalDataset(list(reversed(dm.test_set.items)))
    before = {k: v.clone() for k, v in module.state_dict().items()}
    flags = {n: p.requires_grad for n, p in module.named_parameters()}
    module.eval()
    ttt = TestTimeTraining(steps=2)
    scoring = Scoring(["ttt"])
    _test(module, dm, [ttt, scoring])
    _same(_rows(scoring), expected[0], ["ttt"])
    after = module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert flags == {n: p.requires_grad for n, p in module.named_parameters()}
    assert not module.training and not module.model.training
    assert ttt.slices == sum(len(it.z) for it in dm.test_set.items) and ttt.seconds_per_slice > 0


def test_prediction_files_on_the_prepared_grid(run, expected):
    """``eval.save_predictions=true``: one multi-label file per query scan and variant, with the prepared image's
    shape and affine; each organ's voxels are its own prediction, and where only one organ is predicted the voxel
    carries that organ's label id."""
    res, path = _eval(run, "eval.variants=[plain,cca]", "eval.save_predictions=true", "name=preds")
    cfg, module, dm = _module_dm(run)
    queries = sorted({it.query_id for it in dm.test_set.items})
    folder = Path(res["predictions"])
    assert folder == path.parent / "predictions"
    for v in ("plain", "cca"):
        assert sorted(p.name for p in (folder / v).glob("*.nii.gz")) == [f"pred_{q}.nii.gz" for q in queries]
        assert not (folder / v / "source_grid").exists()  # the phantom folder has no manifest.json
        for q in queries:
            out = nib.load(folder / v / f"pred_{q}.nii.gz")
            img = nib.load(Path(cfg.data.root) / f"image_{q}.nii.gz")
            lab = np.asarray(out.dataobj).transpose(2, 1, 0)
            assert out.shape == img.shape and np.allclose(out.affine, img.affine) and lab.dtype == np.uint8
            items = [it for it in dm.test_set.items if it.query_id == q]
            full = {it.label_id: np.zeros(lab.shape, bool) for it in items}
            for it in items:
                full[it.label_id][it.z] = expected[1][(it.organ, q, v)][0].astype(bool)
            count = sum(m.astype(int) for m in full.values())
            assert set(np.unique(lab)) <= {0, *full}
            for lid, m in full.items():
                assert not ((lab == lid) & ~m).any()  # only where this organ was predicted
                assert ((lab == lid) | ~(m & (count == 1))).all()  # and wherever it alone was
            assert ((lab > 0) == (count > 0)).all()


def test_source_grid_copy_of_a_perfect_prediction_overlays_the_source_label(tmp_path):
    """A raw SABS-format phantom (scan 0 oblique: rotated 12° and 7°; scan 1 stored RAI, i.e. flipped), prepared by
    ``prepare sabs``; the prediction is the prepared ground truth itself. The prepared-grid file equals the prepared
    label; the source-grid copy has the source shape and affine and overlays the source label inside the prepared
    field of view (Dice > 0.9 per organ, and clearly less when flipped left-right)."""
    raw = write_raw_sabs(tmp_path / "raw", n_scans=2, size=160, depth=12, seed=0)
    img, lab = nib.load(raw / "img" / "img0001.nii.gz"), nib.load(raw / "label" / "label0001.nii.gz")
    a, b = np.deg2rad(12), np.deg2rad(7)
    rz = np.array([[np.cos(a), -np.sin(a), 0, 0], [np.sin(a), np.cos(a), 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    rx = np.array([[1, 0, 0, 0], [0, np.cos(b), -np.sin(b), 0], [0, np.sin(b), np.cos(b), 0], [0, 0, 0, 1]])
    oblique = rz @ rx @ img.affine
    write_nifti(raw / "img" / "img0001.nii.gz", np.asarray(img.dataobj), oblique)
    write_nifti(raw / "label" / "label0001.nii.gz", np.asarray(lab.dataobj), oblique)
    prep = tmp_path / "prep"
    prepare_sabs(raw, prep, progress=False)
    manifest = json.loads((prep / "manifest.json").read_text())
    organs = {"spleen": 1, "right_kidney": 2, "left_kidney": 3, "liver": 6}
    writer = PredictionWriter(tmp_path / "predictions")
    for sid in ("0", "1"):
        label = np.asarray(nib.load(prep / f"label_{sid}.nii.gz").dataobj).transpose(2, 1, 0)
        for organ, lid in organs.items():
            z = np.flatnonzero((label == lid).any(axis=(1, 2)))
            gt = (label[z] == lid).astype(np.uint8)
            item = EvalItem(organ, lid, sid, "x", np.zeros(gt.shape, np.float32), gt, z, np.zeros(len(z), int),
                            np.zeros((1, 1, 1), np.float32), np.zeros((1, 1, 1), np.uint8), [0], (5.0, 1.0, 1.0),
                            query_path=str(prep / f"image_{sid}.nii.gz"))
            record = ItemPrediction(item, "test")
            record.add("plain", gt, gt.astype(np.float32), 0.0)
            writer.collect(record)
    written = writer.write(writer.parts)
    assert len(written) == 4
    for sid, src in (("0", "0001"), ("1", "0002")):
        on_prep = nib.load(tmp_path / "predictions" / "plain" / f"pred_{sid}.nii.gz")
        prepared = nib.load(prep / f"label_{sid}.nii.gz")
        keep = np.isin(np.asarray(prepared.dataobj), list(organs.values()))
        assert np.array_equal(np.asarray(on_prep.dataobj), np.where(keep, np.asarray(prepared.dataobj), 0))
        assert np.allclose(on_prep.affine, prepared.affine)
        out = nib.load(tmp_path / "predictions" / "plain" / "source_grid" / f"pred_{sid}.nii.gz")
        source = nib.load(raw / "label" / f"label{src}.nii.gz")
        assert out.shape == source.shape and np.allclose(out.affine, source.affine, atol=1e-4)
        assert np.allclose(source.affine, manifest["scans"][sid]["source_affine"], atol=1e-4)
        # the preparation crops 32 px per in-plane border: compare inside the field of view it kept
        fov = to_original_grid(np.ones(prepared.shape, np.uint8), prepared.affine, source.shape, source.affine) > 0
        assert 0.3 < fov.mean() < 0.9
        o, s = np.asarray(out.dataobj), np.where(fov, np.asarray(source.dataobj), 0)
        assert not (o[~fov] > 0).any()
        for organ, lid in organs.items():
            dice = 2 * ((o == lid) & (s == lid)).sum() / ((o == lid).sum() + (s == lid).sum())
            assert dice > 0.9, (sid, organ, dice)
            flipped = 2 * ((o[::-1] == lid) & (s == lid)).sum() / ((o == lid).sum() + (s == lid).sum())
            assert flipped < dice - 0.2, (sid, organ, flipped)  # a misaligned copy would not pass
