"""EP1 slice selection: support parts and query ranges, on constructed and real CHAOS labels."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fsl_med.data.protocol import query_plan, support_slice_indices
from fsl_med.data.volumes import load_volume
from fsl_med.errors import DataError
from fsl_med.prepare.datasets import get_dataset_info


def test_support_slices_at_one_sixth_half_five_sixths():
    organ = np.arange(10, 22)  # 12 slices
    assert support_slice_indices(organ, 3) == [12, 16, 20]  # int(12/6)=2, int(6)=6, int(10)=10
    assert support_slice_indices(np.array([7]), 3) == [7, 7, 7]
    with pytest.raises(DataError, match="absent"):
        support_slice_indices(np.array([], dtype=int), 3)


def test_query_plan_parts_and_range():
    present = np.zeros(30, dtype=bool)
    present[[5, 6, 8, 9, 10, 11, 12, 13, 14]] = True  # z 7 has no organ inside the extent
    plan = query_plan(present, 3)
    assert plan.z.tolist() == list(range(5, 15))
    # part = floor((z - 5) / (9 / 3)) clamped to 0..2
    assert plan.part.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]
    skip = query_plan(present, 3, skip_no_organ_slices=True)
    assert 7 not in skip.z.tolist() and len(skip.z) == 9
    margin = query_plan(present, 3, z_margin=2)
    assert margin.z[0] == 3 and margin.z[-1] == 16 and margin.part[0] == 0 and margin.part[-1] == 2
    assert query_plan(np.zeros(5, dtype=bool)).z.size == 0


def test_real_chaos_label_slice_selection(chaos):
    info = get_dataset_info("chaos_t2")
    vol = load_volume(chaos, "1", info.all_label_ids)
    classmap = json.loads((chaos / "classmap_1.json").read_text())
    for lid in info.labels.values():
        slices = vol.slices_with(lid)
        # our slice index equals the shipped classmap entry of this scan
        assert slices.tolist() == classmap[info.classmap_names[lid]]["1"]
        sup = support_slice_indices(slices, 3)
        n = len(slices)
        assert sup == [int(slices[int(n / 6)]), int(slices[int(n / 2)]), int(slices[int(5 * n / 6)])]
        assert all((vol.label[z] == lid).any() for z in sup)
        plan = query_plan((vol.label == lid).any(axis=(1, 2)), 3)
        assert plan.z[0] == slices[0] and plan.z[-1] == slices[-1]
        assert sorted(set(plan.part.tolist())) == [0, 1, 2]
        assert np.all(np.diff(plan.part) >= 0)
