"""``fsl-med compare``: heads x encoders through the protocol's jobs on the same episodes, one report; its bad input."""

from __future__ import annotations

import contextlib
import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import error_line
from omegaconf import OmegaConf

from fsl_med.cli import main
from fsl_med.config import HEAD_DEFAULTS, load_config
from fsl_med.data.datamodule import FewShotDataModule
from fsl_med.data.phantom import generate_phantom

REPO = Path(__file__).resolve().parents[1]
PRESET = str(REPO / "experiments" / "compare_cpu.yaml")
ORGANS = ["liver", "right_kidney", "left_kidney", "spleen"]
REPORTED = "compare.reported=[{head: panet, setting: 1, dice: 12.34, source: 'test fixture, not a paper'}]"


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    return generate_phantom(tmp_path_factory.mktemp("cmp") / "phantom", n_scans=6, size=64, depth=10, seed=0)


def _args(phantom: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    return ["compare", PRESET, f"data.root={phantom}", f"data.cache_dir={cache}", f"logging.output_dir={out}",
            "data.image_size=64", "data.num_workers=0", "trainer.max_steps=2", "data.episodes_per_epoch=2",
            "ttt.steps=1", "trainer.enable_progress_bar=false", "eval.overlay_slices=0", *extra]


@pytest.fixture(scope="module")
def grid(phantom, tmp_path_factory) -> tuple[Path, dict, str]:
    """2 heads x 2 tiny encoders, Settings 1 and 2; the second encoder trains 1 step and runs no TTT (its override);
    the preset's resnet101 override stays in the config and is ignored (not compared)."""
    tmp = tmp_path_factory.mktemp("cmp-run")
    out = tmp / "runs"
    argv = _args(phantom, out, tmp_path_factory.getbasetemp() / "sp_cache", "compare.heads=[panet,adnet]",
                 "compare.encoders=[vit_tiny_patch14,vit_tiny_patch14_reg]",
                 "compare.encoder_overrides={vit_tiny_patch14_reg: [trainer.max_steps=1, 'protocol.variants=[plain,cca]']}",
                 REPORTED, "compare.paper_protocol_encoders=[]")  # no paper-protocol twins (tested below)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(argv) == 0
    report_dir = out / "compare-cpu-compare" / "version_0"
    assert buf.getvalue().strip().splitlines()[-1] == str(report_dir / "compare.json")
    return report_dir, json.loads((report_dir / "compare.json").read_text()), (report_dir / "compare.md").read_text()


@pytest.mark.slow
def test_rows_and_cells_come_from_the_runs(grid) -> None:
    report_dir, rep, md = grid
    rows = {(r["head"], r["encoder"]): r for r in rep["rows"]}
    assert list(rows) == [("panet", "vit_tiny_patch14"), ("panet", "vit_tiny_patch14_reg"),
                          ("adnet", "vit_tiny_patch14"), ("adnet", "vit_tiny_patch14_reg")]
    assert rep["variants"] == ["plain", "cca", "ttt", "ttt_cca"] and rep["folds"] == [0] and rep["seeds"] == [1234]
    csv_rows = list(csv.DictReader((report_dir / "compare.csv").open()))
    for (head, enc), row in rows.items():
        tiny = enc == "vit_tiny_patch14"
        assert row["variants"] == (["plain", "cca", "ttt", "ttt_cca"] if tiny else ["plain", "cca"])
        assert row["steps_trained"] == [2 if tiny else 1] and row["weights"] == "none"
        assert row["encoder_overrides"] == ([] if tiny else ["trainer.max_steps=1", "protocol.variants=[plain,cca]"])
        assert [r["tag"].split("-", 2)[-1] for r in row["runs"]] == [
            "s1-f0-seed1234", "s2-f0-seed1234-kidneys", "s2-f0-seed1234-liver-spleen"]
        assert row["seconds_per_step"] > 0 and row["seconds_per_volume"] > 0
        for s in (1, 2):
            results = [json.loads(Path(r["results"]).read_text()) for r in row["runs"] if r["setting"] == s]
            for v in row["variants"]:
                # one fold and seed: each organ's Dice is the one run that tested it, the row's mean their mean
                dice = {o: d for res in results for o, d in res["variants"][v]["dice"].items()}
                assert set(dice) == set(ORGANS)
                agg = row["settings"][str(s)][v]
                assert agg["dice"] == pytest.approx(dice) and agg["dice_mean"] == pytest.approx(np.mean(list(dice.values())))
                assert agg["dice_mean_std"] == 0.0
                assert f"{agg['dice_mean']:.2f} ± 0.00" in md
                mean_csv = [r for r in csv_rows if (r["head"], r["encoder"], r["setting"], r["variant"], r["organ"])
                            == (head, enc, str(s), v, "mean")]
                assert len(mean_csv) == 1 and float(mean_csv[0]["dice"]) == pytest.approx(agg["dice_mean"], abs=1e-4)
        # every run trained with its own head's defaults (the preset's base head is alp)
        for r in row["runs"]:
            cfg = load_config(Path(r["train_dir"]) / "config.yaml")
            assert cfg.model.head.name == head and cfg.model.encoder.name == enc
            assert list(cfg.loss.ce_weights) == HEAD_DEFAULTS[head]["loss.ce_weights"]
            assert cfg.model.mask_pooling == HEAD_DEFAULTS[head]["model.mask_pooling"]
    # the rows without TTT show "–" there, and the report says why
    line = next(ln for ln in md.splitlines() if ln.startswith("| panet | `vit_tiny_patch14_reg`"))
    assert line.count("| – |") >= 2
    assert "panet / vit_tiny_patch14_reg: +TTT, +TTT+CCA not run" in md and "compare.encoder_overrides[vit_tiny_patch14_reg]" in md
    for needle in ("S1 plain", "S2 +TTT+CCA", "S1 *reported by its paper*", "s/step", "s/volume", "## Setting 2, +CCA",
                   "weights", "`none`", "folds [0], seeds [1234]"):
        assert needle in md, needle
    assert {(r["setting"], r["variant"]) for r in csv_rows} == {(s, v) for s in "12" for v in rep["variants"]}
    assert (report_dir / "compare_bar.png").stat().st_size > 1000


@pytest.mark.slow
def test_same_seed_gives_the_same_episodes_across_rows(grid) -> None:
    """The rows' runs of one job draw identical training batches: same data section and seed, and the same episodes
    (the support-mask check of an episode is head-independent for nearest and adjoint pooling)."""
    _, rep, md = grid
    by_tag: dict[str, list[Path]] = {}
    for row in rep["rows"]:
        for r in row["runs"]:
            by_tag.setdefault(r["tag"].split("-", 2)[-1], []).append(Path(r["train_dir"]) / "config.yaml")
    for tag, paths in by_tag.items():
        assert len(paths) == 4
        cfgs = [load_config(p) for p in paths]
        assert all(c.data == cfgs[0].data and c.seed == cfgs[0].seed for c in cfgs), tag
        batches = []
        for c in cfgs:
            dm = FewShotDataModule(c)
            dm.prepare_data()
            dm.setup("fit")
            batches.append(list(dm.episode_loader(total_steps=2)))
        for other in batches[1:]:
            for a, b in zip(batches[0], other, strict=True):
                assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), tag
    assert "Training episodes: the same for every row (mask pooling adjoint)." in md


