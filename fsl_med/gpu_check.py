"""``fsl-med gpu-check`` (``make gpu-check``): fsl_med's GPU path, run and measured in one command.

Every CUDA-specific path of fsl_med runs here once, each as one row of a report: bf16 autocast and
``torch.compile`` training, pinned-memory batches, the evaluation's host/device split with CCA and TTT,
``fsl-med segment``, DDP (NCCL), and whether the data pipeline keeps the device busy. A row that fails is
reported with its message (and its traceback in ``gpu-check.log``); the other rows still run.

The ``jobs-b<N>`` rows measure how many training runs share one GPU best (``protocol.jobs_per_gpu``): 1, 2 and 4
concurrent training processes (separate OS processes, the large encoder in bf16-mixed at batch ``N``) each build
their model and warm up, then run a fixed number of steps from a common start; the row gives the total episodes per
second of each count, its speed-up over one process, the peak GPU memory of each process, and names the count with
the most episodes per second. The processes run this module with a hidden worker option (``--jobs-worker``).

Two profiles:

* ``gpu`` (a CUDA device is present): the bundled or given real CHAOS-T2 folder, fold 0; the paper's
  encoder (DINOv2 ViT-L/14, LoRA r=4, 256 px) and ViT-S/14 full fine-tuning, random init.
* ``tiny`` (no CUDA, or ``--profile tiny``): a generated phantom, a 2-block ViT, a few steps. Every row runs
  (on the CPU), so the check cannot rot; what needs CUDA says ``skipped: no CUDA``. Its figures exercise
  the code and are not benchmarks.

Config overrides (``model.head.name=adnet``, ...) apply to every row, and every row names the few-shot head its
model had. Besides, one ``head-<name>`` row per registered head trains the small encoder a few steps in
bf16-mixed with that head and predicts a query volume with it on the device (the heads' float32 arithmetic under
autocast), whatever head the overrides name.

Outputs in ``--out``: ``gpu-check.md`` (the report; its first line says what ran where), ``gpu-check.json``
(every figure) and ``gpu-check.log`` (one line per row, tracebacks of failed rows), rewritten after every
row, so a run cut short still leaves what it measured. Scratch files (runs, checkpoints, segmentations)
live in a temporary folder that is removed at the end.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fsl_med import atomic
from fsl_med.errors import ConfigError, DataError
from fsl_med.measure import count_flops, machine_info, matmul_throughput, peak_rss_mb, sync

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = "lightning_logs/gpu-check"
DICE_TOLERANCE = 1e-3
"""Largest allowed difference between a device and a CPU evaluation of one checkpoint (Dice as a fraction)."""
NO_CUDA = "skipped: no CUDA"


@dataclass(frozen=True)
class Profile:
    """What the check runs: the two encoders, step counts, batch sizes and the time budget."""

    name: str
    large: tuple[str, ...]
    large_title: str
    small: tuple[str, ...]
    small_title: str
    phantom: tuple[str, ...]
    warmup: int
    steps: int
    batch_sizes: tuple[int, ...]
    ckpt_steps: int
    ttt_steps: int
    paper_ttt_slices: int
    matmul_n: int
    budget_s: float
    row_timeout_s: int
    jobs: tuple[int, ...] = (1, 2, 4)
    """Counts of concurrent training processes of the ``jobs-b<N>`` rows."""
    jobs_steps: int = 20
    """Timed training steps of each process in each count's common window (after ``warmup`` steps)."""


GPU = Profile(
    name="gpu",
    large=("model.encoder.name=dinov2_vitl14", "model.encoder.finetune=lora", "model.encoder.lora_rank=4"),
    large_title="DINOv2 ViT-L/14, LoRA r=4",
    small=("model.encoder.name=dinov2_vits14", "model.encoder.finetune=full"),
    small_title="DINOv2 ViT-S/14, full",
    phantom=(), warmup=3, steps=10, batch_sizes=(1, 8, 32), ckpt_steps=5, ttt_steps=100, paper_ttt_slices=3,
    matmul_n=8192, budget_s=330.0, row_timeout_s=200, jobs=(1, 2, 4), jobs_steps=20,
)
TINY = Profile(
    name="tiny",
    large=("model.encoder.name=vit_tiny_patch14", "model.encoder.finetune=lora", "model.encoder.lora_rank=4"),
    large_title="tiny ViT (2 blocks, dim 64), LoRA r=4",
    small=("model.encoder.name=vit_tiny_patch14", "model.encoder.finetune=full"),
    small_title="tiny ViT (2 blocks, dim 64), full",
    phantom=("data.image_size=64",), warmup=1, steps=2, batch_sizes=(1, 2, 4), ckpt_steps=2, ttt_steps=2,
    paper_ttt_slices=2, matmul_n=512, budget_s=270.0, row_timeout_s=150, jobs=(1, 2), jobs_steps=2,
)
PROFILES = {"gpu": GPU, "tiny": TINY}


def train_plan(profile: Profile) -> tuple[list[tuple[str, str, str, str, int]], list[tuple[str, str, str, str, int]]]:
    """The training rows ``(key, encoder, precision, compile, batch)``: eager ones (run first) and compiled ones
    (run last: compiling a ViT-L takes the longest and is the first thing the time budget drops)."""
    b1 = profile.batch_sizes[0]
    eager = [("train-large-fp32", "large", "32-true", "off", b1), ("train-large-bf16", "large", "bf16-mixed", "off", b1),
             ("train-small-fp32", "small", "32-true", "off", b1), ("train-small-bf16", "small", "bf16-mixed", "off", b1)]
    eager += [(f"train-large-bf16-b{b}", "large", "bf16-mixed", "off", b) for b in profile.batch_sizes[1:]]
    compiled = [("train-small-bf16-compile", "small", "bf16-mixed", "default", b1),
                ("train-large-bf16-compile", "large", "bf16-mixed", "default", b1)]
    return eager, compiled


def head_plan() -> list[tuple[str, str]]:
    """The ``(key, head)`` of the per-head rows: ``head-<name>`` for every registered head, in registration order."""
    from fsl_med.models.heads import list_heads

    return [(f"head-{h}", h) for h in list_heads()]


def jobs_plan(profile: Profile) -> list[tuple[str, int]]:
    """The ``(key, batch)`` of the concurrent-training rows: ``jobs-b<N>`` for the profile's first two batch sizes."""
    return [(f"jobs-b{b}", b) for b in profile.batch_sizes[:2]]


def row_keys(profile: Profile) -> list[str]:
    """Every row key of ``profile`` in the order the rows run (``--only`` takes prefixes of them)."""
    eager, compiled = train_plan(profile)
    return ["env", *(k[0] for k in eager), *EVAL_KEYS, *(k for k, _ in head_plan()), *(k for k, _ in jobs_plan(profile)),
            *(k[0] for k in compiled)]


EVAL_KEYS = ("ckpt", "eval", "ttt-paper", "eval-vs-cpu", "segment-vs-cpu", "ddp")


