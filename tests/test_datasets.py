"""Dataset registry and the reference 5-fold split with its support scan."""

from __future__ import annotations

import pytest

from fsl_med.errors import ConfigError, DataError
from fsl_med.prepare.datasets import discover_scans, fold_split, get_dataset_info

CHAOS_IDS = ["1", "2", "3", "5", "8", "10", "13", "15", "19", "20", "21", "22", "31", "32", "33", "34", "36", "37",
             "38", "39"]


def test_chaos_folds_match_reference():
    info = get_dataset_info("chaos_t2")
    s0 = fold_split(info, CHAOS_IDS, 0)
    assert s0.query == ["1", "2", "3", "5"] and s0.support == "8"
    assert "8" not in s0.train and len(s0.train) == 15
    s4 = fold_split(info, CHAOS_IDS, 4)  # wraps: support is the first scan
    assert s4.query == ["36", "37", "38", "39"] and s4.support == "1"
    assert len(s4.train) == 15 and "1" not in s4.train


def test_sabs_folds_and_labels():
    info = get_dataset_info("sabs")
    ids = [str(i) for i in range(30)]
    s = fold_split(info, ids, 1)
    assert s.query == [str(i) for i in range(6, 12)] and s.support == "12" and len(s.train) == 23
    assert info.labels == {"liver": 6, "right_kidney": 2, "left_kidney": 3, "spleen": 1}


def test_unknown_dataset_and_fold():
    with pytest.raises(ConfigError, match="did you mean 'chaos_t2'"):
        get_dataset_info("chaos_t")
    with pytest.raises(ConfigError, match="data.fold"):
        fold_split(get_dataset_info("chaos_t2"), CHAOS_IDS, 5)


def test_discover_scans(tmp_path, chaos):
    assert discover_scans(chaos) == CHAOS_IDS
    with pytest.raises(DataError, match="not found"):
        discover_scans(tmp_path / "missing")
    with pytest.raises(DataError, match="image_<id>.nii.gz"):
        discover_scans(tmp_path)
