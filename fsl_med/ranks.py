"""Which process of a distributed job this is (launchers' environment, no torch import), and gathering
Python objects from every process through the Lightning strategy."""

from __future__ import annotations

import os
from typing import Any, TypeVar

T = TypeVar("T")


def is_rank_zero() -> bool:
    """True in the process that owns the outputs: not distributed, or global rank 0.

    Reads the launchers' environment: ``RANK`` (torchrun), ``SLURM_PROCID`` (SLURM with several tasks), or
    Lightning's own ``NODE_RANK``/``LOCAL_RANK`` (its launcher sets them for the processes it starts).
    """
    env = os.environ
    if "RANK" in env:
        return int(env["RANK"]) == 0
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return int(env["SLURM_PROCID"]) == 0
    return int(env.get("NODE_RANK", "0")) == 0 and int(env.get("LOCAL_RANK", "0")) == 0


def gather_objects(trainer: Any, obj: T) -> list[T]:
    """``obj`` of every process of ``trainer``'s job, in rank order, on every process.

    Uses only the strategy's collective (``trainer.strategy.broadcast``, once per rank), so it works for any
    Lightning strategy; a single process gets ``[obj]``. ``obj`` must be picklable.
    """
    n = int(getattr(trainer, "world_size", 1) or 1)
    if n == 1:
        return [obj]
    return [trainer.strategy.broadcast(obj, src=r) for r in range(n)]
