"""Shared by the launcher tests: a small phantom protocol run through the CLI in a process of its own, and its
report read back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fsl_med.data.phantom import generate_phantom

REPO = Path(__file__).resolve().parents[1]
PROTOCOL = REPO / "experiments" / "protocol_cpu.yaml"


@pytest.fixture(scope="session", name="phantom")
def phantom_fixture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 64 px phantom of 6 scans (prepared layout), shared by the launcher tests."""
    return generate_phantom(tmp_path_factory.mktemp("ph") / "phantom", n_scans=6, size=64, depth=10, seed=0)


@pytest.fixture(scope="session", name="cache_dir")
def cache_dir_fixture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The superpixel cache of the launcher tests' runs (the phantom's superpixels are computed once)."""
    return tmp_path_factory.mktemp("sp_cache")


@pytest.fixture(scope="session", name="inline")
def inline_fixture(phantom: Path, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference of the launcher tests: :func:`protocol_args`' protocol run inline (one process, one job after
    another); its report folder."""
    out = tmp_path_factory.mktemp("inline")
    p = fsl_med(["protocol", *protocol_args(phantom, cache_dir, out)])
    assert p.returncode == 0, p.stderr[-3000:]
    return report_dir(out)


def protocol_args(root: Path, cache: Path, out: Path, *extra: str, steps: int = 6) -> list[str]:
    """``fsl-med protocol protocol_cpu.yaml`` on ``root`` (a 64 px phantom): ``steps`` training steps per job, Setting 1
    and 2 (three jobs), plain/+CCA/+TTT, one CPU thread per job under every launcher (on the CPU the last bits of a
    float reduction depend on the thread count, so equal rows need equal threads)."""
    return [str(PROTOCOL), f"data.root={root}", f"data.cache_dir={cache}", f"logging.output_dir={out}",
            "data.image_size=64", "data.num_workers=0", f"trainer.max_steps={steps}",
            f"trainer.val_check_interval={max(1, steps // 2)}", f"data.episodes_per_epoch={steps}", "ttt.steps=1",
            "trainer.enable_progress_bar=false", "eval.overlay_slices=0", "protocol.variants=[plain,cca,ttt]",
            "trainer.log_every_n_steps=5", "protocol.threads_per_job=1", *extra]


def fsl_med(args: list[str], timeout: float = 900, **kw: Any) -> subprocess.CompletedProcess[str]:
    """``python -m fsl_med ARGS`` in a process of its own (polling the jobs every second)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "FSL_MED_POLL_SECONDS": "1", **kw.pop("env", {})}
    return subprocess.run([sys.executable, "-m", "fsl_med", *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=kw.pop("cwd", REPO), **kw)


def report_dir(out: Path, name: str = "protocol-cpu", verb: str = "protocol", version: int = 0) -> Path:
    return out / f"{name}-{verb}" / f"version_{version}"


def numbers(folder: Path, verb: str = "protocol") -> dict[str, Any]:
    """The report's numbers (every setting, variant and organ: Dice, its std, HD95) as stored, for exact equality."""
    rep = json.loads((folder / f"{verb}.json").read_text())
    return {s: {v: {k: agg[k] for k in ("dice", "dice_std", "hd95", "dice_mean")} for v, agg in vs.items()}
            for s, vs in rep["settings"].items()}


def job_table(folder: Path) -> dict[str, dict[str, Any]]:
    """``jobs.json`` of a report folder, by tag."""
    return {j["tag"]: j for j in json.loads((folder / "jobs.json").read_text())["jobs"]}


def train_folders(out: Path) -> list[Path]:
    """Every training folder (``runs/<name>-<tag>/version_N``) of every report folder under ``out``."""
    return sorted(p for p in out.glob("*/version_*/runs/*/version_*") if not p.parent.name.endswith("-eval"))
