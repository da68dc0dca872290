"""Dice against hand-computed cases, 3D accumulation, and agreement with MONAI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.metrics import compute_dice

from fsl_med.evaluation.metrics import Counts, VolumeResult, confusion_counts, hd95, summarize


def test_hand_computed_dice():
    gt = np.zeros((4, 4), dtype=np.uint8)
    gt[:2, :2] = 1  # 4 pixels
    pred = np.zeros((4, 4), dtype=np.uint8)
    pred[:2, 1:3] = 1  # 4 pixels, 2 overlapping
    c = confusion_counts(pred, gt)
    assert (c.tp, c.fp, c.fn) == (2, 2, 2)
    assert c.dice == pytest.approx(2 * 2 / (2 * 2 + 2 + 2))  # 0.5
    assert confusion_counts(gt, gt).dice == 1.0
    assert confusion_counts(np.zeros_like(gt), gt).dice == 0.0
    assert confusion_counts(np.zeros_like(gt), np.zeros_like(gt)).dice == 1.0


def test_slice_counts_sum_to_3d_dice_and_match_monai():
    rng = np.random.default_rng(0)
    gt = rng.random((5, 16, 16)) > 0.6
    pred = rng.random((5, 16, 16)) > 0.5
    total = Counts(0, 0, 0)
    for z in range(5):
        total = total + confusion_counts(pred[z], gt[z])
    assert total == confusion_counts(pred, gt)
    monai = compute_dice(torch.from_numpy(pred)[None, None].float(), torch.from_numpy(gt)[None, None].float(),
                         include_background=True)
    assert total.dice == pytest.approx(float(monai), rel=1e-6)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        confusion_counts(np.zeros((2, 2)), np.zeros((3, 2)))


def test_summary_means_over_volumes_then_organs():
    res = [
        VolumeResult("liver", "1", Counts(1, 0, 0), 3),  # 100
        VolumeResult("liver", "2", Counts(1, 2, 0), 3),  # 50
        VolumeResult("spleen", "1", Counts(0, 1, 1), 3),  # 0
    ]
    s = summarize(res, ["liver", "spleen", "left_kidney"])
    assert s["dice"] == {"liver": pytest.approx(75.0), "spleen": 0.0}
    assert s["dice_mean"] == pytest.approx(37.5)
    assert s["organs_without_volumes"] == ["left_kidney"]
    assert s["n_volumes"] == {"liver": 2, "spleen": 1, "left_kidney": 0}


def test_hd95_in_mm_on_an_anisotropic_grid_matches_hand_computed_values():
    """Spacing (z, y, x) = (5, 1, 0.5) mm. Single voxels: 4 voxels apart along x is 2 mm, 2 along z is 10 mm, 3 along
    y is 3 mm. A line of 40 voxels against its first 20: the directed distances are 20 zeros and 0.5, 1, ..., 10 mm;
    their 95th percentile (linear interpolation at rank 0.95 * 39 = 37.05) is 9.0 + 0.05 * 0.5 = 9.025 mm, the
    other direction is 0, so HD95 = 9.025 mm; one far outlier among 21 surface voxels is below the 95th percentile."""
    spacing = (5.0, 1.0, 0.5)

    def vol(*points: tuple[int, int, int]) -> np.ndarray:
        v = np.zeros((6, 12, 48), np.uint8)
        for p in points:
            v[p] = 1
        return v

    assert hd95(vol((2, 5, 9)), vol((2, 5, 5)), spacing) == pytest.approx(2.0)
    assert hd95(vol((4, 5, 5)), vol((2, 5, 5)), spacing) == pytest.approx(10.0)
    assert hd95(vol((2, 8, 5)), vol((2, 5, 5)), spacing) == pytest.approx(3.0)
    line20, line40 = [(2, 5, x) for x in range(20)], [(2, 5, x) for x in range(40)]
    assert hd95(vol(*line40), vol(*line20), spacing) == pytest.approx(9.025, abs=1e-5)
    assert hd95(vol(*line20), vol(*line40), spacing) == pytest.approx(9.025, abs=1e-5)  # symmetric
    assert hd95(vol(*line20, (2, 5, 39)), vol(*line20), spacing) == pytest.approx(0.0)


def test_seconds_per_volume_per_organ_and_over_all_volumes():
    res = [VolumeResult("liver", "1", Counts(1, 0, 0), 3, seconds=1.0),
           VolumeResult("liver", "2", Counts(1, 0, 0), 3, seconds=3.0),
           VolumeResult("spleen", "1", Counts(1, 0, 0), 3, seconds=5.0),
           VolumeResult("spleen", "1", Counts(1, 0, 0), 3, seconds=100.0, variant="ttt")]
    s = summarize(res, ["liver", "spleen", "left_kidney"], variant="plain")
    assert s["seconds_per_volume_by_organ"] == {"liver": pytest.approx(2.0), "spleen": pytest.approx(5.0)}
    assert s["seconds_per_volume"] == pytest.approx(3.0)  # over the 3 volumes, not over the organs' means


def test_results_csv_starts_with_the_run_and_times_every_organ_row(tmp_path):
    """results.csv: the same first column as ablation.csv (``run``), ``seconds_per_volume`` on every row; the Dice
    and HD95 cells are the summaries' numbers."""
    import csv

    from fsl_med.evaluation.report import RUN, build_results, write_results
    from fsl_med.evaluation.table import Column

    organs = ["liver", "spleen"]
    vols = [VolumeResult(o, q, Counts(tp, 1, 1), 3, seconds=0.5 + i, variant=v, hd95=2.0)
            for i, (o, q, tp) in enumerate([("liver", "1", 3), ("liver", "2", 1), ("spleen", "1", 2)])
            for v in ("plain", "cca")]
    variants = {v: summarize(vols, organs, variant=v) for v in ("plain", "cca")}
    results = {"in_sample": None, **build_results(variants["plain"], vols, [], {"name": "mri"}, variants)}
    write_results(tmp_path, results, organs)
    text = (tmp_path / "results.csv").read_text()
    assert text.splitlines()[0] == "run,variant,organ,dice,dice_std,hd95_mm,n,seconds_per_volume"
    assert isinstance(RUN, Column) and RUN.key == "run"
    rows = list(csv.DictReader(text.splitlines()))
    assert len(rows) == 2 * (len(organs) + 1) and {r["run"] for r in rows} == {"mri"}
    for r in rows:
        assert r["seconds_per_volume"] != "" and float(r["seconds_per_volume"]) > 0, r
        summ = variants[r["variant"]]
        if r["organ"] == "mean":
            assert float(r["seconds_per_volume"]) == pytest.approx(summ["seconds_per_volume"], abs=1e-4)
            assert float(r["dice"]) == pytest.approx(summ["dice_mean"], abs=1e-4)
        else:
            assert float(r["seconds_per_volume"]) == pytest.approx(summ["seconds_per_volume_by_organ"][r["organ"]],
                                                                   abs=1e-4)
            assert float(r["dice"]) == pytest.approx(summ["dice"][r["organ"]], abs=1e-4)
            assert float(r["hd95_mm"]) == pytest.approx(2.0)
    liver = next(r for r in rows if r["organ"] == "liver" and r["variant"] == "plain")
    assert float(liver["seconds_per_volume"]) == pytest.approx((0.5 + 1.5) / 2)
