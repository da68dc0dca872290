"""Evaluation never scores scans the model trained on (issue 16): every checkpoint records its training data,
``eval`` takes fold, setting and test organs from it unless given on the command line, and scans the checkpoint
trained or validated on are refused unless ``eval.allow_train_scans=true`` (then the outputs say so first)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import error_line

from fsl_med.cli import main
from fsl_med.data.phantom import generate_phantom
from fsl_med.data.provenance import CHECKPOINT_KEY, TrainedOn, folder_fingerprint, scans_seen
from fsl_med.prepare.nifti import read_nifti, write_nifti

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "experiments" / "demo.yaml")

# 10 phantom scans, chaos_t2 folds scaled: fold 0 queries 1, 2 / support 3; fold 2 queries 5, 6 / support 7
FOLD0_QUERY, FOLD0_SUPPORT = ["1", "2"], "3"


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    return generate_phantom(tmp_path_factory.mktemp("ph") / "phantom", n_scans=10, size=48, depth=8, seed=0)


def _common(root: Path, out: Path, cache: Path, steps: int = 2) -> list[str]:
    return [DEMO, f"data.root={root}", f"logging.output_dir={out}", f"data.cache_dir={cache}", "data.image_size=48",
            "data.num_workers=0", f"trainer.max_steps={steps}", "trainer.enable_progress_bar=false",
            "trainer.val_check_interval=2"]


@pytest.fixture(scope="module")
def runs(phantom, tmp_path_factory) -> dict[str, Path]:
    """The issue's scenario (fold 2, setting 2, liver+spleen) and a plain fold-0 checkpoint."""
    out = tmp_path_factory.mktemp("runs")
    c = _common(phantom, out / "runs", out / "cache")
    assert main(["train", *c, "name=f2", "data.fold=2", "data.setting=2", "data.test_organs=[liver,spleen]"]) == 0
    assert main(["train", *c, "name=f0"]) == 0
    return {"out": out, "f2": out / "runs" / "f2" / "version_0" / "checkpoints" / "last.ckpt",
            "f0": out / "runs" / "f0" / "version_0" / "checkpoints" / "last.ckpt"}


def _eval_args(phantom: Path, runs: dict[str, Path], ckpt: str, name: str) -> list[str]:
    out = runs["out"]
    return ["eval", *_common(phantom, out / "runs", out / "cache"), f"ckpt={runs[ckpt]}", f"name={name}"]




def test_checkpoint_records_what_it_was_trained_on(runs, phantom):
    rec = torch.load(runs["f2"], map_location="cpu", weights_only=False)[CHECKPOINT_KEY]
    t = TrainedOn.from_dict(rec)
    assert (t.dataset, t.fold, t.setting, t.test_organs) == ("chaos_t2", 2, 2, ["liver", "spleen"])
    assert t.excluded_labels == [1, 4]  # liver and spleen slices were dropped from training
    assert sorted(t.train_scans, key=int) == ["1", "2", "3", "4", "8", "9"] and list(t.val_scans) == ["10"]
    assert all(isinstance(d, str) and len(d) == 16 for d in [*t.train_scans.values(), *t.val_scans.values()])
    files = {str(i): (phantom / f"image_{i}.nii.gz", phantom / f"label_{i}.nii.gz") for i in range(1, 11)}
    assert t.fingerprint == folder_fingerprint(files)
    # the best checkpoint carries the same record, and the run summary repeats it
    best = next(runs["f2"].parent.glob("best-*.ckpt"))
    assert torch.load(best, map_location="cpu", weights_only=False)[CHECKPOINT_KEY] == rec
    assert json.loads((runs["f2"].parents[1] / "train_summary.json").read_text())["trained_on"] == rec


