"""The preparation loop shared by every dataset: raw case -> prepared ``image_/label_`` pair + manifest.

Each dataset module lists its cases (:class:`Case`: a scan id, the source files it reads and a loader)
and gives the preprocessing plan (raw scan -> prepared scan, :mod:`fsl_med.prepare.plan`). :func:`run_preparation` then skips
cases already prepared from the same source with the same parameters, writes every file atomically,
updates ``manifest.json`` after each scan, writes ``classmap_1.json`` and (optionally) caches the
superpixel pseudolabels used for training.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from fsl_med import __version__
from fsl_med.atomic import (
    check_output_file,
    first_missing,
    refuse_nested,
    refuse_overwriting_inputs,
    remove_empty_folders,
    replace_folder,
    write_text,
)
from fsl_med.errors import DataError, FilesystemError
from fsl_med.locks import exclusive
from fsl_med.prepare.classmap import CLASSMAP_NAME, build_classmap, label_slices
from fsl_med.prepare.datasets import DatasetInfo, scan_files, scan_sort_key
from fsl_med.prepare.geometry import orientation_of, spacing_of
from fsl_med.prepare.manifest import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_NAME,
    file_record,
    params_digest,
    read_manifest,
    scan_is_current,
    write_manifest,
)
from fsl_med.prepare.nifti import write_nifti
from fsl_med.prepare.plan import Plan, Scan, check_resampling
from fsl_med.prepare.sources import Source

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Case:
    """One scan of a raw download: its prepared id, the source files it is made from, and its reader."""

    scan_id: str
    inputs: tuple[str, ...]
    load: Callable[[], Scan]


@dataclass
class PrepareReport:
    """What :func:`run_preparation` did."""

    out_dir: Path
    prepared: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    superpixel_seconds: float = 0.0

    @property
    def seconds_per_volume(self) -> float:
        """Mean preparation time of the volumes prepared in this call (0 if none)."""
        return float(np.mean(list(self.seconds.values()))) if self.seconds else 0.0

    def summary(self) -> str:
        """One line: counts, time per volume, output folder."""
        s = (f"prepared {len(self.prepared)} volume(s), {len(self.skipped)} already up to date"
             f"{f', {self.seconds_per_volume:.2f} s per volume' if self.seconds else ''}")
        if self.superpixel_seconds:
            s += f", superpixels {self.superpixel_seconds:.1f} s"
        return f"{s} -> {self.out_dir}"


LOCK_NAME = ".fsl_med.lock"
"""The lock file of a prepared folder being written (:mod:`fsl_med.locks`): one ``prepare`` at a time."""
_STAGING = ".{name}.overwrite-"
"""Sibling folder an ``--overwrite`` preparation is written into before it replaces ``--out``."""


def check_output_dir(out_dir: Path, source: Source | None) -> None:
    """Refuse an output inside (or holding) a source folder, or one that cannot be created or written; creates
    nothing.

    Raises:
        DataError: naming the folder and the problem.
    """
    if source is not None:
        if source.kind == "folder":
            refuse_nested(out_dir, source.path, "--out", "the source folder --src")
        else:
            refuse_overwriting_inputs(out_dir, {"--src": source.path})
    out = out_dir.expanduser()
    if out.exists():
        if not out.is_dir():
            raise DataError(f"--out {out_dir}: exists and is not a folder")
        if not os.access(out, os.W_OK | os.X_OK):
            raise DataError(f"--out {out_dir}: is not writable")
    else:
        check_output_file(out, "--out")  # its nearest existing parent is a writable folder


def remove_stale_temporaries(out_dir: Path) -> None:
    """Delete temporary files of an earlier, killed run (``.name.XXXX.tmp*`` written by atomic writes) and the
    staging folders of a killed ``--overwrite`` (only called while holding the folder's lock)."""
    for p in out_dir.glob(".*.tmp*"):
        with contextlib.suppress(OSError):
            p.unlink()
    for pattern in (_STAGING.format(name=out_dir.name) + "*", f".{out_dir.name}.old-*"):  # see replace_folder
        for p in out_dir.parent.glob(pattern):
            shutil.rmtree(p, ignore_errors=True)


def _is_layout_file(name: str) -> bool:
    """A file ``prepare`` (or another project's prepared layout) writes: NIfTI scans, pseudolabels, classmap, manifest."""
    return (name == MANIFEST_NAME or name == CLASSMAP_NAME or name.endswith((".nii", ".nii.gz"))
            or (name.startswith("classmap") and name.endswith(".json")))


def _few(names: list[str], n: int = 4) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _params_diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k}={old.get(k)!r} (now {new.get(k)!r})" for k in keys[:4]) or "the manifest format"


