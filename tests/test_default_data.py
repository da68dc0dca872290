"""The MRI commands' default data folder is the one `make prepare-mri` writes, or ``$FSL_MED_DATA_MRI`` (issue 32):
no command defaults to a path outside the repository, and a missing default folder is one line that says how to get
the data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fsl_med.config import load_config
from fsl_med.prepare.datasets import DEFAULT_ROOTS, default_mri_root

REPO = Path(__file__).resolve().parents[1]
MRI_DEFAULT = "data/CHAOST2/chaos_MR_T2_normalized"


def _env_without_data() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("FSL_MED_DATA_MRI", "FSL_MED_DATA_CT")}
    env["PYTHONWARNINGS"] = "ignore"
    return env


def test_the_default_mri_folder_is_what_make_prepare_mri_writes(monkeypatch):
    make = (REPO / "Makefile").read_text()
    assert f"MRI_OUT      = $(or $(OUT),{MRI_DEFAULT})" in make
    assert MRI_DEFAULT in DEFAULT_ROOTS
    monkeypatch.delenv("FSL_MED_DATA_MRI", raising=False)
    assert default_mri_root() == Path(MRI_DEFAULT)
    assert load_config(REPO / "experiments" / "mri.yaml").data.root == MRI_DEFAULT
    monkeypatch.setenv("FSL_MED_DATA_MRI", "/somewhere/chaos")
    assert default_mri_root() == Path("/somewhere/chaos")
    assert load_config(REPO / "experiments" / "mri.yaml").data.root == "/somewhere/chaos"


@pytest.mark.parametrize("argv", [
    ["train", str(REPO / "experiments" / "mri.yaml"), "model.encoder.name=vit_tiny_patch14",
     "model.encoder.weights=none", "trainer.max_steps=1"],
    ["bench", "--out", "bench-out"],
    ["gpu-bundle", "--out", "bundle-out"],
], ids=["train", "bench", "gpu-bundle"])
def test_a_missing_default_folder_says_how_to_get_the_data(argv, tmp_path):
    p = subprocess.run([sys.executable, "-m", "fsl_med", *argv], cwd=tmp_path, env=_env_without_data(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("fsl-med: error:")]
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert MRI_DEFAULT in lines[0] and "make prepare-mri" in lines[0] and "FSL_MED_DATA_MRI" in lines[0], lines[0]
    assert sorted(q.name for q in tmp_path.iterdir()) == [], "nothing may be written before the data is found"
