"""Data hardening through the real CLI: classmap schema, what a data folder ignores (and says so), geometry
that cannot be trusted, filesystem faults named as such, and intensities too large for float32.

Each error is one line ``fsl-med: error: ...`` naming the file and what is wrong, exit code 2, no traceback,
no run folder left behind; what is merely odd is trained on with one warning/note line."""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import error_line

from fsl_med.cli import main
from fsl_med.data.phantom import generate_phantom
from fsl_med.data.volumes import Normalizer
from fsl_med.errors import DataError
from fsl_med.prepare.nifti import write_nifti

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "experiments" / "demo.yaml")
# fold 0 of the 6-scan phantom: query 1, support 2, training 3-5, validation 6


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    return generate_phantom(tmp_path_factory.mktemp("ph") / "phantom", n_scans=6, size=48, depth=8, seed=0)


@pytest.fixture
def data(phantom, tmp_path) -> Path:
    """A copy of the phantom to break."""
    d = tmp_path / "data"
    shutil.copytree(phantom, d)
    return d


def _common(root: Path, out: Path, cache: Path) -> list[str]:
    return [DEMO, f"data.root={root}", f"logging.output_dir={out}", f"data.cache_dir={cache}", "data.image_size=48",
            "data.num_workers=0", "trainer.max_steps=2", "trainer.enable_progress_bar=false"]


def _train(root: Path, tmp: Path, capsys, *extra: str) -> tuple[int, str, Path]:
    out = tmp / "runs"
    rc = main(["train", *_common(root, out, tmp / "cache"), *extra])
    return rc, capsys.readouterr().err, out


def _import(root: Path, capsys) -> tuple[int, str, str]:
    rc = main(["prepare", "import", "--src", str(root), "--dataset", "chaos", "--check-only", "--no-progress"])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err




def _no_run_folder(out: Path) -> None:
    assert not out.exists() or not any(out.rglob("version_*")), "a run folder was left behind"


def _import_problem(root: Path, capsys, *needles: str) -> None:
    """``prepare import --check-only`` lists the problem (one line with every needle) and exits 2."""
    rc, out, err = _import(root, capsys)
    assert rc == 2, out + err
    problems = [ln for ln in out.splitlines() if ln.startswith("problem:")]
    assert any(all(n in ln for n in needles) for ln in problems), (needles, out)
    error_line(err, "problem(s) found")


def _nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(path))
    return np.asarray(img.dataobj).copy(), img.affine


