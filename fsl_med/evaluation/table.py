"""One typed results table with Markdown, CSV and JSON output, for every report fsl_med writes.

``eval`` (``results.*``), ``protocol`` (``protocol.*``), ``ablate`` (``ablation.*``) and ``bench``
(``BENCHMARKS.md``, ``benchmarks.*``) build :class:`Table` objects and write them with :func:`write_report`.
Missing values (``None``, NaN) are shown as ``–`` in Markdown and left empty in CSV.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fsl_med import atomic

MISSING = "–"


def is_missing(v: Any) -> bool:
    """``None`` or a float NaN."""
    return v is None or (isinstance(v, float) and math.isnan(v))


@dataclass(frozen=True)
class Column:
    """One column: the row key it shows, its Markdown title, and how numbers are written.

    Attributes:
        key: the row dict's key.
        title: the Markdown header (the CSV header is ``key``).
        digits: decimals of floats in Markdown (``None``: ``str``).
        csv_digits: decimals of floats in CSV (``None``: ``repr``-exact).
        numeric: right-aligned in Markdown.
        fmt: optional Markdown formatter of the whole row (e.g. ``mean ± std``), used instead of ``digits``.
    """

    key: str
    title: str
    digits: int | None = 2
    csv_digits: int | None = 4
    numeric: bool = True
    fmt: Callable[[dict[str, Any]], str] | None = None

    def md(self, row: dict[str, Any]) -> str:
        """The Markdown cell of ``row``."""
        if self.fmt is not None:
            return self.fmt(row)
        v = row.get(self.key)
        if is_missing(v):
            return MISSING
        if isinstance(v, float) and self.digits is not None:
            return f"{v:.{self.digits}f}"
        return str(v)

    def csv(self, row: dict[str, Any]) -> str:
        """The CSV cell of ``row``."""
        v = row.get(self.key)
        if is_missing(v):
            return ""
        if isinstance(v, float) and self.csv_digits is not None:
            return f"{v:.{self.csv_digits}f}"
        return str(v)


def text(key: str, title: str) -> Column:
    """A left-aligned text column."""
    return Column(key, title, digits=None, csv_digits=None, numeric=False)


@dataclass(frozen=True)
class Table:
    """Rows (dicts) under typed columns.

    Attributes:
        columns: the columns, in order.
        rows: the rows; a row may hold keys no column shows (they go to JSON only).
        bold: indices of rows shown in bold in Markdown (e.g. the mean row).
    """

    columns: tuple[Column, ...]
    rows: tuple[dict[str, Any], ...] = ()
    bold: tuple[int, ...] = field(default=())

    def markdown(self) -> str:
        """A GitHub Markdown table."""
        lines = ["| " + " | ".join(c.title for c in self.columns) + " |",
                 "|" + "".join("---:|" if c.numeric else "---|" for c in self.columns)]
        for i, r in enumerate(self.rows):
            cells = [c.md(r) for c in self.columns]
            if i in self.bold:
                cells = [f"**{x}**" for x in cells]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def csv(self) -> str:
        """CSV with the column keys as header."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow([c.key for c in self.columns])
        for r in self.rows:
            w.writerow([c.csv(r) for c in self.columns])
        return buf.getvalue()

    def records(self) -> list[dict[str, Any]]:
        """JSON-ready rows: the columns' keys (NaN as ``None``)."""
        return [{c.key: (None if is_missing(r.get(c.key)) else r.get(c.key)) for c in self.columns} for r in self.rows]


def write_report(folder: str | Path, stem: str, markdown: Sequence[str], table: Table | None,
                 document: dict[str, Any], md_name: str | None = None) -> Path:
    """Write ``<stem>.csv`` (``table``), ``<md_name or stem.md>`` (the ``markdown`` lines) and ``<stem>.json``
    (``document``), each atomically; returns the JSON path."""
    folder = Path(folder)
    if table is not None:
        atomic.write_text(folder / f"{stem}.csv", table.csv())
    atomic.write_text(folder / (md_name or f"{stem}.md"), "\n".join(markdown) + "\n")
    return atomic.write_json(folder / f"{stem}.json", document)
