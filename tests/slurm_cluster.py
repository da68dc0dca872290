"""A real single-node SLURM for the tests (scripts/slurm-local.sh) and helpers that read it without `sacct` (there is
no accounting database): `scontrol show job`, `squeue` and the filetxt job-completion log.

``slurm_cluster`` (session fixture; a test module imports ``slurm_cluster_fixture`` to use it) makes sure SLURM is up, starting it with ``scripts/slurm-local.sh start`` when
``sinfo`` does not answer; it skips with the reason when that cannot be done (not root, no apt, the script failed),
and fails instead under CI=true (a green CI ran the SLURM tests), like the real-data fixture ``chaos``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "slurm-local.sh"
CONF = Path("/etc/slurm/slurm.conf")
CONF_MARK = "# written by fsl_med scripts/slurm-local.sh"  # first line of the slurm.conf that slurm-local.sh writes
JOBCOMP_LOG = Path("/var/log/slurm/jobcomp.log")  # JobCompLoc of the slurm.conf that slurm-local.sh writes
UP_STATES = {"idle", "mixed", "allocated", "completing"}

# "Key=value Key2=value with spaces Key3=..." -> split before each " Key=" (keys such as AllocNode:Sid, CPUs/Task)
_FIELD_START = re.compile(r"\s+(?=[A-Za-z][\w:/]*=)")


@dataclass(frozen=True)
class SlurmCluster:
    """What the tests need to know about the running SLURM."""

    partition: str          # the default partition
    node_state: str         # as sinfo reported it when the fixture checked
    jobcomp_log: Path | None  # JobCompLoc when JobCompType is jobcomp/filetxt, else None


def _run(*cmd: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def node_state() -> str:
    """The first node's state as ``sinfo -h -o %T`` says (``idle``, ``down*``, ...); '' when SLURM does not answer."""
    if shutil.which("sinfo") is None:
        return ""
    try:
        p = _run("sinfo", "-h", "-o", "%T", timeout=20)
    except subprocess.TimeoutExpired:
        return ""
    lines = p.stdout.split()
    return lines[0] if p.returncode == 0 and lines else ""


def parse_key_values(line: str) -> dict[str, str]:
    """``Key=value`` fields of one ``scontrol -o`` or jobcomp line (a value may hold spaces or further '=')."""
    out: dict[str, str] = {}
    for field in _FIELD_START.split(line.strip()):
        key, sep, value = field.partition("=")
        if sep:
            out[key] = value.strip()
    return out


def scontrol_job(job_id: str) -> dict[str, str]:
    """``scontrol show job -o JOB_ID`` as a dict (JobState, Restarts, ExitCode, StdOut, ...); {} when SLURM has
    forgotten the job (MinJobAge after it ended) or never knew it. For an array's own id (``123``) SLURM lists
    every task; this returns the first line (ask for ``123_0`` for one task)."""
    p = _run("scontrol", "show", "job", "-o", str(job_id))
    lines = [ln for ln in p.stdout.splitlines() if ln.strip()]
    return parse_key_values(lines[0]) if p.returncode == 0 and lines else {}


def jobcomp_records(path: Path | str = JOBCOMP_LOG) -> list[dict[str, str]]:
    """The records of SLURM's jobcomp/filetxt log, one dict per line (JobId, JobState, ExitCode, ...), oldest first.
    A requeued run is recorded too (22.05 writes it with JobState=PENDING), so a job may have several records."""
    p = Path(path)
    if not p.is_file():
        return []
    return [parse_key_values(ln) for ln in p.read_text(errors="replace").splitlines() if ln.startswith("JobId=")]


def jobcomp_record(job_id: str, path: Path | str = JOBCOMP_LOG, timeout: float = 15) -> dict[str, str]:
    """The newest jobcomp record of JOB_ID, waiting up to TIMEOUT seconds for it; {} when none came."""
    deadline = time.monotonic() + timeout
    while True:
        recs = [r for r in jobcomp_records(path) if r.get("JobId") == str(job_id)]
        if recs or time.monotonic() > deadline:
            return recs[-1] if recs else {}
        time.sleep(0.5)


