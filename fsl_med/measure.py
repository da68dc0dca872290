"""Measuring on the machine at hand: device-synchronised timing, FLOP counts, matmul throughput, memory and
a description of the machine. Shared by ``fsl-med bench`` and ``fsl-med gpu-check``.

CUDA work is asynchronous: a timer read right after a kernel launch measures the launch, not the kernel.
Every timer here synchronises the device first (:func:`sync`), so the same code times CPU and CUDA.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fsl_med import __version__


def default_device() -> str:
    """``"cuda"`` when a CUDA device is visible, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def sync(device: torch.device | str | None = None) -> None:
    """Wait for the queued work of ``device`` (a no-op on the CPU or when ``device`` is None)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], Any], repeats: int, warmup: int = 2,
                device: torch.device | str | None = None) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` calls after ``warmup`` untimed ones, the device
    synchronised before and after each timed call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def count_flops(fn: Callable[[], Any]) -> float:
    """FLOPs of ``fn()`` (forward and backward if it calls ``backward``), attention included.

    The count runs with the math attention backend, because ``FlopCounterMode`` counts nothing inside the
    fused attention kernels (CPU flash attention, forward and backward); timed runs use the default kernels.
    FLOPs do not depend on the dtype, so an fp32 eager count serves bf16 and compiled runs of the same model.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc, sdpa_kernel(SDPBackend.MATH):
        fn()
    return float(fc.get_total_flops())


def matmul_throughput(device: torch.device | str, dtype: torch.dtype = torch.float32, n: int = 2048,
                      repeats: int = 30, warmup: int = 3) -> dict[str, float]:
    """FLOP/s of an ``n x n @ n x n`` product of random ``dtype`` matrices on ``device``: the best of
    ``repeats`` timed products (the machine's peak, the denominator of FLOP-bound fractions) and their
    median (on a shared machine single products swing by several per cent)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for i in range(warmup + repeats):
        sync(device)
        t0 = time.perf_counter()
        (a @ b).sum().item()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    flop = 2.0 * n**3
    return {"best": flop / min(times), "median": flop / statistics.median(times), "n": n}


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what ``platform`` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_info() -> dict[str, Any]:
    """CPU, cores, torch threads, versions and the CUDA device's name (``None`` without CUDA)."""
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(), "fsl_med": __version__}
