"""The configuration reference, generated from the config schema (:mod:`fsl_med.config`) so it cannot drift.

As an mkdocs hook (``hooks:`` in ``mkdocs.yml``), :func:`on_page_markdown` replaces the line
``<!-- config-reference -->`` of a page (``docs/reference/config.md``) with one table per config section: every
field's dotted key, type, default, choices and description. As a script, ``python docs/hooks/config_reference.py``
prints that Markdown.

Where each part comes from:

- keys, types and defaults: the schema's dataclasses (``dataclasses.fields``, the annotations as written, the
  ``default`` / ``default_factory`` values);
- choices: a field annotated with a ``Literal``, :data:`fsl_med.config.CHOICES` (single-valued choice fields) and
  :data:`LIST_CHOICES` below (the list fields and names that ``validate`` checks against a set);
- descriptions: each section's dataclass docstring, each field's ``# ...`` comment (on its line, and the comment
  lines right below it, or comment lines right above it), read from the source with ``ast`` and ``tokenize``; a
  choice field also gets its ``Literal`` alias's docstring; a field that is null by default and follows ``compat``
  or the head gets the values it takes (:data:`fsl_med.config.COMPAT`, :data:`fsl_med.config.HEAD_DEFAULTS`).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import re
import sys
import textwrap
import tokenize
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal, NamedTuple

ROOT = Path(__file__).resolve().parents[2]
if (ROOT / "fsl_med").is_dir() and str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # document this checkout's schema, whichever fsl_med is installed

from fsl_med import config as schema  # noqa: E402

PLACEHOLDER = "<!-- config-reference -->"
"""The line of a page that the generated tables replace."""

LIST_CHOICES: dict[str, tuple[Any, ...]] = {
    "model.head.name": schema.HEAD_NAMES,
    "data.setting": (1, 2),
    "model.encoder.lora_targets": schema.LORA_TARGETS,
    "eval.variants": schema.VARIANTS,
    "protocol.variants": schema.VARIANTS,
    "protocol.settings": (1, 2),
    "ablation.variants": schema.VARIANTS,
    "ablation.runs[].variants": schema.VARIANTS,
    "compare.heads": schema.HEAD_NAMES,
}
"""Fields that :func:`fsl_med.config.validate` checks against a set but that :data:`~fsl_med.config.CHOICES` does not
list: list fields (each item one of the set) and names from a registry or a fixed range."""

ALIASES: dict[str, str] = {
    "eval.variants": "Variant", "protocol.variants": "Variant", "ablation.variants": "Variant",
    "ablation.runs[].variants": "Variant", "model.encoder.lora_targets": "LoraTarget",
}
"""List fields whose items are of a ``Literal`` alias of :mod:`fsl_med.config` (its docstring describes them)."""


class Field(NamedTuple):
    """One leaf of the schema, as the reference shows it."""

    key: str
    type: str
    default: str
    choices: str
    description: str


class Section(NamedTuple):
    """One table: a dataclass of the schema at ``key`` (``""``: the top level)."""

    key: str
    doc: str
    fields: list[Field]


# -- reading the source -------------------------------------------------------------------------------------------


def field_comments(cls: type) -> dict[str, str]:
    """Field name -> its ``# ...`` comment in the source of ``cls`` or of the dataclass it inherits the field from:
    the comment on the field's line(s) with the comment-only lines right below it, or else the comment-only lines
    right above it. Fields without one are left out."""
    out: dict[str, str] = {}
    for c in reversed(cls.__mro__):
        if dataclasses.is_dataclass(c):
            out.update(_own_comments(c))
    return out


def _own_comments(cls: type) -> dict[str, str]:
    """:func:`field_comments` of the fields that ``cls``'s own class body writes."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source (e.g. made with make_dataclass)
        return {}
    tree = ast.parse(source)
    node = tree.body[0]
    assert isinstance(node, ast.ClassDef)
    spans = [(n.target.id, n.lineno, n.end_lineno or n.lineno) for n in node.body
             if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)]
    comments: dict[int, tuple[str, bool]] = {}  # line -> (text, alone on its line)
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = (tok.string.lstrip("#").strip(), tok.line.strip().startswith("#"))
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            code_lines.update(range(tok.start[0], tok.end[0] + 1))
    out: dict[str, str] = {}
    for name, first, last in spans:
        own = [comments[ln][0] for ln in range(first, last + 1) if ln in comments and not comments[ln][1]]
        if own:
            ln = last + 1
            while ln in comments and comments[ln][1]:  # the comment goes on below the field
                own.append(comments[ln][0])
                ln += 1
        else:
            above: list[str] = []
            ln = first - 1
            while ln in comments and comments[ln][1] and ln not in code_lines:
                above.insert(0, comments[ln][0])
                ln -= 1
            if above and not _continues_a_field(ln, comments, spans):
                own = above
        if own:
            out[name] = " ".join(own)
    return out