def _source_identity(path: str | Path) -> str:
    return str(Path(path).expanduser().resolve())


def existing_preparation(out: Path, info: DatasetInfo, source: Source, params: dict[str, Any],
                         wanted: set[str]) -> str | None:
    """What ``out`` holds that ``prepare`` may not write into, or None when it may: the folder is empty, or its
    manifest records the same preparation (dataset, source and plan) and it holds no scan the manifest does not
    list (then the run resumes, or finds everything up to date).

    Returns:
        one clause naming what is there (e.g. ``holds a preparation of sabs``), or None.
    """
    try:
        entries = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    except OSError as e:
        raise DataError(f"--out {out}: cannot list the folder ({e.strerror or e})") from e
    if not entries:
        return None
    manifest = read_manifest(out)
    if manifest is None:
        what = "an unreadable manifest.json or one of another program" if MANIFEST_NAME in entries else \
            "no manifest.json of fsl-med prepare"
        return f"already holds {len(entries)} file(s) ({_few(entries)}) and {what}"
    differ = []
    if manifest.get("dataset") != info.name:
        differ.append(f"dataset {manifest.get('dataset')} (now {info.name})")
    src = (manifest.get("source") or {}).get("path")
    if src is None or _source_identity(src) != _source_identity(source.path):
        differ.append(f"source {src} (now {source.path})")
    if manifest.get("dataset") == info.name and manifest.get("params_digest") != params_digest(params):
        differ.append(f"plan {_params_diff(manifest.get('params') or {}, params)}")
    if differ:
        return f"holds another preparation: {'; '.join(differ)}"
    listed = set(manifest["scans"]) | wanted  # wanted: an interrupted run may have written a scan not yet listed
    foreign = sorted({sid for sid in scan_files(out).scans if sid not in listed}, key=scan_sort_key)
    if foreign:
        return f"holds scan(s) {_few(foreign)} that its manifest.json does not list (not from this preparation)"
    return None


def _matrix(a: np.ndarray) -> list[list[float]]:
    return [[round(float(v), 6) for v in row] for row in np.asarray(a)]


def geometry_record(arr: np.ndarray, affine: np.ndarray, prefix: str = "") -> dict[str, Any]:
    """Shape, spacing, orientation and affine of a volume, as manifest fields (optionally prefixed)."""
    return {f"{prefix}shape": [int(s) for s in arr.shape], f"{prefix}spacing": [round(v, 6) for v in spacing_of(affine)],
            f"{prefix}orientation": orientation_of(affine), f"{prefix}affine": _matrix(affine)}


def write_classmap(out_dir: Path, manifest: dict[str, Any], info: DatasetInfo) -> Path:
    """Write ``classmap_1.json`` (reference format) from the manifest's per-scan label slices."""
    cm = build_classmap(info.classmap_names, {sid: e["label_slices"] for sid, e in manifest["scans"].items()})
    return write_text(out_dir / CLASSMAP_NAME, json.dumps(cm))  # compact, as the reference file


