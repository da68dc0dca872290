"""The configuration reference (docs/hooks/config_reference.py) is generated from the schema: every key once, with
its default, choices and comment; a field added to a schema dataclass appears without touching the generator."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
from omegaconf import DictConfig, ListConfig, OmegaConf

from fsl_med import config as schema

REPO = Path(__file__).resolve().parents[1]
HOOK = REPO / "docs" / "hooks" / "config_reference.py"


@pytest.fixture(scope="module")
def ref():
    spec = importlib.util.spec_from_file_location("config_reference", HOOK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def markdown(ref) -> str:
    return ref.generate()


def _leaves(node, prefix: str = "") -> dict[str, object]:
    """Dotted key -> default of every leaf of the default config (a list or an empty mapping is a leaf)."""
    out: dict[str, object] = {}
    for k in node.keys():
        key, child = f"{prefix}{k}", node._get_node(k)
        if isinstance(child, DictConfig) and len(child) > 0:
            out.update(_leaves(child, f"{key}."))
        elif isinstance(child, (DictConfig, ListConfig)):
            out[key] = OmegaConf.to_container(child, resolve=False)
        else:
            out[key] = child._value()
    return out


def _rows(markdown: str) -> dict[str, list[str]]:
    """Key -> the cells of its table row (Type, Default, Choices, Description); a key twice is an error."""
    rows: dict[str, list[str]] = {}
    for line in markdown.splitlines():
        m = re.match(r"\| `([^`]+)` \| (.*) \|$", line)
        if m:
            assert m.group(1) not in rows, f"{m.group(1)} has two rows"
            rows[m.group(1)] = re.split(r"(?<!\\)\| ", m.group(2) + " ")
            rows[m.group(1)] = [c.strip() for c in rows[m.group(1)]]
    return rows


def test_every_leaf_key_of_the_default_config_appears_once_with_its_default(ref, markdown) -> None:
    leaves = _leaves(OmegaConf.structured(schema.Config))
    assert len(leaves) > 150
    rows = _rows(markdown)
    for key, default in leaves.items():
        assert markdown.count(f"| `{key}` |") == 1, key
        want = "required" if default == "???" else f"`{ref.value(default)}`".replace("|", r"\|")
        assert rows[key][1] == want, (key, rows[key][1], want)
    # the other rows are the fields of list entries (ablation.runs[], compare.reported[])
    assert {k for k in rows if k not in leaves} == {k for k in rows if "[]." in k} != set()
    assert rows["data.root"][1] == "required" and rows["data.cache_dir"][1] == "`${oc.env:FSL_MED_CACHE,.cache/fsl_med}`"
    assert rows["model.head.panet.cos_eps"][1] == "`1e-08`" and rows["eval.variants"][1] == "`[plain, cca]`"


def test_choices_types_and_descriptions_come_from_the_schema(markdown) -> None:
    rows = _rows(markdown)
    # CHOICES (a Literal per field), and the sets validate() checks list items and names against
    assert rows["protocol.launcher"][2] == "`inline`, `local`, `slurm`"
    assert rows["data.superpixel.body_connectivity"][2] == "`4`, `8`"
    assert rows["eval.variants"][2] == "each of " + ", ".join(f"`{v}`" for v in schema.VARIANTS)
    assert rows["model.head.name"][2] == ", ".join(f"`{h}`" for h in schema.HEAD_NAMES)
    for key in schema.CHOICES:
        assert rows[key][2] == ", ".join(f"`{v}`" for v in schema.CHOICES[key].__args__), key
    assert rows["trainer.gradient_clip_val"][0] == "float or null" and rows["trainer.devices"][0] == "any"
    assert rows["ablation.runs"][0] == "list of `ablation.runs[]` entries"
    # the trailing comment, the comment lines below it, the Literal's docstring, the compat and head defaults
    desc = rows["data.exclude_labels"][3]
    assert desc.startswith("setting 2's excluded label ids") and "(its bug)" in desc
    assert r"any (SSL-ALPNet) \| all" in rows["data.exclude_rule"][3]
    assert "drop a training slice that contains **any** excluded label" in rows["data.exclude_rule"][3]
    assert "Null takes the value of `compat`: fsl_med `true`, reference `false`." in rows["ttt.restore"][3]
    assert "alp `[0.05, 1.0]`" in rows["loss.ce_weights"][3]
    # one section per dataclass, headed by its key and opened by its docstring
    for section in ("data.superpixel", "model.encoder", "model.head.alp", "trainer", "eval", "protocol",
                    "protocol.slurm", "logging", "ablation.runs[]", "compare.reported[]"):
        assert f"\n## `{section}`\n" in markdown, section
    assert "## `model.head.alp`\n\nALPNet's adaptive local prototypes" in markdown


# -- a schema the tests own ------------------------------------------------------------------------------------------
@dataclass
class Knobs:
    """Knobs of a test section."""

    mode: Literal["fast", "exact"] = "fast"  # how to go
    level: int | None = None
    # a comment above a field describes it
    weights: list[float] = field(default_factory=lambda: [0.5, 1.5])


@dataclass
class Small:
    """A small schema."""

    name: str = "x"
    knobs: Knobs = field(default_factory=Knobs)


@dataclass
class MoreKnobs(Knobs):
    added: str = "new"  # a field added to the section


@dataclass
class Bigger(Small):
    knobs: MoreKnobs = field(default_factory=MoreKnobs)


def test_every_field_is_described_and_no_description_points_outside_the_docs(markdown) -> None:
    """Each row of the reference (list-entry fields included) says what its field does, and nothing in it sends a
    reader to a file that the documentation site, a clone or a pip install does not have."""
    rows = _rows(markdown)
    assert len(rows) > 150
    assert [key for key, cells in rows.items() if not cells[3]] == []
    assert "method-zoo" not in markdown and "../shared" not in markdown


def test_a_dataclass_passed_in_is_documented_field_by_field(ref) -> None:
    md = ref.generate(Small, choices={}, list_choices={}, notes=lambda key: [])
    rows = _rows(md)
    assert set(rows) == {"name", "knobs.mode", "knobs.level", "knobs.weights"}
    assert rows["knobs.mode"] == ["str", "`fast`", "`fast`, `exact`", "how to go."]
    assert rows["knobs.level"][:2] == ["int or null", "`null`"]
    assert rows["knobs.weights"][1:] == ["`[0.5, 1.5]`", "", "a comment above a field describes it."]
    assert "## `knobs`\n\nKnobs of a test section." in md


def test_a_field_added_to_a_schema_dataclass_appears(ref) -> None:
    rows = _rows(ref.generate(Bigger, choices={}, list_choices={}, notes=lambda key: []))
    assert rows["knobs.added"][1:] == ["`new`", "", "a field added to the section."]
    assert rows["knobs.mode"][3] == "how to go."  # inherited fields keep their comments
    # and in the real schema: a subclass of a section with one more field
    @dataclass
    class Eval2(schema.EvalConfig):
        new_knob: int = 7

    @dataclass
    class Config2(schema.Config):
        eval: Eval2 = field(default_factory=Eval2)

    rows = _rows(ref.generate(Config2))
    assert rows["eval.new_knob"][:2] == ["int", "`7`"] and rows["eval.npart"][1] == "`3`"
    assert rows["eval.batch_size"][3].startswith("query slices per encoder call")


def test_the_hook_fills_the_placeholder_and_the_script_prints_the_tables(ref, markdown) -> None:
    page = (REPO / "docs" / "reference" / "config.md").read_text(encoding="utf-8")
    assert page.count(ref.PLACEHOLDER) == 1
    out = ref.on_page_markdown(page, page=None, config=None, files=None)
    assert ref.PLACEHOLDER not in out and markdown.strip() in out and out.startswith("# Configuration reference")
    assert ref.on_page_markdown("# Other page\n") == "# Other page\n"
    p = subprocess.run([sys.executable, str(HOOK)], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout == markdown