def test_eval_takes_fold_setting_and_organs_from_the_checkpoint(runs, phantom, caplog, capsys):
    # the scenario: a fold-2 / setting-2 checkpoint evaluated with a config that says fold 0, setting 1
    with caplog.at_level(logging.WARNING, logger="fsl_med"):
        assert main(_eval_args(phantom, runs, "f2", "scenario")) == 0
    notes = [r.getMessage() for r in caplog.records if "taken from it" in r.getMessage()]
    assert len(notes) == 1 and "data.fold=2 (config: 0)" in notes[0] and "data.setting=2 (config: 1)" in notes[0]
    assert "data.test_organs=['liver', 'spleen']" in notes[0]
    path = Path(capsys.readouterr().out.strip().splitlines()[-1])
    res = json.loads(path.read_text())
    assert (res["fold"], res["setting"], set(res["dice"])) == (2, 2, {"liver", "spleen"})
    assert res["query_scans"] == ["5", "6"] and res["support_scan"] == "7"
    assert res["in_sample"] is None and next(iter(res)) == "in_sample"
    assert res["trained_on"]["fold"] == 2


def test_eval_refuses_scans_the_checkpoint_trained_on(runs, phantom, capsys):
    # the same, with the fold given on the command line: fold 0's query and support scans were trained on
    before = sorted(p.name for p in (runs["out"] / "runs").iterdir())
    assert main([*_eval_args(phantom, runs, "f2", "leak"), "data.fold=0"]) == 2
    line = error_line(capsys.readouterr().err)
    assert "was trained on fold 2 (setting 2) of chaos_t2; evaluating fold 0 uses query scans 1, 2 (trained on); " \
           "support scan 3 (trained on): that would be in-sample Dice" in line
    assert "eval.allow_train_scans=true" in line
    assert sorted(p.name for p in (runs["out"] / "runs").iterdir()) == before  # no run folder was created