def run_preparation(info: DatasetInfo, source: Source, cases: list[Case], out_dir: str | Path, plan: Plan, *,
                    force: bool = False, overwrite: bool = False, progress: bool = True) -> PrepareReport:
    """Prepare every case of a raw download into ``out_dir`` (the prepared layout).

    ``out_dir`` must be empty (or missing), or hold this same preparation (its manifest records the same dataset,
    source and plan): then scans already prepared are kept and the run resumes. Anything else is refused, unless
    ``overwrite``: the preparation is then written into a sibling folder and replaces ``out_dir`` only once it is
    complete (the old content stays intact until then). One writer at a time: a second ``prepare`` into the same
    folder is refused, naming the first (:mod:`fsl_med.locks`). A failed run leaves no folder it created.

    Args:
        info: the dataset (label map, class names).
        source: the raw download.
        cases: the scans to prepare (ids must be unique).
        out_dir: output folder (created; must not lie inside a source folder).
        plan: the preprocessing plan: its :meth:`~fsl_med.prepare.plan.Plan.forward` prepares each scan, after
            :func:`~fsl_med.prepare.plan.check_resampling` (a scan it cannot resample sensibly is refused, one it
            resamples far is noted); its parameters are recorded and must match an existing preparation's unless
            ``overwrite``.
        force: re-prepare scans that are up to date.
        overwrite: replace whatever prepared data ``out_dir`` holds (never a folder holding other kinds of files).
        progress: show progress bars (stderr).

    Returns:
        a :class:`PrepareReport`.

    Raises:
        DataError: no cases, unreadable/inconsistent input (naming the file), an output folder holding other data,
            another writer, unwritable output.
    """
    out = Path(out_dir).expanduser()
    params = plan.as_dict()
    if not cases:
        raise DataError(f"{source.path}: no scans found in the source")
    check_output_dir(out, source)
    created = first_missing(out)  # removed again if the run fails and it is still empty
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FilesystemError(f"--out {out_dir}: cannot create it ({e.strerror or e})") from e
    locked = False  # only the run that holds the lock may remove the folder: a refused second run saw it missing too
    try:
        with exclusive(out / LOCK_NAME, f"--out {out_dir}"):
            locked = True
            remove_stale_temporaries(out)
            wanted = {c.scan_id for c in cases}
            held = existing_preparation(out, info, source, params, wanted)
            if held is not None and not overwrite:
                raise DataError(f"--out {out_dir}: {held}; prepare writes into an empty folder or resumes its own "
                                "preparation: choose another --out, or add --overwrite to replace its content")
            if held is None:
                return _prepare_into(out, info, source, cases, plan, force=force, progress=progress)
            others = [n for n in sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
                      if not _is_layout_file(n) or (out / n).is_dir()]
            if others:
                raise DataError(f"--out {out_dir}: --overwrite replaces prepared data only, and it also holds "
                                f"{_few(others)}; choose another --out")
            staged = out.parent / f"{_STAGING.format(name=out.name)}{os.getpid()}"
            try:
                staged.mkdir()
                report = _prepare_into(staged, info, source, cases, plan, force=True, progress=progress)
                replace_folder(out, staged)
            finally:
                shutil.rmtree(staged, ignore_errors=True)
            report.out_dir = out
            log.info("replaced the content of %s (--overwrite)", out)
            return report
    except BaseException:
        if created is not None and locked:
            remove_if_empty(out, up_to=created)
        raise


def remove_if_empty(folder: Path, up_to: Path | None = None) -> bool:
    """Remove ``folder`` if it holds nothing but temporaries of an atomic write, a lock file and a manifest that lists
    no scan (a run that failed before its first scan file), then its empty parents up to ``up_to`` (a failed run
    leaves no empty folder it created); True if ``folder`` was removed. A folder holding any scan file is kept
    whole: its manifest is what lets a rerun resume it."""
    try:
        names = [p.name for p in folder.iterdir()]
    except OSError:
        return False
    if any(not (n == LOCK_NAME or n == MANIFEST_NAME or (n.startswith(".") and ".tmp" in n)) for n in names):
        return False
    m = read_manifest(folder)
    if m is not None and m["scans"]:
        return False
    for n in names:
        with contextlib.suppress(OSError):
            (folder / n).unlink()
    remove_empty_folders(folder, up_to or folder)
    return not folder.exists()


