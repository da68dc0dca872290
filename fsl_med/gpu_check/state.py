"""The state of one check: its settings, the device, the scratch folder, the rows' results so far, and the helpers
every row uses (its run config, its data, peak memory, time limits)."""

from __future__ import annotations

import contextlib
import gc
import signal
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fsl_med.gpu_check.profiles import Profile
from fsl_med.measure import peak_rss_mb

REPO = Path(__file__).resolve().parents[2]
NO_CUDA = "skipped: no CUDA"


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
def time_limit(seconds: int) -> Iterator[None]:
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
def alarm_deferred() -> Iterator[None]:
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


def one_line(e: BaseException) -> str:
    """``Type: first line of the message`` of an exception."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".strip()


def median(xs: list[float]) -> float | None:
    """The median of ``xs``, ``None`` when empty."""
    return statistics.median(xs) if xs else None


def head_figures(model: Any) -> dict[str, Any]:
    """The head of a :class:`~fsl_med.models.segmenter.FewShotSegmenter` as built: its name, its own parameters
    (ADNet: ``threshold``) and the values it logs (ADNet: ``T``)."""
    head = model.head
    return {"head": head.name, "head_parameters": [n for n, _ in head.named_parameters()],
            "head_values": head.log_values()}


class CheckState:
    """What the rows of one check share: settings, device, scratch folder and what earlier rows found.

    Args:
        out: report folder.
        profile: :data:`~fsl_med.gpu_check.profiles.GPU` or :data:`~fsl_med.gpu_check.profiles.TINY`.
        data: prepared CHAOS-T2 folder; ``None``: a phantom is generated (the ``tiny`` profile's default).
        cache_dir: superpixel cache.
        overrides: ``key=value`` config overrides applied to every row (after the profile's).
    """

    def __init__(self, out: Path, profile: Profile, data: Path | None, cache_dir: str, overrides: list[str]) -> None:
        self.out, self.profile, self.data, self.cache_dir = out, profile, data, cache_dir
        self.overrides = list(overrides)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.cuda = self.device == "cuda"
        self.rows: list[Row] = []
        self.env: dict[str, Any] = {}
        self.bound: float | None = None  # FLOP/s: the faster of the bf16 and fp32 matmuls
        self.flops: dict[tuple[str, int], float] = {}  # (encoder, batch) -> FLOPs per training step
        self.ckpt: Path | None = None
        self.ckpt_head: str | None = None  # the head of the checkpoint's model
        self.t_start = time.monotonic()
        self.work = Path(".")  # the scratch folder while the check runs
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

    def eval_config(self, extra: list[str]) -> Any:
        """The config of a row that loads the checkpoint: the large encoder in fp32, ``ckpt`` set."""
        return self.config([*self.profile.large, f"ckpt={self.ckpt}", "trainer.precision=32-true", "name=gpu-check",
                            *extra])

    # -- helpers of the rows ------------------------------------------------------------------------
    def data_module(self, cfg: Any) -> Any:
        """The training data module of ``cfg``, prepared and set up (superpixels computed or read)."""
        from fsl_med.data.datamodule import FewShotDataModule

        dm = FewShotDataModule(cfg)
        dm.prepare_data()
        dm.setup("fit")
        return dm

    def cleanup(self) -> None:
        """Free what a row left: Python garbage, the CUDA cache and its peak-memory counters."""
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_memory(self) -> dict[str, Any]:
        """The peak GPU memory since the last :meth:`cleanup` (without CUDA: the process's peak RSS)."""
        if self.cuda:
            return {"peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20}
        return {"peak_gpu_mb": NO_CUDA, "peak_rss_mb": peak_rss_mb()}

    def log(self, text: str) -> None:
        """Append a time-stamped line to ``gpu-check.log``."""
        with open(self.out / "gpu-check.log", "a", encoding="utf-8") as f:
            f.write(f"[{time.strftime('%H:%M:%S')}] {text.rstrip()}\n")