@dataclass
class Row:
    """One line of the report: what ran, its figures, and ``ok`` / ``FAILED: ...`` / ``skipped: ...``."""

    key: str
    section: str
    title: str
    status: str = "not run"
    seconds: float | None = None
    figures: dict[str, Any] = field(default_factory=dict)


class RowTimeout(Exception):
    """A row ran past its time limit."""


@contextlib.contextmanager
def _time_limit(seconds: int) -> Iterator[None]:
    """Raise :class:`RowTimeout` in this (main) thread after ``seconds``; a no-op outside the main thread."""
    def expire(*_: Any) -> None:
        raise RowTimeout(f"ran past its limit of {seconds} s")

    try:
        old = signal.signal(signal.SIGALRM, expire)
    except ValueError:  # not the main thread
        yield
        return
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@contextlib.contextmanager
def _alarm_deferred() -> Iterator[None]:
    """SIGALRM (a row's time limit) held back until the block ends, then delivered."""
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    except (AttributeError, ValueError, OSError):  # no pthread_sigmask on this platform
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".strip()


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _head_figures(model: Any) -> dict[str, Any]:
    """The head of a :class:`~fsl_med.models.segmenter.FewShotSegmenter` as built: its name, its own parameters
    (ADNet: ``threshold``) and the values it logs (ADNet: ``T``)."""
    head = model.head
    return {"head": head.name, "head_parameters": [n for n, _ in head.named_parameters()],
            "head_values": head.log_values()}


# -- the concurrent training processes of the jobs-b<N> rows -------------------------------------------------------

