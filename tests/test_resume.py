"""Resume and determinism: a run killed with SIGKILL and resumed from its last.ckpt ends exactly where an
uninterrupted run with the same seed ends (CPU, deterministic mode); two runs with one seed are identical."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fsl_med.data.phantom import generate_phantom

REPO = Path(__file__).resolve().parents[1]
STEPS = 40


def _cmd(verb: str, root: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "fsl_med", verb, str(REPO / "experiments" / "demo.yaml"), f"data.root={root}",
            "data.image_size=64", "data.num_workers=0", f"trainer.max_steps={STEPS}", "trainer.ckpt_every_n_steps=4",
            "trainer.val_check_interval=20", "trainer.deterministic=true", f"logging.output_dir={out}",
            "trainer.enable_progress_bar=false", f"data.cache_dir={cache}", *extra]


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def _weights(path: Path) -> tuple[int, dict[str, torch.Tensor]]:
    ck = torch.load(path, map_location="cpu", weights_only=False)
    return ck["global_step"], ck["state_dict"]


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path):
    root = generate_phantom(tmp_path / "ph", n_scans=6, size=64, depth=10, seed=0)
    out, cache = tmp_path / "runs", tmp_path / "cache"
    # two uninterrupted runs with the same seed
    _run(_cmd("train", root, out, cache, "name=a"), tmp_path)
    _run(_cmd("train", root, out, cache, "name=a"), tmp_path)
    step_a, wa = _weights(out / "a" / "version_0" / "checkpoints" / "last.ckpt")
    step_a2, wa2 = _weights(out / "a" / "version_1" / "checkpoints" / "last.ckpt")
    assert step_a == step_a2 == STEPS and _same(wa, wa2)

    # the same run, killed with SIGKILL as soon as its first periodic last.ckpt exists
    last_b = out / "b" / "version_0" / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen(_cmd("train", root, out, cache, "name=b"), cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    deadline = time.time() + 300
    while not last_b.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL, "the run ended before it could be killed"
    killed_step, _ = _weights(last_b)
    assert 0 < killed_step < STEPS
    print(f"killed at step {killed_step} of {STEPS}")

    p = _run(_cmd("train", root, out, cache, "name=b", "resume=last"), tmp_path)
    assert f"resuming from {last_b}" in p.stderr
    step_b, wb = _weights(out / "b" / "version_1" / "checkpoints" / "last.ckpt")
    assert step_b == STEPS and _same(wa, wb), f"resumed from step {killed_step}: weights differ"

    # and the same final metrics
    dice = []
    for ckpt in (out / "a" / "version_0" / "checkpoints" / "last.ckpt", out / "b" / "version_1" / "checkpoints" / "last.ckpt"):
        p = _run(_cmd("eval", root, out, cache, f"ckpt={ckpt}"), tmp_path)
        res = json.loads(Path(p.stdout.strip().splitlines()[-1]).read_text())
        assert res["seed"] == 1234
        dice.append(res["dice"])
    assert dice[0] == dice[1]
