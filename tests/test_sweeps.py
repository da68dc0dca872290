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


# -- `fsl-med sweep` checks the sweep file before the W&B account (issue 28) ------------------------------------

def _mri_sweep() -> dict:
    return yaml.safe_load((REPO / "experiments" / "sweeps" / "mri.yaml").read_text())


def _edit(**changes) -> dict:
    """The MRI sweep with top-level keys replaced (value None: removed)."""
    doc = _mri_sweep()
    for k, v in changes.items():
        if v is None:
            doc.pop(k, None)
        else:
            doc[k] = v
    return doc


def _with_param(key: str, spec) -> dict:
    doc = _mri_sweep()
    doc["parameters"][key] = spec
    return doc


def _with_command(*middle: str, last: str = "${args_no_hyphens}") -> dict:
    return _edit(command=["${env}", "fsl-med", "run", *middle, last])


BROKEN_SWEEPS = {
    "yaml_syntax": ("method: random\nparameters: {optim.lr: {values: [1, 2}\n", "line 2 is not valid YAML"),
    "empty": ("", "is empty"),
    "a_list": ("- method: random\n- parameters: {}\n", "is a YAML list, expected a mapping of sweep keys"),
    "a_string": ("just words\n", "is a YAML string, expected a mapping"),
    "not_utf8": (b"method: random\nname: \xff\xfe\n", "not UTF-8 text"),
    "unknown_key": (_edit(methd="random", method=None), "unknown top-level key(s) 'methd' (did you mean 'method'?)"),
    "no_method": (_edit(method=None), "no 'method' (one of bayes, random, grid, custom)"),
    "bad_method": (_edit(method="hyperband"), "method 'hyperband' is not one of bayes, random, grid, custom"),
    "no_command_no_program": (_edit(command=None, program=None), "neither 'command' nor 'program'"),
    "command_not_a_list": (_edit(command="fsl-med run experiments/mri.yaml"), "'command' must be a non-empty list"),
    "program_macro_without_program": (_edit(program=None, command=["${env}", "${program}", "${args_no_hyphens}"]),
                                      "uses ${program} but there is no 'program'"),
    "no_parameters": (_edit(parameters=None), "no 'parameters'"),
    "parameters_a_list": (_edit(parameters=["optim.lr", "ttt.steps"]), "'parameters' must be a non-empty mapping"),
    "parameter_a_list": (_with_param("optim.lr", [0.1, 0.2]), "parameter 'optim.lr' must be a mapping"),
    "parameter_unknown_spec_key": (_with_param("ttt.steps", {"vals": [1, 2]}), "parameter 'ttt.steps' has unknown key"),
    "parameter_bad_distribution": (_with_param("optim.lr", {"distribution": "loguniform", "min": 0.1, "max": 1}),
                                   "distribution 'loguniform' is not one of"),
    "parameter_min_above_max": (_with_param("optim.lr", {"min": 0.1, "max": 0.01}), "min 0.1 is larger than max 0.01"),
    "parameter_not_a_config_key": (_with_param("optim.lrr", {"values": [0.1]}),
                                   "parameter 'optim.lrr' is not a config key of experiments/mri.yaml"),
    "parameter_bad_value": (_with_param("model.encoder.lora_rank", {"values": [4, "four"]}),
                            "parameter 'model.encoder.lora_rank' value 'four'"),
    "parameter_out_of_range": (_with_param("eval.cca_mode", {"values": ["2d", "4d"]}),
                               "parameter 'eval.cca_mode' value '4d'"),
    "missing_experiment_config": (_with_command("experiments/nope.yaml"),
                                  "the command's config file experiments/nope.yaml does not exist"),
    "bad_fixed_override": (_with_command("experiments/mri.yaml", "eval.variants=[plain,best]"),
                           "the command's config experiments/mri.yaml with its overrides"),
    "hyphenated_args": (_with_command("experiments/mri.yaml", last="${args}"),
                        "passes the parameters to fsl-med as ${args}"),
    "metric_without_name": (_edit(metric={"goal": "maximize"}), "'metric' must be a mapping with a 'name'"),
    "metric_not_logged": (_with_command("experiments/mri.yaml", "eval.variants=[plain]"),
                          "metric 'test/dice_ttt_cca' is not logged by this command"),
}


@pytest.fixture
def no_wandb_account(tmp_path, monkeypatch):
    """No W&B credentials (no WANDB_* variables, an empty HOME, no netrc); the repository as working folder."""
    for k in [k for k in os.environ if k.startswith("WANDB") or k == "NETRC"]:
        monkeypatch.delenv(k)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(REPO)
    from fsl_med.runs import has_wandb_key

    assert not has_wandb_key()
    return home


@pytest.mark.parametrize("case", list(BROKEN_SWEEPS))
def test_a_broken_sweep_file_is_named_before_the_missing_account(case, no_wandb_account, tmp_path, capsys):
    from fsl_med.cli import main

    content, needle = BROKEN_SWEEPS[case]
    path = tmp_path / "sweep.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content)
    else:
        path.write_text(yaml.safe_dump(content, sort_keys=False))
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fsl-med: error: ") and "Traceback" not in err, err
    assert str(path) in lines[0] and needle in lines[0], (needle, lines[0])
    assert "account" not in lines[0]


@pytest.mark.parametrize("what", ["missing", "folder"])
def test_a_missing_sweep_file_or_a_folder_is_named(what, no_wandb_account, tmp_path, capsys):
    from fsl_med.cli import main

    path = tmp_path / "sweep.yaml"
    if what == "folder":
        path.mkdir()
    assert main(["sweep", str(path)]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("fsl-med: error: ") and str(path) in line and "account" not in line, line
    assert ("sweep file not found" if what == "missing" else "is a folder") in line


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_a_valid_sweep_file_without_an_account_gives_the_login_message(path, no_wandb_account, capsys):
    from fsl_med.cli import main

    assert main(["sweep", str(path.relative_to(REPO))]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("fsl-med: error: W&B sweeps need a W&B account: run '.venv/bin/wandb login'"), line


def test_a_broken_sweep_file_is_named_before_offline_mode(no_wandb_account, tmp_path, monkeypatch, capsys):
    from fsl_med.cli import main

    monkeypatch.setenv("WANDB_MODE", "offline")
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(_edit(method="smart")))
    assert main(["sweep", str(path)]) == 2
    line = capsys.readouterr().err.strip()
    assert "method 'smart'" in line and "WANDB_MODE" not in line, line
