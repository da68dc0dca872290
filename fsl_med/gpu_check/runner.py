"""The one runner of the check: every row of the table (:mod:`fsl_med.gpu_check.rows`) in order, each with its time
limit, within the time budget and ``--only``; the report rewritten after every row. Also the inputs (data folder,
superpixel cache) and :func:`run_gpu_check`, what ``fsl-med gpu-check`` calls."""

from __future__ import annotations

import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from fsl_med import atomic
from fsl_med.errors import ConfigError, DataError
from fsl_med.gpu_check import rows
from fsl_med.gpu_check.profiles import PROFILES, Profile
from fsl_med.gpu_check.report import headline, to_json, write_report
from fsl_med.gpu_check.rows import RowSpec
from fsl_med.gpu_check.state import REPO, CheckState, Row, one_line, time_limit
from fsl_med.prepare.datasets import default_mri_root

DEFAULT_OUT = "lightning_logs/gpu-check"
DEFAULT_BUNDLE = REPO / "gpu_bundle"
CACHE_IN_OUT = "cache"
"""The superpixel cache's folder in ``--out`` when neither ``--cache-dir``, a bundle's cache nor ``$FSL_MED_CACHE``
names one: every file the check keeps is under ``--out``."""


class GpuCheck(CheckState):
    """Runs the rows of a profile and writes the report (``out``, ``profile``, ``data``, ``cache_dir`` and
    ``overrides`` as in :class:`CheckState`).

    Args:
        only: run only rows whose key starts with one of these (:func:`~fsl_med.gpu_check.rows.select_rows`: the
            environment row always runs; rows that need the evaluation checkpoint bring its row along).
        budget_s: rows not started within this many seconds are reported as skipped.
    """

    def __init__(self, out: Path, profile: Profile, data: Path | None, cache_dir: str, overrides: list[str],
                 only: list[str] | None = None, budget_s: float | None = None) -> None:
        super().__init__(out, profile, data, cache_dir, overrides)
        self.only = only
        self.budget_s = profile.budget_s if budget_s is None else budget_s

    def headline(self, counts: bool = True) -> str:
        """The report's first line (:func:`~fsl_med.gpu_check.report.headline`)."""
        return headline(self, counts)

    def to_json(self) -> dict[str, Any]:
        """The content of ``gpu-check.json``."""
        return to_json(self)

    def write(self) -> Path:
        """Write ``gpu-check.md`` and ``gpu-check.json`` (atomically); returns the Markdown path."""
        return write_report(self)

    def run_row(self, spec: RowSpec, selected: set[str]) -> Row:
        """Run ``spec.run(self, row)`` with its time limit; any exception becomes the row's ``FAILED`` status."""
        row = Row(spec.key, spec.section, spec.title)
        self.rows.append(row)
        elapsed = time.monotonic() - self.t_start
        if spec.key not in selected:
            row.status = "skipped: not selected (--only)"
        elif elapsed > self.budget_s and not spec.always:
            row.status = f"skipped: time budget ({self.budget_s:.0f} s) spent"
        elif spec.needs_ckpt and self.ckpt is None:
            row.status = "skipped: no checkpoint (the checkpoint row did not succeed)"
        else:
            print(f"gpu-check: {spec.title} ...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            try:
                with time_limit(spec.timeout_s or self.profile.row_timeout_s):
                    spec.run(self, row)
                row.status = row.figures.pop("_status", "ok")
            except Exception as e:  # noqa: BLE001 - every failure is reported per row
                row.status = f"FAILED: {one_line(e)}"
                self.log(f"{spec.key}: {row.status}\n{traceback.format_exc()}")
            finally:
                row.seconds = time.perf_counter() - t0
                self.cleanup()
            print(f"gpu-check: {spec.title}: {row.status} ({row.seconds:.1f} s)", file=sys.stderr, flush=True)
        self.log(f"{spec.key}: {row.status}" + (f" ({row.seconds:.1f} s)" if row.seconds is not None else ""))
        self.write()
        return row

    def run(self) -> int:
        """Run every row of the table in a scratch folder (removed at the end), write the report; returns the number
        of failed rows."""
        table = rows.row_table(self.profile, self.device)
        selected = rows.select_rows(self.only, table)
        with tempfile.TemporaryDirectory(prefix="fsl_med_gpu_check_") as work:
            self.work = Path(work)
            if self.phantom:
                from fsl_med.data.phantom import generate_phantom

                self.data = generate_phantom(self.work / "phantom", n_scans=6, size=64, depth=8, seed=0)
            self.split = self._split()
            print(f"gpu-check: {self.headline(counts=False)} Report: {self.out / 'gpu-check.md'}", file=sys.stderr,
                  flush=True)
            for spec in table:
                self.run_row(spec, selected)
        self.write()
        return sum(r.status.startswith("FAILED") for r in self.rows)

    def _split(self) -> dict[str, Any]:
        from fsl_med.prepare.datasets import discover_scans, fold_split, get_dataset_info

        split = fold_split(get_dataset_info("chaos_t2"), discover_scans(self.data), 0)
        return {"query": split.query, "support": split.support, "train": split.train}


def _has_volumes(folder: Path) -> bool:
    return folder.is_dir() and any(folder.glob("image_*.nii.gz"))


def resolve_inputs(bundle: str | None, data: str | None, cache_dir: str | None,
                   out: str | Path = DEFAULT_OUT) -> tuple[Path, str, str]:
    """The data folder and superpixel cache: ``--data`` or ``--bundle`` when given (checked); else the first
    of :func:`~fsl_med.prepare.datasets.default_mri_root` (``$FSL_MED_DATA_MRI``, else the folder ``make
    prepare-mri`` writes) and ``gpu_bundle/chaos`` that holds volumes. The cache is ``--cache-dir``, else the bundle's when the data is the bundle's, else
    ``$FSL_MED_CACHE``, else ``cache`` in the report folder ``out``.

    Returns:
        ``(data folder, cache folder, where the data came from)``.
    Raises:
        DataError: ``--bundle`` is not a bundle, or ``--data`` (or the bundle) holds no prepared volumes.
    """
    b: Path | None = None
    if bundle is not None:
        b = Path(bundle)
        if not (b / "MANIFEST.json").is_file():
            raise DataError(f"--bundle {b}: not a bundle (no MANIFEST.json; make gpu-bundle writes one)")
    if data is not None:
        root, origin = Path(data), "--data"
    elif b is not None:
        root, origin = b / "chaos", "--bundle"
    else:
        candidates = [default_mri_root(), DEFAULT_BUNDLE / "chaos"]
        root = next((c for c in candidates if _has_volumes(c)), candidates[0])
        origin = "default"
        if root == DEFAULT_BUNDLE / "chaos":
            b = DEFAULT_BUNDLE
    if origin != "default" and not _has_volumes(root):
        raise DataError(f"{origin} {root}: no prepared CHAOS-T2 volumes (image_<id>.nii.gz) there")
    if cache_dir is None and b is not None and root == b / "chaos" and (b / "cache").is_dir():
        cache_dir = str(b / "cache")
    return root, cache_dir or os.environ.get("FSL_MED_CACHE") or str(Path(out) / CACHE_IN_OUT), origin


def run_gpu_check(out: str | Path = DEFAULT_OUT, profile: str = "auto", data: str | None = None,
                  bundle: str | None = None, cache_dir: str | None = None, overrides: list[str] | None = None,
                  only: list[str] | None = None, budget_s: float | None = None) -> tuple[Path, int]:
    """Run the check and write its report.

    Args:
        out: report folder (created); the superpixel cache goes in it unless ``cache_dir``, a bundle or
            ``$FSL_MED_CACHE`` names one.
        profile: ``auto`` (``gpu`` with CUDA, else ``tiny``), ``gpu`` or ``tiny``.
        data, bundle, cache_dir: see :func:`resolve_inputs`; the ``tiny`` profile generates a phantom unless
            ``data`` or ``bundle`` is given.
        overrides: ``key=value`` config overrides of every row (checked before any row runs).
        only: row-key prefixes to run (``train``, ``eval``, ``segment``, ``ddp``, ``train-large-bf16``...).
    Returns:
        ``(path of gpu-check.md, number of failed rows)``.
    Raises:
        ConfigError: unknown profile, ``gpu`` without CUDA, a bad override, ``--only`` or ``--budget-s`` value.
        DataError: no data for the ``gpu`` profile, a ``--data`` folder without volumes, not a ``--bundle``.
    """
    if profile == "auto":
        profile = "gpu" if torch.cuda.is_available() else "tiny"
    if profile not in PROFILES:
        raise ConfigError(f"--profile {profile}: must be auto, gpu or tiny")
    if profile == "gpu" and not torch.cuda.is_available():
        raise ConfigError("--profile gpu: no CUDA device on this machine (the tiny profile runs without one)")
    prof = PROFILES[profile]
    rows.select_rows(only, rows.row_table(prof, "cuda" if torch.cuda.is_available() else "cpu"))  # a bad --only
    if budget_s is not None and not budget_s >= 0:
        raise ConfigError(f"--budget-s {budget_s}: must be >= 0")
    root, cache, origin = resolve_inputs(bundle, data, cache_dir, out)
    real = prof.name == "gpu" or origin != "default"  # the tiny profile generates a phantom unless given data
    if real and not _has_volumes(root):
        raise DataError(f"{root}: no prepared CHAOS-T2 volumes for the gpu profile (make gpu-bundle, or --data DIR)")
    from fsl_med.run_config import load_run_config

    # the overrides are checked once, up front: a typo is one error line, not a failure in every row
    load_run_config(REPO / "experiments" / "mri.yaml", [f"data.root={root}", *(overrides or [])])
    out_dir = atomic.ensure_writable_dir(out, "--out")
    (out_dir / "gpu-check.log").write_text("", encoding="utf-8")
    check = GpuCheck(out_dir, prof, root if real else None, cache, list(overrides or []), only, budget_s)
    failed = check.run()
    return out_dir / "gpu-check.md", failed
