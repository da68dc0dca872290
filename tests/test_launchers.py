"""``protocol.launcher``: jobs run inline, as parallel local processes (same numbers, bit for bit), from a job table
that makes a rerun skip finished jobs, resume interrupted ones and run failed ones again; a changed config and a
second driver are refused with one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import error_line
from launch_cli import (  # noqa: F401 - module-scoped fixtures
    PROTOCOL,
    cache_dir_fixture,
    fsl_med,
    inline_fixture,
    job_table,
    numbers,
    phantom_fixture,
    protocol_args,
    report_dir,
    train_folders,
)

from fsl_med import locks
from fsl_med.cli import main
from fsl_med.config import load_config
from fsl_med.launchers import LocalLauncher, cpu_count, slurm_minutes

TAGS = ["s1-f0-seed1234", "s2-f0-seed1234-kidneys", "s2-f0-seed1234-liver-spleen"]


@pytest.fixture(scope="module")
def local(phantom, tmp_path_factory, cache_dir) -> tuple[Path, subprocess.CompletedProcess[str]]:
    out = tmp_path_factory.mktemp("local")
    p = fsl_med(["protocol", *protocol_args(phantom, cache_dir, out, "protocol.launcher=local", "protocol.parallel=2")])
    assert p.returncode == 0, p.stderr[-3000:]
    return out, p


def test_local_parallel_gives_the_inline_numbers_bit_for_bit(inline, local):
    out, p = local
    folder = report_dir(out)
    assert numbers(folder) == numbers(inline)  # every Dice, std and HD95 exactly
    assert (folder / "protocol.md").read_text().count("|") > 20
    table = job_table(folder)
    assert list(table) == TAGS and all(j["state"] == "done" for j in table.values())
    assert all(Path(j["train_dir"]).is_dir() and Path(j["results_path"]).is_file() for j in table.values())
    # two jobs at once, the two cores split between them, one log line per state change with a progress count
    assert "local launcher: up to 2 job(s) at once, 1 CPU thread(s) each, no GPU" in p.stderr
    assert "[0/3 done, 2 running] s2-f0-seed1234-kidneys: running (pid " in p.stderr
    assert "[3/3 done] " in p.stderr
    starts = [json.loads((folder / "jobs" / t / "state.json").read_text()) for t in TAGS]
    assert len({s["pid"] for s in starts}) == 3  # each job in a process of its own
    assert all("job.log" in os.listdir(folder / "jobs" / t) for t in TAGS)
    assert json.loads((folder / "protocol.json").read_text())["launcher"] == "local"


def test_rerun_of_a_finished_protocol_trains_nothing(phantom, cache_dir, local):
    out, _ = local
    before = train_folders(out)
    mtime = (report_dir(out) / "protocol.json").stat().st_mtime
    p = fsl_med(["protocol", *protocol_args(phantom, cache_dir, out, "protocol.launcher=local", "protocol.parallel=2")])
    assert p.returncode == 0, p.stderr[-3000:]
    assert train_folders(out) == before  # no job trained or ran again
    assert "3 of 3 jobs finished before" in p.stderr and "running (pid" not in p.stderr
    assert (report_dir(out) / "protocol.json").stat().st_mtime > mtime  # the report is written again
    assert not report_dir(out, version=1).exists()
    # the launch fields may change: the same protocol continued inline trains nothing either
    p = fsl_med(["protocol", *protocol_args(phantom, cache_dir, out)])
    assert p.returncode == 0 and train_folders(out) == before


def test_rerun_with_changed_settings_is_refused_naming_the_fields(phantom, cache_dir, local, capsys):
    out, _ = local
    rc = main(["protocol", *protocol_args(phantom, cache_dir, out, "optim.lr=0.01", steps=8)])
    assert rc == 2
    err = error_line(capsys.readouterr().err)
    assert "trainer.max_steps (6 -> 8)" in err and "optim.lr (0.001 -> 0.01)" in err and "name=" in err
    assert not report_dir(out, version=1).exists()


def test_a_second_driver_on_the_same_folder_is_refused(phantom, cache_dir, local, capsys):
    out, _ = local
    with locks.exclusive(report_dir(out) / "driver.lock", "the protocol folder"):
        rc = main(["protocol", *protocol_args(phantom, cache_dir, out)])
    assert rc != 0
    err = error_line(capsys.readouterr().err)
    assert f"pid {os.getpid()}" in err and "driver.lock" in err


def _wait_for(pred, timeout: float = 300.0, every: float = 0.2) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(every)
    raise AssertionError("timed out")


def test_stopped_local_protocol_resumes_to_the_uninterrupted_numbers(phantom, cache_dir, tmp_path):
    """SIGTERM to the driver: every running job saves last.ckpt and the driver exits 143; the same command resumes
    them (new training folders that start at the saved step) and ends with the numbers of an uninterrupted run."""
    det = ("trainer.deterministic=true", "protocol.settings=[2]")  # two jobs, both running when stopped
    ref = fsl_med(["protocol", *protocol_args(phantom, cache_dir, tmp_path / "ref", *det, steps=40)])
    assert ref.returncode == 0, ref.stderr[-3000:]
    out = tmp_path / "out"
    args = ["protocol", *protocol_args(phantom, cache_dir, out, *det, "protocol.launcher=local", "protocol.parallel=2",
                                       steps=40)]
    proc = subprocess.Popen([sys.executable, "-m", "fsl_med", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONWARNINGS": "ignore", "FSL_MED_POLL_SECONDS": "1"})
    logs = [report_dir(out) / "jobs" / t / "job.log" for t in TAGS[1:]]
    _wait_for(lambda: all(f.is_file() and "step 10/40" in f.read_text() for f in logs))
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    assert "rerun the same command to resume" in err.strip().splitlines()[-1]
    table = job_table(report_dir(out))
    assert [table[t]["state"] for t in TAGS[1:]] == ["interrupted", "interrupted"]
    saved = [json.loads((report_dir(out) / "jobs" / t / "state.json").read_text()) for t in TAGS[1:]]
    assert all(s["state"] == "interrupted" and s["signal"] == "SIGTERM" for s in saved)
    p = fsl_med(args)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stderr.count("(resumes from its last.ckpt)") == 2
    assert numbers(report_dir(out)) == numbers(report_dir(tmp_path / "ref"))


def test_a_killed_job_is_reported_failed_the_others_aggregate_and_a_rerun_runs_it(phantom, cache_dir, inline,
                                                                                  tmp_path):
    """A job killed from outside (as the OOM killer does): its error line is in the report and the exit status is 1;
    the other jobs still aggregate; the same command runs the failed job again and completes the protocol."""
    out = tmp_path / "out"
    args = ["protocol", *protocol_args(phantom, cache_dir, out, "protocol.settings=[2]", "protocol.launcher=local",
                                       "protocol.parallel=1")]
    proc = subprocess.Popen([sys.executable, "-m", "fsl_med", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONWARNINGS": "ignore", "FSL_MED_POLL_SECONDS": "1"})
    state = report_dir(out) / "jobs" / TAGS[1] / "state.json"
    _wait_for(lambda: state.is_file() and json.loads(state.read_text()).get("state") == "running")
    os.kill(json.loads(state.read_text())["pid"], signal.SIGKILL)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 2, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert f"1 protocol job(s) failed ({TAGS[1]})" in last and "protocol.json" in last
    rep = json.loads((report_dir(out) / "protocol.json").read_text())
    assert [r["tag"] for r in rep["runs"]] == [TAGS[2]]
    assert rep["failed"][0]["tag"] == TAGS[1] and "killed by SIGKILL" in rep["failed"][0]["error"]
    md = (report_dir(out) / "protocol.md").read_text()
    assert "## Failed jobs (1; not in the numbers above)" in md and "killed by SIGKILL" in md
    assert rep["settings"]["2"]["plain"]["n_runs"]["liver"] == 1
    p = fsl_med(args)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"{TAGS[1]}: failed before" in p.stderr and p.stderr.count("running (pid") == 1
    assert numbers(report_dir(out)) == {"2": numbers(inline)["2"]}


def test_launcher_settings_are_checked_with_one_line(capsys):
    cases = [("protocol.launcher=pbs", "protocol.launcher"), ("protocol.parallel=0", "protocol.parallel"),
             ("protocol.jobs_per_gpu=0", "protocol.jobs_per_gpu"), ("protocol.slurm.time=soon", "protocol.slurm.time"),
             ("protocol.slurm.mem=lots", "protocol.slurm.mem"), ("protocol.slurm.cpus=0", "protocol.slurm.cpus"),
             ("protocol.slurm.partition='gpu a100'", "protocol.slurm.partition"),
             ("protocol.slurm.extra=[constraint=a100]", "protocol.slurm.extra[0]"),
             ("protocol.slurm.extra=[--time=5]", "protocol.slurm.extra[0]"),
             ("protocol.slurm.max_requeues=-1", "protocol.slurm.max_requeues")]
    for override, key in cases:
        assert main(["protocol", "protocol_cpu", override]) == 2, override
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"'{key}'" in err[0], (override, err)


def test_no_wait_needs_the_slurm_launcher(phantom, cache_dir, tmp_path, capsys):
    rc = main(["protocol", *protocol_args(phantom, cache_dir, tmp_path), "--no-wait"])
    assert rc == 2
    assert "--no-wait needs protocol.launcher=slurm" in error_line(capsys.readouterr().err)
    assert not (tmp_path / "protocol-cpu-protocol").exists()  # nothing half-written


@pytest.mark.parametrize(("value", "minutes"), [("30", 30), ("1:30", 2), ("24:00:00", 1440), ("2-0", 2880),
                                                 ("1-12:30", 2190), ("0-0:0:30", 1)])
def test_slurm_time_in_minutes(value, minutes):
    assert slurm_minutes(value) == minutes


def test_wandb_runs_of_a_protocol_share_one_group_and_the_driver_logs_the_table_once(phantom, cache_dir, tmp_path):
    """Offline W&B (no key here): one run per job, each in the protocol's group (the group name is in each run's
    record), and one more run, of job type ``aggregate``, holding the report's table."""
    out = tmp_path / "wb"
    p = fsl_med(["protocol", *protocol_args(phantom, cache_dir, out, "logging.logger=wandb", "protocol.settings=[2]")],
                env={"WANDB_API_KEY": "", "NETRC": str(tmp_path / "no-netrc")})
    assert p.returncode == 0, p.stderr[-3000:]
    folder = report_dir(out)
    group = b"protocol-cpu-protocol-version_0"
    job_runs = sorted(folder.glob("runs/*/version_*/wandb/offline-run-*/run-*.wandb"))
    assert len(job_runs) == 2  # one W&B run per job, not one for the whole process
    assert all(group in f.read_bytes() and b"aggregate" not in f.read_bytes() for f in job_runs)
    agg = list(folder.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(agg) == 1 and group in agg[0].read_bytes() and b"aggregate" in agg[0].read_bytes()
    tables = list(folder.glob("wandb/offline-run-*/files/media/table/report_*.table.json"))
    assert len(tables) == 1
    doc = json.loads(tables[0].read_text())
    csv_rows = (folder / "protocol.csv").read_text().strip().splitlines()
    assert doc["columns"] == csv_rows[0].split(",") and len(doc["data"]) == len(csv_rows) - 1


def test_ablation_rows_as_local_jobs_give_the_inline_numbers_and_a_reuse_row_waits_for_its_source(phantom, cache_dir,
                                                                                                   tmp_path):
    grid = ("ablation.runs=[{name: full}, {name: frozen, overrides: [model.encoder.finetune=frozen], variants: [plain]},"
            " {name: full-3shot, reuse: full, overrides: [shots=3], variants: [plain, cca]}]")
    base = ["ablate", str(PROTOCOL.with_name("ablation_cpu.yaml")), f"data.root={phantom}", f"data.cache_dir={cache_dir}",
            "data.image_size=64", "data.num_workers=0", "model.encoder.name=vit_tiny_patch14", "trainer.max_steps=2",
            "data.episodes_per_epoch=2", "ttt.steps=1", "trainer.enable_progress_bar=false",
            "data.test_organs=[liver,spleen]", "eval.overlay_slices=0", "ablation.variants=[plain,ttt]",
            "protocol.threads_per_job=1", grid]
    reports = {}
    for launcher in ("inline", "local"):
        out = tmp_path / launcher
        p = fsl_med([*base, f"logging.output_dir={out}", f"protocol.launcher={launcher}", "protocol.parallel=2"])
        assert p.returncode == 0, p.stderr[-3000:]
        folder = report_dir(out, "ablation-cpu", "ablation")
        reports[launcher] = json.loads((folder / "ablation.json").read_text())
        table = job_table(folder)
        assert [table[t]["kind"] for t in ("full", "frozen", "full-3shot")] == ["train_eval", "eval_untrained",
                                                                              "eval_ckpt"]
        if launcher == "local":  # two jobs at once, but the reuse row only once 'full' is done
            lines = p.stderr.splitlines()
            done = next(i for i, x in enumerate(lines) if "] full: done" in x)
            started = next(i for i, x in enumerate(lines) if "] full-3shot: running (pid" in x)
            assert started > done and "frozen: running (pid" in "\n".join(lines[:done])
    for a, b in zip(reports["inline"]["runs"], reports["local"]["runs"], strict=True):
        assert a["name"] == b["name"] and a["dice"] == b["dice"] and a["hd95_mean"] == b["hd95_mean"]
        assert a["steps"] == b["steps"] and a["trained"] == b["trained"]
    runs = {r["name"]: r for r in reports["local"]["runs"]}
    assert runs["full-3shot"]["checkpoint"] == runs["full"]["checkpoint"] and runs["frozen"]["checkpoint"] is None


def test_local_launcher_splits_the_cores_unless_threads_per_job_is_set():
    split = LocalLauncher(load_config(None, ["data.root=unused", "protocol.launcher=local", "protocol.parallel=2"]))
    assert split.slots == 2 and split.threads == max(1, cpu_count() // 2) and split.gpus == 0
    one = LocalLauncher(load_config(None, ["data.root=unused", "protocol.launcher=local"]))  # null parallel: 1 without a GPU
    assert one.slots == 1 and one.threads == cpu_count()
    fixed = LocalLauncher(load_config(None, ["data.root=unused", "protocol.parallel=2", "protocol.threads_per_job=3"]))
    assert fixed.threads == 3
