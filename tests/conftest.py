"""Shared fixtures: the real CHAOS-T2 folder, tiny-model configs, and a small real-data subset."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CHAOS = REPO.parent / "shared" / "data" / "CHAOST2" / "chaos_MR_T2_normalized"
if "FSL_MED_DATA_MRI" not in os.environ and DEFAULT_CHAOS.is_dir():
    # the tests' default data (the commands' own default is the folder `make prepare-mri` writes); subprocesses
    # (`make train-mri`, `fsl-med bench`, ...) inherit it
    os.environ["FSL_MED_DATA_MRI"] = str(DEFAULT_CHAOS)

# Overrides that make any experiment config run fast on CPU: a tiny random-init ViT, no workers.
TINY = [
    "model.encoder.name=vit_tiny_patch14",
    "model.encoder.weights=none",
    "model.encoder.finetune=full",
    "data.num_workers=0",
    "trainer.enable_progress_bar=false",
    "logging.logger=csv",
]


def fsl_subprocess(*args: str, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    """``python -m fsl_med ARGS`` in a fresh process (no inherited rank or run-folder variables, warnings off);
    asserts it succeeded (the last 3000 characters of stderr otherwise)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FSL_MED_RUN_DIR", "LOCAL_RANK", "RANK",
                                                                        "NODE_RANK", "WORLD_SIZE"))}
    p = subprocess.run([sys.executable, "-m", "fsl_med", *args], cwd=cwd, capture_output=True, text=True,
                       timeout=timeout, env={**env, "PYTHONWARNINGS": "ignore"})
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def error_line(err: str, *needles: str) -> str:
    """The one ``fsl-med: error:`` line of a command's stderr; asserts there is exactly one, no traceback, and that it
    contains every needle."""
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("fsl-med: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def chaos_root() -> Path | None:
    """The real CHAOS-T2 prepared folder, or None when absent."""
    p = Path(os.environ.get("FSL_MED_DATA_MRI", DEFAULT_CHAOS))
    return p.resolve() if (p / "image_1.nii.gz").is_file() else None  # absolute: tests link to it from tmp dirs


@pytest.fixture(scope="session")
def chaos() -> Path:
    """Path of the real CHAOS-T2 data; skips when absent, fails under CI=true (a green CI used real data)."""
    root = chaos_root()
    if root is None:
        msg = (f"real CHAOS-T2 data not found at {os.environ.get('FSL_MED_DATA_MRI', DEFAULT_CHAOS)} "
               "(set FSL_MED_DATA_MRI)")
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg + " and CI=true requires it")
        pytest.skip(msg)
    return root


@pytest.fixture(scope="session")
def chaos_subset(chaos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four real CHAOS volumes (ids 1, 2, 3, 5) linked into a folder: split into query 1, support 2,
    training 3 and validation 5 by the proportional fold split."""
    out = tmp_path_factory.mktemp("chaos_subset")
    for sid in ("1", "2", "3", "5"):
        for kind in ("image", "label"):
            (out / f"{kind}_{sid}.nii.gz").symlink_to(chaos / f"{kind}_{sid}.nii.gz")
    return out


@pytest.fixture(autouse=True)
def _quiet_random_init_warning():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*RANDOMLY INITIALISED.*")
        yield


@pytest.fixture
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A superpixel cache shared across tests of a session (regeneration is tested separately)."""
    return tmp_path_factory.getbasetemp() / "sp_cache"


@pytest.fixture
def tiny() -> list[str]:
    """Overrides for a tiny random-init ViT on CPU (see ``TINY``)."""
    return list(TINY)
