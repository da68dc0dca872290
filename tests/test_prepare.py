"""``fsl-med prepare``: official raw formats (generated DICOM+PNG CHAOS, HU NIfTI Synapse) -> prepared layout,
and ``prepare import`` on real and broken prepared folders."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fsl_med.atomic import sha256_file
from fsl_med.cli import main
from fsl_med.data.phantom import generate_phantom, make_phantom_scan
from fsl_med.data.phantom_raw import (
    CHAOS_TO_BTCV,
    CT_SPACING,
    MR_SPACING,
    world_affine,
    write_raw_chaos,
    write_raw_sabs,
)
from fsl_med.data.volumes import load_volume
from fsl_med.errors import DataError
from fsl_med.prepare.chaos import prepare_chaos
from fsl_med.prepare.dicom import chaos_grey_to_label
from fsl_med.prepare.geometry import orientation_of, reorient, world_centroid
from fsl_med.prepare.importer import check_prepared, import_prepared
from fsl_med.prepare.manifest import read_manifest
from fsl_med.prepare.nifti import write_nifti
from fsl_med.prepare.plan import CtPlan, MriPlan, folder_plan
from fsl_med.prepare.sabs import prepare_sabs

MR_SIZE, MR_DEPTH = 96, 12
CT_SIZE, CT_DEPTH = 192, 8


def _tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for p in files:
        h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def _load(out: Path, kind: str, sid: str) -> nib.Nifti1Image:
    return nib.load(str(out / f"{kind}_{sid}.nii.gz"))


@pytest.fixture(scope="module")
def raw_chaos(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("raw_chaos")
    write_raw_chaos(d, n_patients=3, size=MR_SIZE, depth=MR_DEPTH, seed=0)
    write_raw_chaos(d, n_patients=3, size=MR_SIZE, depth=MR_DEPTH, seed=0, as_zip=True)
    return d


@pytest.fixture(scope="module")
def raw_sabs(tmp_path_factory) -> Path:
    return write_raw_sabs(tmp_path_factory.mktemp("raw_sabs"), n_scans=3, size=CT_SIZE, depth=CT_DEPTH, seed=0)


@pytest.fixture(scope="module")
def prepared_chaos(raw_chaos, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prep_chaos") / "chaos"
    prepare_chaos(raw_chaos / "CHAOS_Train_Sets.zip", out, progress=False)
    return out


@pytest.fixture(scope="module")
def prepared_sabs(raw_sabs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prep_sabs") / "sabs"
    prepare_sabs(raw_sabs, out, progress=False)
    return out


def test_chaos_zip_geometry_labels_and_intensities(raw_chaos, prepared_chaos):
    out = prepared_chaos
    ids = ("1", "2", "3")
    assert sorted(p.name for p in out.glob("image_*.nii.gz")) == [f"image_{i}.nii.gz" for i in ids]
    expected_z = round((MR_DEPTH - 1) * MR_SPACING[2] / 7.7) + 1
    for n, sid in enumerate(ids, start=1):
        img, lab = _load(out, "image", sid), _load(out, "label", sid)
        assert img.shape == lab.shape and img.shape[:2] == (256, 256) and abs(img.shape[2] - expected_z) <= 1
        assert np.allclose(img.header.get_zooms(), (1.25, 1.25, 7.7), atol=1e-4)
        assert orientation_of(img.affine) == "LAS"
        label = np.asarray(lab.dataobj)
        assert set(np.unique(label)) == {0, 1, 2, 3, 4}
        raw_img, raw_lab = make_phantom_scan(n, size=MR_SIZE, depth=MR_DEPTH, seed=0)
        arr = img.get_fdata()
        assert arr.min() >= 0 and arr.max() <= np.percentile(raw_img, 99.5) + 1e-3  # top 0.5 % clipped
        assert arr.max() > 0.9 * np.percentile(raw_img, 99.5)
        # every organ stays where it was in world coordinates (within a voxel)
        aff = world_affine(MR_SIZE, MR_DEPTH, MR_SPACING)
        for c in (1, 2, 3, 4):
            d = world_centroid(raw_lab == c, aff) - world_centroid(label == c, img.affine)
            assert np.all(np.abs(d[:2]) < 1.5) and abs(d[2]) < 4.0, (sid, c, d)
        # patient's right (liver) at low x index, left (spleen) at high x index, as in the real prepared data
        assert np.argwhere(label == 1)[:, 0].mean() < np.argwhere(label == 4)[:, 0].mean()


def test_chaos_manifest_and_classmap(raw_chaos, prepared_chaos):
    m = read_manifest(prepared_chaos)
    assert m is not None and m["complete"] and m["dataset"] == "chaos_t2"
    assert m["params"]["spacing"] == [1.25, 1.25, 7.7] and m["params"]["clip_top_percent"] == 0.5
    assert m["fsl_med_version"] and m["orientation"] == "LAS" and m["source"]["kind"] == "zip"
    assert set(m["scans"]) == {"1", "2", "3"}
    cm = json.loads((prepared_chaos / "classmap_1.json").read_text())
    for sid, e in m["scans"].items():
        assert e["source_orientation"] == "LPS" and e["source_shape"] == [MR_SIZE, MR_SIZE, MR_DEPTH]
        assert np.allclose(e["source_spacing"], MR_SPACING)
        assert e["labels_present"] == [0, 1, 2, 3, 4] and e["shape"][:2] == [256, 256]
        for name, rec in e["files"].items():
            assert sha256_file(prepared_chaos / name) == rec["sha256"]
        vol = load_volume(prepared_chaos, sid)
        assert cm["LIVER"][sid] == vol.slices_with(1).tolist() and cm["SPLEEN"][sid] == vol.slices_with(4).tolist()
    # the real import check accepts what we prepared
    assert check_prepared(prepared_chaos, "chaos").ok


def test_folder_and_zip_give_identical_volumes(raw_chaos, prepared_chaos, tmp_path):
    before = _tree_digest(raw_chaos / "Train_Sets")
    rep = prepare_chaos(raw_chaos / "Train_Sets", tmp_path / "f", progress=False)
    assert rep.prepared == ["1", "2", "3"]
    for sid in ("1", "2", "3"):
        for kind in ("image", "label"):
            a, b = _load(prepared_chaos, kind, sid), _load(tmp_path / "f", kind, sid)
            assert np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj)) and np.allclose(a.affine, b.affine)
    assert _tree_digest(raw_chaos / "Train_Sets") == before  # the source is never modified


def test_rerun_skips_up_to_date_and_redoes_what_changed(raw_chaos, tmp_path):
    src, out = raw_chaos / "CHAOS_Train_Sets.zip", tmp_path / "out"
    zip_digest = _tree_digest(src)
    prepare_chaos(src, out, progress=False)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.nii.gz")}
    rep = prepare_chaos(src, out, progress=False)
    assert rep.prepared == [] and rep.skipped == ["1", "2", "3"]
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.nii.gz")} == mtimes
    (out / "label_2.nii.gz").unlink()
    rep = prepare_chaos(src, out, progress=False)
    assert rep.prepared == ["2"] and (out / "label_2.nii.gz").is_file()
    with pytest.raises(DataError, match=r"holds another preparation: plan label_interp='per_class' \(now 'nearest'\)"):
        prepare_chaos(src, out, MriPlan(label_interp="nearest"), progress=False)  # another plan: never mixed in
    assert read_manifest(out)["params"]["label_interp"] == "per_class"
    rep = prepare_chaos(src, out, MriPlan(label_interp="nearest"), overwrite=True, progress=False)
    assert rep.prepared == ["1", "2", "3"]
    assert read_manifest(out)["params"]["label_interp"] == "nearest"
    assert _tree_digest(src) == zip_digest
    assert not list(out.glob(".*tmp*"))


def test_interrupted_preparation_resumes(raw_chaos, tmp_path):
    """A failure on the third patient leaves two complete volumes and an incomplete manifest; a re-run
    after the fix prepares only the third."""
    src = tmp_path / "src"
    write_raw_chaos(tmp_path, n_patients=3, size=MR_SIZE, depth=MR_DEPTH, seed=0)
    src = tmp_path / "Train_Sets"
    victim = sorted((src / "MR" / "3" / "T2SPIR" / "DICOM_anon").iterdir())[4]
    good = victim.read_bytes()
    victim.write_bytes(b"not a dicom file")
    out = tmp_path / "out"
    with pytest.raises(DataError, match="IMG-0002-00005.dcm"):
        prepare_chaos(src, out, progress=False)
    m = read_manifest(out)
    assert m is not None and not m["complete"] and set(m["scans"]) == {"1", "2"}
    assert not (out / "image_3.nii.gz").exists() and not list(out.glob(".*tmp*"))
    victim.write_bytes(good)
    rep = prepare_chaos(src, out, progress=False)
    assert rep.skipped == ["1", "2"] and rep.prepared == ["3"] and read_manifest(out)["complete"]


def test_sabs_geometry_labels_and_intensities(raw_sabs, prepared_sabs):
    out = prepared_sabs
    m = read_manifest(out)
    assert set(m["scans"]) == {"0", "1", "2"}  # re-indexed 0..N-1 in file-name order
    assert m["scans"]["0"]["source"]["files"][0].endswith("img/img0001.nii.gz")
    assert m["scans"]["0"]["source_orientation"] == "LPS" and m["scans"]["1"]["source_orientation"] == "RAI"
    border = 32
    for n in range(3):
        img, lab = _load(out, "image", str(n)), _load(out, "label", str(n))
        assert img.shape == (256, 256, CT_DEPTH) and orientation_of(img.affine) == "LAS"
        s = (CT_SIZE - 2 * border) / 256
        assert np.allclose(img.header.get_zooms(), (CT_SPACING[0] * s, CT_SPACING[1] * s, CT_SPACING[2]), atol=1e-4)
        arr, label = img.get_fdata(), np.asarray(lab.dataobj)
        assert arr.min() == pytest.approx(0.0) and arr.max() == pytest.approx(255.0, abs=1e-3)
        present = set(np.unique(label).tolist())
        assert {0, 1, 2, 3, 6, 7, 8} >= present >= {0, 2, 3, 6, 7, 8}  # BTCV ids kept
        _, raw_lab = make_phantom_scan(n + 1, size=CT_SIZE, depth=CT_DEPTH, seed=0)
        inside = np.zeros_like(raw_lab, dtype=bool)
        inside[border:-border, border:-border] = True
        aff = world_affine(CT_SIZE, CT_DEPTH, CT_SPACING)
        for c in (1, 2, 3):  # liver, kidneys (in the phantom's CHAOS ids)
            d = world_centroid((raw_lab == c) & inside, aff) - world_centroid(label == CHAOS_TO_BTCV[c], img.affine)
            assert np.all(np.abs(d) < 1.5), (n, c, d)
        assert m["scans"][str(n)]["intensity_range"] == [0.0, 255.0]


def test_ct_preprocessing_is_orientation_invariant():
    rng = np.random.default_rng(0)
    hu = rng.integers(-1000, 400, size=(100, 90, 6)).astype(np.float32)
    lab = np.zeros(hu.shape, dtype=np.uint8)
    lab[40:60, 30:50, 2:4] = 6
    aff = np.diag([-0.7, 0.7, 3.0, 1.0])
    ref = CtPlan().forward(hu, aff, lab)
    assert ref.image.shape == (256, 256, 6)
    for codes in ("RPI", "LPS", "RAS"):
        h2, a2 = reorient(hu, aff, codes)
        l2, _ = reorient(lab, aff, codes)
        got = CtPlan().forward(h2, a2, l2)
        assert np.allclose(got.image, ref.image, atol=1e-3) and np.array_equal(got.label, ref.label)
        assert np.allclose(got.affine, ref.affine)
    assert hu.min() == -1000  # input untouched


def test_chaos_grey_levels():
    png = np.array([[0, 63, 126], [189, 252, 60]], dtype=np.uint8)
    assert chaos_grey_to_label(png, "x.png").tolist() == [[0, 1, 2], [3, 4, 1]]
    with pytest.raises(DataError, match=r"x\.png: grey levels \[100\]"):
        chaos_grey_to_label(np.array([[0, 100]], dtype=np.uint8), "x.png")


def test_cli_prepare_errors_are_one_line(raw_chaos, tmp_path, capsys):
    src = raw_chaos / "Train_Sets"
    assert main(["prepare", "chaos", "--src", str(src), "--out", str(src / "x"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lies inside the source folder --src" in err[0]
    assert main(["prepare", "sabs", "--src", str(raw_chaos), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "RawData/Training/img/img00XX.nii.gz" in capsys.readouterr().err
    assert main(["prepare", "chaos", "--src", str(tmp_path / "missing.zip"), "--out", str(tmp_path / "o")]) == 2
    assert "source not found" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_prepare_sabs_with_superpixel_cache(raw_sabs, tmp_path, capsys):
    out, cache = tmp_path / "ct", tmp_path / "cache"
    assert main(["prepare", "sabs", "--src", str(raw_sabs), "--out", str(out), "--cache-dir", str(cache),
                 "--no-progress"]) == 0
    assert "prepared 3 volume(s)" in capsys.readouterr().out
    assert len(list((cache / "superpixels").glob("image_*.npz"))) == 3


# ------------------------------------------------------------------ prepare import


def test_import_accepts_real_chaos(chaos):
    rep = check_prepared(chaos, "chaos")
    assert rep.ok, rep.problems
    assert len(rep.scans) == 20 and all(e["shape"][:2] == [256, 256] for e in rep.scans.values())
    assert all(e["labels_present"] == [0, 1, 2, 3, 4] for e in rep.scans.values())


def test_import_completes_real_subset(chaos_subset, tmp_path, capsys):
    folder = tmp_path / "subset"
    folder.mkdir()
    for p in chaos_subset.iterdir():
        (folder / p.name).symlink_to(p.resolve())
    cache = tmp_path / "cache"
    assert main(["prepare", "import", "--src", str(folder), "--dataset", "chaos", "--cache-dir", str(cache),
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "4 scans of chaos_t2 are valid" in out and "classmap_1.json" in out and "manifest.json" in out
    m = read_manifest(folder)
    assert set(m["scans"]) == {"1", "2", "3", "5"} and m["source"]["kind"] == "prepared"
    assert set(json.loads((folder / "classmap_1.json").read_text())) == {"BG", "LIVER", "RK", "LK", "SPLEEN"}
    assert len(list((cache / "superpixels").glob("*.npz"))) == 4


@pytest.fixture
def small_prepared(tmp_path) -> Path:
    return generate_phantom(tmp_path / "ph", n_scans=3, size=48, depth=8, seed=0)


def _break(folder: Path, case: str) -> str:
    if case == "missing_label":
        (folder / "label_2.nii.gz").unlink()
        return "image_2.nii.gz: no matching label_2.nii.gz"
    img = nib.load(str(folder / "label_3.nii.gz"))
    lab = np.asarray(img.dataobj).copy()
    if case == "shape_mismatch":
        write_nifti(folder / "label_3.nii.gz", lab[:, :, :-1], img.affine)
        return "label_3.nii.gz: label shape (48, 48, 7) differs from image shape (48, 48, 8)"
    lab[0, 0, 0] = 9
    write_nifti(folder / "label_3.nii.gz", lab, img.affine)
    return "label_3.nii.gz: label values [9] are outside the chaos_t2 label map"


@pytest.mark.parametrize("case", ["missing_label", "shape_mismatch", "unknown_label"])
def test_import_flags_broken_folders(small_prepared, case, capsys):
    expected = _break(small_prepared, case)
    (small_prepared / "classmap_1.json").unlink()
    before = sorted(p.name for p in small_prepared.iterdir())
    rep = import_prepared(small_prepared, "chaos")
    assert not rep.ok and any(expected in p for p in rep.problems), rep.problems
    assert main(["prepare", "import", "--src", str(small_prepared), "--dataset", "chaos", "--no-superpixels"]) == 2
    cap = capsys.readouterr()
    assert expected in cap.out
    err = cap.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fsl-med: error:") and "problem(s) found" in err[0]
    assert sorted(p.name for p in small_prepared.iterdir()) == before  # nothing written


def test_import_without_volumes_names_the_layout(tmp_path):
    with pytest.raises(DataError, match="expected image_<id>.nii.gz"):
        check_prepared(tmp_path, "sabs")


def test_ct_normalisation_uses_training_scans_only(prepared_sabs, tmp_path):
    from fsl_med.config import load_config
    from fsl_med.data.datamodule import FewShotDataModule

    cfg = load_config(Path(__file__).resolve().parents[1] / "experiments" / "ct.yaml",
                      [f"data.root={prepared_sabs}", f"data.cache_dir={tmp_path}"])
    dm = FewShotDataModule(cfg)
    dm.resolve_split()
    assert dm.split.query == ["0"] and dm.split.support == "1" and dm.train_ids == ["2"]
    train = load_volume(prepared_sabs, "2").image
    assert dm.normalize.mean == pytest.approx(float(train.mean()), rel=1e-5)
    assert dm.normalize.std == pytest.approx(float(train.std()), rel=1e-4)
    everything = np.concatenate([load_volume(prepared_sabs, s).image.ravel() for s in ("0", "1", "2")])
    assert abs(dm.normalize.mean - float(everything.mean())) > 1e-3  # the query/support scans are not used
    assert dm.preprocessing_plan() == CtPlan()  # what a checkpoint trained on this folder stores for segment


def test_prepared_folders_record_their_plan(prepared_chaos, prepared_sabs, small_prepared, tmp_path):
    """The manifest's params are the plan (as the checkpoint stores it); imported or foreign folders have none."""
    from fsl_med.errors import ConfigError
    from fsl_med.prepare.plan import plan_from_dict

    assert folder_plan(prepared_chaos) == MriPlan() and folder_plan(prepared_sabs) == CtPlan()
    assert read_manifest(prepared_chaos)["params"] == MriPlan().as_dict()
    assert plan_from_dict(CtPlan(border=16).as_dict()) == CtPlan(border=16)
    assert folder_plan(tmp_path) is None
    assert import_prepared(small_prepared, "chaos").ok and folder_plan(small_prepared) is None
    for bad, needle in (({"modality": "pet"}, "not a preprocessing plan"), ({**MriPlan().as_dict(), "zoom": 2},
                        "unknown plan field"), ({**MriPlan().as_dict(), "label_interp": "cubic"}, "label_interp")):
        with pytest.raises(ConfigError, match=needle):
            plan_from_dict(bad)


def test_sabs_from_zip_equals_folder(raw_sabs, prepared_sabs, tmp_path):
    import zipfile

    archive = tmp_path / "Abdomen.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(raw_sabs.rglob("*.nii.gz")):
            zf.write(p, f"Abdomen/RawData/Training/{p.relative_to(raw_sabs).as_posix()}")
    rep = prepare_sabs(archive, tmp_path / "z", progress=False)
    assert rep.prepared == ["0", "1", "2"]
    for sid in rep.prepared:
        a, b = _load(prepared_sabs, "image", sid), _load(tmp_path / "z", "image", sid)
        assert np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
    assert read_manifest(tmp_path / "z")["source"]["kind"] == "zip"
