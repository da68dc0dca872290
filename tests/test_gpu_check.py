"""``make gpu-check`` and ``make gpu-bundle`` on a machine without CUDA.

The check's tiny mode runs every row (on the CPU) so that it cannot rot; a failing row is reported with its
message and does not stop the others. The bundle carries what a borrowed GPU machine lacks, and its mode runs
on a Python that has torch, lightning, timm, ... but neither monai, nibabel, omegaconf, pydicom nor wandb.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import os
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest

from fsl_med.cli import main
from fsl_med.gpu_bundle import LIMIT_BYTES, MISSING_PACKAGES
from fsl_med.gpu_check import NO_CUDA, TINY, GpuCheck

REPO = Path(__file__).resolve().parents[1]
TRAIN_ROWS = ("train-large-fp32", "train-large-bf16", "train-small-fp32", "train-small-bf16", "train-large-bf16-b2",
              "train-large-bf16-b4", "train-small-bf16-compile", "train-large-bf16-compile")
HEAD_ROWS = ("head-alp", "head-panet", "head-adnet", "head-qnet", "head-rpt")
JOBS_ROWS = ("jobs-b1", "jobs-b2")
ALL_ROWS = {"env", *TRAIN_ROWS, *HEAD_ROWS, *JOBS_ROWS, "ckpt", "eval", "ttt-paper", "eval-vs-cpu", "segment-vs-cpu",
            "ddp"}
BLOCKED = ("monai", "nibabel", "omegaconf", "pydicom", "wandb")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FSL_MED_RUN_DIR", "LOCAL_RANK", "RANK",
                                                                        "NODE_RANK", "WORLD_SIZE", "MASTER_"))}
    return {**env, "PYTHONWARNINGS": "ignore", **extra}


def _report(out: Path) -> tuple[dict, dict[str, dict]]:
    doc = json.loads((out / "gpu-check.json").read_text())
    return doc, {r["key"]: r for r in doc["rows"]}


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _alive_in_groups(pgids: list[int]) -> list[int]:
    """Processes (zombies aside) in the process groups ``pgids``: a jobs row's processes and their DataLoader workers
    (each process leads a group of its own)."""
    alive = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) in pgids and fields[0] != "Z":
            alive.append(int(d.name))
    return alive


@pytest.mark.slow
def test_make_gpu_check_without_cuda_runs_every_row_in_tiny_mode(tmp_path):
    out = tmp_path / "gc"
    p = subprocess.run(["make", "-s", "gpu-check", f"OUT={out}"], cwd=REPO, capture_output=True, text=True,
                       timeout=600, env=_env())
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stderr.splitlines()[0].startswith("gpu-check: No CUDA device: tiny mode on cpu (phantom data")
    md = (out / "gpu-check.md").read_text()
    assert md.splitlines()[0].startswith("# fsl_med GPU check: No CUDA device: tiny mode")
    assert "22 rows ok, 0 failed, 0 skipped" in md.splitlines()[0]
    assert md.strip() in p.stdout  # the report is printed, then its path
    doc, rows = _report(out)
    assert set(rows) == ALL_ROWS and all(r["status"].startswith("ok") for r in rows.values())
    assert doc["profile"] == "tiny" and doc["fold0"]["query"] == ["1"] and doc["fold0"]["support"] == "2"

    env = rows["env"]["figures"]
    assert env["gpu"] == NO_CUDA and env["bound_tflops"] > 0 and env["bf16_matmul_tflops"] > 0
    for key in TRAIN_ROWS:
        f = rows[key]["figures"]
        assert f["seconds_per_step"] > 0 and f["steps"] == 3 and f["episodes_per_s"] > 0, key
        assert f["gflop_per_step"] > 0 and 0 < f["bound_fraction"] < 1, key
        assert f["loader_episodes_per_s"] > 0 and f["loader_workers"] == 1 and isinstance(f["data_keeps_up"], bool)
        assert f["wait_seconds_per_step"] >= 0 and f["peak_gpu_mb"] == NO_CUDA and f["peak_rss_mb"] > 0
    assert rows["train-large-bf16-b4"]["figures"]["batch"] == 4
    assert rows["train-large-fp32"]["figures"]["finetune"] == "lora"
    assert rows["train-small-bf16"]["figures"]["precision"] == "bf16-mixed"
    assert rows["train-large-bf16-compile"]["figures"]["compile"] == "default"
    # FLOPs per step do not depend on the batch's precision or compilation, and grow with the batch
    gf = {k: rows[k]["figures"]["gflop_per_step"] for k in TRAIN_ROWS}
    assert gf["train-large-fp32"] == gf["train-large-bf16"] == gf["train-large-bf16-compile"]
    assert gf["train-large-bf16-b4"] > gf["train-large-bf16-b2"] > gf["train-large-bf16"]

    ev = rows["eval"]["figures"]
    assert all(0 <= ev[f"dice_{v}"] <= 100 for v in ("plain", "cca", "ttt", "ttt_cca"))
    assert ev["ttt_changed_volumes"].endswith(" of 4")
    assert ev["volumes"] == 4 and ev["seconds_per_slice"] > 0 and ev["ttt_seconds_per_slice"] > 0
    assert rows["ttt-paper"]["figures"]["ttt_seconds_per_slice"] > 0
    cmp_ = rows["eval-vs-cpu"]["figures"]
    assert cmp_["volumes"] == 8 and cmp_["max_abs_dice_diff"] == 0 and cmp_["dice_device"] == cmp_["dice_cpu"]
    seg = rows["segment-vs-cpu"]["figures"]
    assert seg["identical"] is True and seg["voxels_device"] == seg["voxels_cpu"] > 0
    assert seg["seconds_device"] != seg["seconds_cpu"]  # two runs were compared, not one with itself
    assert rows["ddp"]["status"] == "ok (gloo; NCCL skipped: no CUDA)"
    assert rows["ddp"]["figures"]["volumes"] == 4
    for key in JOBS_ROWS:  # 1 and 2 concurrent training processes, each row's processes gone afterwards
        f = rows[key]["figures"]
        assert [c["jobs"] for c in f["concurrent"]] == [1, 2] and f["suggested_jobs_per_gpu"] in (1, 2), key
        assert all(c["episodes_per_s"] > 0 for c in f["concurrent"]) and not _alive_in_groups(f["process_ids"]), key
    assert "## Concurrent training processes on the CPU" in md and "`protocol.jobs_per_gpu=" in md
    # every row names its model's head (the default here); one row per registered head trains and predicts with it
    for key in ALL_ROWS - {"env", "eval-vs-cpu", "segment-vs-cpu", "eval", "ddp", *HEAD_ROWS}:
        assert rows[key]["figures"]["head"] == "alp", key
    for key in ("eval", "eval-vs-cpu", "segment-vs-cpu", "ddp"):
        assert rows[key]["figures"]["head"] == "alp", key
    for key in HEAD_ROWS:
        f = rows[key]["figures"]
        assert f["head"] == key.removeprefix("head-") and f["precision"] == "bf16-mixed", key
        assert f["seconds_per_step"] > 0 and f["steps"] == 3 and f["predict_seconds_per_slice"] > 0, key
        assert 0 <= f["predict_prob_min"] <= f["predict_prob_max"] <= 1 and 0 <= f["predict_foreground"] <= 1, key
    assert rows["head-adnet"]["figures"]["head_parameters"] == ["threshold"]
    assert "T" in rows["head-adnet"]["figures"]["head_values"]
    assert "## Few-shot heads" in md and "| threshold ({T: " in md
    # the heads on the encoder's bundle: Q-Net's test-time refinement timed per predicted slice, RPT's BaT block
    qnet = rows["head-qnet"]["figures"]
    assert qnet["refined_slices"] == qnet["predict_slices"] and 0 < qnet["refine_seconds_per_slice"]
    assert qnet["refine_seconds_per_slice"] < qnet["predict_seconds_per_slice"] and "tau" in qnet["head_values"]
    assert any(n.startswith("bat.") for n in rows["head-rpt"]["figures"]["head_parameters"])
    assert "refine_seconds_per_slice" not in rows["head-rpt"]["figures"] and " (refinement " in md


def test_a_failing_row_is_reported_and_the_others_still_run(tmp_path, capsys):
    out = tmp_path / "gc"
    # no adapter to adapt: every TTT row fails, plain and +CCA evaluation and segment do not
    rc = main(["gpu-check", "--out", str(out), "--only", "eval,ttt,segment", "ttt.params=adapter"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "2 row(s) failed" in err
    _, rows = _report(out)
    for key in ("eval", "ttt-paper"):
        assert rows[key]["status"].startswith("FAILED: ConfigError: config key 'ttt.params'"), rows[key]["status"]
    for key in ("env", "ckpt", "eval-vs-cpu", "segment-vs-cpu"):
        assert rows[key]["status"] == "ok", (key, rows[key]["status"])
    assert all(rows[k]["status"] == "skipped: not selected (--only)" for k in (*TRAIN_ROWS, *HEAD_ROWS, *JOBS_ROWS,
                                                                                 "ddp"))
    md = (out / "gpu-check.md").read_text()
    assert "2 failed" in md.splitlines()[0] and "## Failures" in md and "- `eval`: ConfigError" in md
    log = (out / "gpu-check.log").read_text()
    assert "Traceback" in log and "ttt.params" in log


def test_a_head_override_reaches_every_row_and_each_head_row_keeps_its_head(tmp_path, capsys):
    out = tmp_path / "gc"
    assert main(["gpu-check", "--out", str(out), "--only", "train-small-fp32,head-alp,ttt,segment",
                 "model.head.name=adnet", "model.head.adnet.threshold_init=-5"]) == 0
    doc, rows = _report(out)
    assert doc["overrides"] == ["model.head.name=adnet", "model.head.adnet.threshold_init=-5"]
    for key in ("train-small-fp32", "ckpt", "ttt-paper", "segment-vs-cpu"):  # the models that ran had ADNet's head
        assert rows[key]["status"] == "ok" and rows[key]["figures"]["head"] == "adnet", (key, rows[key])
    for key in ("train-small-fp32", "ckpt", "ttt-paper"):
        f = rows[key]["figures"]
        assert f["head_parameters"] == ["threshold"] and abs(f["head_values"]["T"] + 5) < 0.5, (key, f)
    alp = rows["head-alp"]["figures"]  # a head row measures its own head, whatever the overrides name
    assert rows["head-alp"]["status"] == "ok" and alp["head"] == "alp" and alp["head_parameters"] == []
    md = (out / "gpu-check.md").read_text()
    assert "| tiny ViT (2 blocks, dim 64), full, 32-true, batch 1 | adnet |" in md
    assert "| TTT as in the paper: per slice, 2 steps, 2 slices | adnet |" in md
    assert "`model.head.name=adnet model.head.adnet.threshold_init=-5`" in md


def test_concurrent_training_row_measures_one_and_two_processes_and_leaves_none(tmp_path, capsys):
    out = tmp_path / "gc"
    assert main(["gpu-check", "--out", str(out), "--only", "jobs-b1"]) == 0
    _, rows = _report(out)
    row = rows["jobs-b1"]
    assert row["status"] == "ok" and rows["jobs-b2"]["status"] == "skipped: not selected (--only)"
    f = row["figures"]
    assert f["head"] == "alp" and f["finetune"] == "lora" and f["precision"] == "bf16-mixed" and f["batch"] == 1
    assert f["jobs"] == [1, 2] and f["steps_per_process"] == 2 and len(f["process_ids"]) == 2
    one, two = f["concurrent"]
    assert (one["jobs"], two["jobs"]) == (1, 2) and one["speedup"] == 1.0 and two["speedup"] > 0
    for c, n in ((one, 1), (two, 2)):
        assert c["episodes"] == 2 * n and c["episodes_per_s"] > 0 and c["window_s"] > 0
        assert c["episodes_per_s"] == pytest.approx(c["episodes"] / c["window_s"])
        assert len(c["per_process_episodes_per_s"]) == n and all(x > 0 for x in c["per_process_episodes_per_s"])
        assert c["peak_gpu_mb"] == NO_CUDA and len(c["peak_rss_mb"]) == n and all(x > 0 for x in c["peak_rss_mb"])
    assert two["speedup"] == pytest.approx(two["episodes_per_s"] / one["episodes_per_s"])
    best = max(f["concurrent"], key=lambda c: c["episodes_per_s"])
    assert f["suggested_jobs_per_gpu"] == f["best_jobs"] == best["jobs"]
    assert not _alive_in_groups(f["process_ids"])  # the processes and their DataLoader workers
    md = (out / "gpu-check.md").read_text()
    lines = md.splitlines()
    i = next(k for k, x in enumerate(lines) if x.startswith("| tiny ViT (2 blocks, dim 64), LoRA r=4, bf16-mixed, batch 1: "
                                                             "1, 2 concurrent training processes on the CPU | alp | 1"))
    cells = [c.strip() for c in lines[i].split("|")[1:-1]] + [c.strip() for c in lines[i + 1].split("|")[1:-1]]
    assert "–" not in cells and cells[-1] == "" and cells[8] == "ok" and cells[11].startswith("2")
    assert f"`protocol.jobs_per_gpu={best['jobs']}`" in md
    # the protocol wall-time estimate reads the row (train-large-bf16 did not run: the step time is given)
    est = subprocess.run([sys.executable, str(REPO / "scripts" / "protocol-estimate.py"), "--gpu-check",
                          str(out / "gpu-check.json"), "--seconds-per-step", "0.5", "--gpus", "1", "8"],
                         capture_output=True, text=True, timeout=60)
    assert est.returncode == 0, est.stderr
    head, _, _, one_gpu, eight = est.stdout.strip().splitlines()
    gain = best["speedup"]
    assert head.startswith("ESTIMATE") and f"{best['jobs']} run(s) per GPU at {gain:.2f}x" in head
    hours = math.ceil(45 / best["jobs"]) * 100_000 * 0.5 * best["jobs"] / gain / 3600
    assert one_gpu.startswith(f"| 1 | {hours:.1f} |")
    assert eight.startswith(f"| 8 | {math.ceil(45 / (8 * best['jobs'])) * 100_000 * 0.5 * best['jobs'] / gain / 3600:.1f} |")
    bad = subprocess.run([sys.executable, str(REPO / "scripts" / "protocol-estimate.py"), "--gpu-check",
                          str(out / "gpu-check.json")], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "train-large-bf16 row" in bad.stderr


def test_concurrent_training_row_past_its_time_limit_ends_its_processes(tmp_path, cache_dir):
    """The processes are released, then train far past the row's limit: the row fails with the limit, and the
    processes are killed with their DataLoader workers."""
    out = tmp_path / "gc"
    out.mkdir()
    profile = replace(TINY, row_timeout_s=25, jobs_steps=1_000_000)
    check = GpuCheck(out, profile, None, str(cache_dir), [], only=["jobs-b1"])
    assert check.run() == 1
    _, rows = _report(out)
    f = rows["jobs-b1"]["figures"]
    assert rows["jobs-b1"]["status"] == "FAILED: RowTimeout: ran past its limit of 25 s"
    assert len(f["process_ids"]) == 2 and "concurrent" not in f
    assert not _alive_in_groups(f["process_ids"])


def test_rows_past_the_time_budget_are_skipped(tmp_path, capsys):
    out = tmp_path / "gc"
    assert main(["gpu-check", "--out", str(out), "--budget-s", "0"]) == 0
    _, rows = _report(out)
    assert set(rows) == ALL_ROWS and rows["env"]["status"] == "ok"  # the environment row always runs
    assert all(r["status"] == "skipped: time budget (0 s) spent" for k, r in rows.items() if k != "env")


@pytest.mark.parametrize(("args", "message"), [
    (["--only", "nonsense"], "--only nonsense: matches no row"),
    (["optim.lrr=0.1"], "unknown config key 'optim.lrr'"),
    (["model.head.name=adnt"], "config key 'model.head.name': unknown head 'adnt'; did you mean 'adnet'?"),
    (["--profile", "gpu"], "--profile gpu: no CUDA device"),
    (["--data", "MISSING"], "--data MISSING: no prepared CHAOS-T2 volumes"),
    (["--bundle", "MISSING"], "--bundle MISSING: not a bundle (no MANIFEST.json"),
    (["--only", ","], "--only: names no row"),
    (["--budget-s", "-1"], "--budget-s -1.0: must be >= 0"),
])
def test_bad_gpu_check_input_is_one_line_and_writes_nothing(tmp_path, capsys, args, message):
    out = tmp_path / "gc"
    missing = str(tmp_path / "missing")
    args = [missing if a == "MISSING" else a for a in args]
    assert main(["gpu-check", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fsl-med: error: ") and message.replace("MISSING", missing) in err[0], err
    assert not out.exists()


# -- the bundle ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bundle(chaos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle of five real scans (fold 0 of the subset: query 1, support 2, training 3, 5, 8)."""
    out = tmp_path_factory.mktemp("bundle") / "gpu_bundle"
    p = subprocess.run([sys.executable, "-m", "fsl_med", "gpu-bundle", "--out", str(out), "--data", str(chaos),
                        "--scans", "1,2,3,5,8"], capture_output=True, text=True, timeout=600, env=_env())
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip().splitlines()[-1] == str(out)
    return out


