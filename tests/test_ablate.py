"""``fsl-med ablate``: a grid of trained, untrained and reused rows evaluated with the variants, one report."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from fsl_med.cli import main
from fsl_med.data.phantom import generate_phantom

REPO = Path(__file__).resolve().parents[1]
GRID = [
    "ablation.runs=[{name: full}, {name: frozen, overrides: [model.encoder.finetune=frozen], variants: [plain, cca]},"
    " {name: full-3shot, reuse: full, overrides: [shots=3]},"
    " {name: lora-3slice, overrides: [model.encoder.finetune=lora, data.three_slices=true]},"
    " {name: resnet101, overrides: [model.encoder.name=resnet101_deeplabv3], variants: [plain]}]",
]


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    return generate_phantom(tmp_path_factory.mktemp("abl") / "phantom", n_scans=7, size=64, depth=10, seed=1)


def _args(phantom: Path, out: Path, cache_dir: Path) -> list[str]:
    return ["ablate", str(REPO / "experiments" / "ablation_cpu.yaml"), f"data.root={phantom}",
            f"data.cache_dir={cache_dir}", f"logging.output_dir={out}", "data.image_size=64", "data.num_workers=0",
            "model.encoder.name=vit_tiny_patch14", "trainer.max_steps=2", "data.episodes_per_epoch=2", "ttt.steps=1",
            "trainer.enable_progress_bar=false", "data.test_organs=[liver,spleen]"]


def test_ablation_grid_writes_one_report(phantom, tmp_path, cache_dir, capsys) -> None:
    out = tmp_path / "runs"
    assert main([*_args(phantom, out, cache_dir), *GRID]) == 0
    report_dir = out / "ablation-cpu-ablation" / "version_0"
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(report_dir / "ablation.json")
    rep = json.loads((report_dir / "ablation.json").read_text())
    runs = {r["name"]: r for r in rep["runs"]}
    assert list(runs) == ["full", "frozen", "full-3shot", "lora-3slice", "resnet101"]
    assert runs["full"]["trained"] and runs["full"]["steps"] == 2 and Path(runs["full"]["checkpoint"]).is_file()
    assert not runs["frozen"]["trained"] and runs["frozen"]["steps"] == 0 and runs["frozen"]["checkpoint"] is None
    assert runs["full-3shot"]["reuse"] == "full" and runs["full-3shot"]["checkpoint"] == runs["full"]["checkpoint"]
    assert runs["full-3shot"]["shots"] == 3 and runs["lora-3slice"]["three_slices"]
    assert runs["lora-3slice"]["finetune"] == "lora r=4" and runs["resnet101"]["encoder"] == "resnet101_deeplabv3"
    assert set(runs["full"]["dice_mean"]) == {"plain", "cca", "ttt", "ttt_cca"}
    assert set(runs["frozen"]["dice_mean"]) == {"plain", "cca"} and set(runs["resnet101"]["dice_mean"]) == {"plain"}
    for r in runs.values():
        assert all(0 <= d <= 100 for d in r["dice_mean"].values())
    # the 3-shot row evaluated 3 support scans, the others one
    res3 = json.loads(Path(runs["full-3shot"]["results_path"]).read_text())
    res1 = json.loads(Path(runs["full"]["results_path"]).read_text())
    # the reuse row is exactly a 3-shot evaluation of the 'full' checkpoint, the 'full' row a 1-shot one
    for shots, res in ((3, res3), (1, res1)):
        assert main(["eval", *_args(phantom, tmp_path / "direct", cache_dir)[1:], f"ckpt={runs['full']['checkpoint']}",
                     f"shots={shots}", "eval.variants=[plain,cca,ttt,ttt_cca]", f"name=direct{shots}"]) == 0
        direct = json.loads(next((tmp_path / "direct").glob(f"direct{shots}-eval/version_0/results.json")).read_text())
        strip = [{k: v for k, v in x.items() if k != "seconds"} for x in direct["volumes"]]
        assert strip == [{k: v for k, v in x.items() if k != "seconds"} for x in res["volumes"]], shots
    assert [(v["tp"], v["fp"], v["fn"]) for v in res3["volumes"]] != [(v["tp"], v["fp"], v["fn"]) for v in res1["volumes"]]
    capsys.readouterr()
    md = (report_dir / "ablation.md").read_text()
    for needle in ("| full | `vit_tiny_patch14`", "(untrained)", "2 (= full)", "3 (scans)", "lora r=4", "+TTT+CCA",
                   "HD95 (mm)", "resnet101_deeplabv3", "fold 0, Setting 1, seed 1234", "TTT: 1 steps", "| – |"):
        assert needle in md, needle
    rows = list(csv.DictReader((report_dir / "ablation.csv").open()))
    assert {(r["run"], r["variant"]) for r in rows if r["organ"] == "mean"} == {
        (n, v) for n, r in runs.items() for v in r["dice_mean"]}
    assert all(float(r["seconds_per_volume"]) > 0 for r in rows)  # organ rows too: their volumes' mean
    assert (report_dir / "dice_bar.png").stat().st_size > 1000


@pytest.mark.parametrize("grid,message", [
    ("ablation.runs=[]", "'ablation.runs' is empty"),
    ("ablation.runs=[{name: a}, {name: a}]", "duplicate run name 'a'"),
    ("ablation.runs=[{name: a, reuse: b}, {name: b}]", "'b' is not an earlier run"),
    ("ablation.runs=[{name: a}, {name: b, reuse: a, overrides: [model.encoder.adapter=conv1]}]",
     "changes model of 'a'"),
    ("ablation.runs=[{name: a, overrides: [model.encoder.nme=x]}]",
     r"ablation.runs\[0\] \(a\) override 'model.encoder.nme=x': unknown config key"),
    ("ablation.runs=[{name: a, variants: [plain, best]}]", "ablation.runs\\[0\\].variants"),
])
def test_ablation_config_errors_are_one_line(phantom, tmp_path, cache_dir, capsys, grid, message) -> None:
    import re

    assert main([*_args(phantom, tmp_path / "runs", cache_dir), grid]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(message, err[0]), err
    assert not list((tmp_path / "runs").rglob("*.ckpt"))  # nothing trained before the grid was checked
