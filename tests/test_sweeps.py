"""W&B sweep files: valid sweep documents whose parameters are config keys of the right type, whose metric is
logged, and whose command runs (one agent-style invocation, offline, no login)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fsl_med.config import load_config
from fsl_med.data.phantom import generate_phantom
from fsl_med.evaluation.scoring import logged_dice_metrics

REPO = Path(__file__).resolve().parents[1]
SWEEPS = sorted((REPO / "experiments" / "sweeps").glob("*.yaml"))


def _command_parts(sweep: dict) -> tuple[Path, list[str]]:
    """The config file and the fixed key=value overrides of a sweep's command."""
    cmd = sweep["command"]
    assert cmd[:3] == ["${env}", "fsl-med", "run"] and cmd[-1] == "${args_no_hyphens}"
    config = REPO / cmd[3]
    fixed = [c for c in cmd[4:-1] if "=" in c]
    assert len(fixed) == len(cmd[4:-1])
    return config, fixed


def _values(spec: dict) -> list:
    if "values" in spec:
        return list(spec["values"])
    if "value" in spec:
        return [spec["value"]]
    return [spec["min"], spec["max"]]


def test_there_are_ct_and_mri_sweeps():
    assert {p.stem for p in SWEEPS} >= {"ct", "mri"}


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_sweep_parameters_are_valid_config_keys_and_the_metric_is_logged(path):
    sweep = yaml.safe_load(path.read_text())
    assert sweep["method"] in ("grid", "random", "bayes") and sweep["metric"]["goal"] in ("maximize", "minimize")
    config, fixed = _command_parts(sweep)
    assert config.is_file()
    cfg = load_config(config, fixed)
    assert sweep["metric"]["name"] in logged_dice_metrics(cfg)
    assert {"optim.lr", "model.encoder.lora_rank", "ttt.steps", "eval.cca_mode"} <= set(sweep["parameters"])
    for key, spec in sweep["parameters"].items():
        for value in _values(spec):
            got = load_config(config, [*fixed, f"{key}={value}"])  # unknown key / wrong type / range -> error
            node = got
            for part in key.split("."):
                node = node[part]
            assert node == value or (isinstance(value, float) and math.isclose(node, value)), (key, value, node)


def test_agent_style_invocation_runs_offline(tmp_path):
    """What `wandb agent` executes: ${env} dropped, ${args_no_hyphens} replaced by sampled key=value pairs."""
    sweep = yaml.safe_load((REPO / "experiments" / "sweeps" / "mri.yaml").read_text())
    sampled = [f"{k}={_values(spec)[0]}" for k, spec in sweep["parameters"].items()]
    root = generate_phantom(tmp_path / "ph", n_scans=6, size=64, depth=10, seed=0)
    tiny = [f"data.root={root}", "data.image_size=64", "data.num_workers=0", "model.encoder.name=vit_tiny_patch14",
            "model.encoder.weights=none", "trainer.max_steps=2", "trainer.val_check_interval=2",
            "data.episodes_per_epoch=2", f"logging.output_dir={tmp_path / 'runs'}", "trainer.enable_progress_bar=false",
            f"data.cache_dir={tmp_path / 'cache'}"]
    cmd = [sys.executable, "-m", "fsl_med", *sweep["command"][2:-1], *tiny, *sampled]
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB")}
    env.update(HOME=str(tmp_path), PYTHONWARNINGS="ignore")  # no API key, no ~/.netrc: must go offline, not prompt
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "logging offline" in p.stderr
    res = json.loads(Path(p.stdout.strip().splitlines()[-1]).read_text())
    assert set(res["variants"]) == {"plain", "cca", "ttt", "ttt_cca"}
    assert res["config"]["model"]["encoder"]["lora_rank"] == sweep["parameters"]["model.encoder.lora_rank"]["values"][0]
    offline = list((tmp_path / "runs").rglob("offline-run-*"))
    assert offline, "no offline W&B run was written"