def test_gpu_bundle_holds_the_missing_wheels_the_scans_and_their_pseudolabels(bundle, chaos):
    m = json.loads((bundle / "MANIFEST.json").read_text())
    wheels = sorted(p.name for p in (bundle / "wheels").iterdir())
    assert len(wheels) == len(MISSING_PACKAGES) and not any(w.startswith("wandb") for w in wheels)
    for pkg in MISSING_PACKAGES:  # the versions tested here travel
        [w] = [w for w in wheels if w.lower().startswith(f"{pkg}-")]
        assert w.startswith(f"{pkg}-{importlib.metadata.version(pkg)}-")
        assert w.endswith("-py3-none-any.whl") or ("cp312" in w and "manylinux" in w and "x86_64" in w), w
    assert {e["file"]: e["sha256"] for e in m["wheels"]} == {w: _sha(bundle / "wheels" / w) for w in wheels}
    assert m["python"] == "3.12" and m["scans"] == ["1", "2", "3", "5", "8"]
    for sid in m["scans"]:
        for kind in ("image", "label"):
            assert _sha(bundle / "chaos" / f"{kind}_{sid}.nii.gz") == _sha(chaos / f"{kind}_{sid}.nii.gz")
    assert m["fold0_of_subset"] == {"query": ["1"], "support": "2", "train": ["3", "5", "8"]}
    cached = sorted(p.name.split("-")[0] for p in (bundle / "cache" / "superpixels").glob("*.npz"))
    assert cached == ["image_3", "image_5", "image_8"]
    assert m["bytes"] + m["repository_bytes"] < LIMIT_BYTES == m["limit_bytes"]


