"""The driver of ``protocol``, ``ablate`` and ``compare``: a report folder's job table, filled by a launcher.

The report folder (``<output_dir>/<name>-<verb>/version_N``) holds ``jobs.json``: per job its tag, kind, config hash,
state, job folder, training folder, SLURM job id and requeues. Only the driver writes it, under the folder's lock
(``driver.lock``: a second driver on the same folder is refused with one line naming the first); each job writes its
own ``jobs/<tag>/state.json`` (:mod:`fsl_med.jobs`).

Re-running the same command finds the newest folder of that name holding a job table and continues it: finished jobs
are skipped, interrupted ones resume from their ``last.ckpt``, failed ones run again, jobs still queued or running
(on SLURM, or a local process of an earlier driver) are waited for; then the report is written. A changed
configuration is refused with one line naming the fields that differ; a new ``name`` starts afresh. Fields that say
only where and how jobs run (:data:`fsl_med.config.LAUNCH_KEYS`) may change between runs.

The log has one line per job state change (queued, running, done, failed, requeued) with a progress count. A failed
job's last error line is kept for the report, and the other jobs still aggregate.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from fsl_med import atomic, interrupts, locks
from fsl_med.config import LAUNCH_KEYS, to_yaml
from fsl_med.errors import ConfigError, FslMedError
from fsl_med.evaluation.table import Table, text
from fsl_med.jobs import JobSpec, read_state, write_job
from fsl_med.launchers import InlineLauncher, LocalLauncher, SlurmLauncher, make_launcher
from fsl_med.runs import discard_run_dir, new_run_dir, save_config

log = logging.getLogger(__name__)

TABLE = "jobs.json"
POLL_ENV = "FSL_MED_POLL_SECONDS"
"""Seconds between the driver's looks at its jobs (default 2 for ``local``, 10 for ``slurm``)."""


class JobsFailed(FslMedError):
    """Some jobs failed; the report of the others was written. The message names the failed jobs."""


@dataclass
class Outcome:
    """What the jobs of one driver run produced: per tag, the ``done`` state with its ``results`` document
    (``done``) or the failure's last error line (``failed``); ``pending`` when ``--no-wait`` left them running."""

    done: dict[str, dict[str, Any]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    pending: list[str] = field(default_factory=list)


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): node}


def _comparable(doc: dict[str, Any]) -> dict[str, Any]:
    flat = _flatten(doc)
    return {k: v for k, v in flat.items() if not any(k == p or k.startswith(p + ".") for p in LAUNCH_KEYS)}