@pytest.mark.slow
def test_a_row_run_is_fsl_med_run_of_its_job_config(grid, tmp_path, capsys) -> None:
    """Each job is exactly ``fsl-med run`` of its config: the model's initial weights come from the job's seed, not from
    the rows trained before it (the adnet row trains after three others)."""
    _, rep, _ = grid
    run = next(r for row in rep["rows"] if (row["head"], row["encoder"]) == ("adnet", "vit_tiny_patch14")
               for r in row["runs"] if r["setting"] == 1)
    cfg = Path(run["train_dir"]) / "config.yaml"
    assert main(["run", str(cfg), f"logging.output_dir={tmp_path}", "name=direct"]) == 0
    capsys.readouterr()
    direct = json.loads((tmp_path / "direct-eval" / "version_0" / "results.json").read_text())
    ours = json.loads(Path(run["results"]).read_text())
    strip = [[{k: v for k, v in x.items() if k != "seconds"} for x in res["volumes"]] for res in (direct, ours)]
    assert strip[0] == strip[1] and len(strip[0]) == 16  # 4 organs x 4 variants on the phantom's one query scan


@pytest.mark.slow
def test_reported_column_holds_only_configured_numbers_with_their_source(grid) -> None:
    report_dir, rep, md = grid
    assert rep["reported"] == [{"head": "panet", "setting": 1, "dice": 12.34, "source": "test fixture, not a paper",
                                "encoder": None}]
    for line in md.splitlines():
        if line.startswith("| panet | `vit_tiny"):  # both encoders' panet rows: Setting 1 only, in italics
            assert line.count("*12.34*") == 1
        elif line.startswith("| adnet | `vit_tiny"):
            assert "12.34" not in line
    assert "test fixture, not a paper" in md and "none verified" not in md
    assert "12.34" not in (report_dir / "compare.csv").read_text()  # never mixed with the re-runs


