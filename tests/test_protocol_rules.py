"""Issue 30 §4: the ADNet lineage's protocol rules as config fields (method-zoo.md §1 rows 5-7), defaults unchanged.

* ``data.exclude_rule`` any | all: Setting 2 drops a training slice holding any / all of the excluded labels;
* ``eval.part_rule`` extent | count: a query slice's support part from its place in the organ's extent, or from
  ``linspace(0, C, npart + 1)`` chunks of the C organ-containing slices;
* ``eval.support_pick`` next | group_last | group_index:N: which scan of the fold's group is the support.

The last test measures method-zoo.md §1's ANY/ALL table on the real CHAOS-T2 labels.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import error_line

from fsl_med.cli import main
from fsl_med.config import load_config
from fsl_med.data.datamodule import FewShotDataModule
from fsl_med.data.exclusion import excluded_slices, exclusion_note
from fsl_med.data.phantom import generate_phantom
from fsl_med.data.protocol import count_parts, query_plan
from fsl_med.errors import ConfigError, DataError
from fsl_med.prepare.datasets import fold_split, get_dataset_info, scan_files
from fsl_med.prepare.nifti import read_nifti
from fsl_med.trained_on import in_sample_scans

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "experiments" / "demo.yaml")
CHAOS_IDS = ["1", "2", "3", "5", "8", "10", "13", "15", "19", "20", "21", "22", "31", "32", "33", "34", "36", "37",
             "38", "39"]
ALL_FOUR = "data.test_organs=[liver,right_kidney,left_kidney,spleen]"


def _one_line(err: Exception, *needles: str) -> str:
    msg = str(err)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, (n, msg)
    return msg


# -- data.exclude_rule ---------------------------------------------------------------------------------------------


def _label_volume() -> np.ndarray:
    """Six 4x4 slices holding: nothing, {1}, {1, 4}, {4}, {1, 2, 3, 4}, {2}."""
    lab = np.zeros((6, 4, 4), dtype=np.uint8)
    lab[1, 0, 0] = 1
    lab[2, 0, 0], lab[2, 3, 3] = 1, 4
    lab[3, 1, 1] = 4
    lab[4, 0, 0], lab[4, 0, 1], lab[4, 0, 2], lab[4, 0, 3] = 1, 2, 3, 4
    lab[5, 2, 2] = 2
    return lab


def test_exclude_rules_on_a_constructed_volume():
    lab = _label_volume()
    before = lab.copy()
    # any: every slice holding liver or spleen goes; all: only the slices holding both
    assert excluded_slices(lab, [1, 4], "any").tolist() == [False, True, True, True, True, False]
    assert excluded_slices(lab, [4, 1], "all").tolist() == [False, False, True, False, True, False]
    assert excluded_slices(lab, [1, 2, 3, 4], "all").tolist() == [False, False, False, False, True, False]
    assert excluded_slices(lab, [1, 2, 3, 4], "any").tolist() == [False, True, True, True, True, True]
    for rule in ("any", "all"):
        assert excluded_slices(lab, [], rule).tolist() == [False] * 6  # Setting 1
        assert excluded_slices(lab, [2], rule).tolist() == [False, False, False, False, True, True]  # one label
        assert excluded_slices(lab, [7], rule).tolist() == [False] * 6  # absent label
    assert excluded_slices(lab, [1, 7], "all").tolist() == [False] * 6  # a label absent everywhere: nothing dropped
    assert excluded_slices(lab, [1, 4]).tolist() == excluded_slices(lab, [1, 4], "any").tolist()  # the default
    assert np.array_equal(lab, before)
    with pytest.raises(ConfigError) as e:
        excluded_slices(lab, [1], "some")
    _one_line(e.value, "data.exclude_rule", "'some'")
    with pytest.raises(DataError) as e:
        excluded_slices(lab[0], [1], "any")
    _one_line(e.value, "[Z, H, W]")
    assert exclusion_note([4, 1, 2, 3], "all", 88, 718) == \
        "setting 2 (exclude_rule=all, labels [1, 2, 3, 4]): dropped 88 of 718 training slices (12.3 %)"


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    # chaos_t2 folds scaled to 6 scans: fold 0 groups scans 1, 2 (query 1, support 2), trains on 3, 4, 5 and validates
    # on 6; fold 2 groups 3, 4, 5
    return generate_phantom(tmp_path_factory.mktemp("ph") / "phantom", n_scans=6, size=48, depth=8, seed=0)


def _cfg(root: Path, tmp: Path, *extra: str):
    return load_config(DEMO, [f"data.root={root}", f"data.cache_dir={tmp / 'cache'}", "data.image_size=48",
                              "data.num_workers=0", *extra])


def _dropped(root: Path, ids: list[str], labels: list[int], rule: str) -> tuple[int, int, dict[str, set[int]]]:
    """(dropped, total, kept z per scan) computed here from the label files with numpy."""
    dropped, total, kept = 0, 0, {}
    for sid in ids:
        lab = np.asarray(read_nifti(scan_files(root).paths(sid)[1])[0]).transpose(2, 1, 0)
        has = np.stack([(lab == i).any(axis=(1, 2)) for i in labels])
        drop = has.any(axis=0) if rule == "any" else has.all(axis=0)
        dropped, total = dropped + int(drop.sum()), total + len(drop)
        kept[sid] = set(np.flatnonzero(~drop).tolist())
    return dropped, total, kept


@pytest.mark.parametrize("rule", ["any", "all"])
def test_datamodule_applies_the_exclude_rule(phantom, tmp_path, caplog, rule):
    cfg = _cfg(phantom, tmp_path, "data.setting=2", ALL_FOUR, f"data.exclude_rule={rule}")
    dm = FewShotDataModule(cfg)
    with caplog.at_level(logging.INFO, logger="fsl_med.data.datamodule"):
        dm.setup("fit")
    assert dm.train_ids == ["3", "4", "5"]
    dropped, total, kept = _dropped(phantom, dm.train_ids, [1, 2, 3, 4], rule)
    assert 0 < dropped < total
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("setting 2 (")]
    assert lines == [exclusion_note([1, 2, 3, 4], rule, dropped, total)]
    assert dm.train_set is not None
    used = {(v, z) for v, z, _ in dm.train_set.candidates}
    assert used and all(z in kept[dm.train_ids[v]] for v, z in used)  # no dropped slice is ever drawn
    if rule == "all":  # slices with only some test organs stay in training (the lineage's rule)
        lab = np.asarray(read_nifti(scan_files(phantom).paths("3")[1])[0]).transpose(2, 1, 0)
        partial = [z for z in kept["3"] if np.isin(lab[z], [1, 2, 3, 4]).any()]
        assert partial and any((0, z) in used for z in partial)
    # the rules differ on this phantom: 'all' keeps strictly more slices than 'any'
    other = _dropped(phantom, dm.train_ids, [1, 2, 3, 4], "any" if rule == "all" else "all")[0]
    assert (dropped > other) == (rule == "any")


def test_setting_1_drops_nothing_and_logs_nothing(phantom, tmp_path, caplog):
    dm = FewShotDataModule(_cfg(phantom, tmp_path, "data.exclude_rule=all"))
    with caplog.at_level(logging.INFO, logger="fsl_med.data.datamodule"):
        dm.setup("fit")
    assert not [r for r in caplog.records if r.getMessage().startswith("setting 2")]
    assert dm.train_set is not None and len(dm.train_set.candidates) > 8  # beyond any one volume's 8 slices


# -- eval.part_rule ------------------------------------------------------------------------------------------------


def _chunk_loop(c: int, npart: int) -> list[int]:
    """The lineage's loop written out: chunk s covers positions int(linspace)[s] .. int(linspace)[s+1] - 1."""
    out = [-1] * c
    edges = [int(x) for x in np.linspace(0, c, npart + 1)]
    for s in range(npart):
        for i in range(edges[s], edges[s + 1]):
            out[i] = s
    return out