def _prepare_into(out: Path, info: DatasetInfo, source: Source, cases: list[Case], plan: Plan, *, force: bool,
                  progress: bool) -> PrepareReport:
    """The preparation loop proper, into ``out`` (checked and locked by :func:`run_preparation`)."""
    params = plan.as_dict()
    digest = params_digest(params)
    wanted = {c.scan_id for c in cases}
    old = read_manifest(out) or {}
    old_scans: dict[str, Any] = old.get("scans", {}) if old.get("dataset") == info.name else {}
    manifest: dict[str, Any] = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "fsl_med_version": __version__,
        "dataset": info.name, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source": {"path": _source_identity(source.path), "kind": source.kind}, "params": params,
        "params_digest": digest, "expected_scans": sorted(wanted, key=scan_sort_key),
        "orientation": params.get("orientation"), "complete": False, "scans": {}, "files": {},
    }
    for sid, entry in old_scans.items():  # scans we wrote before that are no longer in the source
        if sid not in wanted:
            for name in entry.get("files", {}):
                with contextlib.suppress(OSError):
                    (out / name).unlink()
    # before the first scan file, so that an interrupted run leaves a folder holding its own preparation
    write_manifest(out, {**manifest, "scans": {k: v for k, v in old_scans.items() if k in wanted}})
    report = PrepareReport(out_dir=out)
    bar = tqdm(cases, desc=f"prepare {info.name}", unit="vol", disable=not progress, file=sys.stderr)
    for case in bar:
        fingerprint = source.fingerprint(list(case.inputs))
        entry = old_scans.get(case.scan_id)
        if not force and scan_is_current(out, entry, digest, fingerprint):
            manifest["scans"][case.scan_id] = entry
            report.skipped.append(case.scan_id)
            continue
        t0 = time.perf_counter()
        raw = case.load()
        bad = np.setdiff1d(np.unique(raw.label), np.asarray(info.all_label_ids))
        if bad.size:
            raise DataError(f"{source.describe(case.inputs[-1])}: label values {bad.tolist()[:5]} are outside the "
                            f"{info.name} label map {list(info.all_label_ids)}")
        note = check_resampling(plan, raw.image.shape, raw.affine, f"scan {case.scan_id} "
                                f"({source.describe(case.inputs[0])})")
        if note:
            log.warning("%s", note)
        prep = plan.forward(raw.image, raw.affine, raw.label)
        label = np.asarray(prep.label)
        names = (f"image_{case.scan_id}.nii.gz", f"label_{case.scan_id}.nii.gz")
        write_nifti(out / names[0], np.asarray(prep.image, dtype=np.float32), prep.affine)
        write_nifti(out / names[1], label.astype(np.uint8), prep.affine)
        seconds = time.perf_counter() - t0
        manifest["scans"][case.scan_id] = {
            "source": {"files": list(case.inputs) if len(case.inputs) <= 4 else
                       [case.inputs[0], f"... {len(case.inputs) - 2} more ...", case.inputs[-1]],
                       "n_files": len(case.inputs), "fingerprint": fingerprint},
            "params_digest": digest,
            **geometry_record(prep.image, prep.affine),
            **geometry_record(raw.image, raw.affine, prefix="source_"),
            "labels_present": [int(v) for v in np.unique(label)],
            "label_slices": label_slices(label),
            "intensity_range": [round(float(prep.image.min()), 4), round(float(prep.image.max()), 4)],
            "files": {n: file_record(out / n) for n in names},
            "seconds": round(seconds, 3),
        }
        report.prepared.append(case.scan_id)
        report.seconds[case.scan_id] = seconds
        write_manifest(out, manifest)
    write_classmap(out, manifest, info)
    manifest["files"][CLASSMAP_NAME] = file_record(out / CLASSMAP_NAME)
    manifest["complete"] = True
    manifest["seconds_per_volume"] = round(report.seconds_per_volume, 3) if report.seconds else None
    write_manifest(out, manifest)
    log.debug("%s (manifest: %s)", report.summary(), out / MANIFEST_NAME)
    return report
