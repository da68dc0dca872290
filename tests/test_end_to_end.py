"""End to end through the real CLI: train -> checkpoint -> eval on real CHAOS volumes, and the demo."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def fsl_med(*args: str, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "fsl_med", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.slow
def test_train_then_eval_on_real_chaos(chaos_subset, tmp_path, cache_dir, tiny):
    common = [*tiny, f"data.root={chaos_subset}", f"data.cache_dir={cache_dir}", f"logging.output_dir={tmp_path}/runs",
              "name=e2e"]
    cfg = str(REPO / "experiments" / "mri.yaml")
    p = fsl_med("train", cfg, *common, "trainer.max_steps=6", "trainer.val_check_interval=3",
                "data.episodes_per_epoch=4", "trainer.log_every_n_steps=1", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    last = Path(p.stdout.strip().splitlines()[-1])
    assert last.name == "last.ckpt" and last.is_file()
    run = last.parent.parent
    assert run == tmp_path / "runs" / "e2e" / "version_0"
    assert (run / "config.yaml").is_file() and (run / "metrics.csv").is_file()
    assert "trained 6 steps" in p.stdout
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    stored = ckpt["hyper_parameters"]["config"]
    assert stored["data"]["root"] == str(chaos_subset) and stored["model"]["encoder"]["name"] == "vit_tiny_patch14"
    assert ckpt["global_step"] == 6
    metrics = (run / "metrics.csv").read_text()
    assert "val/dice" in metrics and "train/loss" in metrics
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["steps"] == 6 and summary["seconds_per_step_median"] > 0

    p = fsl_med("eval", cfg, *common, f"ckpt={last}", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    res_path = Path(p.stdout.strip().splitlines()[-1])
    assert res_path.name == "results.json" and res_path.parent.parent.name == "e2e-eval"
    res = json.loads(res_path.read_text())
    assert set(res["dice"]) == {"liver", "right_kidney", "left_kidney", "spleen"}
    assert all(0.0 <= v <= 100.0 for v in res["dice"].values())
    assert res["dice_mean"] == pytest.approx(sum(res["dice"].values()) / 4)
    assert res["seed"] == 1234 and res["config"]["data"]["fold"] == 0 and res["global_step"] == 6
    assert res["query_scans"] == ["1"] and res["support_scan"] == "2"
    assert {v["query"] for v in res["volumes"]} == {"1"} and len(res["volumes"]) == 8  # 4 organs x plain, cca
    assert set(res["variants"]) == {"plain", "cca"} and res["variants"]["plain"]["dice"] == res["dice"]
    assert all(v["hd95"] is None or v["hd95"] >= 0 for v in res["volumes"])
    assert (res_path.parent / "dice_bar.png").is_file() and len(list((res_path.parent / "overlays").glob("*.png"))) == 12
    for name in ("results.csv", "results.md", "config.yaml"):
        assert (res_path.parent / name).is_file()
    # results.csv starts with the run's name (the first column of ablation.csv) and times every row
    rows = list(csv.DictReader((res_path.parent / "results.csv").open()))
    assert next(iter(rows[0])) == "run" and {r["run"] for r in rows} == {"e2e"}
    assert len(rows) == 2 * 5 and all(float(r["seconds_per_volume"]) > 0 for r in rows)  # 2 variants x (4 organs, mean)
    for r in rows:
        summ = res["variants"][r["variant"]]
        dice = summ["dice_mean"] if r["organ"] == "mean" else summ["dice"][r["organ"]]
        assert float(r["dice"]) == pytest.approx(dice, abs=1e-4)
        if r["organ"] != "mean":
            assert float(r["seconds_per_volume"]) == pytest.approx(
                summ["seconds_per_volume_by_organ"][r["organ"]], abs=1e-4)
    assert "Liver" in (res_path.parent / "results.md").read_text()

    # 'latest' finds the newest last.ckpt of the run name
    p = fsl_med("eval", cfg, *common, "ckpt=latest", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(Path(p.stdout.strip().splitlines()[-1]).read_text())["dice"] == res["dice"]

    # a checkpoint evaluated with another encoder is a one-line error
    p = fsl_med("eval", cfg, *common, f"ckpt={last}", "model.encoder.finetune=lora", cwd=tmp_path)
    assert p.returncode == 2 and "model.encoder.finetune" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.slow
@pytest.mark.parametrize("fmt,config", [("sabs-raw", "ct.yaml"), ("chaos-zip", "mri.yaml")])
def test_prepare_raw_download_then_train_and_eval(fmt, config, tmp_path, cache_dir, tiny):
    """The CT path and the CHAOS path from an official-format download: phantom -> prepare -> train -> eval."""
    p = fsl_med("phantom", "--format", fmt, "--out", str(tmp_path / "raw"), "--n-scans", "4", "--size", "160",
                "--depth", "10", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    src = Path(p.stdout.strip().splitlines()[-1])
    kind = "sabs" if fmt == "sabs-raw" else "chaos"
    p = fsl_med("prepare", kind, "--src", str(src), "--out", str(tmp_path / "prepared"), "--cache-dir", str(cache_dir),
                "--no-progress", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "prepared 4 volume(s)" in p.stdout
    common = [*tiny, f"data.root={tmp_path / 'prepared'}", f"data.cache_dir={cache_dir}",
              f"logging.output_dir={tmp_path}/runs"]
    cfg = str(REPO / "experiments" / config)
    p = fsl_med("train", cfg, *common, "trainer.max_steps=4", "trainer.val_check_interval=2",
                "data.episodes_per_epoch=4", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    p = fsl_med("eval", cfg, *common, "ckpt=latest", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(Path(p.stdout.strip().splitlines()[-1]).read_text())
    assert res["config"]["data"]["dataset"] == ("sabs" if kind == "sabs" else "chaos_t2")
    assert set(res["dice"]) == {"liver", "right_kidney", "left_kidney", "spleen"}
    for organ in ("Liver", "Spleen", "Left kidney", "Right kidney"):
        assert organ in p.stdout
