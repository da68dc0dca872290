"""Shared pieces of the every-verb head tests (``tests/test_heads*.py``): a small phantom with the overrides every
command there uses, and readers of a run folder (its newest version, training rows, checkpoint, head state)."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fsl_med.data.phantom import generate_phantom


def phantom_env(tmp_path_factory: pytest.TempPathFactory, prefix: str) -> SimpleNamespace:
    """A 6-scan 64-pixel phantom (``root``), the run folder (``runs``) and the overrides every command shares (``over``;
    the superpixel cache is shared by the whole session)."""
    base = tmp_path_factory.mktemp(prefix)
    root = generate_phantom(base / "ph", n_scans=6, size=64, depth=10, seed=0)
    runs = base / "runs"
    over = [f"data.root={root}", "data.image_size=64", "data.num_workers=0", "data.batch_size=1",
            f"logging.output_dir={runs}", "trainer.enable_progress_bar=false", "logging.logger=csv",
            f"data.cache_dir={tmp_path_factory.getbasetemp() / 'sp_cache'}"]
    return SimpleNamespace(base=base, root=root, runs=runs, over=over)


def run_dir(env: SimpleNamespace, name: str) -> Path:
    """The newest ``version_*`` folder of run ``name``."""
    dirs = sorted((env.runs / name).glob("version_*"))
    assert dirs, f"no run folder {env.runs / name}"
    return dirs[-1]


def last_ckpt(run: Path) -> Path:
    return run / "checkpoints" / "last.ckpt"


def train_rows(run: Path) -> list[dict[str, str]]:
    """The training-step rows of a run's metrics.csv."""
    with open(run / "metrics.csv", newline="") as f:
        return [r for r in csv.DictReader(f) if r.get("train/loss")]


def head_state(path: Path) -> dict[str, torch.Tensor]:
    """The head's tensors (``model.head.*``) of a checkpoint."""
    sd = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    return {k: v for k, v in sd.items() if k.startswith("model.head.")}