_CHILD_ENV_DROP = ("FSL_MED_RUN_DIR", "LOCAL_RANK", "RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class _JobProcess:
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
    def start(cls, index: int, spec: dict[str, Any], folder: Path) -> _JobProcess:
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


def _await(procs: list[_JobProcess], event: str) -> list[dict[str, Any]]:
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


def _jobs_worker(spec_path: str, fd: int) -> int:
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
            send(event="error", message=_one_line(e))
        return 1
    return 0


class GpuCheck:
    """Runs the rows of a profile and writes the report.

    Args:
        out: report folder.
        profile: :data:`GPU` or :data:`TINY`.
        data: prepared CHAOS-T2 folder; ``None``: a phantom is generated (the ``tiny`` profile's default).
        cache_dir: superpixel cache.
        overrides: ``key=value`` config overrides applied to every row (after the profile's).
        only: run only rows whose key starts with one of these (the environment row always runs; rows
            that need the evaluation checkpoint bring its row along).
        budget_s: rows not started within this many seconds are reported as skipped.
    """

    def __init__(self, out: Path, profile: Profile, data: Path | None, cache_dir: str, overrides: list[str],
                 only: list[str] | None = None, budget_s: float | None = None) -> None:
        self.out, self.profile, self.data, self.cache_dir = out, profile, data, cache_dir
        self.overrides, self.only = list(overrides), only
        self.budget_s = profile.budget_s if budget_s is None else budget_s
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.cuda = self.device == "cuda"
        self.rows: list[Row] = []
        self.env: dict[str, Any] = {}
        self.bound: float | None = None  # FLOP/s: the faster of the bf16 and fp32 matmuls
        self.flops: dict[tuple[str, int], float] = {}  # (encoder, batch) -> FLOPs per training step
        self.ckpt: Path | None = None
        self.ckpt_head: str | None = None  # the head of the checkpoint's model
        self.t_start = time.monotonic()
        self.work = Path(".")
        self.started = time.strftime("%Y-%m-%d %H:%M:%S")
        self.phantom = data is None  # a phantom is generated (tiny profile without --data/--bundle)
        self.split: dict[str, Any] = {}

    # -- configuration ------------------------------------------------------------------------------
    def config_overrides(self, extra: list[str] | tuple[str, ...]) -> list[str]:
        """The overrides of :meth:`config` (of ``experiments/mri.yaml``): scratch paths + profile + user + ``extra``."""
        return [f"data.root={self.data}", f"data.cache_dir={self.cache_dir}", f"logging.output_dir={self.work / 'runs'}",
                "logging.logger=none", "trainer.enable_progress_bar=false", "model.encoder.weights=none",
                *(self.profile.phantom if self.phantom else ()), *self.overrides, *extra]

    def config(self, extra: list[str] | tuple[str, ...]) -> Any:
        """The run config of one row: ``experiments/mri.yaml`` + scratch paths + profile + user + row overrides."""
        from fsl_med.run_config import load_run_config

        return load_run_config(REPO / "experiments" / "mri.yaml", self.config_overrides(extra))

    # -- running rows -------------------------------------------------------------------------------
    def selected(self, key: str) -> bool:
        return self.only is None or key == "env" or any(key.startswith(p) for p in self.only)

    def run_row(self, key: str, section: str, title: str, fn: Callable[[Row], None],
                needs_ckpt: bool = False) -> Row:
        """Run ``fn(row)`` with a time limit; any exception becomes the row's ``FAILED`` status."""
        row = Row(key, section, title)
        self.rows.append(row)
        elapsed = time.monotonic() - self.t_start
        if not self.selected(key):
            row.status = "skipped: not selected (--only)"
        elif elapsed > self.budget_s and key != "env":
            row.status = f"skipped: time budget ({self.budget_s:.0f} s) spent"
        elif needs_ckpt and self.ckpt is None:
            row.status = "skipped: no checkpoint (the checkpoint row did not succeed)"
        else:
            print(f"gpu-check: {title} ...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            try:
                with _time_limit(self.profile.row_timeout_s):
                    fn(row)
                row.status = row.figures.pop("_status", "ok")
            except Exception as e:  # noqa: BLE001 - every failure is reported per row
                row.status = f"FAILED: {_one_line(e)}"
                self._log(f"{key}: {row.status}\n{traceback.format_exc()}")
            finally:
                row.seconds = time.perf_counter() - t0
                self._cleanup()
            print(f"gpu-check: {title}: {row.status} ({row.seconds:.1f} s)", file=sys.stderr, flush=True)
        self._log(f"{key}: {row.status}" + (f" ({row.seconds:.1f} s)" if row.seconds is not None else ""))
        self.write()
        return row

    def _cleanup(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def _log(self, text: str) -> None:
        with open(self.out / "gpu-check.log", "a", encoding="utf-8") as f:
            f.write(f"[{time.strftime('%H:%M:%S')}] {text.rstrip()}\n")

    def _peak_memory(self) -> dict[str, Any]:
        if self.cuda:
            return {"peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20}
        return {"peak_gpu_mb": NO_CUDA, "peak_rss_mb": peak_rss_mb()}

    # -- the rows -----------------------------------------------------------------------------------
    def row_env(self, row: Row) -> None:
        f = row.figures
        f.update(machine_info())
        import lightning
        import timm

        f.update(lightning=lightning.__version__, timm=timm.__version__, device=self.device,
                 profile=self.profile.name)
        if self.cuda:
            p = torch.cuda.get_device_properties(0)
            f.update(gpu=p.name, gpu_memory_gib=p.total_memory / 2**30, multiprocessors=p.multi_processor_count,
                     compute_capability=f"{p.major}.{p.minor}", cuda_version=torch.version.cuda,
                     cudnn=torch.backends.cudnn.version(), bf16_supported=torch.cuda.is_bf16_supported(),
                     tf32_matmul=torch.backends.cuda.matmul.allow_tf32, tf32_cudnn=torch.backends.cudnn.allow_tf32)
        else:
            f.update(gpu=NO_CUDA, cuda_version=NO_CUDA, bf16_supported="emulated on this CPU (no CUDA)")
        n = self.profile.matmul_n
        bf = matmul_throughput(self.device, torch.bfloat16, n=n, repeats=10, warmup=3)
        fp = matmul_throughput(self.device, torch.float32, n=n, repeats=5, warmup=2)
        f.update(matmul_n=n, bf16_matmul_tflops=bf["best"] / 1e12, bf16_matmul_median_tflops=bf["median"] / 1e12,
                 fp32_matmul_tflops=fp["best"] / 1e12)
        self.bound = max(bf["best"], fp["best"])
        f["bound_tflops"] = self.bound / 1e12
        self.env = f

    def _data_module(self, cfg: Any) -> Any:
        from fsl_med.data.datamodule import FewShotDataModule

        dm = FewShotDataModule(cfg)
        dm.prepare_data()
        dm.setup("fit")
        return dm

    def _loader_rate(self, dm: Any, batch: int, seconds: float = 3.0) -> dict[str, Any]:
        """Episodes per second of the training DataLoader as configured (workers, pinned memory), measured
        after its start-up and its prefetched batches, for about ``seconds`` (at least 3 batches)."""
        dl = dm.episode_loader(total_steps=10_000)
        nw = dl.num_workers
        it = iter(dl)
        for _ in range(nw * (dl.prefetch_factor or 2) + 1 if nw else 1):
            next(it)
        got, t0 = 0, time.perf_counter()
        while got < 3 or (time.perf_counter() - t0 < seconds and got < 100):
            next(it)
            got += 1
        dt = time.perf_counter() - t0
        del it
        return {"loader_workers": nw, "loader_pinned": bool(dl.pin_memory), "loader_episodes_per_s": got * batch / dt}

    def row_train(self, row: Row, encoder: str, precision: str, compile_mode: str, batch: int,
                  head: str | None = None) -> tuple[Any, Any]:
        """Seconds per training step through Lightning (median after warm-up), FLOPs, peak memory and the
        data pipeline: the wait between steps and the configured DataLoader's episodes per second (not for a
        ``head`` row: the data do not depend on the head). ``head``: ``model.head.name`` of this row (after the
        user's overrides). Returns the trained module and its config."""
        from fsl_med.models.module import FewShotModule
        from fsl_med.runs import make_trainer, new_run_dir
        from fsl_med.train import StepTimer

        p = self.profile
        enc = p.large if encoder == "large" else p.small
        cfg = self.config([*enc, f"trainer.precision={precision}", f"model.compile={compile_mode}",
                           f"data.batch_size={batch}", f"trainer.max_steps={p.warmup + p.steps}",
                           "data.num_val_scans=0", *([f"model.head.name={head}"] if head else [])])
        dm = self._data_module(cfg)
        module = FewShotModule.from_config(cfg)
        f = row.figures
        f.update(_head_figures(module.model), encoder=cfg.model.encoder.name, finetune=cfg.model.encoder.finetune,
                 precision=precision, compile=compile_mode, batch=batch, workers=cfg.data.num_workers)
        if head is None:
            f.update(self._loader_rate(dm, batch))
        key = (f"{cfg.model.encoder.name}/{cfg.model.encoder.finetune}/{module.model.head.name}", batch)
        if key not in self.flops and compile_mode == "off":
            from torch.utils.data import default_collate

            b = default_collate([dm.train_set[i] for i in range(batch)])
            module.to(self.device)
            b = {k: v.to(self.device) for k, v in b.items()}

            def step() -> None:
                loss, _, _ = module.model.episode_loss(b["support_image"], b["support_mask"], b["query_image"],
                                                       b["query_label"], module.ce_weights, cfg.loss.align_weight)
                loss.backward()

            self.flops[key] = count_flops(step)
            module.zero_grad(set_to_none=True)
            del b
            self._cleanup()
        timer = StepTimer(synchronize=True)  # the device's seconds per step (kernels, not their launch)
        trainer = make_trainer(cfg, new_run_dir(self.work / "runs", f"train-{row.key}"), with_val=False,
                               extra_callbacks=[timer], progress_bar=False)
        trainer.fit(module, datamodule=dm)
        secs = _median(timer.times[p.warmup:])
        wait = _median(timer.gaps[p.warmup:]) if len(timer.gaps) > p.warmup else _median(timer.gaps)
        flops = self.flops.get(key)
        f.update(seconds_per_step=secs, steps_per_s=1 / secs if secs else None,
                 episodes_per_s=batch / secs if secs else None, first_step_seconds=timer.times[0],
                 steps=len(timer.times), gflop_per_step=flops / 1e9 if flops else None,
                 bound_fraction=flops / secs / self.bound if flops and secs and self.bound else None,
                 wait_seconds_per_step=wait)
        f.update(self._peak_memory())
        rate = f.get("loader_episodes_per_s")
        if rate is not None and f["episodes_per_s"]:
            f["data_keeps_up"] = bool(rate >= f["episodes_per_s"])
            f["workers_needed"] = math.ceil(f["episodes_per_s"] / (rate / max(1, f["loader_workers"])))
        if compile_mode != "off":
            torch._dynamo.reset()
        return module, cfg

    def row_head(self, row: Row, head: str) -> None:
        """The small encoder with head ``head``: training steps in bf16-mixed (:meth:`row_train`), then the
        prediction of the first query volume on the device under the same autocast. The prediction must be binary,
        its probabilities finite and in [0, 1]. A head with a test-time refinement (Q-Net) also gives its seconds
        per query slice (``refine_seconds_per_slice``, part of ``predict_seconds_per_slice``)."""
        from fsl_med.data.datamodule import FewShotDataModule

        precision = "bf16-mixed"
        module, cfg = self.row_train(row, "small", precision, "off", self.profile.batch_sizes[0], head=head)
        dm = FewShotDataModule(cfg)
        dm.setup("test")
        it = dm.test_set.items[0]
        module.to(self.device).eval()
        seg = module.model
        timed = hasattr(seg.head, "reset_refine_timing")  # a head with a test-time refinement (Q-Net)
        if timed:
            seg.head.reset_refine_timing()
        with torch.autocast(self.device, dtype=torch.bfloat16):
            sync(self.device)
            t0 = time.perf_counter()
            protos = seg.support_prototypes(it.support_images, it.support_masks, self.device, it.shots)
            pred, prob = seg.predict_volume(protos, it.query_images, it.part, cfg.eval.batch_size, self.device)
            sync(self.device)
            dt = time.perf_counter() - t0
        f = row.figures
        f.update(_head_figures(seg), predict_slices=len(it.z), predict_seconds_per_slice=dt / max(1, len(it.z)),
                 predict_foreground=float(np.mean(pred)), predict_prob_min=float(np.min(prob)),
                 predict_prob_max=float(np.max(prob)), organ=it.organ, query=it.query_id)
        if timed:  # part of predict_seconds_per_slice
            n = int(seg.head.refined_slices)
            f.update(refined_slices=n, refine_seconds_per_slice=float(seg.head.refine_seconds) / n if n else None)
        if pred.shape != it.query_labels.shape or not np.isin(pred, (0, 1)).all():
            raise RuntimeError(f"head {head}: prediction of shape {pred.shape} with values {np.unique(pred)[:5]} "
                               f"(expected binary, {it.query_labels.shape})")
        if not (np.isfinite(prob).all() and prob.min() >= 0 and prob.max() <= 1):
            raise RuntimeError(f"head {head}: probabilities outside [0, 1] or not finite")

    def row_jobs(self, row: Row, batch: int) -> None:
        """Total training episodes per second of 1, 2, 4 (``profile.jobs``) concurrent training processes on the
        device: the large encoder, bf16-mixed, batch ``batch``, through Lightning with the configured DataLoader.

        ``max(jobs)`` processes start at once (this module's ``--jobs-worker``); each builds its model and trains
        ``warmup`` steps, then waits. For each count n, the first n processes are released together and each trains
        ``jobs_steps`` steps; the others wait, idle. Total episodes/s = (sum of batch x steps) / (the last end - the
        first start); the speed-up is relative to one process. Peak GPU memory is per process and count (CUDA; without
        CUDA the processes' peak RSS). The row's time limit or any error kills every process (their DataLoader workers
        with them: each runs in its own process group)."""
        p = self.profile
        extra = [*p.large, "trainer.precision=bf16-mixed", "model.compile=off", f"data.batch_size={batch}",
                 "data.num_val_scans=0"]
        cfg = self.config(extra)
        self._data_module(cfg)  # superpixels computed once, before the processes read them
        counts = sorted(set(p.jobs))
        f = row.figures
        f.update(head=cfg.model.head.name, encoder=cfg.model.encoder.name, finetune=cfg.model.encoder.finetune,
                 precision="bf16-mixed", batch=batch, workers=cfg.data.num_workers, warmup_steps=p.warmup,
                 steps_per_process=p.jobs_steps, jobs=counts)
        from fsl_med.runs import new_run_dir

        folder = self.work / row.key
        folder.mkdir(parents=True, exist_ok=True)
        procs: list[_JobProcess] = []
        try:
            for i in range(counts[-1]):
                rounds = sum(n > i for n in counts)
                spec = {"overrides": self.config_overrides([*extra, f"trainer.max_steps={p.warmup + p.jobs_steps * rounds}"]),
                        "warmup": p.warmup, "steps": p.jobs_steps, "rounds": rounds, "batch": batch,
                        "run_dir": str(new_run_dir(self.work / "runs", f"{row.key}-{i}"))}
                with _alarm_deferred():  # a process started is always in `procs`, whose end the `finally` sees to
                    procs.append(_JobProcess.start(i, spec, folder))
            f["process_ids"] = [pr.proc.pid for pr in procs]  # the report names them even if the row fails
            _await(procs, "ready")  # every process built and warmed up
            results: list[dict[str, Any]] = []
            for n in counts:
                active = procs[:n]
                _await([pr for pr in active if not pr.armed], "ready")
                for pr in active:  # the common start
                    pr.go()
                done = _await(active, "done")
                t0, t1 = min(m["t0"] for m in done), max(m["t1"] for m in done)
                episodes = sum(m["episodes"] for m in done)
                res: dict[str, Any] = {
                    "jobs": n, "episodes_per_s": episodes / (t1 - t0), "window_s": t1 - t0, "episodes": episodes,
                    "per_process_episodes_per_s": [m["episodes"] / (m["t1"] - m["t0"]) for m in done]}
                res["speedup"] = res["episodes_per_s"] / results[0]["episodes_per_s"] if results else 1.0
                if self.cuda:
                    res["peak_gpu_mb"] = [m["peak_gpu_mb"] for m in done]
                else:
                    res.update(peak_gpu_mb=NO_CUDA, peak_rss_mb=[m["peak_rss_mb"] for m in done])
                results.append(res)
                f["concurrent"] = results
            best = max(results, key=lambda r: r["episodes_per_s"])
            f.update(best_jobs=best["jobs"], best_episodes_per_s=best["episodes_per_s"],
                     suggested_jobs_per_gpu=best["jobs"])
        finally:
            for pr in procs:
                pr.kill()

    def row_ckpt(self, row: Row) -> None:
        """The ``train`` verb for a few steps with validation: the checkpoint every evaluation row loads."""
        from fsl_med.models.module import FewShotModule
        from fsl_med.train import train

        p = self.profile
        cfg = self.config([*p.large, f"trainer.max_steps={p.ckpt_steps}", f"trainer.val_check_interval={p.ckpt_steps}",
                           "data.num_val_scans=1", "name=gpu-check", "trainer.precision=32-true"])
        module = FewShotModule.from_config(cfg)
        res = train(cfg, module=module, sync_timing=True)  # its seconds per step are reported
        self.ckpt = res.last_ckpt
        row.figures.update(_head_figures(module.model), steps=res.steps, seconds_per_step=res.seconds_per_step,
                           val_dice=res.val_dice, checkpoint=res.last_ckpt.name)
        self.ckpt_head = module.model.head.name

    def _eval_config(self, extra: list[str]) -> Any:
        return self.config([*self.profile.large, f"ckpt={self.ckpt}", "trainer.precision=32-true", "name=gpu-check",
                            *extra])

    def row_eval(self, row: Row) -> None:
        """The ``eval`` verb on the device: fold 0, all four variants, TTT in the fast (per-volume) mode."""
        from fsl_med.evaluate import evaluate

        cfg = self._eval_config(["eval.variants=[plain,cca,ttt,ttt_cca]", "ttt.mode=volume",
                                 f"ttt.steps={self.profile.ttt_steps}"])
        results = evaluate(cfg).results
        plain = [v for v in results["volumes"] if v["variant"] == "plain"]
        slices = sum(v["slices"] for v in plain)
        f = row.figures
        f["head"] = results["config"]["model"]["head"]["name"]  # the config evaluate built the model from
        f.update({f"dice_{k}": s["dice_mean"] for k, s in results["variants"].items()})
        f.update(volumes=len(plain), scored_slices=slices, query_scans=sorted({v["query"] for v in plain}),
                 seconds_per_slice=sum(v["seconds"] for v in plain) / max(slices, 1),
                 seconds_per_volume=results["variants"]["plain"]["seconds_per_volume"],
                 ttt_mode=f"volume, {self.profile.ttt_steps} steps",
                 ttt_changed_volumes=_changed(results["volumes"], "ttt"),
                 ttt_seconds_per_slice=results["ttt_seconds_per_slice"])

    def row_ttt_paper(self, row: Row) -> None:
        """The paper's TTT (per slice, ``ttt_steps`` steps) on a few slices of the first query volume."""
        from fsl_med.checkpoints import module_from_checkpoint
        from fsl_med.data.datamodule import FewShotDataModule
        from fsl_med.refine.ttt import TestTimeTrainer

        cfg = self._eval_config(["ttt.mode=slice", f"ttt.steps={self.profile.ttt_steps}"])
        dm = FewShotDataModule(cfg)
        dm.setup("test")
        it = dm.test_set.items[0]
        module, _ = module_from_checkpoint(self.ckpt, cfg)
        module.to(self.device).eval()
        seg = module.model
        row.figures.update(_head_figures(seg))
        protos = seg.support_prototypes(it.support_images, it.support_masks, self.device, it.shots)
        pred, prob = seg.predict_volume(protos, it.query_images, it.part, cfg.eval.batch_size, self.device)
        n = min(self.profile.paper_ttt_slices, len(it.z))
        idx = np.arange(len(it.z) // 2 - n // 2, len(it.z) // 2 - n // 2 + n)
        fg = pred[idx].copy()
        h, w = fg.shape[-2:]
        fg[:, h * 2 // 5:h * 3 // 5, w * 2 // 5:w * 3 // 5] = 1  # every slice is adapted (empty ones are skipped)
        ttt = TestTimeTrainer.from_config(seg, cfg, module.ce_weights)
        sync(self.device)
        t0 = time.perf_counter()
        ttt.refine(it.query_images[idx], fg, prob[idx], it.part[idx], it.support_images, it.support_masks,
                   np.random.default_rng(0), self.device, cfg.eval.batch_size, shots=it.shots)
        sync(self.device)
        dt = time.perf_counter() - t0
        row.figures.update(slices=n, steps_per_slice=self.profile.ttt_steps, ttt_seconds_per_slice=dt / n,
                           seconds_per_ttt_step=dt / n / max(1, self.profile.ttt_steps), organ=it.organ,
                           query=it.query_id)
        row.figures.update(self._peak_memory())

    def _subset_dice(self, accelerator: str) -> tuple[dict[str, float], str, str]:
        """Per-(organ, variant) Dice of the first query scan, plain and +CCA, through Lightning's test loop; the query
        and the model's head."""
        from fsl_med.checkpoints import module_from_checkpoint
        from fsl_med.data.datamodule import EvalDataset, FewShotDataModule
        from fsl_med.evaluation.scoring import Scoring
        from fsl_med.refine.cca import CCA
        from fsl_med.runs import make_trainer, new_run_dir

        cfg = self._eval_config(["eval.variants=[plain,cca]", f"trainer.accelerator={accelerator}",
                                 "trainer.devices=1", "trainer.strategy=auto", "eval.overlay_slices=0"])
        module, _ = module_from_checkpoint(self.ckpt, cfg)
        dm = FewShotDataModule(cfg)
        dm.setup("test")
        query = dm.test_set.items[0].query_id
        dm.test_set = EvalDataset([it for it in dm.test_set.items if it.query_id == query])
        scoring = Scoring(["plain", "cca"], hd95=False)
        trainer = make_trainer(cfg, new_run_dir(self.work / "runs", f"subset-{accelerator}"), with_val=False,
                               progress_bar=False, extra_callbacks=[CCA(cfg.eval.cca_mode), scoring])
        trainer.test(module, datamodule=dm, verbose=False)
        return {f"{r.organ}/{r.variant}": r.counts.dice for r in scoring.results["test"]}, query, module.model.head.name

    def row_eval_vs_cpu(self, row: Row) -> None:
        """One query scan evaluated on the device and on the CPU (fp32, plain and +CCA): Dice must agree."""
        dev, query, head = self._subset_dice("auto")
        cpu, _, _ = self._subset_dice("cpu")
        if sorted(dev) != sorted(cpu):
            raise RuntimeError(f"device and CPU scored different volumes: {sorted(dev)} vs {sorted(cpu)}")
        diff = max(abs(dev[k] - cpu[k]) for k in dev)
        f = row.figures
        f.update(head=head, query=query, volumes=len(dev), device=self.device, max_abs_dice_diff=diff,
                 dice_device={k: 100 * v for k, v in dev.items()}, dice_cpu={k: 100 * v for k, v in cpu.items()})
        if not self.cuda:
            f["note"] = "no CUDA: the device run was on the CPU too"
        if diff > DICE_TOLERANCE:
            raise RuntimeError(f"device and CPU Dice differ by {diff:.2e} > {DICE_TOLERANCE:g} (query {query})")

    def row_segment_vs_cpu(self, row: Row) -> None:
        """``fsl-med segment`` of one query volume (liver, the fold's support scan) on the device and on the CPU:
        the two outputs must be identical."""
        from fsl_med.prepare.datasets import discover_scans, fold_split, get_dataset_info
        from fsl_med.prepare.nifti import read_nifti
        from fsl_med.segment import segment

        split = fold_split(get_dataset_info("chaos_t2"), discover_scans(self.data), 0)
        root = Path(self.data)
        sup, query = split.support, split.query[0]
        out: dict[str, tuple[np.ndarray, float]] = {}
        for run, dev in (("device", self.device), ("cpu", "cpu")):  # two runs, also when the device is the CPU
            sync(self.device)
            t0 = time.perf_counter()
            res = segment(self.ckpt, root / f"image_{sup}.nii.gz", root / f"label_{sup}.nii.gz",
                          root / f"image_{query}.nii.gz", self.work / f"segment-{run}.nii.gz", label=1, batch_size=8,
                          device=dev, plan="mri")
            sync(self.device)
            out[run] = (read_nifti(res.path)[0], time.perf_counter() - t0)
        a, b = out["device"][0], out["cpu"][0]
        differ = int(np.count_nonzero(a != b))
        f = row.figures
        f.update(head=self.ckpt_head, support=sup, query=query, organ="liver", shape=list(a.shape),
                 voxels_device=int(a.sum()),
                 voxels_cpu=int(b.sum()), voxels_differing=differ, identical=differ == 0,
                 seconds_device=out["device"][1], seconds_cpu=out["cpu"][1])
        if not self.cuda:
            f["note"] = "no CUDA: the device run was on the CPU too"
        if differ:
            raise RuntimeError(f"segment on {self.device} and on the CPU differ in {differ} voxels")

    def row_ddp(self, row: Row) -> None:
        """``trainer.strategy=ddp`` in one process (NCCL on CUDA, gloo without): train, then evaluate, with
        the cross-rank gather of the evaluation."""
        import torch.distributed as dist

        from fsl_med.evaluate import evaluate
        from fsl_med.models.module import FewShotModule
        from fsl_med.train import train

        p = self.profile
        env = dict(os.environ)
        try:
            cfg = self.config([*p.small, "trainer.strategy=ddp", "trainer.devices=1", "trainer.max_steps=2",
                               "trainer.val_check_interval=2", "data.num_val_scans=1", "name=gpu-check-ddp",
                               "eval.variants=[plain,cca]", "eval.overlay_slices=0"])
            module = FewShotModule.from_config(cfg)
            res = train(cfg, module=module)
            results = evaluate(_with(cfg, ckpt=str(res.last_ckpt))).results
            row.figures.update(head=module.model.head.name, backend="nccl" if self.cuda else "gloo", steps=res.steps,
                               val_dice=res.val_dice,
                               dice_plain=results["variants"]["plain"]["dice_mean"],
                               volumes=len([v for v in results["volumes"] if v["variant"] == "plain"]))
            if not self.cuda:
                row.figures["_status"] = "ok (gloo; NCCL skipped: no CUDA)"
        finally:
            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
            os.environ.clear()
            os.environ.update(env)

    # -- the whole check ----------------------------------------------------------------------------
    def run(self) -> int:
        """Run every row, write the report; returns the number of failed rows."""
        p = self.profile
        with tempfile.TemporaryDirectory(prefix="fsl_med_gpu_check_") as work:
            self.work = Path(work)
            if self.phantom:
                from fsl_med.data.phantom import generate_phantom

                self.data = generate_phantom(self.work / "phantom", n_scans=6, size=64, depth=8, seed=0)
            self.split = self._split()
            print(f"gpu-check: {self.headline(counts=False)} Report: {self.out / 'gpu-check.md'}", file=sys.stderr,
                  flush=True)
            self.run_row("env", "env", "environment and matmul throughput", self.row_env)
            L, S = p.large_title, p.small_title
            eager, compiled = train_plan(p)

            def title(enc: str, prec: str, comp: str, b: int) -> str:
                return f"{L if enc == 'large' else S}, {prec}{' + torch.compile' if comp != 'off' else ''}, batch {b}"

            for k, enc, prec, comp, b in eager:
                self.run_row(k, "train", title(enc, prec, comp, b), lambda r, a=(enc, prec, comp, b): self.row_train(r, *a))
            self.run_row("ckpt", "eval", f"checkpoint: `fsl-med train` {p.ckpt_steps} steps + validation, {L}, fp32",
                         self.row_ckpt)
            self.run_row("eval", "eval", f"`fsl-med eval` fold 0 on {self.device}: plain, +CCA, +TTT, +TTT+CCA "
                         f"(TTT per volume, {p.ttt_steps} steps)", self.row_eval, needs_ckpt=True)
            self.run_row("ttt-paper", "eval", f"TTT as in the paper: per slice, {p.ttt_steps} steps, "
                         f"{p.paper_ttt_slices} slices", self.row_ttt_paper, needs_ckpt=True)
            self.run_row("eval-vs-cpu", "eval", f"evaluation of one query scan on {self.device} vs CPU (fp32, plain "
                         "and +CCA)", self.row_eval_vs_cpu, needs_ckpt=True)
            self.run_row("segment-vs-cpu", "segment", f"`fsl-med segment` of one volume on {self.device} vs CPU",
                         self.row_segment_vs_cpu, needs_ckpt=True)
            self.run_row("ddp", "ddp", f"DDP ({'NCCL' if self.cuda else 'gloo'}), 1 process: train 2 steps, evaluate",
                         self.row_ddp)
            for k, head in head_plan():  # after the rows above, before the compiled ones (the budget drops last rows)
                self.run_row(k, "heads", f"head `{head}`: {S}, bf16-mixed, batch {p.batch_sizes[0]}: training steps, then "
                             f"the prediction of a query volume on {self.device}", lambda r, h=head: self.row_head(r, h))
            where = "one GPU" if self.cuda else "the CPU"
            for k, b in jobs_plan(p):  # before the compiled rows (the time budget drops the last rows first)
                self.run_row(k, "jobs", f"{L}, bf16-mixed, batch {b}: {', '.join(map(str, sorted(set(p.jobs))))} "
                             f"concurrent training processes on {where}", lambda r, b=b: self.row_jobs(r, b))
            for k, enc, prec, comp, b in compiled:
                self.run_row(k, "train", title(enc, prec, comp, b), lambda r, a=(enc, prec, comp, b): self.row_train(r, *a))
        self.write()
        return sum(r.status.startswith("FAILED") for r in self.rows)

    # -- the report ---------------------------------------------------------------------------------
    def _split(self) -> dict[str, Any]:
        from fsl_med.prepare.datasets import discover_scans, fold_split, get_dataset_info

        split = fold_split(get_dataset_info("chaos_t2"), discover_scans(self.data), 0)
        return {"query": split.query, "support": split.support, "train": split.train}

    def headline(self, counts: bool = True) -> str:
        """The report's first line: what ran where, and (``counts``) how many rows passed, failed, were skipped."""
        n = {s: sum(r.status.startswith(s) for r in self.rows) for s in ("ok", "FAILED", "skipped")}
        tally = f" {n['ok']} rows ok, {n['FAILED']} failed, {n['skipped']} skipped." if counts else ""
        if self.profile.name == "tiny":
            why = "No CUDA device" if not self.cuda else "--profile tiny"
            data = "phantom data" if self.phantom else "real data"
            return (f"{why}: tiny mode on {self.device} ({data}, tiny random-init ViT, {self.profile.steps} timed "
                    f"steps); the figures exercise the code and are not benchmarks.{tally}")
        e = self.env
        gpu = f"{e.get('gpu')} ({e.get('gpu_memory_gib', 0):.0f} GiB)" if e else "CUDA"
        return f"GPU check on {gpu}, torch {torch.__version__}, CUDA {torch.version.cuda}.{tally}"

    def to_json(self) -> dict[str, Any]:
        return {"headline": self.headline(), "profile": self.profile.name, "device": self.device,
                "started": self.started, "seconds": time.monotonic() - self.t_start, "data": str(self.data),
                "fold0": self.split, "overrides": self.overrides, "bound_tflops": self.bound / 1e12 if self.bound else None,
                "rows": [r.__dict__ for r in self.rows]}

    def write(self) -> Path:
        """Write ``gpu-check.md`` and ``gpu-check.json`` (atomically); returns the Markdown path."""
        atomic.write_json(self.out / "gpu-check.json", _jsonable(self.to_json()))
        return atomic.write_text(self.out / "gpu-check.md", render_markdown(self))


def _changed(volumes: list[dict[str, Any]], variant: str) -> str:
    """``"k of n"``: the volumes whose ``variant`` prediction differs from the plain one (TP/FP/FN)."""
    counts = {(v["organ"], v["query"], v["variant"]): (v["tp"], v["fp"], v["fn"]) for v in volumes}
    keys = [k for k in counts if k[2] == "plain"]
    return f"{sum(counts[k] != counts[(k[0], k[1], variant)] for k in keys)} of {len(keys)}"


def _with(cfg: Any, **values: Any) -> Any:
    from fsl_med.config import apply_overrides

    return apply_overrides(cfg, [f"{k}={v}" for k, v in values.items()])


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, (str, int, bool)) or x is None:
        return x
    return str(x)


def _cell(v: Any, nd: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "**no**"
    if isinstance(v, float):
        return "–" if not math.isfinite(v) else f"{v:.{nd}f}"
    return str(v)


def _pct(v: Any) -> str:
    return "–" if not isinstance(v, float) else f"{100 * v:.1f} %"


def render_markdown(check: GpuCheck) -> str:
    """The report: headline, environment, then one table per section; failures with their messages."""
    lines = [f"# fsl_med GPU check: {check.headline()}", ""]
    e = check.env
    if e:
        lines += ["| environment | |", "|---|---|"]
        for k in ("gpu", "gpu_memory_gib", "multiprocessors", "compute_capability", "cuda_version", "cudnn",
                  "bf16_supported", "tf32_matmul", "tf32_cudnn", "torch", "lightning", "timm", "python", "cpu",
                  "cores", "torch_threads"):
            if k in e:
                lines.append(f"| {k} | {_cell(e[k], 1)} |")
        lines += [f"| bf16 matmul {e['matmul_n']}³ (best of 10) | {e['bf16_matmul_tflops']:.2f} TFLOP/s "
                  f"(median {e['bf16_matmul_median_tflops']:.2f}) |",
                  f"| fp32 matmul {e['matmul_n']}³ (best of 5) | {e['fp32_matmul_tflops']:.2f} TFLOP/s |",
                  f"| bound (the faster of the two; denominator of every fraction) | {e['bound_tflops']:.2f} TFLOP/s |",
                  ""]
    sp = check.split
    fold = (f", fold 0: query scans {', '.join(sp['query'])}, support {sp['support']}, training "
            f"{', '.join(sp['train'])}" if sp else "")
    lines += [f"Data: `{check.data}`{fold}. Config overrides: `{' '.join(check.overrides) or 'none'}`.", ""]
    rows = [r for r in check.rows if r.section == "train"]
    if rows:
        lines += ["## Training (median after warm-up)", "",
                  "| row | head | s/step | steps/s | episodes/s | GFLOP/step | of bound | peak GPU MB | first step s "
                  "| wait between steps s | loader episodes/s (workers) | data keeps up | status |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
        for r in rows:
            f = r.figures
            loader = (f"{_cell(f.get('loader_episodes_per_s'), 1)} ({f.get('loader_workers', '–')})"
                      if "loader_workers" in f else "–")
            keeps = _cell(f.get("data_keeps_up"))
            if f.get("data_keeps_up") is False:
                keeps += f" (needs ~{f.get('workers_needed')} workers)"
            mem = f.get("peak_gpu_mb")
            lines.append(f"| {r.title} | {_cell(f.get('head'))} | {_cell(f.get('seconds_per_step'), 4)} "
                         f"| {_cell(f.get('steps_per_s'), 2)} "
                         f"| {_cell(f.get('episodes_per_s'), 1)} | {_cell(f.get('gflop_per_step'), 1)} "
                         f"| {_pct(f.get('bound_fraction'))} | {_cell(mem, 0) if isinstance(mem, float) else (mem or '–')} "
                         f"| {_cell(f.get('first_step_seconds'), 2)} | {_cell(f.get('wait_seconds_per_step'), 4)} "
                         f"| {loader} | {keeps} | {r.status} |")
        lines.append("")
    rows = [r for r in check.rows if r.section == "heads"]
    if rows:
        lines += ["## Few-shot heads (every registered head, whatever the overrides name)", "",
                  "| row | head | head parameters (values) | s/step | GFLOP/step | prediction s/slice | foreground "
                  "| probability range | status |", "|---|---|---|---:|---:|---:|---:|---|---|"]
        for r in rows:
            f = r.figures
            params = ", ".join(f.get("head_parameters", [])) or "none"
            if f.get("head_values"):
                params += f" ({_fig(f['head_values'])})"
            prob = (f"[{_cell(f['predict_prob_min'])}, {_cell(f['predict_prob_max'])}]" if "predict_prob_min" in f
                    else "–")
            predict = _cell(f.get("predict_seconds_per_slice"), 4)
            if f.get("refine_seconds_per_slice") is not None:  # Q-Net: its test-time refinement's part
                predict += f" (refinement {_cell(f['refine_seconds_per_slice'], 4)})"
            lines.append(f"| {r.title} | {_cell(f.get('head'))} | {params} | {_cell(f.get('seconds_per_step'), 4)} "
                         f"| {_cell(f.get('gflop_per_step'), 1)} | {predict} "
                         f"| {_pct(f.get('predict_foreground'))} | {prob} | {r.status} |")
        lines.append("")
    rows = [r for r in check.rows if r.section == "jobs"]
    if rows:
        lines += _jobs_table(check, rows)
    for section, heading in (("eval", "## Evaluation"), ("segment", "## Segment"), ("ddp", "## DDP")):
        rows = [r for r in check.rows if r.section == section]
        if not rows:
            continue
        lines += [heading, "", "| row | head | figures | seconds | status |", "|---|---|---|---:|---|"]
        for r in rows:
            figs = "; ".join(f"{k} {_fig(v)}" for k, v in r.figures.items() if k != "head" and v not in ([], {}))
            lines.append(f"| {r.title} | {_cell(r.figures.get('head'))} | {figs or '–'} | {_cell(r.seconds, 1)} "
                         f"| {r.status} |")
        lines.append("")
    failed = [r for r in check.rows if r.status.startswith("FAILED")]
    if failed:
        lines += ["## Failures", ""] + [f"- `{r.key}`: {r.status[len('FAILED: '):]}" for r in failed]
        lines += ["", "Tracebacks: `gpu-check.log`.", ""]
    return "\n".join(lines)


def _jobs_table(check: GpuCheck, rows: list[Row]) -> list[str]:
    """The concurrent-training section: one line per row and process count, then the suggested
    ``protocol.jobs_per_gpu`` of each row."""
    where = "one GPU" if check.cuda else "the CPU (tiny mode: not a benchmark)"
    mem = "peak GPU MB per process" if check.cuda else "peak RSS MB per process"
    lines = [f"## Concurrent training processes on {where} (`protocol.jobs_per_gpu`)", "",
             "Each process trains on its own (separate OS processes); the counts start together after their warm-up. "
             "Total episodes/s = (sum of batch x steps) / the wall time from the first start to the last end.", "",
             f"| row | head | processes | total episodes/s | speed-up vs 1 | episodes/s per process | {mem} "
             "| window s | status |", "|---|---|---:|---:|---:|---|---|---:|---|"]
    notes = []
    for r in rows:
        f = r.figures
        res = f.get("concurrent") or []
        if not res:
            lines.append(f"| {r.title} | {_cell(f.get('head'))} | – | – | – | – | – | – | {r.status} |")
            continue
        for i, c in enumerate(res):
            per = ", ".join(f"{x:.2f}" for x in c["per_process_episodes_per_s"])
            peak = c.get("peak_gpu_mb") if check.cuda else c.get("peak_rss_mb")
            peak = ", ".join(f"{x:.0f}" for x in peak) if isinstance(peak, list) else _cell(peak)
            best = " **(best)**" if c["jobs"] == f.get("best_jobs") else ""
            lines.append(f"| {r.title if i == 0 else ''} | {_cell(f.get('head')) if i == 0 else ''} | {c['jobs']}{best} "
                         f"| {_cell(c['episodes_per_s'], 2)} | {_cell(c['speedup'], 2)}× | {per} | {peak} "
                         f"| {_cell(c['window_s'], 2)} | {r.status if i == 0 else ''} |")
        if f.get("suggested_jobs_per_gpu") is not None:
            notes.append(f"- batch {f.get('batch')}: the most episodes/s with {f['suggested_jobs_per_gpu']} "
                         f"process(es) ({_cell(f['best_episodes_per_s'], 2)} episodes/s): "
                         f"`protocol.jobs_per_gpu={f['suggested_jobs_per_gpu']}`")
    lines.append("")
    if notes:
        lines += ["Suggested `protocol.jobs_per_gpu` (the count with the most total episodes/s):", "", *notes, ""]
    return lines


def _fig(v: Any) -> str:
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_fig(x)}" for k, x in v.items()) + "}"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return ",".join(str(x) for x in v)
    return _cell(v)


DEFAULT_BUNDLE = REPO / "gpu_bundle"


def _has_volumes(folder: Path) -> bool:
    return folder.is_dir() and any(folder.glob("image_*.nii.gz"))


def resolve_inputs(bundle: str | None, data: str | None, cache_dir: str | None) -> tuple[Path, str, str]:
    """The data folder and superpixel cache: ``--data`` or ``--bundle`` when given (checked); else the first
    of ``$FSL_MED_DATA_MRI``, ``../shared/data/CHAOST2/chaos_MR_T2_normalized`` and ``gpu_bundle/chaos`` that
    holds volumes. The cache is ``--cache-dir``, else the bundle's when the data is the bundle's, else
    ``$FSL_MED_CACHE`` or ``.cache/fsl_med``.

    Returns:
        ``(data folder, cache folder, where the data came from)``.
    Raises:
        DataError: ``--bundle`` is not a bundle, or ``--data`` (or the bundle) holds no prepared volumes.
    """
    b: Path | None = None
    if bundle is not None:
        b = Path(bundle)
        if not (b / "MANIFEST.json").is_file():
            raise DataError(f"--bundle {b}: not a bundle (no MANIFEST.json; make gpu-bundle writes one)")
    if data is not None:
        root, origin = Path(data), "--data"
    elif b is not None:
        root, origin = b / "chaos", "--bundle"
    else:
        env = os.environ.get("FSL_MED_DATA_MRI")
        candidates = [Path(env)] if env else []
        candidates += [REPO.parent / "shared/data/CHAOST2/chaos_MR_T2_normalized", DEFAULT_BUNDLE / "chaos"]
        root = next((c for c in candidates if _has_volumes(c)), candidates[0])
        origin = "default"
        if root == DEFAULT_BUNDLE / "chaos":
            b = DEFAULT_BUNDLE
    if origin != "default" and not _has_volumes(root):
        raise DataError(f"{origin} {root}: no prepared CHAOS-T2 volumes (image_<id>.nii.gz) there")
    if cache_dir is None and b is not None and root == b / "chaos" and (b / "cache").is_dir():
        cache_dir = str(b / "cache")
    return root, cache_dir or os.environ.get("FSL_MED_CACHE") or ".cache/fsl_med", origin


def run_gpu_check(out: str | Path = DEFAULT_OUT, profile: str = "auto", data: str | None = None,
                  bundle: str | None = None, cache_dir: str | None = None, overrides: list[str] | None = None,
                  only: list[str] | None = None, budget_s: float | None = None) -> tuple[Path, int]:
    """Run the check and write its report.

    Args:
        out: report folder (created).
        profile: ``auto`` (``gpu`` with CUDA, else ``tiny``), ``gpu`` or ``tiny``.
        data, bundle, cache_dir: see :func:`resolve_inputs`; the ``tiny`` profile generates a phantom unless
            ``data`` or ``bundle`` is given.
        overrides: ``key=value`` config overrides of every row (checked before any row runs).
        only: row-key prefixes to run (``train``, ``eval``, ``segment``, ``ddp``, ``train-large-bf16``...).
    Returns:
        ``(path of gpu-check.md, number of failed rows)``.
    Raises:
        ConfigError: unknown profile, ``gpu`` without CUDA, a bad override, ``--only`` or ``--budget-s`` value.
        DataError: no data for the ``gpu`` profile, a ``--data`` folder without volumes, not a ``--bundle``.
    """
    if profile == "auto":
        profile = "gpu" if torch.cuda.is_available() else "tiny"
    if profile not in PROFILES:
        raise ConfigError(f"--profile {profile}: must be auto, gpu or tiny")
    if profile == "gpu" and not torch.cuda.is_available():
        raise ConfigError("--profile gpu: no CUDA device on this machine (the tiny profile runs without one)")
    prof = PROFILES[profile]
    keys = row_keys(prof)
    if only is not None and not only:
        raise ConfigError(f"--only: names no row (rows: {', '.join(keys)})")
    for o in only or []:
        if not any(k.startswith(o) for k in keys):
            raise ConfigError(f"--only {o}: matches no row (rows: {', '.join(keys)})")
    if only and any(o.startswith(("eval", "ttt", "segment")) for o in only):
        only = [*only, "ckpt"]  # the rows that load the evaluation checkpoint need its row
    if budget_s is not None and not budget_s >= 0:
        raise ConfigError(f"--budget-s {budget_s}: must be >= 0")
    root, cache, origin = resolve_inputs(bundle, data, cache_dir)
    real = prof.name == "gpu" or origin != "default"  # the tiny profile generates a phantom unless given data
    if real and not _has_volumes(root):
        raise DataError(f"{root}: no prepared CHAOS-T2 volumes for the gpu profile (make gpu-bundle, or --data DIR)")
    from fsl_med.run_config import load_run_config

    # the overrides are checked once, up front: a typo is one error line, not a failure in every row
    load_run_config(REPO / "experiments" / "mri.yaml", [f"data.root={root}", *(overrides or [])])
    out_dir = atomic.ensure_writable_dir(out, "--out")
    (out_dir / "gpu-check.log").write_text("", encoding="utf-8")
    check = GpuCheck(out_dir, prof, root if real else None, cache, list(overrides or []), only, budget_s)
    failed = check.run()
    return out_dir / "gpu-check.md", failed


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--jobs-worker":  # a jobs-b<N> row's process
    sys.exit(_jobs_worker(sys.argv[2], int(sys.argv[3])))