def test_gpu_bundle_offline_and_a_failed_rebuild_keeps_the_old_bundle(bundle, chaos, tmp_path):
    out = tmp_path / "b"
    cmd = [sys.executable, "-m", "fsl_med", "gpu-bundle", "--out", str(out), "--data", str(chaos), "--scans", "1,2,3"]
    p = subprocess.run([*cmd, "--wheels-from", str(bundle / "wheels")], capture_output=True, text=True, timeout=300,
                       env=_env())
    assert p.returncode == 0, p.stderr[-2000:]
    before = (out / "MANIFEST.json").read_text()
    empty = tmp_path / "empty"
    empty.mkdir()
    p = subprocess.run([*cmd, "--wheels-from", str(empty)], capture_output=True, text=True, timeout=300, env=_env())
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert p.returncode == 2 and lines[-1].startswith("fsl-med: error: gpu-bundle: pip could not get") and \
        "monai==" in lines[-1] and "Traceback" not in p.stderr
    assert (out / "MANIFEST.json").read_text() == before and len(list((out / "wheels").glob("*.whl"))) == 4
    assert sorted(x.name for x in tmp_path.iterdir()) == ["b", "empty"]  # no half-written bundle left
    p = subprocess.run([*cmd[:-2], "--scans", "1,2,77"], capture_output=True, text=True, timeout=300, env=_env())
    assert p.returncode == 2 and "image_77.nii.gz not found" in p.stderr and "Traceback" not in p.stderr


