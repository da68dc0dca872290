"""The concurrent training processes of the ``jobs-b<N>`` rows: each a separate OS process (``python -m
fsl_med.gpu_check --jobs-worker SPEC FD``) that warms up, then trains a fixed number of steps when released."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from fsl_med.gpu_check.state import REPO, one_line
from fsl_med.measure import peak_rss_mb, sync

_CHILD_ENV_DROP = ("FSL_MED_RUN_DIR", "LOCAL_RANK", "RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class JobProcess:
    """One training process of a ``jobs-b<N>`` row (``python -m fsl_med.gpu_check --jobs-worker SPEC FD``), in a
    process group of its own. It reports on a pipe (``FD``: one JSON object a line: ``ready``, ``done``, ``error``)
    and is released by a ``go`` line on its stdin; its output goes to ``worker-<i>.log``."""

    def __init__(self, index: int, proc: subprocess.Popen, fd: int, log: Path) -> None:
        self.index, self.proc, self.fd, self.log = index, proc, fd, log
        self.buffer = b""
        self.messages: list[dict[str, Any]] = []
        self.armed = False  # a `ready` was received and no `go` sent since
        self.eof = False

    @classmethod
    def start(cls, index: int, spec: dict[str, Any], folder: Path) -> JobProcess:
        spec_path = folder / f"worker-{index}.json"
        spec_path.write_text(json.dumps(spec), encoding="utf-8")
        log = folder / f"worker-{index}.log"
        env = {k: v for k, v in os.environ.items() if k not in _CHILD_ENV_DROP}
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
        r, w = os.pipe()
        try:
            with open(log, "wb") as out:
                proc = subprocess.Popen(
                    [sys.executable, *(["-S"] if sys.flags.no_site else []), "-m", "fsl_med.gpu_check", "--jobs-worker",
                     str(spec_path), str(w)],
                    stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT, pass_fds=(w,), env=env,
                    start_new_session=True)
        except BaseException:
            os.close(r)
            raise
        finally:
            os.close(w)
        return cls(index, proc, r, log)

    def read(self) -> None:
        """Whatever the process has written to its pipe (called when ``select`` says it is readable)."""
        data = os.read(self.fd, 65536)
        if not data:
            self.eof = True
            return
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        self.messages += [json.loads(line) for line in lines if line.strip()]

    def failure(self, waiting_for: str) -> RuntimeError:
        """Why the process is gone or said ``error``: its message, else the last line of its log."""
        err = next((m["message"] for m in self.messages if m.get("event") == "error"), None)
        if err is None:
            try:
                tail = [ln for ln in self.log.read_text(errors="replace").splitlines() if ln.strip()]
            except OSError:
                tail = []
            err = tail[-1].strip() if tail else "no output"
        rc = self.proc.poll()
        state = f"exited with status {rc}" if rc is not None else "failed"
        return RuntimeError(f"training process {self.index} {state} before '{waiting_for}': {err} (log: {self.log})")

    def go(self) -> None:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(b"go\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise self.failure("go") from None
        self.armed = False

    def kill(self) -> None:
        """Kill the process and its process group (its DataLoader workers), reap it, close the pipes."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=30)
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)


def await_all(procs: list[JobProcess], event: str) -> list[dict[str, Any]]:
    """The next message of each of ``procs``, which must be ``event`` (in the order of ``procs``). Waits without a
    limit of its own (the row's time limit interrupts it); a process that exits or reports an error first fails."""
    got: dict[int, dict[str, Any]] = {}
    while len(got) < len(procs):
        for pr in procs:
            if pr.index in got:
                continue
            if pr.messages:
                m = pr.messages.pop(0)
                if m.get("event") != event:
                    if m.get("event") == "error":
                        pr.messages.insert(0, m)
                    raise pr.failure(event)
                got[pr.index] = m
                if event == "ready":
                    pr.armed = True
            elif pr.eof or pr.proc.poll() is not None:
                with contextlib.suppress(OSError):
                    while not pr.eof and select.select([pr.fd], [], [], 0)[0]:  # what it wrote before exiting
                        pr.read()
                if not pr.messages:
                    raise pr.failure(event)
        waiting = [pr for pr in procs if pr.index not in got and not pr.messages and not pr.eof]
        if waiting:
            readable, _, _ = select.select([pr.fd for pr in waiting], [], [], 0.5)
            for pr in waiting:
                if pr.fd in readable:
                    pr.read()
    return [got[pr.index] for pr in procs]


def jobs_worker(spec_path: str, fd: int) -> int:
    """One process of a ``jobs-b<N>`` row: build the model from the spec's overrides, train ``warmup`` steps through
    Lightning, then ``rounds`` times: say ``ready``, wait for ``go`` on stdin, train ``steps`` steps and say ``done``
    with the window's start and end (``time.monotonic``: one clock for every process of the machine, the device
    synchronised), its episodes and peak memory. After the last round it waits for the check to end it."""
    out = os.fdopen(fd, "w", buffering=1, encoding="utf-8")

    def send(**msg: Any) -> None:
        out.write(json.dumps(msg) + "\n")
        out.flush()

    try:
        from lightning.pytorch.callbacks import Callback

        from fsl_med.data.datamodule import FewShotDataModule
        from fsl_med.models.module import FewShotModule
        from fsl_med.run_config import load_run_config
        from fsl_med.runs import make_trainer

        spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
        warmup, steps, rounds, batch = spec["warmup"], spec["steps"], spec["rounds"], spec["batch"]

        def wait_for_go() -> None:
            if sys.stdin.readline().strip() != "go":  # the check ended (or is gone): nothing more to measure
                out.close()
                os._exit(0)

        class Rounds(Callback):
            def __init__(self) -> None:
                self.batches, self.t0 = 0, 0.0

            def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, b: Any, batch_idx: int) -> None:
                self.batches += 1
                k, rest = divmod(self.batches - warmup, steps)
                if self.batches < warmup or rest:
                    return
                dev = pl_module.device
                sync(dev)
                now = time.monotonic()
                cuda = torch.device(dev).type == "cuda"
                if k > 0:
                    send(event="done", round=k - 1, t0=self.t0, t1=now, episodes=batch * steps,
                         **({"peak_gpu_mb": torch.cuda.max_memory_allocated(dev) / 2**20} if cuda
                            else {"peak_rss_mb": peak_rss_mb()}))
                if k < rounds:
                    send(event="ready", round=k)
                wait_for_go()  # after the last round: until the check kills this process
                if cuda:
                    torch.cuda.reset_peak_memory_stats(dev)
                sync(dev)
                self.t0 = time.monotonic()

        cfg = load_run_config(REPO / "experiments" / "mri.yaml", spec["overrides"])
        dm = FewShotDataModule(cfg)
        module = FewShotModule.from_config(cfg)
        trainer = make_trainer(cfg, Path(spec["run_dir"]), with_val=False, extra_callbacks=[Rounds()],
                               progress_bar=False)
        trainer.fit(module, datamodule=dm)
    except BaseException as e:  # noqa: BLE001 - reported to the check, traceback in the log
        traceback.print_exc()
        with contextlib.suppress(OSError):
            send(event="error", message=one_line(e))
        return 1
    return 0
