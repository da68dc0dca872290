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
from conftest import fsl_subprocess

from fsl_med.data.phantom import generate_phantom

REPO = Path(__file__).resolve().parents[1]


def _fsl(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return fsl_subprocess(*args, cwd=cwd, timeout=900)


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


_SKIP_SCRIPT = r'''
import json, os, sys
import lightning as L
import torch
from torch.utils.data import DataLoader
from fsl_med.config import load_config
from fsl_med.models.module import FewShotModule

cfg = load_config(sys.argv[1], sys.argv[3:])
torch.manual_seed(0)
g = torch.Generator().manual_seed(0)
img = torch.randn(2, 3, 64, 64, generator=g)
fg = torch.zeros(2, 64, 64)
fg[0, 16:40, 16:40] = 1.0  # rank 0: an ordinary episode
fg[1] = 1.0  # rank 1: all foreground, so no background window: the reference skips it
rank = int(os.environ.get("LOCAL_RANK", 0))  # Lightning re-runs this script for rank 1 with LOCAL_RANK=1
episodes = [{"support_image": img[rank], "support_mask": fg[rank], "query_image": img[rank],
             "query_label": fg[rank].long()}] * 2
module = FewShotModule.from_config(cfg)
before = [p.detach().clone() for p in module.parameters()]
trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=2, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    use_distributed_sampler=False)
trainer.fit(module, DataLoader(episodes, batch_size=1))
if trainer.global_rank == 0:
    changed = any(not torch.equal(a, b.detach()) for a, b in zip(before, module.parameters()))
    json.dump({"step": trainer.global_step, "skipped": float(trainer.callback_metrics["train/skipped_episodes"]),
               "own": module.model.skipped_episodes, "changed": changed}, open(sys.argv[2], "w"))
'''


@pytest.mark.slow
def test_ddp_with_skipped_episodes_on_one_rank_keeps_stepping(tmp_path):
    """``compat=reference`` under two-process DDP, where rank 1's only episode has no background window (skipped,
    as the reference skips it) and rank 0's is ordinary: no hang (rank 1 adds zero gradients instead of leaving the
    backward), both steps are taken, and ``train/skipped_episodes`` is the sum over ranks. (No alignment loss, whose
    query-side skips would depend on the random model.)"""
    from conftest import TINY

    script = tmp_path / "skip_ddp.py"
    script.write_text(_SKIP_SCRIPT)
    out = tmp_path / "out.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCAL_RANK", "RANK", "NODE_RANK", "WORLD_SIZE"))}
    p = subprocess.run([sys.executable, str(script), str(REPO / "experiments" / "mri.yaml"), str(out), *TINY,
                        "data.root=/nonexistent", "data.image_size=64", "compat=reference", "trainer.max_steps=2",
                        "data.batch_size=1", "loss.align_weight=0"], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env={**env, "PYTHONWARNINGS": "ignore"})
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["step"] == 2 and res["changed"] and res["own"] == 0  # rank 0 skipped none
    assert res["skipped"] == 2.0  # rank 1's two skips, summed over ranks
