"""Hardening, round 3 (issue 28), data safety through the real CLI: ``prepare`` never mixes or overwrites a
dataset (empty folder, its own preparation, or ``--overwrite`` replacing it atomically), one writer per prepared
folder and per superpixel cache entry, resuming on other data is refused, train/eval say what the manifest does
not account for, and every write fault is one line naming the file (no partial file, no empty folder)."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import error_line

from fsl_med.cli import main
from fsl_med.config import SuperpixelConfig
from fsl_med.data.phantom import generate_phantom
from fsl_med.data.phantom_raw import write_raw_chaos, write_raw_sabs
from fsl_med.data.superpixels import cache_key, load_or_make_superpixels
from fsl_med.locks import exclusive
from fsl_med.prepare.manifest import read_manifest, write_manifest
from fsl_med.prepare.pipeline import LOCK_NAME

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "experiments" / "demo.yaml")
FSL = [sys.executable, "-m", "fsl_med"]
QUIET = ["--no-superpixels", "--no-progress"]




def _tree(path: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file below ``path`` (hidden files included)."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("raw")
    return {"chaos": write_raw_chaos(d / "chaos", n_patients=3, size=64, depth=8, seed=0),
            "chaos_b": write_raw_chaos(d / "chaos_b", n_patients=3, size=64, depth=8, seed=7),
            "sabs": write_raw_sabs(d / "sabs", n_scans=3, size=128, depth=8, seed=0)}


@pytest.fixture(scope="module")
def prepared_sabs(raw, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("psabs") / "sabs"
    assert main(["prepare", "sabs", "--src", str(raw["sabs"]), "--out", str(out), *QUIET]) == 0
    return out


def _prepare(kind: str, src: Path, out: Path, *extra: str) -> int:
    return main(["prepare", kind, "--src", str(src), "--out", str(out), *QUIET, *extra])


# -- prepare never mixes two datasets ------------------------------------------------------------

def test_prepare_refuses_a_folder_holding_another_dataset(raw, prepared_sabs, tmp_path, capsys):
    out = tmp_path / "X"
    shutil.copytree(prepared_sabs, out)
    before = _tree(out)
    assert _prepare("chaos", raw["chaos"], out) == 2
    error_line(capsys.readouterr().err, f"--out {out}", "holds another preparation", "dataset sabs (now chaos_t2)",
                "--overwrite")
    assert _tree(out) == before  # nothing written, nothing removed


def test_prepare_refuses_other_source_other_plan_and_foreign_files(raw, tmp_path, capsys):
    out = tmp_path / "X"
    assert _prepare("chaos", raw["chaos"], out) == 0
    before = _tree(out)
    assert _prepare("chaos", raw["chaos_b"], out) == 2  # same dataset, other download
    error_line(capsys.readouterr().err, "holds another preparation", f"source {raw['chaos'].resolve()}",
                f"(now {raw['chaos_b']})")
    assert _prepare("chaos", raw["chaos"], out, "--compat", "reference") == 2  # same download, other plan
    error_line(capsys.readouterr().err, "plan label_interp='per_class' (now 'per_class_rint')")
    shutil.copy(out / "image_1.nii.gz", out / "image_9.nii.gz")
    shutil.copy(out / "label_1.nii.gz", out / "label_9.nii.gz")
    assert _prepare("chaos", raw["chaos"], out) == 2  # same preparation, but scans it did not make
    error_line(capsys.readouterr().err, "holds scan(s) 9 that its manifest.json does not list")
    for name in ("image_9.nii.gz", "label_9.nii.gz"):
        (out / name).unlink()
    assert _tree(out) == before
    assert _prepare("chaos", raw["chaos"], out) == 0  # its own preparation: up to date, as before
    assert "prepared 0 volume(s), 3 already up to date" in capsys.readouterr().out


def test_prepare_refuses_a_folder_of_unknown_files_even_with_overwrite(raw, tmp_path, capsys):
    out = tmp_path / "X"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "scan.nii.gz").write_bytes(b"not mine to delete")
    assert _prepare("chaos", raw["chaos"], out) == 2
    error_line(capsys.readouterr().err, "already holds 2 file(s) (notes.txt, scan.nii.gz)", "no manifest.json")
    assert _prepare("chaos", raw["chaos"], out, "--overwrite") == 2
    error_line(capsys.readouterr().err, "--overwrite replaces prepared data only", "notes.txt")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "scan.nii.gz"]


def test_overwrite_replaces_atomically_and_keeps_the_old_content_until_complete(raw, prepared_sabs, tmp_path,
                                                                                 capsys):
    out = tmp_path / "X"
    shutil.copytree(prepared_sabs, out)
    before = _tree(out)
    broken = tmp_path / "broken"  # a CHAOS download whose third patient has a corrupt DICOM slice
    shutil.copytree(raw["chaos"], broken)
    victim = sorted((broken / "MR" / "3" / "T2SPIR" / "DICOM_anon").iterdir())[3]
    victim.write_bytes(b"not a dicom file")
    assert _prepare("chaos", broken, out, "--overwrite") == 2
    error_line(capsys.readouterr().err, victim.name)
    assert _tree(out) == before, "the old content must stay intact until the new preparation is complete"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["X", "broken"], "a staging folder was left behind"
    assert _prepare("chaos", raw["chaos"], out, "--overwrite") == 0
    m = read_manifest(out)
    assert m["dataset"] == "chaos_t2" and m["complete"] and sorted(m["scans"]) == ["1", "2", "3"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json", "classmap_1.json", *(f"{k}_{i}.nii.gz" for k in ("image", "label") for i in (1, 2, 3))])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["X", "broken"]


def test_a_failed_prepare_leaves_no_folder_it_created(raw, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(raw["sabs"], src)
    lab = src / "label" / "label0001.nii.gz"  # a label of another shape than its image
    img = nib.load(str(lab))
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:, :-3], img.affine), str(lab))
    out = tmp_path / "new" / "deeper" / "out"
    assert _prepare("sabs", src, out) == 2
    error_line(capsys.readouterr().err, "label0001.nii.gz")
    assert not (tmp_path / "new").exists()


# -- one writer per folder and per cache entry ----------------------------------------------------

def test_a_second_writer_is_refused_naming_the_holder(raw, tmp_path, capsys):
    out = tmp_path / "X"
    out.mkdir()
    with exclusive(out / LOCK_NAME, "test holder"):
        assert _prepare("chaos", raw["chaos"], out) == 2
        error_line(capsys.readouterr().err, f"--out {out}: is being written by pid {os.getpid()} on host "
                    f"{socket.gethostname()}", str(out / LOCK_NAME))
    assert list(out.iterdir()) == []  # the refused writer wrote nothing
    # a lock file left by a process that died (no kernel lock held) does not block
    (out / LOCK_NAME).write_text(json.dumps({"pid": 999999, "host": "gone", "since": "then", "command": "x"}))
    assert _prepare("chaos", raw["chaos"], out) == 0
    assert not (out / LOCK_NAME).exists()


def test_two_prepares_at_once_never_fail_with_a_raw_error(raw, tmp_path):
    out = tmp_path / "X"
    cmd = [*FSL, "prepare", "chaos", "--src", str(raw["chaos"]), "--out", str(out), *QUIET]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results)[0] == 0, results
    for rc, err in results:
        assert "Traceback" not in err and "error: FileNotFoundError" not in err, err
        if rc != 0:
            assert rc == 2
            line = error_line(err, "is being written by")
            # the holder named, or "another process" while it is still writing its lock file (locks.describe_holder)
            assert ("by pid" in line and "on host" in line) or "by another process" in line, line
    m = read_manifest(out)
    assert m["complete"] and sorted(m["scans"]) == ["1", "2", "3"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_a_cache_entry_being_written_is_waited_for_and_read(tmp_path):
    image = np.random.default_rng(0).uniform(0, 200, (3, 32, 32)).astype(np.float32)
    path = tmp_path / "image_1.nii.gz"
    nib.save(nib.Nifti1Image(image.transpose(1, 2, 0), np.eye(4)), str(path))
    params = SuperpixelConfig()
    entry = tmp_path / "cache" / "superpixels" / f"image_1-{cache_key(path, params, 32)}.npz"
    entry.parent.mkdir(parents=True)
    theirs = np.full(image.shape, 7, np.int32)  # what "the other job" writes: recognisably not computed here
    got: list[np.ndarray] = []
    with exclusive(entry.parent / f".{entry.name}.lock", "the other job"):
        t = threading.Thread(target=lambda: got.append(load_or_make_superpixels(image, path, params,
                                                                                tmp_path / "cache")))
        t.start()
        time.sleep(1.0)
        assert t.is_alive() and not got, "the second writer did not wait for the entry's lock"
        np.savez_compressed(entry, superpixels=theirs)
    t.join(timeout=60)
    assert got and np.array_equal(got[0], theirs)


# -- training and evaluation say what the manifest does not account for -------------------------

def _train_args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["train", DEMO, f"data.root={root}", f"logging.output_dir={out}", f"data.cache_dir={out}/cache",
            "data.image_size=48", "data.num_workers=0", "trainer.max_steps=1", "trainer.enable_progress_bar=false",
            "data.num_val_scans=0", *extra]


def test_training_names_unlisted_scans_and_an_incomplete_preparation(raw, tmp_path, capsys):
    raw5 = write_raw_chaos(tmp_path / "raw5", n_patients=5, size=64, depth=8, seed=3)
    data = tmp_path / "data"
    assert _prepare("chaos", raw5, data) == 0
    capsys.readouterr()
    m = read_manifest(data)
    # an interrupted preparation: two of five scans done
    for sid in sorted(m["scans"], key=int)[2:]:
        for kind in ("image", "label"):
            (data / f"{kind}_{sid}.nii.gz").unlink()
        del m["scans"][sid]
    m["complete"] = False
    write_manifest(data, m)
    assert main(_train_args(data, tmp_path / "runs")) == 2
    err = capsys.readouterr().err
    line = error_line(err, f"{data}: its preparation is incomplete (2 of 5 scans prepared")
    assert "rerun fsl-med prepare chaos" in line
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("version_*"))


def test_training_warns_about_scans_its_manifest_does_not_list(raw, tmp_path, caplog):
    raw5 = write_raw_chaos(tmp_path / "raw5", n_patients=5, size=64, depth=8, seed=3)
    data = tmp_path / "data"
    assert _prepare("chaos", raw5, data) == 0
    other = generate_phantom(tmp_path / "other", n_scans=1, size=64, depth=8, seed=1)
    for kind in ("image", "label"):
        shutil.copy(other / f"{kind}_1.nii.gz", data / f"{kind}_40.nii.gz")
    assert main(_train_args(data, tmp_path / "runs")) == 0
    warned = [r.getMessage() for r in caplog.records if "does not list" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith(f"{data}: holds scan(s) 40 that its manifest.json does not "
                                                     "list"), warned


# -- resuming on other data -------------------------------------------------------------------

def test_resume_on_other_data_is_refused_unless_allowed(tmp_path, capsys, caplog):
    a = generate_phantom(tmp_path / "a", n_scans=6, size=48, depth=8, seed=0)
    b = generate_phantom(tmp_path / "b", n_scans=6, size=48, depth=8, seed=5)
    runs = tmp_path / "runs"
    assert main(_train_args(a, runs, "name=r")) == 0
    copy = tmp_path / "copy_of_a"
    shutil.copytree(a, copy)
    assert main(_train_args(copy, runs, "name=r", "resume=last", "trainer.max_steps=2")) == 0  # the same data
    capsys.readouterr()
    assert main(_train_args(b, runs, "name=r", "resume=last", "trainer.max_steps=3")) == 2
    error_line(capsys.readouterr().err, "the run trained on data.root", str(copy), f"data.root {b} holds other data",
                "have other label files", "resume_allow_other_data=true")
    assert sorted(p.name for p in (runs / "r").iterdir()) == ["version_0", "version_1"]
    assert main(_train_args(b, runs, "name=r", "resume=last", "trainer.max_steps=3",
                            "resume_allow_other_data=true")) == 0
    assert any("continuing on it (resume_allow_other_data=true)" in r.getMessage() for r in caplog.records)


# -- every write fault is one line naming the file --------------------------------------------------

def _limited(limit: int):
    def pre() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return pre


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("wf")
    ph = generate_phantom(d / "ph", n_scans=6, size=48, depth=8, seed=0)
    assert main(_train_args(ph, d / "runs", "name=ck", "trainer.max_steps=2")) == 0
    return ph, d / "runs" / "ck" / "version_0" / "checkpoints" / "last.ckpt"


def test_segment_write_fault_is_named(ckpt, tmp_path):
    ph, ck = ckpt
    out = tmp_path / "new" / "seg.nii.gz"  # in a folder the write creates: removed again when it fails
    p = subprocess.run([*FSL, "segment", "--ckpt", str(ck), "--support-image", str(ph / "image_2.nii.gz"),
                        "--support-mask", str(ph / "label_2.nii.gz"), "--label", "1", "--query",
                        str(ph / "image_1.nii.gz"), "--out", str(out)], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300, preexec_fn=_limited(64))
    assert p.returncode == 2
    error_line(p.stderr, f"cannot write {out}: File too large")
    assert list(tmp_path.iterdir()) == [], "a partial output was left behind"


def test_eval_write_fault_is_named_and_leaves_no_run_folder(ckpt, tmp_path):
    ph, ck = ckpt
    runs = tmp_path / "runs"
    args = ["eval", DEMO, f"data.root={ph}", f"logging.output_dir={runs}", f"data.cache_dir={tmp_path}/cache",
            "data.image_size=48", "data.num_workers=0", "trainer.enable_progress_bar=false", "data.num_val_scans=0",
            f"ckpt={ck}", "eval.save_predictions=true"]
    for limit in (1 << 9, 1 << 13):  # the config first; later the overlays or predictions
        p = subprocess.run([*FSL, *args], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                           preexec_fn=_limited(limit))
        assert p.returncode == 2, p.stderr[-2000:]
        line = error_line(p.stderr, "cannot write", str(runs), "File too large")
        assert not list(runs.rglob("version_*")), f"{line}: the run folder was left behind"


def test_prepare_write_fault_is_named_and_leaves_no_folder(raw, tmp_path):
    out = tmp_path / "new" / "out"
    p = subprocess.run([*FSL, "prepare", "chaos", "--src", str(raw["chaos"]), "--out", str(out), *QUIET],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300, preexec_fn=_limited(1 << 12))
    assert p.returncode == 2
    error_line(p.stderr, f"cannot write {out / 'image_1.nii.gz'}: File too large")
    assert not (tmp_path / "new").exists()


def test_prepare_refuses_a_scan_the_plan_cannot_resample(tmp_path, capsys):
    from fsl_med.data.phantom_raw import chaos_raw_files

    for rel, data in chaos_raw_files(1, size=64, depth=8, seed=0, spacing=(1.5, 1.5, 0.2)).items():
        (tmp_path / "raw" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "raw" / rel).write_bytes(data)
    out = tmp_path / "out"
    assert _prepare("chaos", tmp_path / "raw" / "Train_Sets", out) == 2
    error_line(capsys.readouterr().err, "scan 1 (", "0.2")
    assert not out.exists()


# -- other writers never replace a real dataset -------------------------------------------------------

def test_phantom_raw_never_replaces_a_real_download(tmp_path, capsys):
    real = tmp_path / "Train_Sets"  # stands for the user's CHAOS download
    (real / "MR" / "1").mkdir(parents=True)
    (real / "MR" / "1" / "scan.dcm").write_bytes(b"precious")
    (tmp_path / "CHAOS_Train_Sets.zip").write_bytes(b"PK precious")
    (tmp_path / "RawData" / "Training").mkdir(parents=True)
    before = _tree(tmp_path)
    for fmt in ("chaos-raw", "chaos-zip", "sabs-raw"):
        assert main(["phantom", "--format", fmt, "--out", str(tmp_path), "--n-scans", "1", "--size", "64"]) == 2
        error_line(capsys.readouterr().err, "was not written by fsl-med phantom", "refusing to replace it")
    assert _tree(tmp_path) == before
    out = tmp_path / "ph"
    for fmt in ("chaos-raw", "chaos-zip", "chaos-raw", "chaos-zip"):  # its own phantoms are replaced
        assert main(["phantom", "--format", fmt, "--out", str(out), "--n-scans", "1", "--size", "64"]) == 0


def test_import_keeps_the_manifest_prepare_wrote(raw, tmp_path, capsys):
    data = tmp_path / "data"
    assert _prepare("chaos", raw["chaos"], data) == 0
    manifest = (data / "manifest.json").read_bytes()
    other = generate_phantom(tmp_path / "other", n_scans=1, size=64, depth=8, seed=1)
    for kind in ("image", "label"):
        shutil.copy(other / f"{kind}_1.nii.gz", data / f"{kind}_40.nii.gz")
    (data / "classmap_1.json").unlink()  # it would not list scan 40: import writes a new one
    assert main(["prepare", "import", "--src", str(data), "--dataset", "chaos", *QUIET]) == 0
    out = capsys.readouterr().out
    assert "manifest.json was written by fsl-med prepare and is kept" in out and "scan(s) 40" in out
    assert (data / "manifest.json").read_bytes() == manifest  # its plan and source geometry are not lost


def test_no_usable_temporary_folder_is_named(chaos, tmp_path):
    # a file-size limit of 0 makes every candidate temporary folder unusable (tempfile writes a probe file in each)
    p = subprocess.run([*FSL, "bench", "--out", str(tmp_path / "o"), "--parts", "matmul", "--data", str(chaos)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300, preexec_fn=_limited(0))
    assert p.returncode == 2, p.stderr[-2000:]
    error_line(p.stderr, "No usable temporary directory found in [", str(tmp_path), "set TMPDIR")