def _write_with_sform(path: Path, arr: np.ndarray, sform: np.ndarray) -> None:
    """Write ``arr`` with exactly ``sform`` (code 1, no qform): nibabel would otherwise replace a singular
    affine by a default one on save."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(arr.shape)
    hdr.set_data_dtype(arr.dtype)
    hdr.set_sform(sform, code=1)
    nib.save(nib.Nifti1Image(arr, None, hdr), str(path))


# ------------------------------------------------------------------ 1. classmap_1.json schema

CLASSMAP_CASES = {
    "top_level_list": (lambda cm: [cm], "expected a JSON object {class name: {scan id: [slice, ...]}}, got a list"),
    "entry_not_object": (lambda cm: {**cm, "LIVER": [1, 2]},
                         "class 'LIVER' must map scan ids to lists of slice indices, got a list"),
    "slices_not_list": (lambda cm: {**cm, "LIVER": {**cm["LIVER"], "1": "3, 4"}},
                        "class 'LIVER' scan '1' must be a list of slice indices, got a string ('3, 4')"),
    "slice_not_integer": (lambda cm: {**cm, "LIVER": {**cm["LIVER"], "1": [2, "abc"]}},
                          "class 'LIVER' scan '1' must list integer slice indices, got 'abc'"),
    "slice_float": (lambda cm: {**cm, "SPLEEN": {**cm["SPLEEN"], "2": [1.5]}},
                    "class 'SPLEEN' scan '2' must list integer slice indices, got 1.5"),
    "slice_negative": (lambda cm: {**cm, "RK": {**cm["RK"], "3": [-1]}},
                       "class 'RK' scan '3' must list slice indices >= 0, got -1"),
}


@pytest.mark.parametrize("case", list(CLASSMAP_CASES))
def test_malformed_classmap_is_one_line_error_in_train_and_import(case, data, tmp_path, capsys):
    path = data / "classmap_1.json"
    breaker, needle = CLASSMAP_CASES[case]
    path.write_text(json.dumps(breaker(json.loads(path.read_text()))))
    rc, err, out = _train(data, tmp_path, capsys)
    assert rc == 2
    error_line(err, f"{path}: {needle}")
    _no_run_folder(out)
    _import_problem(data, capsys, f"{path}: {needle}")


def test_classmap_that_is_not_json_is_named(data, tmp_path, capsys):
    path = data / "classmap_1.json"
    path.write_text("{not json")
    rc, err, out = _train(data, tmp_path, capsys)
    assert rc == 2
    error_line(err, f"{path}: not valid JSON")
    _no_run_folder(out)


# ------------------------------------------------------------------ 2. what the data folder ignores

def _odd_but_usable(d: Path) -> list[str]:
    """Add files the layout does not recognise, store scan 3 only as ``.nii`` and shift label 4's affine;
    returns the ignored names with their reasons, as the note lists them."""
    img3, aff3 = _nifti(d / "image_3.nii.gz")
    lab3, _ = _nifti(d / "label_3.nii.gz")
    for kind, arr in (("image", img3), ("label", lab3)):
        (d / f"{kind}_3.nii.gz").unlink()
        write_nifti(d / f"{kind}_3.nii", arr, aff3)
    shutil.copy(d / "image_1.nii.gz", d / "image_abc.nii.gz")
    img5, aff5 = _nifti(d / "image_5.nii.gz")
    write_nifti(d / "image_5.nii", img5, aff5)  # a stray copy beside the .nii.gz
    shutil.copy(d / "image_1.nii.gz", d / "scan_extra.nii.gz")
    for name in ("README", "PROVENANCE.md", "notes.txt"):  # expected, never listed
        (d / name).write_text("x")
    return ["image_5.nii (a .nii.gz of the same scan exists)", "image_abc.nii.gz (non-numeric id)",
            "scan_extra.nii.gz (not named image_<id>.nii[.gz] or label_<id>.nii[.gz])"]


def test_odd_but_usable_folder_trains_with_one_note(data, tmp_path, capsys, caplog):
    listed = _odd_but_usable(data)
    shutil.copy(data / "image_1.nii.gz", data / "image_7.nii.gz")  # no label: ignored in training
    shutil.copy(data / "label_1.nii.gz", data / "label_8.nii.gz")  # no image
    listed += ["image_7.nii.gz (no matching label_7.nii.gz)", "label_8.nii.gz (no matching image_8.nii.gz)"]
    lab4, aff4 = _nifti(data / "label_4.nii.gz")
    shifted = aff4.copy()
    shifted[0, 3] += 0.5
    write_nifti(data / "label_4.nii.gz", lab4, shifted)
    with caplog.at_level(logging.WARNING, logger="fsl_med"):
        rc, err, out = _train(data, tmp_path, capsys)
    assert rc == 0, err[-2000:]
    notes = [r.getMessage() for r in caplog.records if "the prepared layout does not recognise" in r.getMessage()]
    assert len(notes) == 1, notes  # once per run, one line
    note = notes[0]
    assert note == f"{data}: ignoring 5 file(s) the prepared layout does not recognise: " + ", ".join(sorted(listed))
    assert "\n" not in note and "README" not in note and "classmap" not in note and "PROVENANCE" not in note
    mismatch = [r.getMessage() for r in caplog.records if "affine differs" in r.getMessage()]
    assert len(mismatch) == 1, mismatch  # scan 4 is read once per run
    assert str(data / "label_4.nii.gz") in mismatch[0] and str(data / "image_4.nii.gz") in mismatch[0]
    assert any((out / "demo").rglob("last.ckpt"))  # scan 3 (.nii only) was trained on


def test_import_accepts_nii_scans_and_notes_ignored_files(data, capsys):
    listed = _odd_but_usable(data)
    rc, out, err = _import(data, capsys)
    assert rc == 0, out + err
    assert "6 scans of chaos_t2 are valid" in out
    notes = [ln for ln in out.splitlines() if "the prepared layout does not recognise" in ln]
    assert notes == [f"note: {data}: ignoring 3 file(s) the prepared layout does not recognise: " + ", ".join(listed)]
    assert any(ln.startswith("note: ") and str(data / "label_4.nii.gz") not in ln for ln in out.splitlines())
    assert err.strip() == ""


def test_import_notes_an_image_label_affine_mismatch(data, capsys):
    lab, aff = _nifti(data / "label_2.nii.gz")
    aff = aff.copy()
    aff[1, 1] *= 1.01
    write_nifti(data / "label_2.nii.gz", lab, aff)
    rc, out, err = _import(data, capsys)
    assert rc == 0, out + err
    notes = [ln for ln in out.splitlines() if "affine differs" in ln]
    assert len(notes) == 1 and str(data / "label_2.nii.gz") in notes[0] and str(data / "image_2.nii.gz") in notes[0]


def test_unpaired_image_is_still_a_problem_for_import(data, capsys):
    (data / "label_4.nii.gz").unlink()
    _import_problem(data, capsys, f"{data / 'image_4.nii.gz'}: no matching label_4.nii.gz")


# ------------------------------------------------------------------ 3. geometry that cannot be trusted

SINGULAR = {
    "all_zero": np.zeros((4, 4)),
    "zero_column": np.diag([1.5, 0.0, 3.0, 1.0]),
    "parallel_axes": np.array([[1.5, 1.5, 0, 0], [0, 0, 0, 0], [0, 0, 3.0, 0], [0, 0, 0, 1.0]]),
}
SINGULAR_MSG = "singular affine (voxel axes have zero length or are parallel); fix the header's qform/sform"


@pytest.mark.parametrize("case", list(SINGULAR))
def test_singular_affine_is_one_line_error(case, data, tmp_path, capsys):
    path = data / "image_3.nii.gz"
    arr, _ = _nifti(path)
    _write_with_sform(path, arr, SINGULAR[case])
    assert np.allclose(nib.load(str(path)).affine[:3, :3], SINGULAR[case][:3, :3])  # stored as written
    rc, err, out = _train(data, tmp_path, capsys)
    assert rc == 2
    error_line(err, f"{path}: {SINGULAR_MSG}")
    _no_run_folder(out)
    _import_problem(data, capsys, f"{path}: {SINGULAR_MSG}")


def test_segment_rejects_a_singular_affine_before_the_checkpoint(data, tmp_path, capsys):
    path = data / "image_2.nii.gz"
    arr, _ = _nifti(path)
    _write_with_sform(path, arr, SINGULAR["zero_column"])
    ckpt = tmp_path / "never_loaded.ckpt"
    ckpt.write_bytes(b"not a checkpoint: the inputs are checked first")
    rc = main(["segment", "--ckpt", str(ckpt), "--support-image", str(path), "--support-mask",
               str(data / "label_2.nii.gz"), "--query", str(data / "image_1.nii.gz"), "--label", "1",
               "--out", str(tmp_path / "pred.nii.gz")])
    err = capsys.readouterr().err
    assert rc == 2
    error_line(err, f"{path}: {SINGULAR_MSG}")
    assert not (tmp_path / "pred.nii.gz").exists()


# ------------------------------------------------------------------ 4. filesystem faults

def _unprivileged(*args: str) -> subprocess.CompletedProcess:
    """``fsl-med ARGS`` in a subprocess that file permissions apply to: as root (a root CI runner reads a chmod 000
    file and writes into a chmod 555 folder) under ``capsh`` with CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH dropped,
    otherwise directly. Root without ``capsh`` fails: install it (Debian/Ubuntu: ``apt-get install libcap2-bin``)."""
    cmd = [sys.executable, "-m", "fsl_med", *args]
    if os.geteuid() == 0:
        capsh = shutil.which("capsh")
        if capsh is None:
            pytest.fail("running as root: dropping CAP_DAC_OVERRIDE needs capsh (apt-get install libcap2-bin)")
        cmd = [capsh, "--drop=cap_dac_override,cap_dac_read_search", "--", "-c", shlex.join(cmd)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


def test_unreadable_image_is_named_as_a_filesystem_fault(data, tmp_path):
    path = data / "image_3.nii.gz"
    path.chmod(0)
    try:
        out = tmp_path / "runs"
        p = _unprivileged("train", *_common(data, out, tmp_path / "cache"))
        assert p.returncode == 2, p.stderr[-2000:]
        line = error_line(p.stderr, f"{path}: cannot read (Permission denied)")
        assert "gzip" not in line and "NIfTI" not in line
        _no_run_folder(out)
        p = _unprivileged("prepare", "import", "--src", str(data), "--dataset", "chaos", "--check-only",
                          "--no-progress")
        assert p.returncode == 2, p.stdout + p.stderr
        problems = [ln for ln in p.stdout.splitlines() if ln.startswith("problem:")]
        assert any(f"{path}: cannot read (Permission denied)" in ln for ln in problems), p.stdout
        error_line(p.stderr, "problem(s) found")
    finally:
        path.chmod(0o644)


def test_directory_in_place_of_an_image_is_named_as_a_filesystem_fault(data, tmp_path, capsys):
    path = data / "image_3.nii.gz"
    path.unlink()
    path.mkdir()
    rc, err, out = _train(data, tmp_path, capsys)
    assert rc == 2
    line = error_line(err, f"{path}: cannot read (Is a directory)")
    assert "gzip" not in line and "not a NIfTI" not in line
    _no_run_folder(out)
    _import_problem(data, capsys, f"{path}: cannot read (Is a directory)")


def test_superpixel_cache_below_a_regular_file_is_an_error(phantom, tmp_path, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    out = tmp_path / "runs"
    rc = main(["train", *_common(phantom, out, blocker / "cache")])
    err = capsys.readouterr().err
    assert rc == 2
    error_line(err, f"superpixel cache {blocker / 'cache' / 'superpixels'}", "(Not a directory)")
    _no_run_folder(out)


def test_superpixel_cache_folder_that_is_a_file_is_an_error(phantom, tmp_path, capsys):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "superpixels").write_text("a file where the cache folder goes")
    out = tmp_path / "runs"
    rc = main(["train", *_common(phantom, out, cache)])
    err = capsys.readouterr().err
    assert rc == 2
    error_line(err, f"superpixel cache {cache / 'superpixels'}: exists and is not a folder")
    _no_run_folder(out)


def test_read_only_superpixel_cache_is_used_without_caching(phantom, tmp_path):
    cache = tmp_path / "cache"
    (cache / "superpixels").mkdir(parents=True)
    (cache / "superpixels").chmod(0o555)
    try:
        p = _unprivileged("train", *_common(phantom, tmp_path / "runs", cache))
        assert p.returncode == 0, p.stderr[-2000:]
        warned = [ln for ln in p.stderr.splitlines() if "not writable" in ln]
        assert warned == [f"[fsl_med.data.superpixels] superpixel cache {cache / 'superpixels'} is not writable "
                          "(Permission denied): pseudolabels are computed without caching"], p.stderr[-2000:]
        assert not list((cache / "superpixels").iterdir())
    finally:
        (cache / "superpixels").chmod(0o755)


# ------------------------------------------------------------------ 5. intensities

def test_huge_intensities_fail_before_training(data, tmp_path, capsys):
    path = data / "image_3.nii.gz"
    arr, aff = _nifti(path)
    huge = (arr.astype(np.float64) / arr.max() * 3e38).astype(np.float32)
    assert np.isfinite(huge).all()
    write_nifti(path, huge, aff)
    out = tmp_path / "runs"
    out.mkdir()
    (out / "earlier_run").mkdir()
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    rc, err, _ = _train(data, tmp_path, capsys)
    assert rc == 2
    line = error_line(err, str(path), "not finite", "range ")
    assert "3.0e+38" in line
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # no run folder created
    _import_problem(data, capsys, str(path), "not finite")


def test_normaliser_rejects_output_that_is_not_finite():
    img = np.ones((2, 4, 4), np.float32)
    img[0, 0, 0] = np.inf
    with pytest.raises(DataError, match=r"^scan\.nii\.gz: intensities are not finite after normalisation \(range "):
        Normalizer()(img, "scan.nii.gz")
    big = np.full((2, 4, 4), 3e38, np.float32)
    big[0] = -3e38
    z = Normalizer()(big)  # statistics in float64: large but representable intensities normalise finely
    assert np.isfinite(z).all() and np.allclose(np.abs(z), 1.0)