def test_count_parts_cuts_by_count():
    assert np.bincount(count_parts(11, 3)).tolist() == [3, 4, 4]
    assert count_parts(11, 3).tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    assert count_parts(0, 3).tolist() == []
    assert count_parts(1, 3).tolist() == [2]  # C < npart: the leading chunks are empty
    assert count_parts(2, 3).tolist() == [1, 2]
    assert count_parts(3, 3).tolist() == [0, 1, 2]
    assert count_parts(5, 1).tolist() == [0] * 5
    for npart in range(1, 6):
        for c in range(0, 41):
            assert count_parts(c, npart).tolist() == _chunk_loop(c, npart), (c, npart)
    with pytest.raises(ValueError):
        count_parts(-1, 3)


def _extent_parts(mask: np.ndarray, npart: int, z_margin: int, skip: bool, last: bool) -> tuple[list, list]:
    """fsl_med's EP1 plan as method.md §5 states it, written out slice by slice."""
    zs = np.flatnonzero(mask)
    z_min, z_max = int(zs[0]), int(zs[-1])
    span = (z_max - z_min) / npart
    z_out, p_out = [], []
    for z in range(max(0, z_min - z_margin), min(len(mask) - 1, z_max + z_margin) + 1):
        if skip and not mask[z]:
            continue
        p = 0 if span <= 0 else int(np.floor((z - z_min) / span))
        if last or z != len(mask) - 1:
            z_out.append(z)
            p_out.append(min(max(p, 0), npart - 1))
    return z_out, p_out


