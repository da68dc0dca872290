"""Dice against hand-computed cases, 3D accumulation, and agreement with MONAI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.metrics import compute_dice

from fsl_med.evaluation.metrics import Counts, VolumeResult, confusion_counts, summarize


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
