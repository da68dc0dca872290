"""The README and the documentation pages match the Makefile and the CLI (issues 16 and 32): the make-target table,
the verbs table, every command they show, their links, and no page that points outside the repository."""

from __future__ import annotations

import re

from docs_text import DOCS, REPO, page, pages

from fsl_med.cli import build_parser

README_MAX_LINES = 70  # one screen of prose and the two commands, plus the verbs table


def _phony_targets() -> set[str]:
    make = (REPO / "Makefile").read_text()
    line = next(ln for ln in make.splitlines() if ln.startswith(".PHONY:"))
    return set(line.split(":", 1)[1].split())


def _verbs() -> set[str]:
    return set(build_parser()._subparsers._group_actions[0].choices)  # noqa: SLF001 - argparse has no public API


def test_every_make_target_is_in_the_docs_table_and_in_make_help():
    table = page("getting-started.md").split("## Every make target", 1)[1].split("\n## ", 1)[0]
    rows = " ".join(ln.split("|")[1] for ln in table.splitlines() if ln.startswith("| `make"))
    listed = set(re.findall(r"make ([a-z-]+)", rows))
    assert _phony_targets() == listed, (sorted(_phony_targets() - listed), sorted(listed - _phony_targets()))
    make = (REPO / "Makefile").read_text()
    documented = {t for ln in make.splitlines() if "## " in ln and not ln.startswith("#")
                  for t in ln.split(":", 1)[0].split()}
    assert _phony_targets() <= documented, sorted(_phony_targets() - documented)  # `make help` lists them


def test_readme_says_how_to_reach_fsl_med_before_its_first_example():
    for name in ("README.md", "docs/getting-started.md"):
        text = (REPO / name).read_text()
        first_example = text.index("fsl-med ")
        assert "source .venv/bin/activate" in text[:first_example] or ".venv/bin/fsl-med" in text[:first_example], name


def test_every_verb_the_docs_use_exists():
    used = {name: set(re.findall(r"^(?:\$ )?fsl-med ([a-z-]+)", text, flags=re.M)) for name, text in pages().items()}
    assert set().union(*used.values()), "no page shows an fsl-med command"
    unknown = {name: sorted(u - _verbs()) for name, u in used.items() if u - _verbs()}
    assert not unknown, unknown


def test_readme_is_one_screen_with_a_table_of_every_verb_and_its_make_targets():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= README_MAX_LINES
    rows = [ln for ln in readme.splitlines() if ln.startswith("| `fsl-med ")]
    in_table = [re.match(r"\| `fsl-med ([a-z-]+)`", ln).group(1) for ln in rows]
    assert sorted(in_table) == sorted(_verbs()), "README's verbs table must list every verb of `fsl-med --help` once"
    targets = set(re.findall(r"`make ([a-z-]+)`", " ".join(ln.split("|")[3] for ln in rows)))
    assert targets <= _phony_targets(), sorted(targets - _phony_targets())


def test_readme_links_every_docs_page_and_each_link_resolves():
    readme = (REPO / "README.md").read_text()
    links = re.findall(r"\]\(([^)#]+)\)", readme)
    local = [ln for ln in links if not re.match(r"[a-z]+://", ln)]
    assert [ln for ln in local if not (REPO / ln).is_file()] == []
    nav_pages = {p.relative_to(REPO).as_posix() for p in DOCS.glob("*.md")}
    assert nav_pages <= set(local), sorted(nav_pages - set(local))


def test_no_user_facing_page_points_outside_the_repository():
    """The docs describe the method in their own words; nothing a user reads sends them to ``../shared``, which a
    clone or a pip install does not have."""
    offenders = {name: ln for name, text in pages().items() for ln in text.splitlines()
                 if re.search(r"\.\./shared|/shared/|method-zoo\.md", ln)}
    assert not offenders, offenders
    help_lines = [ln for ln in (REPO / "Makefile").read_text().splitlines() if "## " in ln and "../shared" in ln]
    assert not help_lines, help_lines
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices  # noqa: SLF001
    in_help = [verb for verb, p in sub.items() if "../shared" in p.format_help()]
    assert not in_help, in_help


def test_docs_link_only_to_pages_that_exist():
    """Relative links between pages (mkdocs --strict checks them too; this names the page and the link)."""
    broken = []
    for path in DOCS.rglob("*.md"):
        for target in re.findall(r"\]\(([^)#\s]+\.md)(?:#[^)]*)?\)", path.read_text(encoding="utf-8")):
            if not re.match(r"[a-z]+://", target) and not (path.parent / target).resolve().is_file():
                broken.append((path.relative_to(REPO).as_posix(), target))
    assert not broken, broken


def test_every_docs_page_is_in_the_site_navigation():
    nav = (REPO / "mkdocs.yml").read_text()
    listed = set(re.findall(r":\s*([\w/.-]+\.md)\s*$", nav, flags=re.M))
    on_disk = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md") if "hooks" not in p.parts}
    assert on_disk == listed, (sorted(on_disk - listed), sorted(listed - on_disk))
