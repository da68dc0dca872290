"""Where the jobs of ``protocol``, ``ablate`` and ``compare`` run (``protocol.launcher``).

- ``inline``: one after another in the driver's own process (the default; as before).
- ``local``: up to ``protocol.parallel`` jobs at once, each a process of its own (``python -m fsl_med.jobs FOLDER``).
  With GPUs a job is placed on the GPU with the fewest jobs, at most ``protocol.jobs_per_gpu`` per GPU
  (``CUDA_VISIBLE_DEVICES``); the CPU cores are split between the jobs (``torch.set_num_threads``).
- ``slurm``: each job a SLURM job, sent as one job array through submitit with the resources of ``protocol.slurm``.
  A job stopped by SIGTERM (preemption, ``scancel --signal=TERM``) or SIGUSR2 (submitit's warning before the time
  limit) saves ``last.ckpt`` and requeues itself through submitit's checkpointing; the requeued job resumes from it.

Every launcher runs :func:`fsl_med.jobs.run_job` on the job's folder; the driver (:mod:`fsl_med.job_table`) reads the
jobs' ``state.json`` and asks the launcher only whether a job's process or SLURM job is still there.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from fsl_med import interrupts
from fsl_med.errors import FslMedError
from fsl_med.jobs import THREADS_ENV, read_state, run_job, write_state

log = logging.getLogger(__name__)

SLURM_LIVE = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
              "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT", "PREEMPTED")
"""SLURM job states in which a job is still queued or running (``squeue``'s ``%T``)."""


@dataclass
class Ended:
    """A job whose process or SLURM job is gone: its exit code (local) or SLURM's last word on it."""

    folder: Path
    how: str


def cpu_count() -> int:
    """The CPU cores this process may use (its affinity mask, else ``os.cpu_count()``)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class LocalLauncher:
    """Up to ``slots`` jobs at once as child processes of the driver (each in a session of its own, so a Ctrl-C at the
    terminal reaches the driver only, which then stops every child once)."""

    name = "local"

    def __init__(self, cfg: DictConfig) -> None:
        import torch

        pr = cfg.protocol
        self.gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if self.gpus:
            cap = self.gpus * int(pr.jobs_per_gpu)
            self.slots = min(int(pr.parallel), cap) if pr.parallel is not None else cap
        else:
            self.slots = int(pr.parallel) if pr.parallel is not None else 1
        self.threads = int(pr.threads_per_job or max(1, cpu_count() // self.slots))
        self.running: dict[Path, tuple[subprocess.Popen[bytes], int | None]] = {}
        where = (f"{self.gpus} GPU(s), at most {pr.jobs_per_gpu} job(s) per GPU" if self.gpus else "no GPU")
        log.info("local launcher: up to %d job(s) at once, %d CPU thread(s) each, %s", self.slots, self.threads, where)

    def free(self) -> int:
        """How many more jobs may start now."""
        return self.slots - len(self.running)

    def _pick_gpu(self) -> int | None:
        if not self.gpus:
            return None
        load = {g: 0 for g in range(self.gpus)}
        for _, gpu in self.running.values():
            if gpu is not None:
                load[gpu] += 1
        return min(load, key=lambda g: (load[g], g))

    def start(self, folders: list[Path]) -> dict[Path, str]:
        """Start each job of ``folders`` as a child process (the caller keeps within :meth:`free`); returns what to
        log per job (its pid, GPU and threads)."""
        started = {}
        for folder in folders:
            gpu = self._pick_gpu()
            env = {**os.environ, THREADS_ENV: str(self.threads), "OMP_NUM_THREADS": str(self.threads),
                   "PYTHONUNBUFFERED": "1"}
            if gpu is not None:
                env["CUDA_VISIBLE_DEVICES"] = str(gpu)
            logf = open(folder / "job.log", "ab")  # noqa: SIM115 - the child holds it; closed when it ends
            try:
                proc = subprocess.Popen([sys.executable, "-m", "fsl_med.jobs", str(folder)], stdout=logf,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                        start_new_session=True)
            finally:
                logf.close()
            self.running[folder] = (proc, gpu)
            started[folder] = f"pid {proc.pid}" + (f", GPU {gpu}" if gpu is not None else "") + \
                f", {self.threads} thread(s)"
        return started

    def poll(self) -> list[Ended]:
        """The jobs whose process has exited since the last call."""
        ended = []
        for folder, (proc, _) in list(self.running.items()):
            rc = proc.poll()
            if rc is not None:
                del self.running[folder]
                ended.append(Ended(folder, f"exit code {rc}" if rc >= 0 else f"killed by {signal.Signals(-rc).name}"))
        return ended

    def stop(self, signum: int, grace: float = 300.0) -> None:
        """Send ``signum`` to every running job once and wait (up to ``grace`` seconds, then SIGKILL) for them to save
        ``last.ckpt`` and exit."""
        for proc, _ in self.running.values():
            if proc.poll() is None:
                proc.send_signal(signum)
        deadline = time.monotonic() + grace
        for proc, _ in self.running.values():
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class SlurmJob:
    """The callable submitit runs in each SLURM job: :func:`fsl_med.jobs.run_job` on the job's folder.

    A stop by SIGTERM or SIGUSR2 (the job saved ``last.ckpt``) hands over to submitit's own handler for its
    requeue signal, which calls :meth:`checkpoint` (the same job again, on the same folder), requeues the SLURM job
    with ``scontrol requeue`` and exits; the requeued run resumes from ``last.ckpt``. After ``max_requeues`` requeues
    (SLURM_RESTART_COUNT) the job fails instead, and a rerun of the command resumes it.
    """

    def __init__(self, max_requeues: int) -> None:
        self.max_requeues = int(max_requeues)

    def checkpoint(self, folder: str) -> Any:
        """submitit's checkpoint hook: resubmit this job on the same folder (its state lives on disk)."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, folder)

    def __call__(self, folder: str) -> str:
        logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s", force=True)
        for name in ("lightning.pytorch", "lightning.fabric"):
            logging.getLogger(name).propagate = False
        os.environ.setdefault(THREADS_ENV, os.environ.get("SLURM_CPUS_PER_TASK", ""))  # unless threads_per_job
        requeue = signal.getsignal(signal.SIGUSR2)  # submitit's checkpoint-and-requeue handler
        try:
            with interrupts.installed(extra=(signal.SIGUSR2,)):
                run_job(folder)
        except interrupts.Interrupted as e:
            restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
            if restarts >= self.max_requeues or not callable(requeue):
                why = (f"stopped by {e.name} after {restarts} requeue(s) (protocol.slurm.max_requeues="
                       f"{self.max_requeues}); its last.ckpt is kept: rerun the command to resume it")
                write_state(Path(folder), "failed", error=why)
                raise RuntimeError(why) from None
            write_state(Path(folder), "requeued", signal=e.name)
            log.warning("stopped by %s: last.ckpt saved; requeueing (restart %d of at most %d)", e.name, restarts + 1,
                        self.max_requeues)
            requeue(signal.SIGUSR2, None)  # submitit: checkpoint(), scontrol requeue, exit
            raise  # not reached: submitit exits
        return "done"


def slurm_minutes(value: str) -> int:
    """``protocol.slurm.time`` in whole minutes (rounded up), from sbatch's forms: ``M``, ``M:S``, ``H:M:S``, ``D-H``,
    ``D-H:M``, ``D-H:M:S`` (submitit takes minutes and warns its job from them before the limit)."""
    days, _, rest = str(value).rpartition("-")
    parts = [int(x) for x in rest.split(":")]
    if days:  # D-H, D-H:M, D-H:M:S
        h, m, sec = (parts + [0, 0])[:3]
        seconds = ((int(days) * 24 + h) * 60 + m) * 60 + sec
    elif len(parts) == 1:
        seconds = parts[0] * 60
    elif len(parts) == 2:
        seconds = parts[0] * 60 + parts[1]
    else:
        seconds = (parts[0] * 60 + parts[1]) * 60 + parts[2]
    return max(1, -(-seconds // 60))


def _slurm_parameters(cfg: DictConfig, name: str) -> dict[str, Any]:
    """submitit ``SlurmExecutor`` parameters from ``protocol.slurm`` (validated by :func:`fsl_med.config.validate`)."""
    sl = cfg.protocol.slurm
    params: dict[str, Any] = {"job_name": name, "time": slurm_minutes(str(sl.time)), "cpus_per_task": int(sl.cpus),
                              "array_parallelism": int(sl.array_parallelism), "ntasks_per_node": 1, "nodes": 1}
    for key, value in (("partition", sl.partition), ("mem", sl.mem), ("account", sl.account), ("qos", sl.qos)):
        if value is not None:
            params[key] = str(value)
    if sl.gpus:
        params["gpus_per_node"] = int(sl.gpus)
    extra: dict[str, Any] = {"requeue": True}  # a job stopped by preemption or SIGTERM requeues itself
    for line in sl.extra:
        key, _, value = str(line)[2:].partition("=")
        extra[key] = value if value else ""
    params["additional_parameters"] = extra
    if sl.setup:
        params["setup"] = [str(x) for x in sl.setup]
    return params


def squeue_states(job_ids: list[str]) -> dict[str, str] | None:
    """SLURM's state (``squeue``'s ``%T``) of each job of ``job_ids`` that it still lists (array tasks as
    ``<array>_<task>``); None when squeue cannot be asked (the driver retries later)."""
    if not job_ids:
        return {}
    try:
        p = subprocess.run(["squeue", "-h", "-o", "%i %T", "-j", ",".join(job_ids)], capture_output=True, text=True,
                           timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if p.returncode != 0:
        if "Invalid job id" in p.stderr:  # every id has left SLURM's memory
            return {}
        return None
    states = {}
    for line in p.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2:
            states[parts[0]] = parts[1]
    return states


def scontrol_state(job_id: str) -> str | None:
    """``JobState`` of ``scontrol show job`` (with its reason when there is one), or None when SLURM has forgotten
    the job."""
    try:
        p = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    fields = dict(kv.split("=", 1) for kv in p.stdout.split() if "=" in kv) if p.returncode == 0 else {}
    state = fields.get("JobState")
    if state and fields.get("Reason") not in (None, "None"):
        state += f" ({fields['Reason']})"
    return state


class SlurmLauncher:
    """Each job a SLURM job, submitted with submitit as one job array per batch of ready jobs."""

    name = "slurm"

    def __init__(self, cfg: DictConfig, run_dir: Path, name: str) -> None:
        try:
            import submitit
        except ImportError as e:
            raise FslMedError("protocol.launcher=slurm needs submitit: pip install submitit") from e
        if subprocess.run(["which", "sbatch"], capture_output=True).returncode != 0:
            raise FslMedError("protocol.launcher=slurm: no sbatch on PATH (run the command on a SLURM login node, or "
                              "start the local test cluster with `make slurm-start`)")
        self.executor = submitit.SlurmExecutor(folder=run_dir / "slurm" / "%j")
        self.executor.update_parameters(**_slurm_parameters(cfg, name))
        self.max_requeues = int(cfg.protocol.slurm.max_requeues)
        self.out: dict[Path, str] = {}  # job folder -> SLURM job id
        self._missing: dict[str, int] = {}

    def free(self) -> int:
        """SLURM queues everything: no limit here (``protocol.slurm.array_parallelism`` caps what runs at once)."""
        return 1 << 30

    def start(self, folders: list[Path]) -> dict[Path, str]:
        """Submit the jobs of ``folders`` as one job array; returns each one's SLURM job id."""
        if not folders:
            return {}
        try:
            jobs = self.executor.map_array(SlurmJob(self.max_requeues), [str(f) for f in folders])
        except Exception as e:  # sbatch refused (partition, account, time limit ...): its own message, one line
            msg = " ".join(str(e).split())
            raise FslMedError(f"protocol.launcher=slurm: sbatch refused the jobs: {msg[:400]}") from None
        started = {}
        for folder, job in zip(folders, jobs, strict=True):
            self.out[folder] = str(job.job_id)
            started[folder] = f"SLURM job {job.job_id}"
        return started

    def adopt(self, folder: Path, job_id: str) -> None:
        """Track a job a previous driver submitted (still queued or running)."""
        self.out[folder] = job_id

    def live(self, job_id: str) -> bool:
        """Whether SLURM still queues or runs ``job_id``."""
        states = squeue_states([job_id])
        return bool(states) and states.get(job_id) in SLURM_LIVE

    def log_file(self, job_id: str) -> Path:
        """The job's stderr log (submitit's ``<folder>/<id>_0_log.err``)."""
        return Path(str(self.executor.folder).replace("%j", job_id)) / f"{job_id}_0_log.err"

    def slurm_states(self) -> dict[Path, str]:
        """SLURM's state of each job still out (empty when squeue could not be asked)."""
        states = squeue_states(list(self.out.values())) or {}
        return {f: states[j] for f, j in self.out.items() if j in states}

    def poll(self) -> list[Ended]:
        """The jobs that SLURM no longer queues or runs (asked twice, a few seconds apart: a requeued job leaves
        squeue's list for a moment)."""
        states = squeue_states(list(self.out.values()))
        if states is None:
            return []
        ended = []
        for folder, job_id in list(self.out.items()):
            if states.get(job_id) in SLURM_LIVE:
                self._missing.pop(job_id, None)
                continue
            if read_state(folder).get("state") in ("done", "failed") or self._missing.get(job_id, 0) >= 2:
                del self.out[folder]
                self._missing.pop(job_id, None)
                ended.append(Ended(folder, f"SLURM {scontrol_state(job_id) or 'ended'}"))
            else:
                self._missing[job_id] = self._missing.get(job_id, 0) + 1
        return ended

    def stop(self, signum: int, grace: float = 0.0) -> None:
        """Nothing: the submitted jobs keep running on the cluster (a rerun of the command waits for them)."""


class InlineLauncher:
    """One job at a time in this process (``protocol.launcher=inline``, the default)."""

    name = "inline"

    def free(self) -> int:
        return 1

    def run(self, folder: Path, config: DictConfig) -> None:
        """Run the job now (returns when it is done; raises as :func:`fsl_med.jobs.run_job`)."""
        run_job(folder, config)


def make_launcher(cfg: DictConfig, run_dir: Path, name: str) -> InlineLauncher | LocalLauncher | SlurmLauncher:
    """The launcher ``cfg.protocol.launcher`` names."""
    kind = str(cfg.protocol.launcher)
    if kind == "local":
        return LocalLauncher(cfg)
    if kind == "slurm":
        return SlurmLauncher(cfg, run_dir, name)
    return InlineLauncher()
