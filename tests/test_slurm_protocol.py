"""``protocol.launcher=slurm`` on a real single-node SLURM (scripts/slurm-local.sh): every job runs as a SLURM job
(its id in the job table, SLURM's own job-completion log agrees), the report equals ``inline``'s bit for bit, a job
sent SIGTERM mid-training requeues itself and ends with an uninterrupted run's numbers, and ``--no-wait`` submits
and returns while a rerun of the same command waits and aggregates."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from launch_cli import (  # noqa: F401 - module-scoped fixtures
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
from slurm_cluster import (
    jobcomp_records,
    scontrol_job,
    slurm_cluster_fixture,  # noqa: F401 - the `slurm_cluster` fixture
)

TAGS = ["s1-f0-seed1234", "s2-f0-seed1234-kidneys", "s2-f0-seed1234-liver-spleen"]
SLURM = ("protocol.launcher=slurm", "protocol.slurm.cpus=1", "protocol.slurm.time=30")


def _completed(job_id: str) -> list[dict[str, str]]:
    """SLURM's job-completion records of ``job_id`` (``<array>_<task>`` or a plain id), oldest first."""
    array, _, task = job_id.partition("_")
    recs = [r for r in jobcomp_records() if (r.get("ArrayJobId") == array and r.get("ArrayTaskId") == task)
            or (not task and r.get("JobId") == array)]
    return recs


def test_protocol_on_slurm_gives_the_inline_numbers_and_no_wait_then_a_rerun_aggregates(slurm_cluster, phantom,
                                                                                       cache_dir, inline, tmp_path):
    """``--no-wait`` submits one job array and returns; the same command without it adopts the jobs (or finds them
    finished), waits and writes the report, whose rows equal ``inline``'s; SLURM's own records agree."""
    out = tmp_path / "slurm"
    args = ["protocol", *protocol_args(phantom, cache_dir, out, *SLURM)]
    p = fsl_med([*args, "--no-wait"])
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.strip().splitlines()
    assert lines[0].startswith("submitted 3 job(s) to SLURM: ") and "--no-wait" not in lines[1]
    assert lines[1].startswith("to wait for them and write the report, rerun: fsl-med protocol ")
    assert lines[-1] == str(report_dir(out) / "jobs.json")
    assert not (report_dir(out) / "protocol.json").exists()
    ids = [job_table(report_dir(out))[t]["slurm_job_id"] for t in TAGS]
    array = ids[0].split("_")[0]
    assert ids == [f"{array}_{i}" for i in range(3)]  # one job array
    p = fsl_med(args)  # the same command without --no-wait
    assert p.returncode == 0, p.stderr[-3000:]
    assert "SLURM job" in p.stderr and ("from before" in p.stderr or "finished before" in p.stderr)
    folder = report_dir(out)
    assert numbers(folder) == numbers(inline)
    table = job_table(folder)
    assert [table[t]["slurm_job_id"] for t in TAGS] == ids and len(train_folders(out)) == 3  # nothing submitted twice
    for tag, job_id in zip(TAGS, ids, strict=True):
        state = json.loads((folder / "jobs" / tag / "state.json").read_text())
        assert state["state"] == "done" and state["slurm_job_id"] == job_id and state["requeues"] == 0
        recs = _completed(job_id)  # SLURM's own record: the job ran as a SLURM job and completed
        assert recs and recs[-1]["JobState"] == "COMPLETED", (job_id, recs)
        assert recs[-1]["Name"] == "fsl_med-protocol-cpu-protocol"
        known = scontrol_job(job_id)  # remembered for a few minutes after the end (MinJobAge)
        assert not known or known["JobState"] == "COMPLETED"
    rep = json.loads((folder / "protocol.json").read_text())
    assert rep["launcher"] == "slurm" and rep["requeues"] == 0 and [r["slurm_job_id"] for r in rep["runs"]] == ids
    assert "Launcher `slurm`; SLURM requeues" in (folder / "protocol.md").read_text()


def test_sigterm_mid_training_requeues_and_ends_as_an_uninterrupted_run(slurm_cluster, phantom, cache_dir, tmp_path):
    extra = ("protocol.settings=[1]", "trainer.deterministic=true")
    ref = fsl_med(["protocol", *protocol_args(phantom, cache_dir, tmp_path / "ref", *extra, steps=60)])
    assert ref.returncode == 0, ref.stderr[-3000:]
    out = tmp_path / "slurm"
    cmd = [sys.executable, "-m", "fsl_med", "protocol", *protocol_args(phantom, cache_dir, out, *extra, *SLURM, steps=60)]
    driver = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONWARNINGS": "ignore", "FSL_MED_POLL_SECONDS": "1"})
    state_file = report_dir(out) / "jobs" / TAGS[0] / "state.json"
    deadline, job_id = time.monotonic() + 300, None
    while time.monotonic() < deadline and job_id is None:
        time.sleep(0.3)
        logs = list((report_dir(out) / "slurm").glob("*/*_log.err"))
        if logs and "step 20/60" in logs[0].read_text(errors="replace") and state_file.is_file():
            job_id = json.loads(state_file.read_text())["slurm_job_id"]
    assert job_id is not None, "the job did not reach step 20"
    subprocess.run(["scancel", "--signal=TERM", job_id], check=True)
    _, err = driver.communicate(timeout=600)
    assert driver.returncode == 0, err[-3000:]
    assert numbers(report_dir(out)) == numbers(report_dir(tmp_path / "ref"))
    for state in ("[0/1 done, 1 queued] s1-f0-seed1234: queued (SLURM job", "running (SLURM job",
                  "[1/1 done] s1-f0-seed1234: done (SLURM COMPLETED)"):  # one line per state change
        assert state in err, state
    assert f"{TAGS[0]}: requeued (stopped by SIGTERM with last.ckpt saved, requeue 1;" in err
    assert f"{TAGS[0]}: running (SLURM job {job_id}, restart 1)" in err
    runs = train_folders(out)
    assert len(runs) == 2  # the first run, stopped with its last.ckpt, and the requeued run that resumed from it
    state = json.loads(state_file.read_text())
    assert state["state"] == "done" and state["requeues"] == 1
    assert json.loads((report_dir(out) / "protocol.json").read_text())["requeues"] == 1
    recs = _completed(job_id)
    assert [r["JobState"] for r in recs][-2:] == ["PENDING", "COMPLETED"]  # requeued (then pending), then completed