def _continues_a_field(line: int, comments: dict[int, tuple[str, bool]], spans: list[tuple[str, int, int]]) -> bool:
    """Whether ``line`` (just above a block of comment lines) is a field line with a trailing comment, so that the
    block continues that field's comment rather than introducing the next field."""
    return any(first <= line <= last for _, first, last in spans) and line in comments and not comments[line][1]


def module_docstrings(module: types.ModuleType) -> dict[str, str]:
    """Module-level name -> the string literal right below its assignment (an attribute docstring)."""
    try:
        tree = ast.parse(inspect.getsource(module))
    except (OSError, TypeError):
        return {}
    out: dict[str, str] = {}
    for node, nxt in zip(tree.body, tree.body[1:], strict=False):
        target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else \
            node.target if isinstance(node, ast.AnnAssign) else None
        if (isinstance(target, ast.Name) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            out[target.id] = inspect.cleandoc(nxt.value.value)
    return out


# -- formatting ---------------------------------------------------------------------------------------------------

_ROLE = re.compile(r":(?:[a-z]+:)?(?:mod|func|class|data|attr|meth|obj|exc):`~?([^`]+)`")


def prose(text: str, cell: bool = True) -> str:
    """Docstring or comment text as Markdown on one line: reST roles and double backticks as code spans; in a table
    ``cell``, ``|`` escaped."""
    text = _ROLE.sub(lambda m: f"`{m.group(1)}`", text)
    text = re.sub(r"``([^`]+)``", r"`\1`", text)
    text = " ".join(text.split())
    return text.replace("|", r"\|") if cell else text


def value(v: Any) -> str:
    """A default or choice as it is written in YAML or on the command line."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and (abs(v) < 1e-3 or abs(v) >= 1e5) and v != 0:
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {value(x)}" for k, x in v.items()) + "}"
    if dataclasses.is_dataclass(v):
        return value(dataclasses.asdict(v))  # type: ignore[arg-type]
    return str(v)


def code(text: str) -> str:
    """A table cell's code span (``|`` escaped)."""
    return f"`{text}`".replace("|", r"\|")


def type_name(annotation: Any) -> str:
    """The field's type in words: ``int``, ``list[str]``, ``float or null``, ``any``."""
    text = annotation if isinstance(annotation, str) else _type_text(annotation)
    text = text.replace("typing.", "").replace("NoneType", "None")
    parts = [p.strip() for p in _split_union(text)]
    parts = ["null" if p == "None" else "any" if p == "Any" else p for p in parts]
    return " or ".join(parts)


def _type_text(t: Any) -> str:
    if isinstance(t, type) and not typing.get_args(t):
        return t.__name__
    return repr(t)


def _split_union(text: str) -> list[str]:
    """``a | b[c | d]`` -> ``[a, b[c | d]]`` (top-level ``|`` only); ``Optional[x]``/``Union[...]`` likewise."""
    m = re.fullmatch(r"(?:Optional)\[(.*)\]", text)
    if m:
        return [*_split_union(m.group(1)), "None"]
    m = re.fullmatch(r"Union\[(.*)\]", text)
    if m:
        text = m.group(1).replace(",", "|")
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "|" and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return [*parts, cur]


# -- walking the schema ---------------------------------------------------------------------------------------------


def _hints(cls: type) -> dict[str, Any]:
    """The resolved annotations of ``cls`` (``{}`` where they cannot be resolved, e.g. a local class's names)."""
    try:
        return typing.get_type_hints(cls, vars(sys.modules.get(cls.__module__, schema)))
    except Exception:
        return {}


def _literal_values(hint: Any) -> tuple[Any, ...] | None:
    """The values of a ``Literal`` (or ``Literal | None``, or ``list[Literal]``) hint; ``None`` for other hints."""
    if typing.get_origin(hint) is Literal:
        return typing.get_args(hint)
    for arg in typing.get_args(hint):
        found = _literal_values(arg)
        if found is not None:
            return found
    return None


def _is_list(hint: Any) -> bool:
    """A ``list[...]`` hint, or a union with one (``list[str] | None``)."""
    return typing.get_origin(hint) is list or any(typing.get_origin(a) is list for a in typing.get_args(hint))


def _element_dataclass(hint: Any) -> type | None:
    """``X`` of a ``list[X]`` hint where ``X`` is a dataclass (e.g. ``ablation.runs``)."""
    if typing.get_origin(hint) is list:
        (arg,) = typing.get_args(hint) or (None,)
        if isinstance(arg, type) and dataclasses.is_dataclass(arg):
            return arg
    return None


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _nested(f: dataclasses.Field[Any], hint: Any) -> type | None:
    """The dataclass of a section field (a nested config section), else ``None``."""
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return hint
    d = _default(f)
    return type(d) if dataclasses.is_dataclass(d) and not isinstance(d, type) else None


def sections(cls: type, prefix: str = "", choices: dict[str, Any] | None = None,
             list_choices: dict[str, tuple[Any, ...]] | None = None,
             notes: Callable[[str], list[str]] | None = None) -> Iterator[Section]:
    """The sections of the dataclass ``cls`` at ``prefix``, depth first in field order: ``cls``'s own leaves first,
    then each nested dataclass (and each dataclass that a list field holds, as ``<key>[]``).

    Args:
        cls: a dataclass (the schema's :class:`~fsl_med.config.Config`, or any other for tests).
        prefix: the dotted key of ``cls`` (``""``: the top level).
        choices: dotted key -> ``Literal`` of single-valued choice fields (default :data:`fsl_med.config.CHOICES`).
        list_choices: dotted key -> the valid values of a list field's items or of a checked name
            (default :data:`LIST_CHOICES`).
        notes: dotted key -> extra description sentences (default :func:`schema_notes`).
    """
    choices = schema.CHOICES if choices is None else choices
    list_choices = LIST_CHOICES if list_choices is None else list_choices
    notes = schema_notes if notes is None else notes
    hints = _hints(cls)
    comments = field_comments(cls)
    leaves: list[Field] = []
    children: list[tuple[type, str]] = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        hint = hints.get(f.name, f.type)
        sub = _nested(f, hint)
        if sub is not None:
            children.append((sub, f"{key}."))
            continue
        element = _element_dataclass(hint)
        if element is not None:
            children.append((element, f"{key}[]."))
        default = _default(f)
        if default is dataclasses.MISSING or default == "???":
            shown = "required"
        else:
            shown = code(value(default))
        literal = _literal_values(hint)
        allowed: tuple[Any, ...] | None = None
        if key in choices:
            allowed = typing.get_args(choices[key])
        elif key in list_choices:
            allowed = tuple(list_choices[key])
        else:
            allowed = literal
        listed = ", ".join(code(value(c)) for c in allowed) if allowed else ""
        if listed and _is_list(hint):
            listed = f"each of {listed}"
        desc = [comments.get(f.name, ""), *notes(key)]
        typ = f"list of `{key}[]` entries" if element is not None else type_name(f.type)
        if literal:  # a Literal annotation: the type of its values (the values are the choices)
            typ = re.sub(r"Literal\[[^\]]*\]", type(literal[0]).__name__, typ)
        leaves.append(Field(key, typ, shown, listed, prose(sentences(desc))))
    yield Section(prefix.rstrip("."), prose(class_doc(cls), cell=False), leaves)
    for sub, sub_prefix in children:
        yield from sections(sub, sub_prefix, choices, list_choices, notes)


def class_doc(cls: type) -> str:
    """The docstring written for ``cls`` or, without one, for the nearest dataclass it inherits from (not the
    signature that ``dataclass`` makes up for a class without a docstring); ``""`` when none has one."""
    for c in cls.__mro__:
        doc = c.__dict__.get("__doc__")
        if dataclasses.is_dataclass(c) and doc and not doc.startswith(f"{c.__name__}("):
            return inspect.cleandoc(doc)
    return ""


def sentences(parts: list[str]) -> str:
    """Non-empty ``parts`` joined as sentences (a full stop added where one ends without)."""
    parts = [p.strip() for p in parts if p.strip()]
    return " ".join(p if p[-1] in ".!?" else f"{p}." for p in parts)


def schema_notes(key: str) -> list[str]:
    """Sentences the schema's tables add to a field: the values a null field takes per ``compat`` or per head, and
    the docstring of its choices' ``Literal`` alias."""
    out = []
    docs = _alias_docs()
    alias = ALIASES.get(key) or next((n for n, obj in vars(schema).items() if obj is schema.CHOICES.get(key)
                                      and n in docs), None)
    if alias and alias in docs:
        out.append(docs[alias])
    compat = {c: v[key] for c, v in schema.COMPAT.items() if key in v}
    if compat:
        out.append("Null takes the value of `compat`: " + ", ".join(f"{c} `{value(v)}`" for c, v in compat.items())
                   + ".")
    heads = {h: v[key] for h, v in schema.HEAD_DEFAULTS.items() if key in v}
    if heads:
        out.append("Null takes the head's value (`model.head.name`): "
                   + ", ".join(f"{h} `{value(v)}`" for h, v in heads.items()) + ".")
    return out


_DOCS: dict[str, str] = {}


def _alias_docs() -> dict[str, str]:
    if not _DOCS:
        _DOCS.update(module_docstrings(schema))
    return _DOCS


# -- Markdown -------------------------------------------------------------------------------------------------------


def section_markdown(section: Section, level: int = 2) -> str:
    """One section: a heading (its dotted key), its docstring, and the table of its leaves."""
    title = code(section.key) if section.key else "Top level"
    lines = [f"{'#' * level} {title}", ""]
    if section.doc:
        lines += [section.doc, ""]
    lines += ["| Key | Type | Default | Choices | Description |", "|---|---|---|---|---|"]
    for f in section.fields:
        lines.append(f"| {code(f.key)} | {f.type} | {f.default} | {f.choices} | {f.description} |")
    return "\n".join(lines)


def generate(cls: type | None = None, **kwargs: Any) -> str:
    """The Markdown of every section of ``cls`` (default: the whole schema, :class:`fsl_med.config.Config`) that has
    leaves; ``kwargs`` go to :func:`sections`."""
    root = schema.Config if cls is None else cls
    return "\n\n".join(section_markdown(s) for s in sections(root, **kwargs) if s.fields) + "\n"


def on_page_markdown(markdown: str, page: Any = None, config: Any = None, files: Any = None, **_: Any) -> str:
    """mkdocs hook: the page's ``<!-- config-reference -->`` line replaced by :func:`generate`'s tables."""
    if PLACEHOLDER not in markdown:
        return markdown
    lines = markdown.splitlines()
    return "\n".join(generate().rstrip("\n") if ln.strip() == PLACEHOLDER else ln for ln in lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(generate())