def test_gpu_bundle_never_replaces_a_folder_that_is_not_a_bundle(chaos, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    p = subprocess.run([sys.executable, "-m", "fsl_med", "gpu-bundle", "--out", str(out), "--data", str(chaos),
                        "--scans", "1,2,3"], capture_output=True, text=True, timeout=300, env=_env())
    assert p.returncode == 2 and "exists and is not a bundle" in p.stderr and "Traceback" not in p.stderr
    assert [x.name for x in out.iterdir()] == ["notes.txt"] and sorted(x.name for x in tmp_path.iterdir()) == ["mine"]


def test_make_gpu_check_takes_data(chaos, tmp_path):
    out = tmp_path / "gc"
    p = subprocess.run(["make", "-s", "gpu-check", f"OUT={out}", f"DATA={chaos}", "ARGS=--only env"], cwd=REPO,
                       capture_output=True, text=True, timeout=600, env=_env())
    assert p.returncode == 0, p.stderr[-2000:]
    doc, rows = _report(out)
    assert doc["data"] == str(chaos) and doc["fold0"] == {"query": ["1", "2", "3", "5"], "support": "8", "train": [
        "10", "13", "15", "19", "20", "21", "22", "31", "32", "33", "34", "36", "37", "38", "39"]}
    assert doc["headline"].startswith("No CUDA device: tiny mode on cpu (real data") and rows["env"]["status"] == "ok"


def _gpu_machine_python(tmp_path: Path, without: tuple[str, ...] = ()) -> tuple[Path, Path]:
    """A Python like the GPU machines': this interpreter started with ``-S`` on a copy (links) of its
    site-packages without monai, nibabel, omegaconf, pydicom, wandb (and ``without``) and fsl_med's own
    editable install."""
    site = tmp_path / "site"
    site.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        name = entry.name.lower()
        if name.startswith((*BLOCKED, *without, "fsl_med", "__editable__")) or name.endswith(".pth"):
            continue
        (site / entry.name).symlink_to(entry)
    py = tmp_path / "python"
    py.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')
    py.chmod(0o755)
    return py, site


@pytest.mark.slow
def test_bundle_mode_runs_the_check_on_a_python_without_the_missing_packages(bundle, tmp_path):
    py, site = _gpu_machine_python(tmp_path)
    probe = subprocess.run([str(py), "-c", "import importlib.util as u, sys; import torch, lightning, timm; "
                            f"sys.exit(any(u.find_spec(m) for m in {BLOCKED!r}))"],
                           capture_output=True, text=True, env=_env(PYTHONPATH=str(site)), timeout=300)
    assert probe.returncode == 0, probe.stderr  # the simulated machine lacks them (and has torch)
    cache_before = sorted(p.name for p in (bundle / "cache" / "superpixels").iterdir())
    out = tmp_path / "gc"
    p = subprocess.run(["bash", "scripts/gpu-check.sh", "--only", "train-small-fp32,eval,ttt,segment"], cwd=REPO,
                       capture_output=True, text=True, timeout=900,
                       env=_env(FSL_MED_GPU_CHECK="bundle", GPU_BUNDLE=str(bundle), PYTHON=str(py),
                                PYTHONPATH=str(site), OUT=str(out)))
    assert p.returncode == 0, p.stderr[-3000:]
    doc, rows = _report(out)
    assert doc["headline"].startswith("No CUDA device: tiny mode on cpu (real data")
    assert doc["data"] == str(bundle / "chaos") and doc["fold0"]["support"] == "2"
    for key in ("env", "train-small-fp32", "ckpt", "eval", "ttt-paper", "eval-vs-cpu", "segment-vs-cpu"):
        assert rows[key]["status"] == "ok", (key, rows[key]["status"])
    # the bundled pseudolabels were used as they are (a miss would have added files)
    assert sorted(p.name for p in (bundle / "cache" / "superpixels").iterdir()) == cache_before


def test_bundle_mode_names_what_the_machine_lacks(bundle, tmp_path):
    py, site = _gpu_machine_python(tmp_path, without=("timm",))
    p = subprocess.run(["bash", "scripts/gpu-check.sh"], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env=_env(FSL_MED_GPU_CHECK="bundle", GPU_BUNDLE=str(bundle), PYTHON=str(py),
                                PYTHONPATH=str(site), OUT=str(tmp_path / "gc")))
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        f"gpu-check: {py} lacks: timm (add their Python 3.12 wheels to {bundle}/wheels)"]
    assert not (tmp_path / "gc").exists()


