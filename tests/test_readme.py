"""The README's target table and commands match the Makefile and the CLI (issue 16)."""

from __future__ import annotations

import re
from pathlib import Path

from fsl_med.cli import build_parser

REPO = Path(__file__).resolve().parents[1]


def _phony_targets() -> set[str]:
    make = (REPO / "Makefile").read_text()
    line = next(ln for ln in make.splitlines() if ln.startswith(".PHONY:"))
    return set(line.split(":", 1)[1].split())


def test_every_make_target_is_in_the_readme_table_and_in_make_help():
    readme = (REPO / "README.md").read_text()
    table = readme.split("### Every make target", 1)[1].split("\n## ", 1)[0]
    rows = " ".join(ln.split("|")[1] for ln in table.splitlines() if ln.startswith("| `make"))
    listed = set(re.findall(r"make ([a-z-]+)", rows))
    assert _phony_targets() <= listed, sorted(_phony_targets() - listed)
    make = (REPO / "Makefile").read_text()
    documented = {t for ln in make.splitlines() if "## " in ln and not ln.startswith("#")
                  for t in ln.split(":", 1)[0].split()}
    assert _phony_targets() <= documented, sorted(_phony_targets() - documented)  # `make help` lists them


def test_readme_says_how_to_reach_fsl_med_before_its_first_example():
    readme = (REPO / "README.md").read_text()
    first_example = readme.index("fsl-med ")
    assert "source .venv/bin/activate" in readme[:first_example] or ".venv/bin/fsl-med" in readme[:first_example]


def test_every_verb_in_the_readme_exists():
    verbs = set(build_parser()._subparsers._group_actions[0].choices)  # noqa: SLF001 - argparse has no public API
    used = set(re.findall(r"^fsl-med ([a-z-]+)", (REPO / "README.md").read_text(), flags=re.M))
    assert used and used <= verbs, sorted(used - verbs)