def test_default_part_rule_is_todays_plan():
    rng = np.random.default_rng(0)
    for _ in range(300):
        depth = int(rng.integers(3, 30))
        mask = rng.random(depth) < rng.uniform(0.1, 0.9)
        if not mask.any():
            continue
        npart, margin = int(rng.integers(1, 5)), int(rng.integers(0, 3))
        skip, last = bool(rng.integers(2)), bool(rng.integers(2))
        plan = query_plan(mask, npart, margin, skip, last)
        assert (plan.z.tolist(), plan.part.tolist()) == _extent_parts(mask, npart, margin, skip, last)
        explicit = query_plan(mask, npart, margin, skip, last, part_rule="extent")
        assert np.array_equal(plan.z, explicit.z) and np.array_equal(plan.part, explicit.part)


def test_count_rule_in_the_query_plan():
    mask = np.zeros(20, dtype=bool)
    mask[3:14] = True  # 11 organ slices
    assert np.bincount(query_plan(mask, part_rule="count").part).tolist() == [3, 4, 4]
    assert np.bincount(query_plan(mask).part).tolist() == [4, 3, 4]  # extent
    # with gaps (slices 7, 8 lack the organ): count's chunks are those of the 9 organ slices ...
    mask[7:9] = False
    skip = query_plan(mask, skip_no_organ_slices=True, part_rule="count")
    assert skip.z.tolist() == [3, 4, 5, 6, 9, 10, 11, 12, 13] and skip.part.tolist() == count_parts(9).tolist()
    # ... and a scored slice without the organ takes the nearest organ slice's part (lower one on a tie)
    full = query_plan(mask, z_margin=2, part_rule="count")
    assert full.z.tolist() == list(range(1, 16))
    parts = dict(zip(full.z.tolist(), full.part.tolist(), strict=True))
    assert [parts[z] for z in skip.z.tolist()] == skip.part.tolist()  # organ slices: the same parts
    assert (parts[1], parts[2], parts[7], parts[8], parts[14], parts[15]) == (0, 0, 1, 1, 2, 2)
    tie = np.array([0, 1, 0, 0, 0, 1, 1], dtype=bool)  # C = 3: organ slices 1, 5, 6 get parts 0, 1, 2
    t = query_plan(tie, part_rule="count")
    assert t.z.tolist() == [1, 2, 3, 4, 5, 6] and t.part.tolist() == [0, 0, 0, 1, 1, 2]  # z 3 ties: the lower one
    # score_last_slice=false drops the scan's last slice after the parts are assigned
    end = query_plan(tie, part_rule="count", score_last_slice=False)
    assert end.z.tolist() == [1, 2, 3, 4, 5] and end.part.tolist() == [0, 0, 0, 1, 1]
    assert query_plan(np.zeros(5, dtype=bool), part_rule="count").z.size == 0
    with pytest.raises(ConfigError) as e:
        query_plan(mask, part_rule="chunks")
    _one_line(e.value, "eval.part_rule", "'chunks'")