@pytest.mark.slow
def test_without_reported_numbers_the_column_is_empty(phantom, tmp_path, cache_dir, capsys) -> None:
    out = tmp_path / "runs"
    assert main(_args(phantom, out, cache_dir, "compare.heads=[alp]", "compare.encoders=[]",
                      "model.encoder.name=vit_tiny_patch14", "protocol.settings=[1]", "protocol.variants=[plain]")) == 0
    md = capsys.readouterr().out
    rep = json.loads((out / "compare-cpu-compare" / "version_0" / "compare.json").read_text())
    assert rep["reported"] == [] and [(r["head"], r["encoder"]) for r in rep["rows"]] == [("alp", "vit_tiny_patch14")]
    line = next(ln for ln in md.splitlines() if ln.startswith("| alp |"))
    assert line.split("|")[6].strip() == "–"  # head, encoder, weights, steps, S1 plain, S1 reported
    assert "none verified" in md and "compare.reported" in md


@pytest.mark.parametrize("extra,needles", [
    (["compare.heads=[alp,adnett]"], ["'compare.heads'", "unknown head 'adnett'", "did you mean 'adnet'?",
                                      "(registered: alp, panet, adnet, qnet, rpt)"]),
    (["compare.heads=[]"], ["'compare.heads'", "is empty"]),
    (["compare.encoders=[vit_tiny_patch14,resnet101]"], ["'compare.encoders'", "unknown encoder 'resnet101'",
                                                        "did you mean 'resnet101_qnet'?"]),
    (["compare.encoders=[vit_tiny_patch14,vit_tiny_patch14]"], ["'compare.encoders'", "duplicates"]),
    (["model.encoder.finetune=frozen", "compare.heads=[adnet,alp]", "compare.encoders=[vit_tiny_patch14]"],
     ["head 'alp' with encoder 'vit_tiny_patch14' has nothing to train", "finetune=frozen"]),
    (["compare.reported=[{head: alp, setting: 1, dice: 70.0}]"], ["'compare.reported[0].source'", "is not set"]),
    (["compare.reported=[{head: alp, setting: 1, dice: 170.0, source: x}]"], ["'compare.reported[0].dice'", "0..100"]),
    (["compare.heads=[alp]", "compare.reported=[{head: adnet, setting: 1, dice: 70.0, source: x}]"],
     ["'compare.reported[0].head'", "'adnet' is not compared"]),
    (["protocol.settings=[1]", "compare.reported=[{head: alp, setting: 2, dice: 70.0, source: x}]"],
     ["'compare.reported[0].setting'", "Setting 2 is not run"]),
    (["compare.reported=[{head: alp, setting: 1, dice: 70.0, source: x}, "
      "{head: alp, setting: 1, dice: 71.0, source: y, encoder: vit_tiny_patch14}]"],
     ["'compare.reported[1]'", "second number for head alp, encoder vit_tiny_patch14, Setting 1"]),
    (["compare.reported=[{head: alp, setting: 1, dice: 70.0, source: x, encoder: dinov2_vits14}]"],
     ["'compare.reported[0].encoder'", "'dinov2_vits14' is not compared"]),
    (["compare.encoder_overrides={vit_tiny_patch14: [data.fold=1]}"],
     ["compare.encoder_overrides[vit_tiny_patch14] override 'data.fold=1'", "changes data"]),
    (["compare.encoder_overrides={vit_tiny_patch14: [trainer.max_stepz=3]}"],
     ["compare.encoder_overrides[vit_tiny_patch14] override 'trainer.max_stepz=3'", "unknown config key"]),
    (["compare.encoder_overrides={vit_tiny_patch14: [optim.lr=-1]}"],
     ["compare: head 'alp', encoder 'vit_tiny_patch14' with compare.encoder_overrides[vit_tiny_patch14]",
      "'optim.lr': must be > 0"]),
    (["compare.encoder_overrides={vit_tiny: [trainer.max_steps=3]}"],
     ["'compare.encoder_overrides'", "unknown encoder 'vit_tiny'"]),
    (["compare.heads=[qnet]", "compare.encoders=[resnet101_deeplabv3]"],
     ["compare: no head x encoder pair can run", "qnet / resnet101_deeplabv3", "needs feature map(s) 'aux'"]),
    (["compare.heads=[adnet]", "compare.paper_protocol={adnet: nope_reference.yaml}"],
     ["compare.paper_protocol.adnet", "config file not found", "nope_reference.yaml"]),
    (["compare.paper_protocol={adnett: adnet_reference.yaml}"], ["'compare.paper_protocol.adnett'", "unknown head"]),
])
def test_bad_input_is_one_line_and_writes_nothing(phantom, tmp_path, cache_dir, capsys, extra, needles) -> None:
    out = tmp_path / "runs"
    base = ["compare.encoders=[vit_tiny_patch14,resnet101_deeplabv3]"]
    assert main([*_args(phantom, out, cache_dir), *base, *extra]) == 2
    error_line(capsys.readouterr().err, *needles)
    assert not out.exists()