def test_allow_train_scans_says_so_first(runs, phantom, capsys):
    assert main([*_eval_args(phantom, runs, "f2", "insample"), "data.fold=0", "eval.allow_train_scans=true"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    path = Path(out[-1])
    assert out[0].startswith("IN-SAMPLE evaluation (eval.allow_train_scans=true)")
    text = path.read_text()
    first_key = text.splitlines()[1].strip()
    assert first_key.startswith('"in_sample": "IN-SAMPLE evaluation') and "query scans 1, 2 (trained on)" in first_key
    assert path.with_name("results.md").read_text().splitlines()[0].startswith("**IN-SAMPLE evaluation")
    assert json.loads(text)["fold"] == 0


def test_fold0_checkpoint_on_fold0_works_as_before(runs, phantom, capsys, caplog):
    with caplog.at_level(logging.WARNING, logger="fsl_med"):
        assert main(_eval_args(phantom, runs, "f0", "same")) == 0
    assert not [r for r in caplog.records if "taken from it" in r.getMessage()]
    res = json.loads(Path(capsys.readouterr().out.strip().splitlines()[-1]).read_text())
    assert res["in_sample"] is None and res["fold"] == 0 and res["query_scans"] == FOLD0_QUERY
    assert set(res["dice"]) == {"liver", "right_kidney", "left_kidney", "spleen"}


def test_resumed_training_records_the_union_of_scans(runs, phantom, capsys):
    """Fold 0 resumed on fold 2 (explicitly): the model has seen both folds' training scans, so fold 2's
    queries (trained on under fold 0) are refused."""
    out = runs["out"]
    resumed = out / "resumed"
    shutil.copytree(runs["f0"].parents[2], resumed / "f0")
    c = _common(phantom, resumed, out / "cache", steps=4)
    assert main(["train", *c, "name=f0", "resume=last", "data.fold=2"]) == 0
    last = resumed / "f0" / "version_1" / "checkpoints" / "last.ckpt"  # a resumed run gets a new version
    t = TrainedOn.from_dict(torch.load(last, map_location="cpu", weights_only=False)[CHECKPOINT_KEY])
    assert t.fold == 2 and {"5", "6", "7"} <= set(t.train_scans) and {"1", "2", "3"} <= set(t.train_scans)
    assert t.history and t.history[0]["fold"] == 0
    capsys.readouterr()
    assert main(["eval", *c, f"ckpt={last}", "name=resumed"]) == 2
    assert "evaluating fold 2 uses query scans 5, 6 (trained on); support scan 7 (trained on)" in \
        error_line(capsys.readouterr().err)


def test_a_checkpoint_without_a_record_is_checked_from_its_stored_config(runs, phantom, tmp_path, capsys, caplog):
    ckpt = torch.load(runs["f2"], map_location="cpu", weights_only=False)
    del ckpt[CHECKPOINT_KEY]
    old = tmp_path / "old.ckpt"
    torch.save(ckpt, old)
    args = _eval_args(phantom, runs, "f2", "old")
    args[args.index(f"ckpt={runs['f2']}")] = f"ckpt={old}"
    with caplog.at_level(logging.WARNING, logger="fsl_med.checkpoints"):
        assert main([*args, "data.fold=0"]) == 2
    assert any("predates training records" in r.getMessage() for r in caplog.records)
    assert "query scans 1, 2 (trained on); support scan 3 (trained on)" in error_line(capsys.readouterr().err)


def test_scans_seen_across_folders(runs, phantom, tmp_path):
    """A copy of the folder is the same data (refused); another folder whose scans share ids but not labels is
    only reported as uncertain."""
    t = TrainedOn.from_dict(torch.load(runs["f2"], map_location="cpu", weights_only=False)[CHECKPOINT_KEY])
    copy = tmp_path / "copy"
    shutil.copytree(phantom, copy)
    write_nifti(copy / "image_11.nii.gz", *read_nifti(phantom / "image_1.nii.gz")[:2])
    labels = {str(i): copy / f"label_{i}.nii.gz" for i in range(1, 11)}
    ov = scans_seen(t, "another-fingerprint", labels, FOLD0_QUERY, [FOLD0_SUPPORT])
    assert ov.query == [("1", "trained on"), ("2", "trained on")] and ov.support == [("3", "trained on")]
    img, aff, _ = read_nifti(copy / "label_1.nii.gz")
    write_nifti(copy / "label_1.nii.gz", np.flip(img, 0).copy(), aff)  # another patient under the same id
    ov = scans_seen(t, "another-fingerprint", labels, FOLD0_QUERY, [FOLD0_SUPPORT])
    assert ov.query == [("2", "trained on")] and ov.uncertain == ["1"]
    ov = scans_seen(t, t.fingerprint, labels, ["10"], [])
    assert ov.query == [("10", "validated on")] and ov.describe() == "query scan 10 (validated on)"


def test_sweep_without_wandb_login_stops_at_the_first_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert main(["sweep", str(REPO / "experiments" / "sweeps" / "mri.yaml")]) == 2
    err = capsys.readouterr().err
    assert error_line(err) == ("fsl-med: error: W&B sweeps need a W&B account: run '.venv/bin/wandb login' (or set "
                                "WANDB_API_KEY) and retry; without W&B, 'make train-mri' logs offline and 'make "
                                "ablations' runs a local grid")
    assert "wandb agent" not in err
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "a" * 40 + "\n")
    from fsl_med.runs import has_wandb_key

    assert has_wandb_key()
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert main(["sweep", str(REPO / "experiments" / "sweeps" / "mri.yaml")]) == 2
    assert "need online mode" in error_line(capsys.readouterr().err)


def test_run_resuming_a_checkpoint_continues_its_fold(runs, phantom, tmp_path, capsys):
    """`fsl-med run ckpt=...` (what a W&B sweep agent calls) trains and evaluates the checkpoint's fold, setting and
    organs, and the new checkpoint's stored config says so."""
    out = runs["out"]
    c = _common(phantom, tmp_path / "runs", out / "cache", steps=4)
    assert main(["run", *c, "name=cont", f"ckpt={runs['f2']}"]) == 0
    res = json.loads(Path(capsys.readouterr().out.strip().splitlines()[-1]).read_text())
    assert (res["fold"], res["setting"], set(res["dice"])) == (2, 2, {"liver", "spleen"}) and res["in_sample"] is None
    last = tmp_path / "runs" / "cont" / "version_0" / "checkpoints" / "last.ckpt"
    ck = torch.load(last, map_location="cpu", weights_only=False)
    assert ck["hyper_parameters"]["config"]["data"]["fold"] == 2 and ck[CHECKPOINT_KEY]["fold"] == 2
    assert ck["global_step"] == 4
