"""``fsl-med segment``: a user's own volume, any orientation and spacing, segmented with a trained checkpoint.

The checkpoint is a tiny random-init ViT trained for 2 steps (on a small phantom, so that the tests without
real data run everywhere); real-data tests use the CHAOS-T2 volumes of the ``chaos`` fixture.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY

from fsl_med.cli import main
from fsl_med.config import load_config
from fsl_med.data.phantom import generate_phantom
from fsl_med.errors import ConfigError
from fsl_med.models.heads.alp import ClassPrototypes, EpisodePrototypes, merge_episode_prototypes
from fsl_med.prepare.geometry import orientation_of, reorient, resample_image, resample_label, spacing_of
from fsl_med.prepare.nifti import read_nifti, write_nifti
from fsl_med.prepare.plan import CtPlan, MriPlan
from fsl_med.segment import model_z_range, parse_z_range, segment
from fsl_med.train import train

REPO = Path(__file__).resolve().parents[1]
LIVER = 1


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``last.ckpt`` of a tiny model trained for 2 steps through :func:`fsl_med.train.train` (MRI config)."""
    base = tmp_path_factory.mktemp("segment_ckpt")
    root = generate_phantom(base / "phantom", n_scans=4, size=256, depth=8)  # the plan of CHAOS-T2: 256 px
    cfg = load_config(REPO / "experiments" / "mri.yaml", [
        *TINY, f"data.root={root}", f"data.cache_dir={tmp_path_factory.getbasetemp() / 'sp_cache'}",
        "trainer.max_steps=2", "data.episodes_per_epoch=2", "trainer.val_check_interval=2", "data.num_val_scans=0",
        f"logging.output_dir={base / 'runs'}", "name=segment",
    ])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = train(cfg)
    assert res.last_ckpt.is_file()
    return res.last_ckpt


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = main(["segment", *args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


# -- geometry and helpers, no model -----------------------------------------------------------------

def test_parse_z_range():
    assert parse_z_range("3:9") == (3, 9) and parse_z_range("4:4") == (4, 4)
    for bad in ("9:3", "a:b", "3", "1:2:3", "-1:4"):
        with pytest.raises(ConfigError, match="z_range="):  # the keyword of a Python call
            parse_z_range(bad)


def test_geometry_round_trip_keeps_world_positions():
    """A mask on an oblique-free but flipped, permuted, anisotropic grid survives model grid and back."""
    aff = np.diag([-1.25, 1.25, 7.7, 1.0])
    aff[:3, 3] = (150.0, -160.0, -80.0)
    mask = np.zeros((256, 256, 20), dtype=np.uint8)
    mask[40:120, 60:150, 5:15] = 1
    mask[150:200, 100:130, 8:12] = 1
    m2, a2 = reorient(mask, aff, "ARI")
    mq, aq = resample_label(m2, a2, (1.5, 1.1, 7.7), "nearest")
    assert orientation_of(aq) == "ARI"
    plan = MriPlan(size=256)
    prep = plan.forward(mq.astype(np.float32), aq, mq)
    grid, grid_aff = prep.label, prep.affine
    assert grid.shape == (256, 256, mq.shape[2]) and orientation_of(grid_aff) == "LAS"
    assert np.allclose(spacing_of(grid_aff), (1.25, 1.25, 7.7))
    back = plan.inverse(grid, grid_aff, mq.shape, aq)
    assert back.shape == mq.shape and back.dtype == np.uint8
    assert dice(back, mq) > 0.97
    # the query's z axis is reversed: original slices 2..5 are model slices Z-1-5..Z-1-2
    z = mq.shape[2]
    assert model_z_range((2, 5), mq.shape, aq, grid_aff, grid.shape[2]) == (z - 1 - 5, z - 1 - 2)


def test_ct_plan_geometry_and_hu_window():
    """CT plan: HU clipped to [-125, 275], the volume's min..max to 0..255; 32 px border dropped, the rest of the
    in-plane field of view resampled to 256 x 256, z unchanged."""
    img = np.full((300, 200, 5), -1000.0, dtype=np.float32)
    img[0, 0, 0], img[1, 0, 0], img[2, 0, 0], img[3, 0, 0] = -125.0, 275.0, 75.0, 1500.0
    plan = CtPlan()
    w = plan.intensities(img)
    assert w[0, 0, 0] == 0.0 and w[1, 0, 0] == 255.0 and w[2, 0, 0] == pytest.approx(127.5)
    assert w[3, 0, 0] == 255.0 and w.min() == 0.0 and img[3, 0, 0] == 1500.0  # input unchanged
    aff = np.diag([-0.8, 0.9, 3.0, 1.0])
    out = plan.forward(img, aff)
    assert out.image.shape == (256, 256, 5) and out.label is None
    sx, sy, sz = spacing_of(out.affine)
    assert sx == pytest.approx(0.8 * 236 / 256, rel=1e-3) and sy == pytest.approx(0.9 * 136 / 256, rel=1e-3)
    assert sz == pytest.approx(3.0)


def test_merge_episode_prototypes():
    c = 4
    a = EpisodePrototypes(bg=ClassPrototypes(torch.ones(3, c), "gridconv"),
                          fg=ClassPrototypes(torch.cat([torch.zeros(2, c), torch.full((1, c), 2.0)]), "gridconv+"))
    b = EpisodePrototypes(bg=ClassPrototypes(torch.ones(1, c), "mask"),
                          fg=ClassPrototypes(torch.full((1, c), 4.0), "mask"))
    m = merge_episode_prototypes([a, b])
    assert m.fg.mode == "gridconv+" and m.fg.protos.shape == (3, c)
    assert torch.equal(m.fg.protos[-1], torch.full((c,), 3.0))  # mean of the two global prototypes
    assert m.bg.mode == "gridconv+" and m.bg.protos.shape == (4, c)
    assert merge_episode_prototypes([a]) is a


# -- errors through the CLI -------------------------------------------------------------------------

@pytest.fixture
def small(tmp_path: Path) -> dict[str, Path]:
    """Tiny synthetic inputs: a support image and masks, a query, a 4D query."""
    aff = np.diag([1.25, 1.25, 5.0, 1.0])
    img = np.random.default_rng(0).normal(100, 20, (24, 24, 6)).astype(np.float32)
    lab = np.zeros((24, 24, 6), dtype=np.uint8)
    lab[5:15, 5:15, 1:5] = 1
    lab[16:20, 16:20, 2:4] = 3
    files = {
        "image": write_nifti(tmp_path / "s.nii.gz", img, aff),
        "labels": write_nifti(tmp_path / "m.nii.gz", lab, aff),
        "empty": write_nifti(tmp_path / "empty.nii.gz", np.zeros_like(lab), aff),
        "wrong_shape": write_nifti(tmp_path / "m_small.nii.gz", lab[:20], aff),
        "query": write_nifti(tmp_path / "q.nii.gz", img, aff),
        "query4d": write_nifti(tmp_path / "q4d.nii.gz", np.stack([img, img], axis=-1), aff),
    }
    return files


@pytest.mark.parametrize("case,needle", [
    ("empty", "empty mask"),
    ("wrong_shape", "differs from the support image"),
    ("label7", "--label 7"),
    ("binary", "not a binary mask"),
    ("query4d", "expected a 3D volume"),
    ("missing", "file not found"),
    ("zrange_order", "--z-range"),
    ("zrange_outside", "--z-range"),
    ("shots", "--shots-per-part"),
])
def test_bad_inputs_are_one_line_errors(case, needle, small, ckpt, tmp_path, capsys):
    out = tmp_path / "pred.nii.gz"
    mask = {"empty": small["empty"], "wrong_shape": small["wrong_shape"]}.get(case, small["labels"])
    query = small["query4d"] if case == "query4d" else small["query"]
    if case == "missing":
        query = tmp_path / "nope.nii.gz"
    extra = {"label7": ["--label", "7"], "binary": [], "zrange_order": ["--label", "1", "--z-range", "4:2"],
             "zrange_outside": ["--label", "1", "--z-range", "2:6"],
             "shots": ["--label", "1", "--shots-per-part", "3"]}.get(case, ["--label", "1"])
    rc, stdout, err = run_cli(capsys, "--ckpt", str(ckpt), "--support-image", str(small["image"]), "--support-mask",
                              str(mask), "--query", str(query), "--out", str(out), *extra)
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fsl-med: error: "), err
    assert needle in lines[0]
    named = {"empty": mask, "wrong_shape": mask, "binary": mask, "query4d": query, "missing": query}.get(case)
    if named is not None:
        assert str(named) in lines[0]
    if case == "label7":
        assert "labels present: [1, 3]" in lines[0]
    if case == "binary":
        assert "[1, 3]" in lines[0] and "--label" in lines[0]
    if case == "shots":
        # 4 slices of 5 mm: 2 slices on the MRI plan's 7.7 mm grid
        assert "spans only 2 slice" in lines[0]
    assert not out.exists() and stdout == ""
    assert not list(tmp_path.glob(".pred.nii.gz.*"))  # no temporary file left


# -- real data --------------------------------------------------------------------------------------

def make_query(chaos: Path, out_dir: Path, codes: str, spacing: tuple[float, float, float] | None
               ) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    """Scan 1 of CHAOS reoriented to ``codes`` (flips/permutations) and resampled to ``spacing``, with its label."""
    img, aff, _ = read_nifti(chaos / "image_1.nii.gz")
    lab, _, _ = read_nifti(chaos / "label_1.nii.gz")
    img2, aff2 = reorient(img.astype(np.float32), aff, codes)
    lab2, _ = reorient(lab.astype(np.uint8), aff, codes)
    if spacing is not None:
        img2, aff_i = resample_image(img2, aff2, spacing)
        lab2, aff_l = resample_label(lab2, aff2, spacing, "nearest")
        assert np.allclose(aff_i, aff_l)
        aff2 = aff_i
    out_dir.mkdir(parents=True, exist_ok=True)
    return (write_nifti(out_dir / "query.nii.gz", img2, aff2), write_nifti(out_dir / "query_label.nii.gz", lab2, aff2),
            lab2, aff2)


def test_segment_flipped_resampled_query_is_aligned(chaos, ckpt, tmp_path, capsys):
    """Query: CHAOS scan 1 flipped in all three axes and permuted (orientation ARI instead of LAS) and
    resampled to 1.5 x 1.1 x 9.0 mm. A 2-step random-init model is weak, so the support is the query itself
    (same image, its own label, ``--label 1``: a self-match); the prediction must lie on the liver in the
    query's own grid: its Dice against the label is clearly higher than against the label flipped left-right
    (a misaligned output). Also: exact query shape and affine, binary uint8, summary printed."""
    q, ql, lab, aff = make_query(chaos, tmp_path, "ARI", (1.5, 1.1, 9.0))
    out = tmp_path / "pred" / "liver.nii.gz"
    rc, stdout, err = run_cli(capsys, "--ckpt", str(ckpt), "--support-image", str(q), "--support-mask", str(ql),
                              "--label", str(LIVER), "--query", str(q), "--out", str(out))
    assert rc == 0, err
    lines = stdout.strip().splitlines()
    assert lines[-1] == str(out) and "voxels" in lines[0] and " ml" in lines[0]
    pred, paff, _ = read_nifti(out)
    assert pred.shape == lab.shape and pred.dtype == np.uint8
    assert np.allclose(paff, aff, atol=1e-5)
    assert set(np.unique(pred).tolist()) <= {0, 1} and pred.sum() > 0
    liver = lab == LIVER
    aligned = dice(pred, liver)
    misaligned = dice(pred, liver[:, ::-1, :])  # axis 1 of an ARI volume runs left-right
    print(f"Dice aligned {aligned:.3f} vs left-right flipped label {misaligned:.3f}")
    assert aligned > misaligned + 0.05, (aligned, misaligned)
    assert f"{int(pred.sum())} voxels" in lines[0]


def test_segment_is_equivariant_to_reorientation(chaos, ckpt, tmp_path):
    """Support CHAOS scan 2 (multi-label mask, ``--label 1``). Segmenting scan 1 as stored (LAS) and scan 1
    flipped/permuted to ARI (no resampling) must give the same voxels once the first output is reoriented
    likewise: the geometry round trip is exact, whatever the model's quality."""
    sup_img, sup_lab = chaos / "image_2.nii.gz", chaos / "label_2.nii.gz"
    r_las = segment(ckpt, sup_img, sup_lab, chaos / "image_1.nii.gz", tmp_path / "las.nii.gz", label=LIVER)
    q, _, lab, aff = make_query(chaos, tmp_path / "ari", "ARI", None)
    r_ari = segment(ckpt, sup_img, sup_lab, q, tmp_path / "ari.nii.gz", label=LIVER)
    p_las, a_las, _ = read_nifti(r_las.path)
    p_ari, a_ari, _ = read_nifti(r_ari.path)
    assert p_ari.shape == lab.shape and np.allclose(a_ari, aff, atol=1e-5)
    expected, _ = reorient(p_las, a_las, "ARI")
    same = dice(p_ari, expected)
    flipped = dice(p_ari, expected[:, ::-1, :])
    print(f"Dice LAS-vs-ARI outputs {same:.4f} vs left-right flipped {flipped:.4f}")
    assert same > 0.99 and flipped < same - 0.2, (same, flipped)
    assert r_ari.voxels == r_las.voxels or abs(r_ari.voxels - r_las.voxels) < 0.01 * r_las.voxels


def test_z_range_restricts_prediction(chaos, ckpt, tmp_path):
    """``--z-range A:B`` counts slices along the query's original third axis, here a reversed (I) axis;
    nothing is predicted outside. Also k-shot supports (2 slices per part) and 2D CCA."""
    q, ql, lab, _ = make_query(chaos, tmp_path, "ARI", None)
    z = np.flatnonzero((lab == LIVER).any(axis=(0, 1)))
    a, b = int(z[len(z) // 4]), int(z[3 * len(z) // 4])
    res = segment(ckpt, chaos / "image_2.nii.gz", chaos / "label_2.nii.gz", q, tmp_path / "zr.nii.gz", label=LIVER,
                  z_range=f"{a}:{b}", shots_per_part=2, cca="2d")
    pred, _, _ = read_nifti(res.path)
    assert res.z_range == (a, b) and len(res.support_slices) == 3 and all(len(p) == 2 for p in res.support_slices)
    per_slice = pred.sum(axis=(0, 1))
    assert per_slice[:a].sum() == 0 and per_slice[b + 1:].sum() == 0
    assert per_slice[a:b + 1].sum() > 0 and res.voxels == int(pred.sum())


# -- one preprocessing plan: prepare and segment agree array for array ------------------------------

def _raw_cases(kind: str, tmp: Path) -> list:
    """The raw scans ``fsl-med prepare`` reads (phantom downloads), as (scan id, Scan) and the prepared folder."""
    from fsl_med.data.phantom_raw import write_raw_chaos, write_raw_sabs
    from fsl_med.prepare.chaos import find_chaos_cases, prepare_chaos
    from fsl_med.prepare.plan import default_plan
    from fsl_med.prepare.sabs import find_sabs_cases, prepare_sabs
    from fsl_med.prepare.sources import Source

    if kind == "mri":
        src = write_raw_chaos(tmp / "raw", n_patients=2, size=96, depth=12, seed=3)
        prepare_chaos(src, tmp / "prep", progress=False)
        find = find_chaos_cases
    else:
        src = write_raw_sabs(tmp / "raw", n_scans=2, size=160, depth=10, seed=3)
        prepare_sabs(src, tmp / "prep", default_plan("ct", "reference" if kind == "ct-reference" else "fsl_med"),
                     progress=False)
        find = find_sabs_cases
    with Source(src) as source:
        return [(c.scan_id, c.load()) for c in find(source)]


@pytest.mark.parametrize("kind", ["mri", "ct", "ct-reference"])
def test_prepare_and_segment_give_identical_arrays(kind, ckpt, tmp_path):
    """A raw MRI (DICOM series) and a raw CT (HU NIfTI) scan, written as NIfTI in LPS, RAS and LAS: the segment
    path (read the file, :meth:`Segmenter.prepare`, the checkpoint's or ``--plan``'s plan) gives exactly the image,
    labels and affine ``fsl-med prepare`` wrote (``array_equal``). The reference CT plan (``--compat reference``)
    resamples one-sidedly in the stored order, as the reference notebook, so it is compared in the raw's own order."""
    from fsl_med.prepare.plan import default_plan
    from fsl_med.segment import Segmenter, _read_volume

    plan = default_plan("mri" if kind == "mri" else "ct", "reference" if kind == "ct-reference" else "fsl_med")
    seg = Segmenter.from_checkpoint(ckpt, plan=plan)
    cases = _raw_cases(kind, tmp_path)
    for sid, raw in cases:
        want_img, want_aff, _ = read_nifti(tmp_path / "prep" / f"image_{sid}.nii.gz")
        want_lab, _, _ = read_nifti(tmp_path / "prep" / f"label_{sid}.nii.gz")
        assert want_lab.max() > 0
        if kind == "ct-reference":
            assert want_img.shape == (int(96 / 1.75 + 1),) * 2 + (11,)
        for codes in ("LPS", "RAS", "LAS") if kind != "ct-reference" else (orientation_of(raw.affine),):
            img, aff = reorient(np.asarray(raw.image), raw.affine, codes)
            lab, _ = reorient(np.asarray(raw.label, dtype=np.uint8), raw.affine, codes)
            assert orientation_of(aff) == codes
            ip = write_nifti(tmp_path / codes / f"img_{sid}.nii.gz", img, aff)
            lp = write_nifti(tmp_path / codes / f"lab_{sid}.nii.gz", lab, aff)
            got = seg.prepare(_read_volume(ip, "--query")[0], _read_volume(ip, "--query")[1],
                              _read_volume(lp, "--support-mask")[0])
            assert np.array_equal(got.image, want_img), (kind, sid, codes)
            assert np.array_equal(got.label, want_lab), (kind, sid, codes)
            assert np.allclose(got.affine, want_aff, rtol=0, atol=1e-5), (kind, sid, codes)
    (_, query), (_, support) = cases
    organ = int(support.label.max())
    res = seg.segment(np.asarray(query.image), [(np.asarray(support.image), np.asarray(support.label))],
                      query_affine=query.affine, support_affines=[support.affine], label=organ)
    assert res.mask.shape == res.probability.shape == np.asarray(query.image).shape  # back through the plan's grid
    assert res.mask.any() and np.isin(res.mask, (0, 1)).all()


def test_checkpoint_stores_its_plan_and_segment_needs_one_when_unknown(chaos, ckpt, tmp_path, capsys):
    """Trained on a phantom (an MRI-plan grid at 256 px) the checkpoint records that plan; one whose plan is unknown
    (data prepared elsewhere) makes ``segment`` fail in one line unless ``--plan`` is given, which then gives the
    same output as the stored plan."""
    from fsl_med.prepare.plan import CHECKPOINT_KEY, MriPlan

    ck = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert ck[CHECKPOINT_KEY] == MriPlan(size=256).as_dict()
    stored = ck["hyper_parameters"]["config"]
    assert "model" in stored and "protocol" not in stored and "ablation" not in stored  # verb-only sections
    ck[CHECKPOINT_KEY] = None
    unknown = tmp_path / "unknown.ckpt"
    torch.save(ck, unknown)
    args = ["--support-image", str(chaos / "image_2.nii.gz"), "--support-mask", str(chaos / "label_2.nii.gz"),
            "--label", "1", "--query", str(chaos / "image_1.nii.gz")]
    rc, _, err = run_cli(capsys, "--ckpt", str(unknown), *args, "--out", str(tmp_path / "a.nii.gz"))
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "--plan ct or --plan mri" in err, err
    assert not (tmp_path / "a.nii.gz").exists()
    rc, _, err = run_cli(capsys, "--ckpt", str(unknown), *args, "--plan", "mri", "--out", str(tmp_path / "b.nii.gz"))
    assert rc == 0, err
    rc, _, err = run_cli(capsys, "--ckpt", str(ckpt), *args, "--out", str(tmp_path / "c.nii.gz"))
    assert rc == 0, err
    assert np.array_equal(read_nifti(tmp_path / "b.nii.gz")[0], read_nifti(tmp_path / "c.nii.gz")[0])


def test_readme_python_api_example_equals_the_cli(chaos, ckpt, tmp_path, capsys):
    """The docs' ``Segmenter`` example (Segmenting your own volumes) runs as written on real CHAOS volumes; its 1-support and 3-support masks are
    the CLI's outputs for the same inputs, voxel for voxel, and its probabilities lie on the query's grid."""
    import re

    from docs_text import page

    text = page("segment.md")
    block = re.search(r"<!-- segmenter-example -->\n```python\n(.*?)```", text, re.S)
    assert block is not None, "docs/segment.md lost its Segmenter example"
    ns: dict = {"CKPT": str(ckpt), "DATA": str(chaos)}
    exec(compile(block.group(1), "docs/segment.md", "exec"), ns)  # noqa: S102 - the documented example, as written
    one, three = ns["one"], ns["three"]
    q_img, q_aff, _ = read_nifti(chaos / "image_1.nii.gz")
    for res, ids in ((one, (2,)), (three, (2, 3, 5))):
        assert res.mask.shape == res.probability.shape == q_img.shape and np.allclose(res.affine, q_aff)
        assert res.mask.dtype == np.uint8 and res.probability.dtype == np.float32 and res.mask.sum() > 0
        assert len(res.support_slices) == len(ids)
        out = tmp_path / f"cli_{len(ids)}.nii.gz"
        sup = [a for i in ids for a in ("--support-image", str(chaos / f"image_{i}.nii.gz"),
                                        "--support-mask", str(chaos / f"label_{i}.nii.gz"))]
        rc, _, err = run_cli(capsys, "--ckpt", str(ckpt), *sup, "--label", "1", "--query", str(chaos / "image_1.nii.gz"),
                             "--out", str(out))
        assert rc == 0, err
        assert np.array_equal(read_nifti(out)[0], res.mask)
    assert not np.array_equal(one.probability, three.probability)  # the two extra supports change the prototypes
    # arrays with affines give the same as paths
    sup_img, sup_aff, _ = read_nifti(chaos / "image_2.nii.gz")
    sup_lab, _, _ = read_nifti(chaos / "label_2.nii.gz")
    seg = ns["seg"]
    arr = seg.segment(q_img, [(sup_img, sup_lab)], query_affine=q_aff, support_affines=[sup_aff], label=1)
    assert np.array_equal(arr.mask, one.mask) and np.array_equal(arr.probability, one.probability)
