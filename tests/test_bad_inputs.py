"""Hardening (issue 7): every bad input, through the real CLI entry point, gives one line
``fsl-med: error: ...`` naming the file or setting, a non-zero exit code, no traceback, no run folder
left behind, and leaves the source data untouched."""

from __future__ import annotations

import gzip
import hashlib
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from fsl_med.cli import main
from fsl_med.data.phantom import generate_phantom
from fsl_med.prepare.nifti import write_nifti

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "experiments" / "demo.yaml")


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    return generate_phantom(tmp_path_factory.mktemp("ph") / "phantom", n_scans=6, size=48, depth=8, seed=0)


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def _label(folder: Path, sid: str) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(folder / f"label_{sid}.nii.gz"))
    return np.asarray(img.dataobj).copy(), img.affine


# each case breaks a copy of the phantom and names what the error line must contain
def _missing(d: Path, sid: str) -> str:
    shutil.rmtree(d)
    return "data folder not found"


def _empty(d: Path, sid: str) -> str:
    for p in d.iterdir():
        p.unlink()
    return "no prepared volumes found"


def _unknown_layout(d: Path, sid: str) -> str:
    for p in d.glob("*.nii.gz"):
        p.rename(d / p.name.replace("image_", "img").replace("label_", "seg"))
    return "expected the prepared layout image_<id>.nii.gz"


def _truncated(d: Path, sid: str) -> str:
    p = d / f"image_{sid}.nii.gz"
    p.write_bytes(p.read_bytes()[:200])
    return f"image_{sid}.nii.gz: truncated or corrupt"


def _not_gzip(d: Path, sid: str) -> str:
    (d / f"image_{sid}.nii.gz").write_text("this is not a volume")
    return f"image_{sid}.nii.gz"


def _not_nifti(d: Path, sid: str) -> str:
    (d / f"image_{sid}.nii.gz").write_bytes(gzip.compress(b"\x00" * 400))
    return f"image_{sid}.nii.gz: not a NIfTI file"


def _shape_mismatch(d: Path, sid: str) -> str:
    lab, aff = _label(d, sid)
    write_nifti(d / f"label_{sid}.nii.gz", lab[:, :, :-1], aff)
    return f"label_{sid}.nii.gz: label shape (48, 48, 7) differs from image shape (48, 48, 8)"


def _label_outside_map(d: Path, sid: str) -> str:
    lab, aff = _label(d, sid)
    lab[0, 0, 0] = 9
    write_nifti(d / f"label_{sid}.nii.gz", lab, aff)
    return f"label_{sid}.nii.gz: label values [9] are outside the dataset's label map"


def _non_integer_label(d: Path, sid: str) -> str:
    lab, aff = _label(d, sid)
    lab = lab.astype(np.float32)
    lab[0, 0, 0] = 0.5
    write_nifti(d / f"label_{sid}.nii.gz", lab, aff)
    return f"label_{sid}.nii.gz: label has non-integer values"


def _nan_image(d: Path, sid: str) -> str:
    img = nib.load(str(d / f"image_{sid}.nii.gz"))
    arr = np.asarray(img.dataobj).astype(np.float32)
    arr[1, 1, 1] = np.nan
    write_nifti(d / f"image_{sid}.nii.gz", arr, img.affine)
    return f"image_{sid}.nii.gz: contains 1 NaN/inf voxels"


def _four_d(d: Path, sid: str) -> str:
    img = nib.load(str(d / f"image_{sid}.nii.gz"))
    write_nifti(d / f"image_{sid}.nii.gz", np.asarray(img.dataobj)[..., None], img.affine)
    return f"image_{sid}.nii.gz: expected a 3D volume, got 4D"


def _two_d(d: Path, sid: str) -> str:
    img = nib.load(str(d / f"image_{sid}.nii.gz"))
    write_nifti(d / f"image_{sid}.nii.gz", np.asarray(img.dataobj)[:, :, 0], img.affine)
    return f"image_{sid}.nii.gz: expected a 3D volume, got 2D"


def _support_without_organ(d: Path, sid: str) -> str:
    lab, aff = _label(d, "2")  # fold 0 of 6 scans: support scan 2
    lab[lab == 4] = 0
    write_nifti(d / "label_2.nii.gz", lab, aff)
    return "organ 'spleen' (label 4) is absent"


