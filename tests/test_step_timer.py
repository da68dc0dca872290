"""Ordinary training never synchronises the device after a step (issue 31 §6); ``bench`` and ``gpu-check``, which
report seconds per step, ask for it. The count is taken where the step timer calls the device synchronisation
(``fsl_med.train.sync``): on the CPU the synchronisation itself is a no-op, so its calls are what can be seen."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import fsl_med.train
from fsl_med.bench import main as bench_child
from fsl_med.cli import main
from fsl_med.config import load_config
from fsl_med.data.phantom import generate_phantom
from fsl_med.train import train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def sync_calls(monkeypatch: pytest.MonkeyPatch) -> list[torch.device]:
    """The devices the step timer synchronised, one entry a call (the real ``sync`` still runs)."""
    calls: list[torch.device] = []
    real = fsl_med.train.sync

    def counting(device=None):
        calls.append(torch.device(device))
        real(device)

    monkeypatch.setattr(fsl_med.train, "sync", counting)
    return calls


@pytest.fixture
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_phantom(tmp_path_factory.mktemp("ph"), n_scans=6, size=64, depth=8, seed=0)


def test_training_synchronises_only_with_sync_timing(tmp_path, cache_dir, phantom, sync_calls):
    cfg = load_config(REPO / "experiments" / "demo.yaml", [
        f"data.root={phantom}", "data.image_size=64", "data.num_workers=0", "data.num_val_scans=0",
        "trainer.max_steps=3", f"logging.output_dir={tmp_path / 'runs'}", "logging.logger=none",
        "trainer.enable_progress_bar=false", f"data.cache_dir={cache_dir}"])
    res = train(cfg)
    assert res.steps == 3 and res.seconds_per_step > 0
    assert sync_calls == []  # the default: no synchronisation, the host-side seconds per step
    res = train(cfg, sync_timing=True)
    assert res.steps == 3 and res.seconds_per_step > 0
    assert sync_calls == [torch.device("cpu")] * 6  # the start and the end of each of the 3 steps
    summary = json.loads((res.run_dir / "train_summary.json").read_text())
    assert summary["seconds_per_step_median"] == res.seconds_per_step


def test_bench_and_gpu_check_time_their_steps_synchronised(tmp_path, cache_dir, phantom, sync_calls, capsys):
    assert bench_child(["train_full", "--data", str(phantom), "--encoder", "vit_tiny_patch14", "--work",
                        str(tmp_path / "w"), "--cache-dir", str(cache_dir), "--workers", "0", "--steps", "1",
                        "--warmup", "1", "--set", "data.image_size=64"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["seconds_per_step"] > 0
    assert len(sync_calls) == 2 * 2  # warm-up and timed step, each synchronised at its start and end
    sync_calls.clear()
    out = tmp_path / "gc"
    assert main(["gpu-check", "--out", str(out), "--only", "train-small-fp32"]) == 0
    row = next(r for r in json.loads((out / "gpu-check.json").read_text())["rows"] if r["key"] == "train-small-fp32")
    assert row["status"] == "ok" and row["figures"]["steps"] == 3
    assert len(sync_calls) == 2 * 3  # 1 warm-up + 2 timed steps (tiny profile)
