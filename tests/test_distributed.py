"""DDP on CPU with two processes (gloo): training runs, one run folder is written, and a two-process
evaluation (query volumes sharded, TP/FP/FN gathered) gives exactly the single-process numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fsl_med.data.phantom import generate_phantom

REPO = Path(__file__).resolve().parents[1]


def _fsl(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FSL_MED_RUN_DIR", "LOCAL_RANK", "RANK",
                                                                        "NODE_RANK", "WORLD_SIZE"))}
    p = subprocess.run([sys.executable, "-m", "fsl_med", *args], cwd=cwd, capture_output=True, text=True,
                       timeout=900, env={**env, "PYTHONWARNINGS": "ignore"})
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def _strip(volumes: list[dict]) -> list[dict]:
    return [{k: v for k, v in x.items() if k != "seconds"} for x in volumes]


@pytest.mark.slow
def test_two_process_ddp_training_and_sharded_evaluation(tmp_path):
    root = generate_phantom(tmp_path / "ph", n_scans=6, size=64, depth=10, seed=0)
    common = [str(REPO / "experiments" / "demo.yaml"), f"data.root={root}", "data.image_size=64", "data.num_workers=0",
              "data.batch_size=1",
              f"logging.output_dir={tmp_path / 'runs'}", "trainer.enable_progress_bar=false",
              f"data.cache_dir={tmp_path / 'cache'}"]
    ddp = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp"]
    p = _fsl("train", *common, *ddp, "trainer.max_steps=6", "trainer.val_check_interval=3", "name=ddp", cwd=tmp_path)
    assert "2 per step in all" in p.stderr  # episodes per step over both processes
    assert p.stdout.count("trained 6 steps") == 1 and p.stdout.count("last.ckpt") == 1, p.stdout  # rank 0 only
    runs = sorted((tmp_path / "runs" / "ddp").glob("version_*"))
    assert [r.name for r in runs] == ["version_0"]  # both ranks wrote into one run folder
    last = runs[0] / "checkpoints" / "last.ckpt"
    summary = json.loads((runs[0] / "train_summary.json").read_text())
    assert last.is_file() and summary["steps"] == 6

    ev = [f"ckpt={last}", "eval.variants=[plain,cca,ttt,ttt_cca]", "ttt.steps=2", "eval.save_predictions=true"]
    _fsl("eval", *common, *ev, "name=one", cwd=tmp_path)
    p2 = _fsl("eval", *common, *ev, *ddp, "name=two", cwd=tmp_path)
    # only rank 0 prints the results table and the path, and logs below warnings
    assert p2.stdout.count("| **Mean** |") == 1, p2.stdout
    assert [ln for ln in p2.stdout.splitlines() if ln.endswith("results.json")] == \
        [str(tmp_path / "runs" / "two-eval" / "version_0" / "results.json")]
    assert p2.stderr.count("] fold 0: train") == 1, p2.stderr[-3000:]
    one = json.loads((tmp_path / "runs" / "one-eval" / "version_0" / "results.json").read_text())
    two = json.loads((tmp_path / "runs" / "two-eval" / "version_0" / "results.json").read_text())
    assert [p.name for p in (tmp_path / "runs" / "two-eval").iterdir()] == ["version_0"]
    for v in ("plain", "cca", "ttt", "ttt_cca"):
        assert one["variants"][v]["dice"] == two["variants"][v]["dice"], v
        assert one["variants"][v]["hd95"] == two["variants"][v]["hd95"], v
    assert _strip(one["volumes"]) == _strip(two["volumes"]) and len(one["volumes"]) == 16
    assert sorted(p.name for p in (tmp_path / "runs" / "two-eval" / "version_0" / "overlays").iterdir()) == \
        sorted(p.name for p in (tmp_path / "runs" / "one-eval" / "version_0" / "overlays").iterdir())
    # prediction files: the organs of a query scan were scored on different ranks, and are merged into one file
    files1 = sorted((tmp_path / "runs" / "one-eval" / "version_0" / "predictions").rglob("*.nii.gz"))
    files2 = sorted((tmp_path / "runs" / "two-eval" / "version_0" / "predictions").rglob("*.nii.gz"))
    assert len(files1) == 4 and [f.name for f in files1] == [f.name for f in files2]
    for a, b in zip(files1, files2, strict=True):
        assert np.array_equal(np.asarray(nib.load(a).dataobj), np.asarray(nib.load(b).dataobj)), a.name


@pytest.mark.slow
def test_torchrun_processes_share_one_run_folder(tmp_path):
    """Under torchrun every process starts at once: rank 0 creates the run folder, the others find it."""
    root = generate_phantom(tmp_path / "ph", n_scans=6, size=64, depth=10, seed=0)
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FSL_MED_RUN_DIR", "LOCAL_RANK", "RANK"))}
    p = subprocess.run([str(torchrun), "--nproc-per-node=2", "-m", "fsl_med", "train",
                        str(REPO / "experiments" / "demo.yaml"), f"data.root={root}", "data.image_size=64",
                        "data.num_workers=0", "trainer.max_steps=4", "trainer.val_check_interval=2",
                        f"logging.output_dir={tmp_path / 'runs'}", "trainer.enable_progress_bar=false",
                        f"data.cache_dir={tmp_path / 'cache'}", "trainer.accelerator=cpu", "trainer.devices=2",
                        "trainer.strategy=ddp", "name=tr"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=600, env={**env, "PYTHONWARNINGS": "ignore"})
    assert p.returncode == 0, p.stderr[-3000:]
    runs = sorted(d.name for d in (tmp_path / "runs" / "tr").iterdir() if d.is_dir())
    assert runs == ["version_0"]
    assert json.loads((tmp_path / "runs" / "tr" / "version_0" / "train_summary.json").read_text())["steps"] == 4
