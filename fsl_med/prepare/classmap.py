"""``classmap_1.json``: which slices of each scan contain each class; read and schema-checked in one place.

The schema (the reference file's): a JSON object ``{class name: {scan id: [z, ...]}}`` where every ``z`` is
an integer slice index >= 0. ``prepare import`` compares it with the labels; training and evaluation only
check that an existing file is well formed (they derive slices from the labels themselves).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from fsl_med.errors import DataError

CLASSMAP_NAME = "classmap_1.json"

Classmap = dict[str, dict[str, list[int]]]


def _describe(value: Any) -> str:
    """A JSON value's type and (short) value, for messages: ``a string ('abc')``, ``a list``."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "null"
    kind = "a boolean" if isinstance(value, bool) else "a string" if isinstance(value, str) else "a number"
    text = repr(value)
    return f"{kind} ({text[:40] + '...' if len(text) > 40 else text})"


def _short(value: Any) -> str:
    text = repr(value)
    return text[:40] + "..." if len(text) > 40 else text


def validate_classmap(obj: Any, path: str | Path) -> Classmap:
    """Check a parsed classmap against the schema ``{class name: {scan id: [z (int >= 0), ...]}}``.

    Args:
        obj: the parsed JSON.
        path: the file, named in messages.
    Returns:
        ``obj`` itself (typed).
    Raises:
        DataError: one line naming the file, the class/scan entry and what is wrong.
    """
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a JSON object {{class name: {{scan id: [slice, ...]}}}}, "
                        f"got {_describe(obj)}")
    for name, per_scan in obj.items():
        if not isinstance(per_scan, dict):
            raise DataError(f"{path}: class '{name}' must map scan ids to lists of slice indices, "
                            f"got {_describe(per_scan)}")
        for sid, zs in per_scan.items():
            if not isinstance(zs, list):
                raise DataError(f"{path}: class '{name}' scan '{sid}' must be a list of slice indices, "
                                f"got {_describe(zs)}")
            for z in zs:
                if isinstance(z, bool) or not isinstance(z, int):
                    raise DataError(f"{path}: class '{name}' scan '{sid}' must list integer slice indices, "
                                    f"got {_short(z)}")
                if z < 0:
                    raise DataError(f"{path}: class '{name}' scan '{sid}' must list slice indices >= 0, got {z}")
    return obj


def read_classmap(path: str | Path) -> Classmap:
    """Read and schema-check a ``classmap_1.json`` (:func:`validate_classmap`).

    Raises:
        DataError: unreadable, not JSON, or not of the schema; one line naming the file.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or type(e).__name__})") from e
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid JSON (not UTF-8 text: {e.reason} at byte {e.start})") from e
    try:
        obj = json.loads(text)
    except ValueError as e:
        raise DataError(f"{path}: not valid JSON ({str(e).splitlines()[0]})") from e
    return validate_classmap(obj, path)


def label_slices(label: np.ndarray) -> dict[str, list[int]]:
    """{label id: z indices with >= 1 voxel of it} of an ``[X, Y, Z]`` label volume (background omitted)."""
    per_z = label.reshape(-1, label.shape[2]) if label.ndim == 3 else label
    out = {}
    for c in np.unique(per_z):
        if c == 0:
            continue
        out[str(int(c))] = [int(z) for z in np.flatnonzero((per_z == c).any(axis=0))]
    return out


def build_classmap(names: dict[int, str], slices: dict[str, dict[str, list[int]]]) -> Classmap:
    """The ``classmap_1.json`` object (reference format) from each scan's :func:`label_slices`.

    Args:
        names: class name by label id; id 0 is the background.
        slices: {scan id: {label id as str: z indices}}.
    Returns:
        {class name: {scan id: [z, ...]}}: class ``c`` lists the z indices with >= 1 voxel of ``c`` (empty when
        absent); the background class (as in the reference file) lists the z indices with >= 1 foreground voxel.
    """
    out: Classmap = {name: {} for name in names.values()}
    for sid, ls in slices.items():
        fg = sorted({z for zs in ls.values() for z in zs})
        for c, name in names.items():
            out[name][sid] = fg if c == 0 else list(ls.get(str(c), []))
    return out
