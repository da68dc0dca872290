"""The documentation's text for the tests that check it: the README and every page under ``docs/``."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"


def page(name: str) -> str:
    """The Markdown source of ``docs/<name>`` (e.g. ``"test-time.md"``, ``"reference/config.md"``)."""
    return (DOCS / name).read_text(encoding="utf-8")


def pages() -> dict[str, str]:
    """Every user-facing Markdown page: ``README.md`` and ``docs/**/*.md`` (hooks excluded), by path from the repo."""
    paths = [REPO / "README.md", *sorted(p for p in DOCS.rglob("*.md") if "hooks" not in p.parts)]
    return {p.relative_to(REPO).as_posix(): p.read_text(encoding="utf-8") for p in paths}


def all_text() -> str:
    """Every page of :func:`pages`, concatenated."""
    return "\n\n".join(pages().values())