def test_help_lists_every_row_key():
    from fsl_med.cli import build_parser
    from fsl_med.gpu_check import GPU, TINY, row_keys

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["gpu-check"]
    text = " ".join(sub.description.split())
    for key in {*row_keys(GPU), *row_keys(TINY)}:
        shown = "train-large-bf16-b<N>" if key.startswith("train-large-bf16-b") else \
            "head-<name>" if key.startswith("head-") else "jobs-b<N>" if key.startswith("jobs-b") else key
        assert shown in text, key


def test_only_takes_the_row_keys_of_the_table_and_help_lists_every_row(tmp_path, capsys):
    from fsl_med.cli import build_parser
    from fsl_med.gpu_check import GPU, help_text, row_keys, row_table, select_rows

    keys = row_keys(TINY)
    assert set(keys) == ALL_ROWS and len(keys) == len(ALL_ROWS)  # the table is the rows the report has
    for profile in (GPU, TINY):
        table = row_table(profile, "cpu")
        for spec in table:  # every row key is accepted and selects its row
            assert spec.key in select_rows([spec.key], table), spec.key
    # every key at once: accepted end to end (the budget of 0 s skips all but env, so nothing else runs)
    out = tmp_path / "gc"
    assert main(["gpu-check", "--out", str(out), "--only", ",".join(keys), "--budget-s", "0"]) == 0
    _, rows = _report(out)
    assert list(rows) == keys and all(r["status"] == "skipped: time budget (0 s) spent" for k, r in rows.items()
                                      if k != "env")
    capsys.readouterr()
    # an unknown row: one line that names every row of the table
    for unknown in ("head-unet", "jobs-b16x", "evaluation"):
        assert main(["gpu-check", "--out", str(tmp_path / "bad"), "--only", f"env,{unknown}"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"fsl-med: error: --only {unknown}: matches no row (rows: {', '.join(keys)})"], err
    assert not (tmp_path / "bad").exists()
    # --help lists every row of the table: its key, or its family's name (head-<name>, jobs-b<N>, ...)
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["gpu-check"]
    text = " ".join(sub.description.split())
    assert f"Row keys (for --only): {help_text()}." in text
    for profile in (GPU, TINY):
        for spec in row_table(profile, "cuda"):
            assert (spec.shown or spec.key) in text, spec.key
            if spec.shown:  # a family's name stands for its keys
                stem = spec.shown.split("<")[0]
                assert spec.key.startswith(stem) and spec.key != stem, spec.key


def test_a_row_added_to_the_table_is_run_reported_selected_and_listed(tmp_path, monkeypatch, capsys):
    """The table is the one place a row is added: ``--only``, the runner, the report and ``--help`` follow it."""
    from fsl_med.cli import build_parser
    from fsl_med.gpu_check import RowSpec, rows

    real = rows.row_table

    def with_extra(profile, device, heads=None):
        return [*real(profile, device, heads),
                RowSpec("zz-extra", "eval", "an extra row", lambda st, row: row.figures.update(answer=42))]

    monkeypatch.setattr(rows, "row_table", with_extra)
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["gpu-check"]
    assert "zz-extra" in " ".join(sub.description.split())
    out = tmp_path / "gc"
    assert main(["gpu-check", "--out", str(out), "--only", "zz"]) == 0
    _, report = _report(out)
    assert report["zz-extra"]["status"] == "ok" and report["zz-extra"]["figures"] == {"answer": 42}
    assert report["ckpt"]["status"] == "skipped: not selected (--only)"
    assert "| an extra row | – | answer 42 |" in (out / "gpu-check.md").read_text()


def test_the_check_writes_nothing_outside_its_report_folder(tmp_path, monkeypatch, capsys):
    """``make gpu-check`` runs in the repository: the superpixel cache and every other file the check keeps go in
    ``--out`` (``cache/``), its scratch folder is removed, and nothing appears in the current folder."""
    cwd, scratch = tmp_path / "cwd", tmp_path / "tmp"
    cwd.mkdir()
    scratch.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("FSL_MED_CACHE", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    assert main(["gpu-check", "--out", "gc", "--only", "train-small-fp32,segment,jobs-b1"]) == 0
    _, rows = _report(cwd / "gc")
    assert all(rows[k]["status"] == "ok" for k in ("env", "train-small-fp32", "ckpt", "segment-vs-cpu", "jobs-b1"))
    assert [p.name for p in cwd.iterdir()] == ["gc"]
    assert sorted(p.name for p in (cwd / "gc").iterdir()) == ["cache", "gpu-check.json", "gpu-check.log",
                                                              "gpu-check.md"]
    assert len(list((cwd / "gc" / "cache" / "superpixels").glob("image_*.npz"))) == 4  # the phantom's training scans
    assert list(scratch.iterdir()) == []