def config_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key (old -> new)`` for each field that differs between two config documents, launch fields left out."""
    a, b = _comparable(old), _comparable(new)
    return [f"{k} ({a.get(k, '<unset>')} -> {b.get(k, '<unset>')})" for k in sorted(set(a) | set(b))
            if a.get(k, "<unset>") != b.get(k, "<unset>")]


def _doc(cfg: DictConfig) -> dict[str, Any]:
    return yaml.safe_load(to_yaml(cfg))


def job_hash(spec: JobSpec) -> str:
    """A hash of what the job computes: its config (launch fields left out), kind, source and explicit overrides."""
    payload = json.dumps({"config": _comparable(_doc(spec.config)), "kind": spec.kind, "source": spec.source,
                          "explicit": list(spec.explicit)}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def report_folder(cfg: DictConfig, verb: str) -> Path:
    """The report folder of ``cfg.name``'s ``verb``: the newest ``<output_dir>/<name>-<verb>/version_N`` holding a job
    table (continued), else a new one.

    Raises:
        ConfigError: that folder's configuration differs from ``cfg`` (the message names the fields; launch fields
            may differ).
    """
    base = Path(cfg.logging.output_dir) / f"{cfg.name}-{verb}"
    tables = sorted(base.glob(f"version_*/{TABLE}"), key=lambda p: int(p.parent.name.split("_")[-1])) \
        if base.is_dir() else []
    if not tables:
        return new_run_dir(cfg.logging.output_dir, f"{cfg.name}-{verb}")
    run_dir = tables[-1].parent
    try:
        old = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{run_dir / 'config.yaml'} cannot be read ({e}); it holds an earlier {verb} of "
                          f"name={cfg.name}: use another name= to start afresh") from None
    diff = config_diff(old, _doc(cfg))
    if diff:
        shown = "; ".join(diff[:6]) + (f"; and {len(diff) - 6} more" if len(diff) > 6 else "")
        raise ConfigError(f"{run_dir} holds the {verb} '{cfg.name}' with other settings: {shown}. Rerun with the same "
                          f"settings to continue it, or use another name= to start afresh")
    log.info("continuing the %s in %s (its job table: %s)", verb, run_dir, run_dir / TABLE)
    return run_dir


def _pid_alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, TypeError, ValueError):
        return False
    return True


class Driver:
    """Runs the jobs of one report folder through the configured launcher and keeps ``jobs.json``."""

    def __init__(self, run_dir: Path, specs: list[JobSpec], cfg: DictConfig, verb: str) -> None:
        tags = [s.tag for s in specs]
        if len(set(tags)) != len(tags):
            raise ValueError(f"duplicate job tags: {tags}")
        self.run_dir, self.specs, self.cfg, self.verb = run_dir, {s.tag: s for s in specs}, cfg, verb
        self.order = tags
        self.folders = {t: run_dir / "jobs" / t for t in tags}
        self.hashes = {t: job_hash(s) for t, s in self.specs.items()}
        self.table: dict[str, dict[str, Any]] = {}
        self.failed: dict[str, str] = {}
        try:
            old = json.loads((run_dir / TABLE).read_text(encoding="utf-8"))
            self.table = {j["tag"]: j for j in old.get("jobs", [])}
        except (OSError, ValueError, KeyError, TypeError):
            self.table = {}

    # -- the table -------------------------------------------------------------------------------------------------
    def _state(self, tag: str) -> str:
        return self.table.get(tag, {}).get("state", "new")

    def _set(self, tag: str, state: str, how: str = "", **fields: Any) -> None:
        entry = self.table.setdefault(tag, {"tag": tag})
        before = entry.get("state")
        entry.update(state=state, kind=self.specs[tag].kind, hash=self.hashes[tag], folder=str(self.folders[tag]),
                     **fields)
        if state != before:
            counts = {s: sum(1 for t in self.order if self._state(t) == s) for s in ("done", "failed", "running",
                                                                                      "queued")}
            log.info("[%d/%d done%s] %s: %s%s", counts["done"], len(self.order),
                     "".join(f", {counts[s]} {s}" for s in ("running", "queued", "failed") if counts[s]), tag, state,
                     f" ({how})" if how else "")
        self._save()

    def _save(self) -> None:
        atomic.write_json(self.run_dir / TABLE, {
            "verb": self.verb, "name": str(self.cfg.name), "launcher": str(self.cfg.protocol.launcher),
            "jobs": [self.table[t] for t in self.order if t in self.table]})

    def _sync_from_job(self, tag: str) -> dict[str, Any]:
        """Copy the job's own ``state.json`` facts (training folder, SLURM id, requeues, error) into the table."""
        st = read_state(self.folders[tag])
        keep = {k: st[k] for k in ("train_dir", "slurm_job_id", "requeues", "error", "results_path") if k in st}
        if keep:
            self.table.setdefault(tag, {"tag": tag}).update(keep)
        return st

    # -- planning ----------------------------------------------------------------------------------------------------
    def _check_unchanged(self) -> None:
        """A finished job whose configuration changed would mix two configurations in one report: refused."""
        for tag in self.order:
            entry = self.table.get(tag)
            if entry and entry.get("hash") not in (None, self.hashes[tag]) and entry.get("state") == "done":
                try:
                    old = yaml.safe_load((self.folders[tag] / "config.yaml").read_text(encoding="utf-8")) or {}
                    diff = config_diff(old, _doc(self.specs[tag].config))
                except (OSError, yaml.YAMLError):
                    diff = []
                raise ConfigError(f"job {tag} in {self.run_dir} finished with other settings"
                                  f"{': ' + '; '.join(diff[:6]) if diff else ''}; use another name= to start afresh")

    def _classify(self, launcher: Any) -> list[str]:
        """Adopt what is done or still out; return the tags to launch."""
        todo = []
        for tag in self.order:
            st = self._sync_from_job(tag)
            state = st.get("state")
            if state == "done":  # _check_unchanged refused a finished job whose configuration changed
                self._set(tag, "done", "finished before: skipped")
                continue
            job_id = st.get("slurm_job_id") or self.table.get(tag, {}).get("slurm_job_id")
            if isinstance(launcher, SlurmLauncher) and job_id and launcher.live(str(job_id)):
                launcher.adopt(self.folders[tag], str(job_id))
                self._set(tag, "running" if state == "running" else "queued", f"SLURM job {job_id}, from before")
                continue
            if state == "running" and st.get("host") == os.uname().nodename and _pid_alive(st.get("pid")) \
                    and not st.get("slurm_job_id"):
                raise FslMedError(f"job {tag} is still running in process {st.get('pid')} (started by an earlier "
                                  f"{self.verb} of {self.run_dir}); wait for it or stop it, then rerun")
            if self.table.get(tag, {}).get("state") == "failed":  # e.g. killed: its own state.json still says running
                state = "failed"
            if state in ("failed", "interrupted", "running", "requeued"):
                log.info("%s: %s before%s: running it again%s", tag, state,
                         f" ({self.table.get(tag, {}).get('error') or st.get('error')})"
                         if self.table.get(tag, {}).get("error") or st.get("error") else "",
                         " (resumes from its last.ckpt)" if state != "failed" else "")
            todo.append(tag)
        before = sum(1 for t in self.order if self._state(t) == "done")
        if before:
            log.info("%d of %d jobs finished before (skipped); %d to run", before, len(self.order), len(todo))
        return todo

    # -- running -----------------------------------------------------------------------------------------------------
    def _ready(self, todo: list[str]) -> list[str]:
        """The jobs of ``todo`` that may start: their source job (if any) is done; a failed source fails them."""
        ready = []
        for tag in list(todo):
            src = self.specs[tag].source
            if src is None or self._state(src) == "done":
                ready.append(tag)
            elif self._state(src) == "failed":
                todo.remove(tag)
                self._fail(tag, f"job {src}, whose checkpoint it evaluates, failed")
        return ready

    def _fail(self, tag: str, error: str) -> None:
        self.failed[tag] = error
        self._set(tag, "failed", error, error=error)

    def _finish(self, tag: str, how: str = "", stopping: bool = False) -> None:
        st = self._sync_from_job(tag)
        if st.get("state") == "done":
            self.failed.pop(tag, None)
            self._set(tag, "done", how)
        elif stopping and st.get("state") == "interrupted":  # the driver stopped it: it resumes on a rerun
            self._set(tag, "interrupted", st.get("signal") or how)
        else:
            error = st.get("error") or f"the job ended without finishing ({how or 'no state recorded'})"
            log_hint = ""
            if isinstance(self._launcher, SlurmLauncher) and st.get("slurm_job_id"):
                log_hint = f"; log: {self._launcher.log_file(str(st['slurm_job_id']))}"
            elif (self.folders[tag] / "job.log").is_file():
                log_hint = f"; log: {self.folders[tag] / 'job.log'}"
            self._fail(tag, f"{error}{log_hint}")

    def run(self, no_wait: bool = False) -> Outcome:
        """Run every job not done yet and wait for them (``no_wait``: submit to SLURM and return)."""
        self._check_unchanged()
        launcher = make_launcher(self.cfg, self.run_dir, f"fsl_med-{self.cfg.name}-{self.verb}")
        self._launcher = launcher
        if no_wait and not isinstance(launcher, SlurmLauncher):
            raise ConfigError("--no-wait needs protocol.launcher=slurm (local and inline jobs end with this process)")
        todo = self._classify(launcher)
        if isinstance(launcher, InlineLauncher):
            self._run_inline(launcher, todo)
        else:
            self._run_out(launcher, todo, no_wait)
        out = Outcome(failed=dict(self.failed))
        for tag in self.order:
            state = self._state(tag)
            if state == "done":
                st = read_state(self.folders[tag])
                st["results"] = json.loads(Path(st["results_path"]).read_text(encoding="utf-8"))
                out.done[tag] = st
            elif state != "failed":
                out.pending.append(tag)
        return out

    def _run_inline(self, launcher: InlineLauncher, todo: list[str]) -> None:
        attempted = 0
        while todo:
            ready = self._ready(todo)
            if not ready:
                break
            tag = ready[0]
            todo.remove(tag)
            write_job(self.folders[tag], self.specs[tag])
            self._set(tag, "running", "in this process")
            attempted += 1
            try:
                launcher.run(self.folders[tag], self.specs[tag].config)
            except interrupts.Interrupted as e:
                self._sync_from_job(tag)
                self._set(tag, "interrupted", e.name)
                raise self._stopped(e) from None
            except Exception:
                self._finish(tag)
                if attempted == 1 and not any(self._state(t) == "done" for t in self.order):
                    raise  # the first job failed and none is done: its own error, as `fsl-med run` would show it
                log.debug("job %s failed", tag, exc_info=True)
                continue
            self._finish(tag)

    def _run_out(self, launcher: LocalLauncher | SlurmLauncher, todo: list[str], no_wait: bool) -> None:
        poll = float(os.environ.get(POLL_ENV) or (2 if isinstance(launcher, LocalLauncher) else 10))
        seen: dict[str, str] = {}
        try:
            while True:
                ready = self._ready(todo)[: max(0, launcher.free())]
                if ready:
                    for tag in ready:
                        todo.remove(tag)
                        write_job(self.folders[tag], self.specs[tag])
                        (self.folders[tag] / "state.json").unlink(missing_ok=True)  # the new run writes its own
                    started = launcher.start([self.folders[t] for t in ready])
                    for tag in ready:
                        how = started[self.folders[tag]]
                        if isinstance(launcher, SlurmLauncher):
                            self._set(tag, "queued", how, slurm_job_id=how.split()[-1], requeues=0)
                        else:
                            self._set(tag, "running", how)
                if no_wait:
                    return
                if not todo and not self._out(launcher):
                    return
                time.sleep(poll)
                self._watch(launcher, seen)
                for ended in launcher.poll():
                    tag = ended.folder.name
                    self._finish(tag, ended.how)
        except interrupts.Interrupted as e:
            launcher.stop(e.signum)
            for ended in launcher.poll():
                self._finish(ended.folder.name, ended.how, stopping=True)
            for tag in self.order:
                if self._state(tag) == "running" and isinstance(launcher, LocalLauncher):
                    self._set(tag, "interrupted", e.name)
            raise self._stopped(e) from None

    def _out(self, launcher: LocalLauncher | SlurmLauncher) -> bool:
        return bool(launcher.running if isinstance(launcher, LocalLauncher) else launcher.out)

    def _watch(self, launcher: LocalLauncher | SlurmLauncher, seen: dict[str, str]) -> None:
        """Log SLURM's own state changes of the jobs still out: queued -> running, and a job that stopped itself on a
        signal and requeued (its ``state.json`` says ``requeued``)."""
        if not isinstance(launcher, SlurmLauncher):
            return
        for folder, sstate in launcher.slurm_states().items():
            tag = folder.name
            st = self._sync_from_job(tag)
            restart = int(st.get("requeues") or 0)
            if st.get("state") == "requeued" and seen.get(tag) != f"requeued-{restart}":
                seen[tag] = f"requeued-{restart}"
                self._set(tag, "requeued", f"stopped by {st.get('signal') or 'a signal'} with last.ckpt saved, "
                                           f"requeue {restart + 1}; SLURM {sstate}")
            elif sstate == "RUNNING" and st.get("state") == "running" and self._state(tag) != "running":
                self._set(tag, "running", f"SLURM job {st.get('slurm_job_id', '')}, restart {restart}")
            elif sstate == "PENDING" and self._state(tag) == "running":
                self._set(tag, "queued", "SLURM PENDING")

    def _stopped(self, e: interrupts.Interrupted) -> interrupts.Interrupted:
        done = sum(1 for t in self.order if self._state(t) == "done")
        if isinstance(self._launcher, SlurmLauncher):
            out = [self.table[t].get("slurm_job_id") for t in self.order if self._state(t) in ("queued", "running",
                                                                                             "requeued")]
            return e.with_detail(f"{done} of {len(self.order)} jobs done; the submitted SLURM jobs keep running "
                                 f"({', '.join(str(j) for j in out) or 'none'}): rerun the same command to wait for "
                                 f"them and write the report (or scancel them)")
        if done == 0 and not any(self.run_dir.rglob("*.ckpt")):
            discard_run_dir(self.run_dir)
            return e.with_detail(f"in the first job ({self.order[0]}); nothing was saved and the {self.verb} folder "
                                 "was removed")
        return e.with_detail(f"{done} of {len(self.order)} jobs done, the others saved last.ckpt where they had "
                             f"trained; rerun the same command to resume the {self.verb} ({self.run_dir / TABLE})")