def test_compare_needs_a_config(capsys) -> None:
    assert main(["compare", "compare.heads=[alp]"]) == 2
    error_line(capsys.readouterr().err, "compare needs a config")


def test_pairs_an_encoder_cannot_serve_are_skipped_with_the_reason(phantom) -> None:
    from fsl_med.compare import compare_pairs, skip_reason

    base, pairs = compare_pairs(PRESET, [f"data.root={phantom}", "data.image_size=64", "compare.heads=[qnet,rpt]",
                                         "compare.encoders=[vit_tiny_patch14,resnet101_deeplabv3]",
                                         "compare.paper_protocol_encoders=[]"])
    assert [p.label for p in pairs] == ["qnet / vit_tiny_patch14", "rpt / vit_tiny_patch14", "rpt / resnet101_deeplabv3"]
    assert skip_reason("qnet", "resnet101_deeplabv3") == (
        "the qnet head needs feature map(s) 'aux', which resnet101_deeplabv3 does not have (it has 'out')")
    assert skip_reason("rpt", "resnet101_deeplabv3") is None and skip_reason("qnet", "resnet101_qnet") is None


def test_paper_protocol_twins_take_only_the_protocol_fields_of_the_preset(phantom) -> None:
    """A twin row is its row with config.PROTOCOL_KEYS from the head's paper preset: the preset's recipe (encoder,
    weights, optimiser, steps, seed) does not come along; heads without a preset, and encoders not listed, get none."""
    from fsl_med.compare import compare_pairs
    from fsl_med.config import PROTOCOL_KEYS

    over = [f"data.root={phantom}", "data.image_size=64", "compare.heads=[alp,adnet,rpt]",
            "compare.encoders=[vit_tiny_patch14,vit_tiny_patch14_reg]"]
    base, pairs = compare_pairs(PRESET, over)
    twins = [p for p in pairs if p.paper]
    assert [p.label for p in twins] == ["adnet / vit_tiny_patch14 (paper protocol)",
                                        "rpt / vit_tiny_patch14 (paper protocol)"]
    for twin in twins:
        row = next(p for p in pairs if not p.paper and (p.head, p.encoder) == (twin.head, twin.encoder))
        preset = load_config(REPO / "experiments" / f"{twin.head}_reference.yaml", [f"data.root={phantom}"])
        for key in PROTOCOL_KEYS:
            assert OmegaConf.select(twin.cfg, key) == OmegaConf.select(preset, key), key
        differ = {k for k in ("data.episodes", "eval.part_rule", "eval.support_pick", "eval.skip_no_organ_slices")
                  if OmegaConf.select(twin.cfg, k) != OmegaConf.select(row.cfg, k)}
        assert differ == {"data.episodes", "eval.part_rule", "eval.support_pick", "eval.skip_no_organ_slices"}
        for key in ("model", "optim", "trainer", "seed", "loss", "ttt", "protocol"):  # the row's recipe and budget
            assert OmegaConf.select(twin.cfg, key) == OmegaConf.select(row.cfg, key), key
        assert twin.slug.endswith("-paper") and twin.cfg.name == f"{row.cfg.name}-paper"
    rpt = next(p for p in twins if p.head == "rpt")
    assert rpt.cfg.data.exclude_rule == "all" and list(rpt.cfg.data.exclude_labels) == [1, 2, 3, 4]
    assert rpt.cfg.eval.support_pick == "group_index:2" and rpt.cfg.data.num_val_scans == 0


