"""Each ``fsl-med`` verb declares its arguments beside its handler (:class:`fsl_med.cli.Verb`) and
:func:`fsl_med.cli.build_parser` adds every verb of :data:`fsl_med.cli.VERBS` (issue 32)."""

from __future__ import annotations

import dataclasses

import pytest

from fsl_med import cli
from fsl_med.cli import VERBS, build_parser, main


def _help(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """``fsl-med ARGV --help``'s output; it exits 0 and writes nothing to stderr."""
    with pytest.raises(SystemExit) as info:
        main([*argv, "--help"])
    out = capsys.readouterr()
    assert info.value.code == 0 and not out.err, (argv, info.value.code, out.err)
    return out.out


def test_no_two_verbs_share_a_name():
    names = [v.name for v in VERBS]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)


def test_the_parser_has_exactly_the_registered_verbs_in_their_order():
    verbs = build_parser()._subparsers._group_actions[0].choices  # noqa: SLF001 - argparse has no public API
    assert list(verbs) == [v.name for v in VERBS]


def test_every_verb_is_in_the_top_help_and_has_a_working_help(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping: each verb's help line whole
    top = _help(capsys)
    for verb in VERBS:
        assert f"    {verb.name} " in top and " ".join(verb.help.split()) in " ".join(top.split()), verb.name
        own = _help(capsys, verb.name)
        assert own.startswith(f"usage: fsl-med {verb.name} "), (verb.name, own[:200])
        if verb.description_text():
            assert " ".join(verb.description_text().split()) in " ".join(own.split()), verb.name
    for kind in ("chaos", "sabs", "import"):
        assert _help(capsys, "prepare", kind).startswith(f"usage: fsl-med prepare {kind} ")


def test_a_verb_declared_twice_is_refused(monkeypatch):
    twin = dataclasses.replace(VERBS[-1], help="another verb of the same name")
    monkeypatch.setattr(cli, "VERBS", (*VERBS, twin))
    with pytest.raises(ValueError, match=f"two fsl-med verbs are named '{twin.name}'"):
        cli.build_parser()


def test_a_verb_runs_its_own_handler():
    for verb, argv in ((cli.TRAIN, ["train"]), (cli.ENCODERS, ["encoders"]),
                       (cli.PREPARE, ["prepare", "import", "--src", "x", "--dataset", "sabs"])):
        assert build_parser().parse_args(argv).func is verb.run