def queued(ids: Iterable[str]) -> dict[str, str]:
    """{squeue id: state} of the jobs among IDS that squeue still lists (pending, running, completing, requeued)."""
    ids = [str(i) for i in ids]
    if not ids:
        return {}
    p = _run("squeue", "-h", "-o", "%i %T", "-j", ",".join(ids))
    if p.returncode != 0:
        if "Invalid job id" in p.stderr:
            return {}  # all of them are finished and forgotten
        raise RuntimeError(f"squeue failed: {p.stderr.strip()}")
    return dict(ln.split(None, 1) for ln in p.stdout.splitlines() if ln.strip())


def wait_for_jobs(ids: Iterable[str], timeout: float = 60, poll: float = 0.5) -> dict[str, str]:
    """Waits until squeue lists none of IDS (jobs or array tasks: ``123``, ``123_0``); returns {id: JobState} from
    scontrol ('' when already forgotten). Raises TimeoutError naming the jobs still queued. Uses no sacct."""
    ids = [str(i) for i in ids]
    deadline = time.monotonic() + timeout
    while left := queued(ids):
        if time.monotonic() > deadline:
            raise TimeoutError(f"SLURM jobs still queued after {timeout:.0f} s: {left}")
        time.sleep(poll)
    return {i: scontrol_job(i).get("JobState", "") for i in ids}


def _config() -> dict[str, str]:
    p = _run("scontrol", "show", "config")
    return {k.strip(): v.strip() for k, _, v in (ln.partition("=") for ln in p.stdout.splitlines()) if v}


def _ours_and_down() -> bool:
    """slurm-local.sh's config with no slurmctld running here: down, without waiting ~10 s for sinfo to give up."""
    try:
        ours = CONF.read_text().startswith(CONF_MARK)
    except OSError:
        return False
    return ours and not any(_comm(p) == "slurmctld" for p in Path("/proc").glob("[0-9]*"))


def _comm(proc: Path) -> str:
    try:
        return (proc / "comm").read_text().strip()
    except OSError:
        return ""


def _start() -> str | None:
    """Starts the local SLURM; returns why it could not, or None once the node is up."""
    if shutil.which("sbatch") is None:
        if os.geteuid() != 0:
            return "SLURM is not installed and installing it needs root"
        if shutil.which("apt-get") is None:
            return "SLURM is not installed and there is no apt-get to install it"
    try:
        p = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True, timeout=900,
                           stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return f"{SCRIPT.name} start did not finish in 900 s"
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or p.stdout.strip().splitlines() or ["(no output)"])[-1]
        return f"{SCRIPT.name} start failed: {last}"
    return None


@pytest.fixture(scope="session", name="slurm_cluster")
def slurm_cluster_fixture() -> SlurmCluster:
    """A running single-node SLURM (started by scripts/slurm-local.sh when needed). Skips with the reason when it
    cannot be started; fails under CI=true."""
    state = "" if _ours_and_down() else node_state()
    if state not in UP_STATES:
        why = _start()
        state = node_state() if why is None else ""
        if why is None and state not in UP_STATES:
            why = f"SLURM node not up after {SCRIPT.name} start (sinfo says {state or 'nothing'!r})"
        if why is not None:
            msg = f"no local SLURM: {why}"
            if os.environ.get("CI", "").lower() == "true":
                pytest.fail(msg + " and CI=true requires it (bash scripts/slurm-local.sh start)")
            pytest.skip(msg)
    parts = _run("sinfo", "-h", "-o", "%P").stdout.split()
    partition = next((p.rstrip("*") for p in parts if p.endswith("*")), parts[0].rstrip("*") if parts else "")
    conf = _config()
    jobcomp = Path(conf["JobCompLoc"]) if conf.get("JobCompType") == "jobcomp/filetxt" and conf.get("JobCompLoc") \
        else None
    return SlurmCluster(partition=partition, node_state=state, jobcomp_log=jobcomp)