def open_report_folder(cfg: DictConfig, verb: str, plan: Any) -> tuple[Path, Any]:
    """The report folder of ``verb`` (continued or new, :func:`~fsl_med.job_table.report_folder`) and ``plan(folder)``
    (the verb's job configs, each checked before anything runs); a new folder is removed again when the plan fails,
    and the config is saved into it."""
    run_dir = report_folder(cfg, verb)
    fresh = not (run_dir / TABLE).exists()
    try:
        planned = plan(run_dir)
    except BaseException:
        if fresh:
            discard_run_dir(run_dir)
        raise
    save_config(cfg, run_dir)
    return run_dir, planned


def failed_jobs_section(outcome: Outcome) -> list[str]:
    """The report's Markdown section listing the failed jobs with their last error line (empty when none failed)."""
    if not outcome.failed:
        return []
    rows = tuple({"tag": t, "error": e.replace("|", "\\|")} for t, e in outcome.failed.items())
    return ["", f"## Failed jobs ({len(rows)}; not in the numbers above)", "",
            Table((text("tag", "job"), text("error", "last error line")), rows).markdown()]


def raise_if_failed(outcome: Outcome, verb: str, path: Path) -> None:
    """After the report of the finished jobs is written: :class:`JobsFailed` if any job failed."""
    if outcome.failed:
        tags = ", ".join(outcome.failed)
        raise JobsFailed(f"{len(outcome.failed)} {verb} job(s) failed ({tags}); the report of the others is {path}; "
                         "rerun the same command to run the failed jobs again")