def test_datamodule_count_rule_on_the_phantom(phantom, tmp_path):
    cfg = _cfg(phantom, tmp_path, "eval.part_rule=count", "eval.skip_no_organ_slices=true", ALL_FOUR)
    dm = FewShotDataModule(cfg)
    dm.setup("test")
    assert dm.test_set is not None and len(dm.test_set.items) == 4
    for it in dm.test_set.items:
        assert it.query_labels.reshape(len(it.z), -1).any(axis=1).all()  # organ slices only
        assert it.part.tolist() == count_parts(len(it.z)).tolist()
    extent = FewShotDataModule(_cfg(phantom, tmp_path, "eval.skip_no_organ_slices=true", ALL_FOUR))
    extent.setup("test")
    assert extent.test_set is not None
    differ = [a.organ for a, b in zip(dm.test_set.items, extent.test_set.items, strict=True)
              if a.part.tolist() != b.part.tolist()]
    assert differ == ["liver"]  # 5 liver slices: count 1/2/2, extent 2/1/2
    default = FewShotDataModule(_cfg(phantom, tmp_path, ALL_FOUR))
    default.setup("test")
    assert default.test_set is not None
    for it in default.test_set.items:
        mask = (default._volume(it.query_id).label == it.label_id).any(axis=(1, 2))
        z, part = _extent_parts(mask, 3, 0, False, True)
        assert (it.z.tolist(), it.part.tolist()) == (z, part)


# -- eval.support_pick ---------------------------------------------------------------------------------------------


def test_support_picks_on_chaos_folds():
    info = get_dataset_info("chaos_t2")
    nxt = [fold_split(info, CHAOS_IDS, f) for f in range(5)]
    assert [(s.query, s.support) for s in nxt] == [(fold_split(info, CHAOS_IDS, f, "next").query,
                                                   fold_split(info, CHAOS_IDS, f, "next").support) for f in range(5)]
    assert (nxt[0].query, nxt[0].support) == (["1", "2", "3", "5"], "8")
    assert (nxt[4].query, nxt[4].support) == (["36", "37", "38", "39"], "1")
    last = [fold_split(info, CHAOS_IDS, f, "group_last") for f in range(5)]
    for f in range(4):  # ADNet: as fsl_med on folds 0-3
        assert (last[f].query, last[f].support) == (nxt[f].query, nxt[f].support)
    assert (last[4].query, last[4].support) == (["1", "36", "37", "38"], "39")
    q2 = fold_split(info, CHAOS_IDS, 0, "group_index:2")  # Q-Net / RPT's supp_idx=2
    assert (q2.query, q2.support) == (["1", "2", "5", "8"], "3")
    assert fold_split(info, CHAOS_IDS, 4, "group_index:2").support == "37"
    assert fold_split(info, CHAOS_IDS, 0, "group_index:0").support == "1"
    for f in range(5):
        group = {*nxt[f].query, nxt[f].support}
        for pick in ("next", "group_last", "group_index:0", "group_index:2", "group_index:4"):
            s = fold_split(info, CHAOS_IDS, f, pick)
            assert {*s.query, s.support} == group and s.support not in s.query and len(s.query) == 4
            assert s.train == nxt[f].train and not set(s.train) & group and len(s.train) == 15
    with pytest.raises(ConfigError) as e:
        fold_split(info, CHAOS_IDS, 0, "group_index:5")
    _one_line(e.value, "eval.support_pick", "chaos_t2", "0..4")
    with pytest.raises(ConfigError) as e:
        fold_split(info, CHAOS_IDS, 0, "group_first")
    _one_line(e.value, "eval.support_pick", "'group_first'")


def test_support_picks_on_sabs_folds():
    info, ids = get_dataset_info("sabs"), [str(i) for i in range(30)]
    s = fold_split(info, ids, 0, "group_index:2")  # Q-Net's SABS groups: 7 scans, fold 4 = 24..29 + 0
    assert (s.query, s.support) == (["0", "1", "3", "4", "5", "6"], "2")
    s = fold_split(info, ids, 4, "group_last")
    assert (s.query, s.support) == (["0", "24", "25", "26", "27", "28"], "29") and len(s.train) == 23
    with pytest.raises(ConfigError) as e:
        fold_split(info, ids, 1, "group_index:7")
    _one_line(e.value, "sabs", "0..6")


