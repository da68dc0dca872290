"""The import contracts of pyproject.toml hold, and they fail on an upward import or a cycle planted into a copy of
the package (so ``make lint`` would stop such a change)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def _lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT), "--config", str(root / "pyproject.toml")], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


def _copy(tmp_path: Path) -> Path:
    root = tmp_path / "copy"
    shutil.copytree(REPO / "fsl_med", root / "fsl_med", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    return root


def test_the_import_contracts_hold():
    p = _lint(REPO)
    assert p.returncode == 0, p.stdout[-3000:]
    assert "2 kept, 0 broken" in p.stdout


@pytest.mark.parametrize("module,line,broken", [
    ("models/segmenter.py", "import fsl_med.evaluate  # planted upward import", "layers follow the data flow"),
    ("config.py", "from fsl_med.data import datasets  # planted upward import", "layers follow the data flow"),
    ("models/encoder_base.py", "import fsl_med.models.encoders  # planted cycle", "no import cycles"),
])
def test_a_planted_upward_import_or_cycle_breaks_a_contract(tmp_path, module, line, broken):
    root = _copy(tmp_path)
    target = root / "fsl_med" / module
    target.write_text(target.read_text() + f"\n{line}\n")
    p = _lint(root)
    assert p.returncode != 0, p.stdout[-2000:]
    assert f"{broken}" in p.stdout and "BROKEN" in p.stdout
