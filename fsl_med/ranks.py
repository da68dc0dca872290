"""Which process of a distributed job this is, from the launchers' environment (no torch import)."""

from __future__ import annotations

import os


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
