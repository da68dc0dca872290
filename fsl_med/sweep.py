"""The ``sweep`` verb: create a W&B sweep from a sweep file and run an agent on this machine.

W&B sweeps are coordinated by the W&B server, so they need an account: without credentials this stops with one
line saying how to log in (and what runs without W&B), before anything is created.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from fsl_med.errors import ConfigError, FslMedError
from fsl_med.runs import has_wandb_key

log = logging.getLogger(__name__)

_SWEEP_ID_RE = re.compile(r"wandb agent (\S+)")


def _wandb_exe() -> str:
    """The ``wandb`` command of this environment (next to the running Python first)."""
    here = Path(sys.executable).parent / "wandb"
    if here.is_file():
        return str(here)
    found = shutil.which("wandb")
    if found is None:
        raise FslMedError("the 'wandb' command is not installed in this environment (pip install wandb)")
    return found


def run_sweep(sweep_file: str | Path, count: int | None = None, create_only: bool = False) -> str:
    """Create the sweep of ``sweep_file`` and run an agent for it (``count`` runs; all when None).

    Returns:
        The sweep id (``entity/project/id``).
    Raises:
        ConfigError: the sweep file is missing, or W&B is offline (``WANDB_MODE``) or has no credentials.
        FslMedError: ``wandb sweep`` failed (its first error line is named); the agent is not started.
    """
    path = Path(sweep_file)
    if not path.is_file():
        raise ConfigError(f"sweep file not found: {path}")
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        raise ConfigError(f"WANDB_MODE={os.environ['WANDB_MODE']}: W&B sweeps are run by the W&B server and need "
                          "online mode; unset WANDB_MODE (or use 'make ablations' for a local grid without W&B)")
    if not has_wandb_key():
        raise ConfigError("W&B sweeps need a W&B account: run '.venv/bin/wandb login' (or set WANDB_API_KEY) and "
                          "retry; without W&B, 'make train-mri' logs offline and 'make ablations' runs a local grid")
    exe = _wandb_exe()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    p = subprocess.run([exe, "sweep", str(path)], capture_output=True, text=True, env=env)
    out = (p.stdout or "") + (p.stderr or "")
    m = _SWEEP_ID_RE.search(out)
    if p.returncode != 0 or m is None:
        lines = [ln.strip() for ln in out.splitlines() if ln.strip() and "detailed error logs" not in ln]
        errors = [ln for ln in lines if "error" in ln.lower()]
        first = next((ln for ln in errors if ln.lower().startswith("error")), None) or \
            (errors[0] if errors else lines[-1] if lines else f"exit code {p.returncode}")
        raise FslMedError(f"'wandb sweep {path}' failed: {first}")
    sweep_id = m.group(1)
    log.info("created sweep %s", sweep_id)
    if create_only:
        return sweep_id
    agent = [exe, "agent", *(["--count", str(count)] if count else []), sweep_id]
    rc = subprocess.run(agent, env=env).returncode
    if rc != 0:
        raise FslMedError(f"'wandb agent {sweep_id}' exited with code {rc}")
    return sweep_id