def rerun_command() -> str:
    """The command line of this process, to print for a later rerun (``--no-wait`` dropped)."""
    args = [a for a in sys.argv[1:] if a != "--no-wait"]
    return shlex.join(["fsl-med", *args])


def drive(run_dir: Path, specs: list[JobSpec], cfg: DictConfig, verb: str, no_wait: bool = False) -> Outcome:
    """Run ``specs`` in ``run_dir`` through ``cfg.protocol.launcher`` under the folder's lock.

    Returns:
        The :class:`Outcome`; with ``no_wait``, the submitted jobs are in ``pending``.
    Raises:
        Locked: another driver holds ``run_dir`` (the message names it).
        Interrupted: a signal stopped the driver (the detail says what was kept and how to resume).
        FslMedError: every job failed (the first job's error), or a launcher could not start.
    """
    group = wandb_group(cfg, verb, run_dir)
    specs = [replace(s, config=_with_group(s.config, group)) for s in specs]  # the callers' configs stay as they are
    with locks.exclusive(run_dir / "driver.lock", f"the {verb} folder {run_dir}"):
        driver = Driver(run_dir, specs, cfg, verb)
        try:
            outcome = driver.run(no_wait=no_wait)
        except (interrupts.Interrupted, locks.Locked):
            raise
        except BaseException:
            if not any(driver._state(t) == "done" for t in driver.order) and not any(run_dir.rglob("*.ckpt")):
                discard_run_dir(run_dir)
            raise
    if no_wait:
        ids = sorted({str(driver.table[t].get("slurm_job_id")) for t in outcome.pending
                      if driver.table.get(t, {}).get("slurm_job_id")})
        print(f"submitted {len(outcome.pending)} job(s) to SLURM: {', '.join(ids) or 'none new'}")
        print(f"to wait for them and write the report, rerun: {rerun_command()}")
    elif outcome.failed and not outcome.done:
        first = next(iter(outcome.failed.items()))
        raise JobsFailed(f"every job of the {verb} failed; {first[0]}: {first[1]}")
    return outcome


