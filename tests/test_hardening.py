"""Hardening, round 2 (issue 15), through the real CLI: no command writes over its inputs; SIGINT/SIGTERM stop a
run honestly (130/143, one line, last.ckpt saved, resumable); non-finite training stops with the step and the
episode named; every trainer setting and checkpoint mismatch is a one-line error before anything is written;
evaluation takes the model from the checkpoint; filesystem faults are named as such."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import error_line

from fsl_med.cli import main
from fsl_med.data.phantom import generate_phantom

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "experiments" / "demo.yaml")
FSL = [sys.executable, "-m", "fsl_med"]


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    return generate_phantom(tmp_path_factory.mktemp("ph") / "phantom", n_scans=6, size=48, depth=8, seed=0)


def _common(root: Path, out: Path, cache: Path, steps: int = 2) -> list[str]:
    return [DEMO, f"data.root={root}", f"logging.output_dir={out}", f"data.cache_dir={cache}", "data.image_size=48",
            "data.num_workers=0", f"trainer.max_steps={steps}", "trainer.enable_progress_bar=false",
            "data.num_val_scans=0"]




def _digest(*paths: Path) -> list[bytes]:
    return [p.read_bytes() for p in paths]


@pytest.fixture(scope="module")
def lora_ckpt(phantom, tmp_path_factory) -> Path:
    """A tiny checkpoint trained with model.* overrides that the demo config does not have."""
    out = tmp_path_factory.mktemp("ck")
    assert main(["train", *_common(phantom, out / "runs", out / "cache"), "name=ck", "model.encoder.finetune=lora",
                 "model.head.alp.fg_thresh=0.9"]) == 0
    return out / "runs" / "ck" / "version_0" / "checkpoints" / "last.ckpt"


# -- outputs never overwrite inputs -----------------------------------------------------------------

def test_segment_refuses_an_output_that_is_an_input(phantom, lora_ckpt, tmp_path, capsys):
    q, s, m = phantom / "image_1.nii.gz", phantom / "image_2.nii.gz", phantom / "label_2.nii.gz"
    before = _digest(q, s, m, lora_ckpt)
    link = tmp_path / "link.nii.gz"
    link.symlink_to(m)
    hard = tmp_path / "hard.nii.gz"
    os.link(q, hard)
    for out, needle in ((q, "--query"), (m, "--support-mask"), (link, "--support-mask"), (hard, "--query"),
                        (s, "--support-image")):
        rc = main(["segment", "--ckpt", str(lora_ckpt), "--support-image", str(s), "--support-mask", str(m),
                   "--label", "1", "--query", str(q), "--out", str(out)])
        assert rc == 2
        error_line(capsys.readouterr().err, str(out), f"is the input {needle}", "never writes over its inputs")
    assert _digest(q, s, m, lora_ckpt) == before


def test_segment_checks_the_output_location_before_inference(phantom, tmp_path, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    bad_ckpt = tmp_path / "never_read.ckpt"
    bad_ckpt.write_bytes(b"not a checkpoint")  # the location error must come before the checkpoint is read
    rc = main(["segment", "--ckpt", str(bad_ckpt), "--support-image", str(phantom / "image_2.nii.gz"),
               "--support-mask", str(phantom / "label_2.nii.gz"), "--label", "1",
               "--query", str(phantom / "image_1.nii.gz"), "--out", str(blocker / "sub" / "pred.nii.gz")])
    assert rc == 2
    error_line(capsys.readouterr().err, str(blocker), "is a file (Not a directory)")
    assert not (tmp_path / "sub").exists()


def test_prepare_refuses_nested_or_identical_folders(tmp_path, capsys):
    from fsl_med.data.phantom_raw import write_raw_chaos

    raw = write_raw_chaos(tmp_path / "raw", n_patients=2, size=32, depth=8, seed=0)
    src = raw / "Train_Sets" if (raw / "Train_Sets").is_dir() else raw
    listing = sorted(str(p) for p in src.rglob("*"))
    for out, how in ((src, "is the source folder"), (src / "prepared", "lies inside the source folder"),
                     (src.parent, "contains the source folder")):
        rc = main(["prepare", "chaos", "--src", str(src), "--out", str(out), "--no-superpixels", "--no-progress"])
        assert rc == 2
        error_line(capsys.readouterr().err, f"--out {out}", how)
    assert sorted(str(p) for p in src.rglob("*")) == listing


@pytest.mark.parametrize("verb", ["train", "eval", "protocol"])
def test_run_folders_inside_the_data_or_cache_are_refused(verb, phantom, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(phantom, data)
    names = sorted(p.name for p in data.iterdir())
    for out, key in ((data / "runs", "data.root"), (data, "data.root"), (tmp_path / "cache" / "r", "data.cache_dir")):
        rc = main([verb, *_common(data, out, tmp_path / "cache")])
        assert rc == 2
        error_line(capsys.readouterr().err, "logging.output_dir", f"the {key} folder")
    assert sorted(p.name for p in data.iterdir()) == names


# -- signals --------------------------------------------------------------------------------------------

def _start(argv: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([*FSL, *argv], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)


def _wait_for(proc: subprocess.Popen, needle: str, timeout: float = 180) -> list[str]:
    """Read stderr lines until one contains ``needle``."""
    seen: list[str] = []
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
        if needle in line:
            return seen
    proc.kill()
    raise AssertionError(f"never saw {needle!r}: {''.join(seen)[-2000:]}")


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    out, err = proc.communicate(timeout=180)
    return proc.returncode, err


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_during_training_saves_last_ckpt_and_resumes(sig, code, phantom, tmp_path):
    args = [*_common(phantom, tmp_path / "runs", tmp_path / "cache", steps=100000), "trainer.log_every_n_steps=1",
            "trainer.val_check_interval=100000", "name=sig"]
    proc = _start(["train", *args], tmp_path)
    _wait_for(proc, "step 5/")
    proc.send_signal(sig)
    rc, err = _finish(proc)
    assert rc == code, err[-2000:]
    last = tmp_path / "runs" / "sig" / "version_0" / "checkpoints" / "last.ckpt"
    lines = [ln for ln in err.splitlines() if ln.startswith("fsl-med:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    name = signal.Signals(sig).name
    assert lines[0].startswith(f"fsl-med: train interrupted by {name} at step "), lines[0]
    assert f"saved {last}" in lines[0] and "resume=last" in lines[0], lines[0]
    step = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
    assert step >= 5 and f"at step {step} of 100000" in lines[0]
    # resume: the run continues from that step to its end
    rc = subprocess.run([*FSL, "train", *args[:-3], f"trainer.max_steps={step + 3}", "name=sig", "resume=last"],
                        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert rc.returncode == 0, rc.stderr[-2000:]
    assert f"trained {step + 3} steps" in rc.stdout
    resumed = tmp_path / "runs" / "sig" / "version_1" / "checkpoints" / "last.ckpt"
    assert torch.load(resumed, map_location="cpu", weights_only=False)["global_step"] == step + 3


def test_sigterm_during_eval_exits_143_and_leaves_no_run_folder(phantom, lora_ckpt, tmp_path):
    proc = _start(["eval", *_common(phantom, tmp_path / "runs", tmp_path / "cache"), f"ckpt={lora_ckpt}",
                   "eval.variants=[plain,ttt]", "ttt.steps=30", "name=ev"], tmp_path)
    _wait_for(proc, "fold 0:")
    time.sleep(3)
    proc.send_signal(signal.SIGTERM)
    rc, err = _finish(proc)
    assert rc == 143, err[-2000:]
    line = [ln for ln in err.splitlines() if ln.startswith("fsl-med:")]
    assert len(line) == 1 and line[0].startswith("fsl-med: eval interrupted by SIGTERM after "), err[-2000:]
    assert "nothing was written" in line[0]
    assert not list((tmp_path / "runs").rglob("version_*"))


def test_sigint_during_prepare_keeps_finished_scans_and_reruns(tmp_path):
    from fsl_med.data.phantom_raw import write_raw_chaos

    raw = write_raw_chaos(tmp_path / "raw", n_patients=8, size=256, depth=24, seed=0)
    out = tmp_path / "prep"
    argv = ["prepare", "chaos", "--src", str(raw), "--out", str(out), "--no-superpixels", "--no-progress"]
    proc = _start(argv, tmp_path)
    deadline = time.time() + 120
    while not list(out.glob("image_*.nii.gz")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)  # the first scan is written: preparation is under way
    proc.send_signal(signal.SIGINT)
    rc, err = _finish(proc)
    if rc == 0:
        pytest.skip("preparation finished before the signal")  # a fast machine: nothing to interrupt
    assert rc == 130, err[-2000:]
    line = [ln for ln in err.splitlines() if ln.startswith("fsl-med:")]
    assert len(line) == 1 and "prepare chaos interrupted by SIGINT" in line[0] and "rerun" in line[0], err
    assert subprocess.run([*FSL, *argv], cwd=tmp_path, capture_output=True, timeout=300).returncode == 0


# -- non-finite training ------------------------------------------------------------------------------

def test_non_finite_loss_stops_training_with_step_and_episode(phantom, tmp_path, capsys):
    out = tmp_path / "runs"
    rc = main(["train", *_common(phantom, out, tmp_path / "cache", steps=20), "optim.name=sgd", "optim.lr=1e30",
               "trainer.ckpt_every_n_steps=1", "name=nan"])
    assert rc == 2
    line = error_line(capsys.readouterr().err, "training stopped: non-finite", "at step", "episode(s): scan ",
                       "slice", "the last good checkpoint is")
    last = out / "nan" / "version_0" / "checkpoints" / "last.ckpt"
    ck = torch.load(last, map_location="cpu", weights_only=False)
    failed_at = int(line.split("at step ")[1].split(";")[0])
    assert ck["global_step"] == failed_at - 1  # the checkpoint before the bad step, not overwritten after it
    assert all(torch.isfinite(t).all() for t in ck["state_dict"].values() if t.is_floating_point())
    assert not list(out.rglob("best*.ckpt"))
    assert not (out / "nan" / "version_0" / "train_summary.json").exists()  # no success summary


# -- settings checked before anything is written --------------------------------------------------------

TRAINER_CASES = [
    ("trainer.precision=17", "trainer.precision"),
    ("trainer.precision=bf17-mixed", "trainer.precision"),
    ("trainer.accelerator=gpu", "trainer.accelerator"),
    ("trainer.accelerator=tpux", "trainer.accelerator"),
    ("trainer.devices=0", "trainer.devices"),
    ("trainer.devices=-2", "trainer.devices"),
    ("trainer.strategy=ddpx", "trainer.strategy"),
    ("trainer.num_nodes=0", "trainer.num_nodes"),
    ("trainer.max_steps=99999999999999999999", "trainer.max_steps"),
    ("trainer.val_check_interval=99999999999999999999", "trainer.val_check_interval"),
    ("trainer.log_every_n_steps=-1", "trainer.log_every_n_steps"),
    ("trainer.ckpt_every_n_steps=0", "trainer.ckpt_every_n_steps"),
    ("trainer.gradient_clip_val=-1", "trainer.gradient_clip_val"),
    ("trainer.gradient_clip_val=inf", "trainer.gradient_clip_val"),
]


@pytest.mark.parametrize("override,key", TRAINER_CASES, ids=[c[0] for c in TRAINER_CASES])
@pytest.mark.parametrize("verb", ["train", "eval"])
def test_trainer_settings_are_checked_before_a_run_folder_exists(verb, override, key, phantom, tmp_path, capsys):
    out = tmp_path / "runs"
    rc = main([verb, *_common(phantom, out, tmp_path / "cache"), override])
    assert rc == 2
    error_line(capsys.readouterr().err, f"'{key}'")
    assert not out.exists() or not any(out.rglob("version_*"))


def test_eval_takes_the_model_from_the_checkpoint(phantom, lora_ckpt, tmp_path, capsys, caplog):
    common = [*_common(phantom, tmp_path / "runs", tmp_path / "cache"), f"ckpt={lora_ckpt}",
              "eval.variants=[plain]", "eval.hd95=false"]
    assert main(["eval", *common]) == 0  # no training override repeated
    err = caplog.text
    notes = [ln for ln in err.splitlines() if "defines the model" in ln]
    assert len(notes) == 1 and "model.encoder.finetune='lora' (config: 'full')" in notes[0], err[-2000:]
    assert "model.head.alp.fg_thresh=0.9 (config: 0.95)" in notes[0]
    res = next((tmp_path / "runs").rglob("results.json")).read_text()
    assert '"finetune": "lora"' in res
    # an explicit override that agrees with the checkpoint is fine; one that contradicts it is an error
    assert main(["eval", *common, "model.encoder.finetune=lora"]) == 0
    capsys.readouterr()
    assert main(["eval", *common, "model.head.alp.fg_thresh=0.5"]) == 2
    error_line(capsys.readouterr().err, "model.head.alp.fg_thresh=0.5 on the command line contradicts the checkpoint",
                "trained with model.head.alp.fg_thresh=0.9")


def _edited(ckpt: Path, dest: Path, edit) -> Path:
    ck = torch.load(ckpt, map_location="cpu", weights_only=False)
    edit(ck)
    torch.save(ck, dest)
    return dest


def test_checkpoint_mismatches_name_what_differs(phantom, lora_ckpt, tmp_path, capsys):
    def cut_pos(ck):
        k = next(k for k in ck["state_dict"] if k.endswith("pos_embed"))
        ck["state_dict"][k] = ck["state_dict"][k][:, :5]

    def cut_patch(ck):
        k = next(k for k in ck["state_dict"] if k.endswith("patch_embed.proj.weight"))
        ck["state_dict"][k] = ck["state_dict"][k][..., :7, :7]

    def drop_block(ck):
        last = max(int(k.split("blocks.")[1].split(".")[0]) for k in ck["state_dict"] if ".blocks." in k)
        for k in [k for k in ck["state_dict"] if f".blocks.{last}." in k]:
            del ck["state_dict"][k]

    def bad_config_list(ck):
        ck["hyper_parameters"]["config"] = [1, 2]

    def bad_config_key(ck):
        ck["hyper_parameters"]["config"]["model"]["no_such_key"] = 1

    def not_a_tensor(ck):
        k = next(iter(ck["state_dict"]))
        ck["state_dict"][k] = "cut"

    cases = [
        (cut_pos, ["pos_embed has shape", "position embedding has 5 tokens in the checkpoint"]),
        (cut_patch, ["patch_embed.proj.weight", "patch 7x7"]),
        (drop_block, ["missing tensors", "depth 1 blocks in the checkpoint, 2 in the model"]),
        (bad_config_list, ["stored config is malformed (a list"]),
        (bad_config_key, ["stored config is malformed", "no_such_key"]),
        (not_a_tensor, ["is not a tensor"]),
    ]
    for edit, needles in cases:
        ck = _edited(lora_ckpt, tmp_path / f"{edit.__name__}.ckpt", edit)
        rc = main(["eval", *_common(phantom, tmp_path / "runs", tmp_path / "cache"), f"ckpt={ck}"])
        assert rc == 2, edit.__name__
        error_line(capsys.readouterr().err, str(ck), *needles)
    rc = main(["eval", *_common(phantom, tmp_path / "runs", tmp_path / "cache"), f"ckpt={lora_ckpt}",
               "data.image_size=64"])
    assert rc == 2
    error_line(capsys.readouterr().err, "checkpoint was trained with data.image_size=48, the config says 64",
                "the encoder would see 4x4 = 16 patch tokens, not 3x3 = 9")
    assert not list((tmp_path / "runs").rglob("version_*"))


# -- filesystem faults ----------------------------------------------------------------------------------

def test_full_disk_while_writing_a_checkpoint_is_named(phantom, tmp_path):
    # a file-size limit makes every write past 256 KiB fail as a full disk does, with an OS error
    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 18, 1 << 18))

    (tmp_path / "cache").mkdir()
    p = subprocess.run([*FSL, "train", *_common(phantom, tmp_path / "runs", tmp_path / "cache")], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       preexec_fn=limit)
    assert p.returncode != 0
    err = p.stderr
    error_line(err, "cannot write checkpoint", ".ckpt", "File too large")
    assert not list((tmp_path / "runs").rglob("*.ckpt")), "a partial checkpoint was left behind"
    assert not list((tmp_path / "runs").rglob(".*.tmp*"))
    assert not list((tmp_path / "runs").rglob("version_*")), "the failed start left its run folder"


def test_output_folder_below_a_file_is_named(phantom, tmp_path, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    rc = main(["train", *_common(phantom, blocker / "runs", tmp_path / "cache")])
    assert rc == 2
    error_line(capsys.readouterr().err, str(blocker), "Not a directory")



def test_sigterm_marks_the_wandb_run_failed(phantom, tmp_path):
    args = [*_common(phantom, tmp_path / "runs", tmp_path / "cache", steps=100000), "trainer.log_every_n_steps=1",
            "trainer.val_check_interval=100000", "name=wb", "logging.logger=wandb"]
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
    proc = subprocess.Popen([*FSL, "train", *args], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**env, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline",
                                            "HOME": str(tmp_path)})
    _wait_for(proc, "step 3/")
    proc.send_signal(signal.SIGTERM)
    rc, err = _finish(proc)
    assert rc == 143, err[-2000:]
    assert "could not mark the W&B run" not in err
    logs = list((tmp_path / "runs" / "wb" / "version_0" / "wandb").glob("offline-run-*/logs/debug.log"))
    assert len(logs) == 1
    # W&B records the exit code the run was finished with: not 0 (finished), but 143 (failed)
    assert "got exitcode: 143" in logs[0].read_text()


def test_caches_and_reports_are_never_written_into_the_data(phantom, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(phantom, data)
    names = sorted(p.name for p in data.iterdir())
    rc = main(["train", *_common(data, tmp_path / "runs", data / "cache")])
    assert rc == 2
    error_line(capsys.readouterr().err, "data.cache_dir", "lies inside the data.root folder")
    rc = main(["prepare", "import", "--src", str(data), "--dataset", "chaos", "--cache-dir", str(data / "sp")])
    assert rc == 2
    error_line(capsys.readouterr().err, "--cache-dir", "lies inside the source folder --src")
    rc = main(["bench", "--data", str(data), "--out", str(data / "bench"), "--parts", "matmul"])
    assert rc == 2
    error_line(capsys.readouterr().err, "--out", "lies inside the --data folder")
    assert sorted(p.name for p in data.iterdir()) == names


def test_sigterm_to_rank_zero_stops_every_ddp_rank_after_the_same_step(phantom, tmp_path):
    """Only rank 0 is signalled (as Kubernetes does): the ranks agree after the next step, save one
    checkpoint and exit 143 together, instead of one rank waiting forever in an all-reduce."""
    args = [*_common(phantom, tmp_path / "runs", tmp_path / "cache", steps=100000), "trainer.log_every_n_steps=2",
            "trainer.val_check_interval=100000", "name=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
            "trainer.strategy=ddp"]
    proc = _start(["train", *args], tmp_path)
    _wait_for(proc, "step 6/", timeout=300)
    proc.send_signal(signal.SIGTERM)
    rc, err = _finish(proc)
    assert rc == 143, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("fsl-med:")]
    assert len(lines) == 1 and "train interrupted by SIGTERM at step" in lines[0], err[-3000:]
    last = tmp_path / "runs" / "ddp" / "version_0" / "checkpoints" / "last.ckpt"
    step = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
    assert f"at step {step} of" in lines[0]


# -- found by a hostile trial (95 cases) after the first round of fixes ------------------------------------

BAD_VALUES = [
    (["name=../escape"], "'name'"),
    (["name=/abs"], "'name'"),
    (["name=a/b"], "'name'"),
    (["name=.."], "'name'"),
    (["seed=-1"], "'seed'"),
    (["seed=1180591620717411303424"], "'seed'"),
    (["protocol.seeds=[-1]"], "'protocol.seeds'"),
    (["eval.npart=1000000000000000000000"], "'eval.npart'"),
    (["data.image_size=1000000000"], "'data.image_size'"),
    (["data.cache_dir=~nosuchuser_fslmed/x"], "'data.cache_dir'"),
    (["ablation.runs={a: 1}"], "ablation.runs"),
]


@pytest.mark.parametrize("overrides,needle", BAD_VALUES, ids=[c[0][0][:30] for c in BAD_VALUES])
def test_out_of_range_settings_are_one_line_errors(overrides, needle, phantom, tmp_path, capsys):
    out = tmp_path / "runs"
    rc = main(["train", *_common(phantom, out, tmp_path / "cache"), *overrides])
    assert rc == 2
    error_line(capsys.readouterr().err, needle)
    assert not out.exists() or not any(out.rglob("version_*"))
    assert not (tmp_path / "escape").exists() and not Path("/abs").exists()


def test_ablation_row_name_cannot_leave_the_output_folder(phantom, tmp_path, capsys):
    cfg = tmp_path / "abl.yaml"
    cfg.write_text(f"defaults: [{DEMO}]\nablation:\n  runs:\n    - {{name: ../../escape, overrides: []}}\n")
    rc = main(["ablate", str(cfg), *_common(phantom, tmp_path / "runs", tmp_path / "cache")[1:]])
    assert rc == 2
    error_line(capsys.readouterr().err, "'name'")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_bad_config_files_are_named(phantom, tmp_path, capsys):
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"name: \xff\xfe\n")
    folder = tmp_path / "dir.yaml"
    folder.mkdir()
    for path, needle in ((binary, "not UTF-8 text"), (folder, "is a folder")):
        rc = main(["train", str(path), f"data.root={phantom}"])
        assert rc == 2
        error_line(capsys.readouterr().err, str(path), needle)


def test_empty_cache_variable_means_the_default_cache(monkeypatch, tmp_path):
    from fsl_med.config import load_config

    monkeypatch.setenv("FSL_MED_CACHE", "")
    assert load_config(DEMO, ["data.root=x"]).data.cache_dir == ".cache/fsl_med"


def test_complex_valued_query_is_refused(phantom, lora_ckpt, tmp_path, capsys):
    import nibabel as nib

    img = nib.load(str(phantom / "image_1.nii.gz"))
    cplx = tmp_path / "complex.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj).astype(np.complex64), img.affine), str(cplx))
    rc = main(["segment", "--ckpt", str(lora_ckpt), "--support-image", str(phantom / "image_2.nii.gz"),
               "--support-mask", str(phantom / "label_2.nii.gz"), "--label", "1", "--query", str(cplx),
               "--out", str(tmp_path / "p.nii.gz")])
    assert rc == 2
    error_line(capsys.readouterr().err, str(cplx), "complex-valued voxels")
    assert not (tmp_path / "p.nii.gz").exists()


def test_other_verbs_check_their_outputs_first(phantom, tmp_path, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    cases = [
        (["phantom", "--out", str(blocker / "ph"), "--n-scans", "2", "--size", "32", "--depth", "8"], "afile"),
        (["phantom", "--out", str(tmp_path / "big"), "--depth", "100000000"], "depth must be an integer in 8..512"),
        (["download", "chaos", "--out", str(tmp_path / "dl"), "--url", "http://[::1"], "invalid URL"),
        (["bench", "--data", str(phantom), "--out", str(blocker), "--parts", "matmul"], "exists and is not a folder"),
        (["bench", "--data", str(phantom), "--out", str(tmp_path / "b"), "--steps", "-3"], "--steps -3"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2, argv
        error_line(capsys.readouterr().err, needle)
    assert not (tmp_path / "big").exists() or not any((tmp_path / "big").glob("*.nii.gz"))


def test_too_many_validation_scans_is_said_not_silent(phantom, tmp_path, capsys, caplog):
    assert main(["train", *_common(phantom, tmp_path / "runs", tmp_path / "cache")[:-1], "data.num_val_scans=100",
                 "trainer.val_check_interval=1"]) == 0
    assert "data.num_val_scans=100, but fold 0 has only" in caplog.text and "no validation" in caplog.text


def test_sigterm_stops_test_time_training_within_a_step(phantom, lora_ckpt, tmp_path):
    proc = _start(["eval", *_common(phantom, tmp_path / "runs", tmp_path / "cache"), f"ckpt={lora_ckpt}",
                   "eval.variants=[plain,ttt]", "ttt.steps=1000000", "name=tt"], tmp_path)
    _wait_for(proc, "fold 0:")
    time.sleep(4)  # well inside the first volume's TTT (a million steps)
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    rc, err = _finish(proc)
    assert rc == 143 and time.time() - t0 < 60, err[-2000:]
    assert "eval interrupted by SIGTERM after 0 of" in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir()), "eval folders left behind"


def test_a_second_sigterm_never_cuts_the_checkpoint_off(phantom, tmp_path):
    args = [*_common(phantom, tmp_path / "runs", tmp_path / "cache", steps=100000), "trainer.log_every_n_steps=1",
            "trainer.val_check_interval=100000", "name=two"]
    proc = _start(["train", *args], tmp_path)
    _wait_for(proc, "step 5/")
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    rc, err = _finish(proc)
    assert rc == 143, err[-2000:]
    last = tmp_path / "runs" / "two" / "version_0" / "checkpoints" / "last.ckpt"
    assert f"saved {last}" in err, err[-2000:]
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] >= 5


def test_folders_given_for_files_are_named_as_folders(phantom, lora_ckpt, tmp_path, capsys):
    d = tmp_path / "x.ckpt"
    d.mkdir()
    rc = main(["train", *_common(phantom, tmp_path / "runs", tmp_path / "cache"), f"resume={d}"])
    assert rc == 2
    error_line(capsys.readouterr().err, "resume=", "is a folder")
    rc = main(["segment", "--ckpt", str(d), "--support-image", str(phantom / "image_2.nii.gz"), "--support-mask",
               str(phantom / "image_2.nii.gz"), "--query", str(phantom / "image_1.nii.gz"),
               "--out", str(tmp_path / "p.nii.gz")])
    assert rc == 2
    error_line(capsys.readouterr().err, "--ckpt", "is a folder")
    # an image given as the mask: the labels listed are capped, the line stays readable
    rc = main(["segment", "--ckpt", str(lora_ckpt), "--support-image", str(phantom / "image_2.nii.gz"),
               "--support-mask", str(phantom / "image_2.nii.gz"), "--query", str(phantom / "image_1.nii.gz"),
               "--out", str(tmp_path / "p.nii.gz")])
    assert rc == 2
    line = error_line(capsys.readouterr().err)
    assert ("non-integer" in line or "more)" in line) and len(line) < 400, line