DATA_CASES = [_missing, _empty, _unknown_layout, _truncated, _not_gzip, _not_nifti, _shape_mismatch,
              _label_outside_map, _non_integer_label, _nan_image, _four_d, _two_d, _support_without_organ]

CONFIG_CASES = [
    (["nosuch.key=1"], "override 'nosuch.key=1': unknown config key 'nosuch'"),
    (["trainer.max_steps=abc"], "trainer.max_steps"),
    (["optim.lr=0"], "config key 'optim.lr': must be > 0"),
    (["data.fold=7"], "config key 'data.fold'"),
    (["data.setting=3"], "config key 'data.setting'"),
    (["data.test_organs=[liver,pancreas]"], "unknown organ 'pancreas'"),
    (["model.encoder.name=dinov2_vitx14"], "dinov2_vitx14"),
    (["ttt.steps=-1"], "config key 'ttt.steps': must be >= 0"),
]


def _run(argv: list[str], capsys) -> tuple[int, str]:
    rc = main(argv)
    err = capsys.readouterr().err
    return rc, err


def _one_error_line(err: str, needle: str) -> None:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("fsl-med: error:")]
    assert len(lines) == 1, err[-2000:]
    assert needle in lines[0], (needle, lines[0])
    assert "Traceback" not in err


def _common(root: Path, out: Path, cache: Path) -> list[str]:
    return [DEMO, f"data.root={root}", f"logging.output_dir={out}", f"data.cache_dir={cache}", "data.image_size=48",
            "data.num_workers=0", "trainer.max_steps=2", "trainer.enable_progress_bar=false"]


