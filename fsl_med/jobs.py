"""One job of ``protocol``, ``ablate`` or ``compare``: its folder, what it runs, and the state it reports.

A job folder ``<report folder>/jobs/<tag>/`` holds ``job.json`` (what to run, written by the driver), ``config.yaml``
(the job's run configuration, written by the driver) and ``state.json`` (written only by the process running the job:
``running``, then ``done`` with its outcome, ``failed`` with the last error line, or ``interrupted`` by a signal).
Whatever runs a job (the driver's own process, a local child process, a SLURM job) calls :func:`run_job` on its folder,
so the same seed gives the same numbers under every launcher.

A job is idempotent: a finished training (``train_summary.json`` at ``trainer.max_steps``) is not trained again but
evaluated from its ``last.ckpt``; an interrupted one resumes from the newest ``last.ckpt`` of its training folders
(the step, optimiser, scheduler and sampler state it saved), so a requeued or re-run job ends where an uninterrupted
one ends.

``python -m fsl_med.jobs FOLDER`` runs one job in a process of its own (the ``local`` launcher's children): exit 0
when done, ``128 + signum`` when stopped by a signal (``last.ckpt`` saved), 1 when it failed (``state.json`` says why).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fsl_med import atomic, interrupts
from fsl_med.config import load_config, to_yaml

log = logging.getLogger(__name__)

KINDS = ("train_eval", "eval_ckpt", "eval_untrained")
"""What a job does: train then evaluate every variant of ``eval.variants`` (``train_eval``), evaluate the checkpoint of
another job (``eval_ckpt``: ``fsl-med ablate``'s ``reuse``), or evaluate the untrained model (``eval_untrained``: a
model without trainable parameters)."""
THREADS_ENV = "FSL_MED_THREADS"
"""Environment variable a launcher sets to the CPU threads one job may use (``torch.set_num_threads``)."""


@dataclass(frozen=True)
class JobSpec:
    """One job as the driver plans it.

    Attributes:
        tag: unique within its report folder (e.g. ``s2-f0-seed1234-kidneys``); names the job's folder.
        config: the validated run configuration (its ``logging.output_dir`` is the report folder's ``runs/``).
        kind: one of :data:`KINDS`.
        source: ``eval_ckpt`` only: the tag of the job whose checkpoint is evaluated.
        explicit: ``eval_ckpt`` only: the row's own overrides (explicit for :func:`fsl_med.evaluate.evaluate`).
    """

    tag: str
    config: DictConfig
    kind: str = "train_eval"
    source: str | None = None
    explicit: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"job kind must be one of {KINDS}, got {self.kind!r}")
        if (self.kind == "eval_ckpt") != (self.source is not None):
            raise ValueError("a job evaluates another job's checkpoint exactly when its kind is eval_ckpt")


def write_job(folder: Path, spec: JobSpec) -> None:
    """Write ``job.json`` and ``config.yaml`` of ``spec`` into ``folder`` (created; each file atomically)."""
    folder.mkdir(parents=True, exist_ok=True)
    atomic.write_text(folder / "config.yaml", to_yaml(spec.config))
    atomic.write_json(folder / "job.json", {"tag": spec.tag, "kind": spec.kind, "source": spec.source,
                                            "explicit": list(spec.explicit)})


def read_state(folder: Path) -> dict[str, Any]:
    """The job's ``state.json`` (``{}`` when it has not started or the file cannot be read)."""
    try:
        data = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def write_state(folder: Path, state: str, **fields: Any) -> dict[str, Any]:
    """Replace ``state.json`` with ``state`` and ``fields`` plus who wrote it (host, pid, SLURM job and restarts)."""
    doc = {"state": state, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": socket.gethostname(),
           "pid": os.getpid(), **slurm_identity(), **fields}
    atomic.write_json(folder / "state.json", doc)
    return doc


def slurm_identity() -> dict[str, Any]:
    """``slurm_job_id`` (``<array>_<task>`` for an array task) and ``requeues`` (SLURM_RESTART_COUNT) of this process's
    SLURM job; ``{}`` outside SLURM."""
    job = os.environ.get("SLURM_JOB_ID")
    if job is None:
        return {}
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return {"slurm_job_id": f"{array}_{task}" if array and task else job,
            "requeues": int(os.environ.get("SLURM_RESTART_COUNT") or 0)}


def error_line(exc: BaseException) -> str:
    """The one line that says why a job failed: the exception's message (its first line) with its type."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _train_folders(cfg: DictConfig) -> list[Path]:
    base = Path(cfg.logging.output_dir) / str(cfg.name)
    return sorted((p for p in base.glob("version_*") if p.is_dir()), key=lambda p: int(p.name.split("_")[-1]))


def finished_training(cfg: DictConfig) -> dict[str, Any] | None:
    """The ``train_summary.json`` of a training of this job that reached ``trainer.max_steps`` (newest first), with
    its folder as ``train_dir``; None if there is none."""
    for run in reversed(_train_folders(cfg)):
        try:
            summ = json.loads((run / "train_summary.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if int(summ.get("steps", -1)) >= int(cfg.trainer.max_steps) and Path(summ.get("last_ckpt", "")).is_file():
            return {**summ, "train_dir": str(run)}
    return None


def resumable_checkpoint(cfg: DictConfig) -> Path | None:
    """The newest ``last.ckpt`` of this job's interrupted trainings (the one to resume from), or None."""
    ckpts = [p for run in _train_folders(cfg) if (p := run / "checkpoints" / "last.ckpt").is_file()]
    return max(ckpts, key=lambda p: p.stat().st_mtime) if ckpts else None


def _train_and_evaluate(cfg: DictConfig) -> dict[str, Any]:
    from fsl_med.evaluate import evaluate
    from fsl_med.train import train

    done = finished_training(cfg)
    if done is not None:  # trained before (e.g. stopped while evaluating): evaluate its final checkpoint
        log.info("training finished before (%s): evaluating its last.ckpt", done["train_dir"])
        ecfg = cfg.copy()
        OmegaConf.update(ecfg, "ckpt", str(done["last_ckpt"]), merge=False)
        results, path, _ = evaluate(ecfg, global_step=int(done["steps"]))
        return {"train_dir": done["train_dir"], "checkpoint": str(done["last_ckpt"]), "steps": int(done["steps"]),
                "trained": True, "seconds_per_step": done.get("seconds_per_step_median"), "results_path": str(path)}
    resume = resumable_checkpoint(cfg)
    tcfg = cfg.copy()
    if resume is not None:
        log.info("resuming from %s", resume)
        OmegaConf.update(tcfg, "resume", str(resume), merge=False)
    # as `fsl-med run` of the job's config: the model is built after train() seeds, so its initial weights depend on
    # the job's seed only, not on the jobs before it
    tr = train(tcfg)
    assert tr.config is not None and tr.module is not None
    results, path, _ = evaluate(tr.config, module=tr.module, global_step=tr.steps)
    return {"train_dir": str(tr.run_dir), "checkpoint": str(tr.last_ckpt), "steps": int(tr.steps), "trained": True,
            "seconds_per_step": tr.seconds_per_step, "results_path": str(path)}


def _evaluate_checkpoint(cfg: DictConfig, source: dict[str, Any], explicit: list[str]) -> dict[str, Any]:
    from fsl_med.evaluate import evaluate

    ecfg = cfg.copy()
    OmegaConf.update(ecfg, "ckpt", str(source["checkpoint"]), merge=False)
    # the row's own overrides are explicit: a data.fold the source did not train on is refused
    results, path, _ = evaluate(ecfg, explicit=explicit)
    return {k: source.get(k) for k in ("train_dir", "checkpoint", "steps", "trained", "seconds_per_step")} | {
        "results_path": str(path)}


def _evaluate_untrained(cfg: DictConfig) -> dict[str, Any]:
    import lightning as L

    from fsl_med.evaluate import evaluate
    from fsl_med.models.module import FewShotModule

    L.seed_everything(cfg.seed, workers=True, verbose=False)  # the untrained weights: the job's seed
    module = FewShotModule.from_config(cfg)
    results, path, _ = evaluate(cfg, module=module, global_step=0)
    return {"train_dir": None, "checkpoint": None, "steps": 0, "trained": False, "seconds_per_step": None,
            "results_path": str(path)}


def run_job(folder: str | os.PathLike[str], config: DictConfig | None = None) -> dict[str, Any]:
    """Run the job of ``folder`` to its end and record it in ``state.json``.

    Args:
        folder: the job's folder (``job.json`` and ``config.yaml`` written by :func:`write_job`).
        config: the job's run configuration when the caller holds it already (the ``inline`` launcher); default:
            read from ``config.yaml``.
    Returns:
        The ``done`` state: ``train_dir``, ``checkpoint``, ``steps``, ``trained``, ``seconds_per_step``,
        ``results_path`` (the job's ``results.json``).
    Raises:
        Interrupted: a signal stopped it (``state.json``: ``interrupted``; a training saved ``last.ckpt``).
        Exception: anything else, as raised (``state.json``: ``failed`` with :func:`error_line`).
    """
    folder = Path(folder)
    threads_before = None
    try:
        spec = json.loads((folder / "job.json").read_text(encoding="utf-8"))
        cfg = config if config is not None else load_config(folder / "config.yaml")
        threads, threads_before = _set_threads(cfg)
        write_state(folder, "running", tag=spec["tag"], threads=threads)
        if spec["kind"] == "eval_ckpt":
            source = read_state(folder.parent / str(spec["source"]))
            if source.get("state") != "done":
                raise RuntimeError(f"job {spec['source']}, whose checkpoint this job evaluates, has not finished")
            outcome = _evaluate_checkpoint(cfg, source, list(spec.get("explicit") or []))
        elif spec["kind"] == "eval_untrained":
            outcome = _evaluate_untrained(cfg)
        else:
            outcome = _train_and_evaluate(cfg)
    except interrupts.Interrupted as e:
        write_state(folder, "interrupted", signal=e.name, error=e.detail or f"stopped by {e.name}")
        raise
    except Exception as e:
        write_state(folder, "failed", error=error_line(e))
        raise
    finally:
        _finish_wandb_run()
        if threads_before is not None:
            import torch

            torch.set_num_threads(threads_before)
    return write_state(folder, "done", **outcome, threads=threads)


def _finish_wandb_run() -> None:
    """End this job's W&B run (training and evaluation log into one), so the next job of the same process (the
    ``inline`` launcher) starts a run of its own. A no-op without ``logging.logger=wandb``."""
    wandb = sys.modules.get("wandb")
    run = getattr(wandb, "run", None) if wandb is not None else None
    if run is not None:
        run.finish()


def _set_threads(cfg: DictConfig) -> tuple[int, int | None]:
    """Give this job its CPU threads: ``protocol.threads_per_job``, else the launcher's :data:`THREADS_ENV`, else
    torch's default. Returns ``(threads now, threads before)``; ``before`` is None when nothing was changed."""
    import torch

    want = cfg.protocol.threads_per_job or (int(os.environ[THREADS_ENV]) if os.environ.get(THREADS_ENV) else None)
    before = torch.get_num_threads()
    if want is None or int(want) == before:
        return before, None
    torch.set_num_threads(int(want))
    return int(want), before


def main(argv: list[str] | None = None) -> int:
    """``python -m fsl_med.jobs FOLDER [--debug]``: run one job in this process (the ``local`` launcher's child)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    args = [a for a in argv if a != "--debug"]
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format="[%(name)s] %(message)s")
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).propagate = False
    if len(args) != 1:
        print("usage: python -m fsl_med.jobs FOLDER [--debug]", file=sys.stderr)
        return 2
    log.info("job %s: pid %d", args[0], os.getpid())
    try:
        with interrupts.installed(extra=(signal.SIGUSR2,)):
            run_job(args[0])
    except interrupts.Interrupted as e:
        print(f"fsl_med job: stopped by {e.name}", file=sys.stderr)
        return e.exit_code
    except Exception as e:  # the driver reads state.json; the log keeps the traceback
        traceback.print_exc()
        print(f"fsl_med job: error: {error_line(e)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
