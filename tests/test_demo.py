"""`make demo` shows learning on any thread count (issue 16): the exact demo recipe, run on 1 and on 2 threads,
beats the untrained model on every organ and by >= 20 mean Dice points, and writes its two figures."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fsl_med.measure import cpu_name

REPO = Path(__file__).resolve().parents[1]

ORGANS = ("Liver", "Right kidney", "Left kidney", "Spleen")
MIN_ORGAN_GAIN = 10.0  # Dice points, every organ
MIN_MEAN_GAIN = 20.0


def _table(out: str) -> dict[str, tuple[float, float]]:
    rows = {}
    for organ in (*ORGANS, "Mean"):
        m = re.search(rf"^\| (?:\*\*)?{organ}(?:\*\*)? \| (?:\*\*)?([\d.]+)(?:\*\*)? \| (?:\*\*)?([\d.]+)(?:\*\*)? \|$",
                      out, flags=re.M)
        assert m, (organ, out[-3000:])
        rows[organ] = (float(m.group(1)), float(m.group(2)))
    return rows


def _start_demo(threads: int, folder: Path) -> subprocess.Popen:
    """``fsl-med demo`` (the exact recipe) on ``threads`` CPU threads, everything it writes under ``folder``."""
    folder.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env.update(OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    return subprocess.Popen([sys.executable, "-m", "fsl_med", "demo", str(REPO / "experiments" / "demo.yaml"),
                             f"data.root={folder}/phantom", f"logging.output_dir={folder}/runs",
                             f"data.cache_dir={folder}/cache", "trainer.enable_progress_bar=false"],
                            cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _check_demo(threads: int, out: str) -> None:
    assert re.search(rf"seed \d+, {threads} thread\(s\) on {re.escape(cpu_name())}, \d+ training steps", out), out
    rows = _table(out)
    gains = {o: after - before for o, (before, after) in rows.items()}
    assert all(gains[o] >= MIN_ORGAN_GAIN for o in ORGANS), (threads, rows)
    assert gains["Mean"] >= MIN_MEAN_GAIN, (threads, rows)
    figures = re.search(r"^figures: (.+)$", out, flags=re.M)
    assert figures, out
    paths = [Path(f) for f in figures.group(1).split(", ")]
    assert [f.name for f in paths] == ["demo_dice.png", "demo_before_after.png"]
    assert all(f.is_file() and f.read_bytes()[:4] == b"\x89PNG" for f in paths)


@pytest.mark.slow
def test_demo_learns_on_every_organ_on_1_and_2_threads(tmp_path):
    """Both thread counts at once (the numbers depend on the thread count, not on what else runs; together they take
    less wall time than one after the other)."""
    procs = {threads: _start_demo(threads, tmp_path / f"threads{threads}") for threads in (1, 2)}
    try:
        done = {threads: p.communicate(timeout=1800) for threads, p in procs.items()}
    finally:
        for p in procs.values():
            p.kill()
    for threads, (out, err) in done.items():
        assert procs[threads].returncode == 0, (threads, err[-3000:])
        _check_demo(threads, out)


def test_the_cli_makes_openmp_threads_wait_passively(tmp_path):
    """Set before torch loads its OpenMP runtime; a value the user set is kept."""
    code = ("import os, sys; from fsl_med.cli import main; rc = main(['encoders']); "
            "print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert p.stdout.strip().splitlines()[-1] == "PASSIVE True", p.stdout + p.stderr
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**env, "OMP_WAIT_POLICY": "ACTIVE"}, cwd=tmp_path)
    assert p.stdout.strip().splitlines()[-1] == "ACTIVE True", p.stdout + p.stderr
