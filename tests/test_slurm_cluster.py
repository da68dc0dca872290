"""The local single-node SLURM (scripts/slurm-local.sh) behaves like the cluster protocol.launcher=slurm needs:
sbatch runs jobs, the job-completion log and scontrol record them, a job can requeue itself, and submitit submits,
collects results (without sacct: no accounting database), runs arrays, and requeues a Checkpointable on SIGUSR2."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from slurm_cluster import SCRIPT, jobcomp_record, scontrol_job, slurm_cluster_fixture, wait_for_jobs  # noqa: F401

submitit = pytest.importorskip("submitit")

TESTS = Path(__file__).resolve().parent


def _sbatch(*args: str) -> str:
    p = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip().split(";")[0]


def _executor(folder: Path, cluster) -> submitit.AutoExecutor:
    ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
    # the job's python imports this module (cloudpickle pickles its functions by reference): put tests/ on its path
    ex.update_parameters(timeout_min=5, cpus_per_task=1, slurm_partition=cluster.partition,
                         slurm_setup=[f"export PYTHONPATH={TESTS}"])
    return ex


def add_and_describe(a: int, b: int) -> dict:
    """A submitit job body: the sum and what SLURM told the job."""
    return {"sum": a + b, "job_id": os.environ.get("SLURM_JOB_ID"), "executor": os.environ.get("SUBMITIT_EXECUTOR"),
            "cpus": os.environ.get("SLURM_CPUS_PER_TASK")}


class SleepUntilRequeued(submitit.helpers.Checkpointable):
    """Sleeps on its first run (marks MARKER, counts runs in its own state); returns on the requeued run."""

    def __init__(self) -> None:
        self.runs = 0

    def __call__(self, marker: str) -> dict:
        self.runs += 1
        restart = os.environ.get("SLURM_RESTART_COUNT", "0")
        with open(marker, "a") as f:
            f.write(f"run {self.runs} restart {restart}\n")
        if restart == "0":
            time.sleep(120)
        return {"runs": self.runs, "restart": restart}


def test_start_is_idempotent_when_slurm_is_up(slurm_cluster):
    p = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "already running" in p.stdout, p.stdout
    s = subprocess.run(["bash", str(SCRIPT), "status"], capture_output=True, text=True, timeout=60)
    assert s.returncode == 0 and slurm_cluster.partition in s.stdout, s.stdout + s.stderr


def test_sbatch_wrap_runs_and_is_recorded_completed(slurm_cluster, tmp_path):
    out = tmp_path / "out.txt"
    job = _sbatch("-o", str(out), "--wrap", "echo hello from slurm job $SLURM_JOB_ID")
    states = wait_for_jobs([job], timeout=60)
    assert out.read_text().strip() == f"hello from slurm job {job}"
    assert states[job] in ("COMPLETED", ""), states  # '' once scontrol has forgotten the job (MinJobAge)
    info = scontrol_job(job)
    if info:
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", info
        assert info["StdOut"] == str(out), info
    if slurm_cluster.jobcomp_log is None:
        pytest.skip("this SLURM has no jobcomp/filetxt log")
    rec = jobcomp_record(job, slurm_cluster.jobcomp_log)
    assert rec.get("JobState") == "COMPLETED" and rec.get("ExitCode") == "0:0", rec


def test_a_job_requeues_itself_and_its_second_run_sees_restart_count_1(slurm_cluster, tmp_path):
    script = tmp_path / "requeue.sh"
    script.write_text(
        "#!/bin/bash\n"
        f"cd {tmp_path}\n"
        'echo "run restart=${SLURM_RESTART_COUNT:-unset}" >> runs.txt\n'
        'if [ "${SLURM_RESTART_COUNT:-0}" = 0 ]; then scontrol requeue "$SLURM_JOB_ID"; sleep 60; exit 3; fi\n'
        'echo "restart=$SLURM_RESTART_COUNT" > second.txt\n'
    )
    job = _sbatch("-o", str(tmp_path / "slurm-%j.out"), str(script))
    states = wait_for_jobs([job], timeout=60)
    assert (tmp_path / "second.txt").read_text().strip() == "restart=1"
    assert (tmp_path / "runs.txt").read_text().splitlines() == ["run restart=unset", "run restart=1"]
    assert states[job] in ("COMPLETED", ""), states
    info = scontrol_job(job)
    if info:
        assert info["Restarts"] == "1" and info["JobState"] == "COMPLETED", info


def test_submitit_returns_a_result_without_sacct(slurm_cluster, tmp_path):
    ex = _executor(tmp_path, slurm_cluster)
    job = ex.submit(add_and_describe, 2, 3)
    # submitit's watcher asks sacct, which fails here: job.state stays UNKNOWN and job.done() only turns True when
    # the result pickle exists. Wait with squeue first so that a job that died without a pickle fails, not hangs.
    wait_for_jobs([job.job_id], timeout=60)
    assert job.paths.result_pickle.is_file(), (job.stdout(), job.stderr())
    assert job.done()
    res = job.result()
    assert res == {"sum": 5, "job_id": job.job_id, "executor": "slurm", "cpus": "1"}
    sbatch = job.paths.submission_file.read_text()
    for line in ("#SBATCH --signal=USR2@90", f"#SBATCH --partition={slurm_cluster.partition}",
                 "#SBATCH --cpus-per-task=1", "#SBATCH --time=5", f"export PYTHONPATH={TESTS}"):
        assert line in sbatch, sbatch
    assert job.paths.stdout == tmp_path / f"{job.job_id}_0_log.out" and job.paths.stdout.is_file()
    assert job.paths.stderr == tmp_path / f"{job.job_id}_0_log.err"


def test_submitit_map_array_gives_one_job_per_task(slurm_cluster, tmp_path):
    ex = _executor(tmp_path, slurm_cluster)
    ex.update_parameters(slurm_array_parallelism=2)
    jobs = ex.map_array(add_and_describe, [1, 2, 3], [10, 20, 30])
    array_id = jobs[0].job_id.split("_")[0]
    assert [j.job_id for j in jobs] == [f"{array_id}_{i}" for i in range(3)]
    wait_for_jobs([array_id], timeout=60)
    assert [j.result()["sum"] for j in jobs] == [11, 22, 33]
    info = scontrol_job(f"{array_id}_1")
    if info:
        assert info["ArrayJobId"] == array_id and info["ArrayTaskId"] == "1", info
    assert "#SBATCH --array=0-2%2" in (tmp_path / f"{array_id}_submission.sh").read_text()


def test_submitit_checkpointable_is_requeued_on_sigusr2(slurm_cluster, tmp_path):
    marker = tmp_path / "marker.txt"
    marker.touch()
    ex = _executor(tmp_path, slurm_cluster)
    job = ex.submit(SleepUntilRequeued(), str(marker))
    deadline = time.monotonic() + 30
    while "run 1" not in marker.read_text():
        assert time.monotonic() < deadline, (job.stdout(), job.stderr())
        time.sleep(0.3)
    time.sleep(1)  # submitit installed its handlers before calling the function; give the sleep a moment
    subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True, timeout=30)
    wait_for_jobs([job.job_id], timeout=60)
    # checkpoint() pickled the callable with runs=1; the requeued run resumed it
    assert job.result() == {"runs": 2, "restart": "1"}
    assert marker.read_text().splitlines() == ["run 1 restart 0", "run 2 restart 1"]
    assert "Caught signal SIGUSR2" in job.stderr()
