"""``fsl-med protocol``: folds x settings x seeds, four evaluation variants from one checkpoint per run, one report."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from fsl_med.cli import main
from fsl_med.data.phantom import generate_phantom

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small_phantom(tmp_path_factory) -> Path:
    return generate_phantom(tmp_path_factory.mktemp("ph") / "phantom", n_scans=6, size=64, depth=10, seed=0)


def test_protocol_on_phantom_writes_a_complete_report(small_phantom, tmp_path, cache_dir, capsys):
    out = tmp_path / "runs"
    rc = main(["protocol", str(REPO / "experiments" / "protocol_cpu.yaml"), f"data.root={small_phantom}",
               f"data.cache_dir={cache_dir}", f"logging.output_dir={out}", "data.image_size=64", "data.num_workers=0",
               "trainer.max_steps=2", "trainer.val_check_interval=2", "data.episodes_per_epoch=2", "ttt.steps=1",
               "trainer.enable_progress_bar=false", "eval.overlay_slices=2"])
    assert rc == 0
    printed = capsys.readouterr().out
    report_dir = out / "protocol-cpu-protocol" / "version_0"
    assert printed.strip().splitlines()[-1] == str(report_dir / "protocol.json")
    rep = json.loads((report_dir / "protocol.json").read_text())
    assert [r["tag"] for r in rep["runs"]] == ["s1-f0-seed1234", "s2-f0-seed1234-kidneys",
                                               "s2-f0-seed1234-liver-spleen"]
    organs = {"liver", "right_kidney", "left_kidney", "spleen"}
    for s in ("1", "2"):
        agg = rep["settings"][s]
        assert set(agg) == {"plain", "cca", "ttt", "ttt_cca"}
        for v in agg.values():
            assert set(v["dice"]) == organs and all(0 <= d <= 100 for d in v["dice"].values())
            assert v["seconds_per_volume"] > 0 and "hd95" in v
        assert (report_dir / f"dice_bar_setting{s}.png").stat().st_size > 1000
    # Setting 2 trains one model per label group, each tested on its own organs only
    s2 = [r for r in rep["runs"] if r["setting"] == 2]
    assert [sorted(r["organs"]) for r in s2] == [["left_kidney", "right_kidney"], ["liver", "spleen"]]
    assert rep["ttt_seconds_per_slice"] > 0 and rep["encoder"]["weights"] == "none" and rep["seeds"] == [1234]
    md = (report_dir / "protocol.md").read_text()
    for needle in ("## Setting 1", "## Setting 2", "+CCA", "+TTT+CCA", "HD95 (mm)", "±", "Seconds per query volume",
                   "TTT seconds per slice", "vit_tiny_patch14", "weights `none`", "2 training steps"):
        assert needle in md, needle
    rows = list(csv.DictReader((report_dir / "protocol.csv").open()))
    assert {(r["setting"], r["variant"]) for r in rows} == {(s, v) for s in ("1", "2")
                                                           for v in ("plain", "cca", "ttt", "ttt_cca")}
    overlays = sorted((report_dir / "overlays" / "setting1").glob("*.png"))
    assert len(overlays) == 8 and {p.name.split("_q")[0] for p in overlays} == organs
    # each run's own evaluation folder has all variants, HD95 per volume and figures
    res = json.loads(Path(rep["runs"][0]["results"]).read_text())
    assert {v["variant"] for v in res["volumes"]} == {"plain", "cca", "ttt", "ttt_cca"}
    assert (Path(rep["runs"][0]["results"]).parent / "dice_bar.png").is_file()


def test_protocol_config_errors_are_one_line(capsys):
    assert main(["protocol", str(REPO / "experiments" / "protocol_cpu.yaml"), "protocol.folds=[7]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "protocol.folds" in err[0]
    assert main(["protocol", str(REPO / "experiments" / "protocol_cpu.yaml"), "eval.variants=[plain,tta]"]) == 2
    assert "eval.variants" in capsys.readouterr().err