@pytest.mark.parametrize("override", ["eval.support_pick=last", "eval.support_pick=group_index:-1",
                                      "eval.part_rule=counted", "data.exclude_rule=every"])
def test_invalid_values_are_one_line_config_errors(phantom, tmp_path, override):
    with pytest.raises(ConfigError) as e:
        _cfg(phantom, tmp_path, override)
    _one_line(e.value, override.split("=")[0])


@pytest.mark.parametrize("pick, needle", [("group_index:5", "group of 5 chaos_t2 scans; N must be 0..4"),
                                          ("group_index:2", "group of 2 chaos_t2 scans (1, 2); N must be 0..1")])
def test_support_pick_beyond_the_group_stops_train_before_anything_is_written(phantom, tmp_path, capsys, pick, needle):
    # group_index:5 exceeds every CHAOS-T2 group (checked with the config); group_index:2 only this 6-scan folder's
    out = tmp_path / "runs"
    rc = main(["train", DEMO, f"data.root={phantom}", f"logging.output_dir={out}", f"data.cache_dir={tmp_path / 'c'}",
               "data.image_size=48", "data.num_workers=0", "trainer.max_steps=1", "trainer.enable_progress_bar=false",
               f"eval.support_pick={pick}"])
    assert rc == 2
    error_line(capsys.readouterr().err, "eval.support_pick", needle)
    assert not out.exists()  # no run folder


def test_support_pick_through_the_datamodule_keeps_the_leakage_guard(phantom, tmp_path):
    picked = FewShotDataModule(_cfg(phantom, tmp_path, "eval.support_pick=group_index:0")).resolve_split()
    assert picked.split is not None and (picked.split.query, picked.split.support) == (["2"], "1")
    base = FewShotDataModule(_cfg(phantom, tmp_path)).resolve_split()
    assert base.split is not None and (base.split.query, base.split.support) == (["1"], "2")
    assert (picked.train_ids, picked.val_ids) == (base.train_ids, base.val_ids) == (["3", "4", "5"], ["6"])
    # a model trained on fold 0 (any pick) never saw fold 0's query or support: evaluation goes ahead
    trained = base.trained_on()
    cfg = _cfg(phantom, tmp_path, "eval.support_pick=group_index:0")
    assert in_sample_scans(cfg, trained, picked, "the model") is None
    # fold 2's group (3, 4, 5) is fold 0's training data: refused, naming the scans, whichever scan is the support
    for pick in ("next", "group_last", "group_index:0", "group_index:1"):
        c2 = _cfg(phantom, tmp_path, "data.fold=2", f"eval.support_pick={pick}")
        dm2 = FewShotDataModule(c2).resolve_split()
        assert dm2.split is not None and {*dm2.split.query, dm2.split.support} == {"3", "4", "5"}
        with pytest.raises(DataError) as e:
            in_sample_scans(c2, trained, dm2, "the model")
        msg = _one_line(e.value, "in-sample")
        assert all(re.search(rf"\b{s}\b", msg) for s in ("3", "4", "5")), msg


# -- real data: method-zoo.md §1's table ----------------------------------------------------------------------------

# excluded labels -> (slices dropped by 'any', by 'all') on the 20 CHAOS-T2 label volumes, 718 slices in all
CHAOS_TABLE = {(1, 4): (463, 272), (2, 3): (324, 261), (1, 2, 3, 4): (558, 88)}


def test_any_all_table_on_real_chaos(chaos):
    listing = scan_files(chaos)
    labels = [np.asarray(read_nifti(listing.paths(s)[1])[0]).transpose(2, 1, 0) for s in listing.scan_ids()]
    assert len(labels) == 20 and sum(lab.shape[0] for lab in labels) == 718
    for group, (n_any, n_all) in CHAOS_TABLE.items():
        assert sum(int(excluded_slices(lab, group, "any").sum()) for lab in labels) == n_any, group
        assert sum(int(excluded_slices(lab, group, "all").sum()) for lab in labels) == n_all, group