@pytest.mark.parametrize("case", DATA_CASES, ids=lambda f: f.__name__.strip("_"))
@pytest.mark.parametrize("verb", ["train", "eval"])
def test_bad_data(case, verb, phantom, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(phantom, data)
    needle = case(data, "3" if verb == "train" else "1")  # a training scan / the fold's query scan
    before = _digest(data) if data.exists() else None
    out = tmp_path / "runs"
    rc, err = _run([verb, *_common(data, out, tmp_path / "cache")], capsys)
    assert rc == 2
    _one_error_line(err, needle)
    assert not out.exists() or not any(out.rglob("version_*")), "a run folder was left behind"
    assert (_digest(data) if data.exists() else None) == before, "the data folder was modified"


@pytest.mark.parametrize("overrides,needle", CONFIG_CASES, ids=[c[0][0] for c in CONFIG_CASES])
def test_bad_config(overrides, needle, phantom, tmp_path, capsys):
    out = tmp_path / "runs"
    rc, err = _run(["train", *_common(phantom, out, tmp_path / "cache"), *overrides], capsys)
    assert rc == 2
    _one_error_line(err, needle)
    assert not out.exists()


@pytest.fixture(scope="module")
def tiny_ckpt(phantom, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ck")
    assert main(["train", *_common(phantom, out / "runs", out / "cache"), "name=ck"]) == 0
    return out / "runs" / "ck" / "version_0" / "checkpoints" / "last.ckpt"


def _weights_cases(tmp: Path, ckpt: Path) -> list[tuple[list[str], str]]:
    truncated = tmp / "trunc.pth"
    truncated.write_bytes(ckpt.read_bytes()[:1000])
    other = tmp / "other.pth"
    torch.save({"conv.weight": torch.zeros(3, 3, 3, 3), "fc.bias": torch.zeros(10)}, other)
    trunc_ckpt = tmp / "trunc.ckpt"
    trunc_ckpt.write_bytes(ckpt.read_bytes()[:5000])
    return [
        (["train", f"model.encoder.weights={tmp / 'missing.pth'}"], "missing.pth"),
        (["train", f"model.encoder.weights={truncated}"], "trunc.pth"),
        (["train", f"model.encoder.weights={other}"], "other.pth"),
        (["eval", f"ckpt={tmp / 'nope.ckpt'}"], "nope.ckpt"),
        (["eval", f"ckpt={trunc_ckpt}"], "trunc.ckpt"),
        (["eval", f"ckpt={ckpt}", "model.encoder.finetune=lora"], "model.encoder.finetune"),
    ]


def test_bad_weights_and_checkpoints(phantom, tiny_ckpt, tmp_path, capsys):
    for argv, needle in _weights_cases(tmp_path, tiny_ckpt):
        out = tmp_path / "runs"
        rc, err = _run([argv[0], *_common(phantom, out, tmp_path / "cache"), *argv[1:]], capsys)
        assert rc == 2, (argv, err[-1500:])
        _one_error_line(err, needle)
        assert not out.exists() or not any(out.rglob("version_*")), argv


def test_unwritable_output_folder(phantom, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc, err = _run(["train", *_common(phantom, blocker / "runs", tmp_path / "cache")], capsys)
    assert rc == 2
    _one_error_line(err, str(blocker))


def test_corrupt_query_volume_fails_or_is_skipped_and_listed(phantom, tmp_path, capsys):
    import json

    data = tmp_path / "data"
    shutil.copytree(phantom, data)
    # a fold-2 checkpoint (a fold-0 one trained on fold 2's queries: evaluating it there is refused)
    assert main(["train", *_common(data, tmp_path / "runs", tmp_path / "cache"), "name=f2", "data.fold=2"]) == 0
    ckpt = tmp_path / "runs" / "f2" / "version_0" / "checkpoints" / "last.ckpt"
    (data / "image_3.nii.gz").write_bytes((data / "image_3.nii.gz").read_bytes()[:300])  # fold 2: queries 3, 4
    common = [*_common(data, tmp_path / "runs", tmp_path / "cache"), f"ckpt={ckpt}"]
    rc, err = _run(["eval", *common], capsys)
    assert rc == 2
    _one_error_line(err, "query scan 3")
    assert "--skip-bad" in err
    rc = main(["eval", "--skip-bad", *common])
    out = capsys.readouterr().out
    assert rc == 0
    res = json.loads(Path(out.strip().splitlines()[-1]).read_text())
    assert {"query": "3", "organ": "*"}.items() <= res["skipped"][0].items() and "unreadable" in res["skipped"][0]["reason"]
    assert {v["query"] for v in res["volumes"]} == {"4"}  # the readable query scan is scored, the bad one listed
    # nothing left to score is an error, not an empty report
    (data / "image_4.nii.gz").write_bytes(b"garbage")
    rc, err = _run(["eval", "--skip-bad", *common], capsys)
    assert rc == 2
    _one_error_line(err, "no query volume could be scored")


def test_concurrent_runs_get_different_version_folders(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from fsl_med.runs import new_run_dir

    with ThreadPoolExecutor(8) as ex:
        dirs = list(ex.map(lambda _: new_run_dir(tmp_path, "same"), range(16)))
    assert len({d.name for d in dirs}) == 16


@pytest.mark.slow
def test_prepare_killed_midway_then_rerun_completes(tmp_path):
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    from fsl_med.data.phantom_raw import write_raw_chaos

    src = write_raw_chaos(tmp_path / "raw", n_patients=6, size=128, depth=16, seed=0, as_zip=True)
    out = tmp_path / "prepared"
    cmd = [sys.executable, "-m", "fsl_med", "prepare", "chaos", "--src", str(src), "--out", str(out),
           "--no-superpixels", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        m = out / "manifest.json"
        if m.is_file() and len(json.loads(m.read_text())["scans"]) >= 1:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL, "preparation finished before it could be killed"
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"]
    for p in list(out.glob("image_*.nii.gz")) + list(out.glob("label_*.nii.gz")):
        assert np.asarray(nib.load(str(p)).dataobj).ndim == 3  # any file under its final name is whole
    assert main(["prepare", "chaos", "--src", str(src), "--out", str(out), "--no-superpixels", "--no-progress"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and len(manifest["scans"]) == 6
    assert not list(out.glob(".*tmp*"))  # temporaries of the killed run are gone


def test_organ_absent_from_a_query_scan_is_skipped_and_listed(phantom, tiny_ckpt, tmp_path, capsys):
    import json

    data = tmp_path / "data"
    shutil.copytree(phantom, data)
    lab, aff = _label(data, "1")  # fold 0 query scan 1 loses its spleen
    lab[lab == 4] = 0
    write_nifti(data / "label_1.nii.gz", lab, aff)
    assert main(["eval", *_common(data, tmp_path / "runs", tmp_path / "cache"), f"ckpt={tiny_ckpt}"]) == 0
    res = json.loads(Path(capsys.readouterr().out.strip().splitlines()[-1]).read_text())
    assert res["skipped"] == [{"query": "1", "organ": "spleen", "reason": "organ absent from the query scan"}]
    assert "spleen" not in res["dice"] and "spleen" in res["organs_without_volumes"]  # never scored as 0 or 1
    assert all(v["organ"] != "spleen" for v in res["volumes"])