@pytest.mark.slow
def test_paper_protocol_twin_runs_and_fills_its_column(phantom, tmp_path, cache_dir, capsys) -> None:
    """ADNet on the tiny ViT under fsl_med's protocol and under its paper's (3D supervoxel episodes, count parts,
    organ-only slices, the group's last scan as support): two rows of runs, one line in the main table with both."""
    out = tmp_path / "runs"
    assert main(_args(phantom, out, cache_dir, "compare.heads=[adnet]", "compare.encoders=[vit_tiny_patch14]",
                      "protocol.settings=[1]", "protocol.variants=[plain,cca]", "data.supervoxel.min_size=50")) == 0
    md = capsys.readouterr().out
    rep = json.loads((out / "compare-cpu-compare" / "version_0" / "compare.json").read_text())
    rows = {r["label"]: r for r in rep["rows"]}
    assert list(rows) == ["adnet / vit_tiny_patch14", "adnet / vit_tiny_patch14 (paper protocol)"]
    twin = rows["adnet / vit_tiny_patch14 (paper protocol)"]
    assert Path(twin["paper_protocol"]).name == "adnet_reference.yaml" and rows["adnet / vit_tiny_patch14"]["paper_protocol"] is None
    run = twin["runs"][0]
    cfg = load_config(Path(run["train_dir"]) / "config.yaml")
    assert (cfg.data.episodes, cfg.eval.part_rule, cfg.eval.support_pick, cfg.eval.skip_no_organ_slices) == (
        "supervoxel3d", "count", "group_last", True)
    # the paper's protocol wins over the row's setting of a protocol field (the override's min_size 50)
    assert (cfg.data.supervoxel.size_rule, cfg.data.supervoxel.min_size) == ("first", 5000)
    line = next(ln for ln in md.splitlines() if ln.startswith("| adnet | `vit_tiny_patch14`"))
    plain = twin["settings"]["1"]["plain"]["dice_mean"]
    assert f"{plain:.2f} ± 0.00 (plain)" in line and "S1 paper's protocol" in md
    assert not any(ln.startswith("| adnet | `vit_tiny_patch14` (paper") for ln in md.splitlines())
    assert "adnet_reference.yaml" in md and "what the protocol alone changes" in md