def _with_group(cfg: DictConfig, group: str) -> DictConfig:
    out = cfg.copy()
    OmegaConf.update(out, "logging.wandb_group", group, merge=False)
    return out


def wandb_group(cfg: DictConfig, verb: str, run_dir: Path) -> str:
    """The W&B group of every run of one report folder: ``logging.wandb_group``, else ``<name>-<verb>-version_N``."""
    return str(cfg.logging.wandb_group or f"{cfg.name}-{verb}-{run_dir.name}")


def log_report_to_wandb(cfg: DictConfig, verb: str, report_json: Path) -> None:
    """With ``logging.logger=wandb``, log the report's table (``<verb>.csv`` beside ``report_json``) once, as a run of
    its own (job type ``aggregate``) in the jobs' group."""
    csv_path = report_json.with_suffix(".csv")
    if cfg.logging.logger != "wandb" or not csv_path.is_file():
        return
    import csv

    import wandb

    with csv_path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    run_dir = report_json.parent
    group = wandb_group(cfg, verb, run_dir)
    name = f"{cfg.name}-{verb}-{run_dir.name}"

    from fsl_med.runs import has_wandb_key

    mode = "online" if has_wandb_key() else "offline"
    os.environ.setdefault("WANDB_SILENT", "true")
    run = wandb.init(project=cfg.logging.wandb_project, entity=cfg.logging.wandb_entity, group=group, name=name,
                     job_type="aggregate", mode=mode, dir=str(run_dir), config={"report": str(report_json)})
    cols = list(rows[0])
    run.log({"report": wandb.Table(columns=cols, data=[[r.get(c) for c in cols] for r in rows])})
    run.finish()
