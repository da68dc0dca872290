"""The preparation loop shared by every dataset: raw case -> prepared ``image_/label_`` pair + manifest.

Each dataset module lists its cases (:class:`Case`: a scan id, the source files it reads and a loader)
and supplies a ``process`` function (raw scan -> prepared scan). :func:`run_preparation` then skips
cases already prepared from the same source with the same parameters, writes every file atomically,
updates ``manifest.json`` after each scan, writes ``classmap_1.json`` and (optionally) caches the
superpixel pseudolabels used for training.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from fsl_med import __version__
from fsl_med.atomic import ensure_writable_dir, refuse_nested, refuse_overwriting_inputs, write_text
from fsl_med.errors import DataError
from fsl_med.prepare.classmap import CLASSMAP_NAME, build_classmap, label_slices
from fsl_med.prepare.datasets import DatasetInfo
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
from fsl_med.prepare.plan import Scan
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


def check_output_dir(out_dir: Path, source: Source | None) -> None:
    """Create ``out_dir``; refuse an output inside a source folder or a folder that is not writable.

    Raises:
        DataError: naming the folder and the problem.
    """
    out = out_dir.expanduser().resolve()
    if source is not None:
        if source.kind == "folder":
            refuse_nested(out_dir, source.path, "--out", "the source folder --src")
        else:
            refuse_overwriting_inputs(out_dir, {"--src": source.path})
    ensure_writable_dir(out, f"--out {out_dir}")


def remove_stale_temporaries(out_dir: Path) -> None:
    """Delete temporary files of an earlier, killed run (``.name.XXXX.tmp*`` written by atomic writes)."""
    for p in out_dir.glob(".*.tmp*"):
        with contextlib.suppress(OSError):
            p.unlink()


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


def run_preparation(info: DatasetInfo, source: Source, cases: list[Case], out_dir: str | Path,
                    params: dict[str, Any], process: Callable[[Scan], Scan], *, force: bool = False,
                    progress: bool = True) -> PrepareReport:
    """Prepare every case of a raw download into ``out_dir`` (the prepared layout).

    Args:
        info: the dataset (label map, class names).
        source: the raw download.
        cases: the scans to prepare (ids must be unique).
        out_dir: output folder (created; must not lie inside a source folder).
        params: the preparation parameters (recorded; a change re-prepares every scan).
        process: raw scan -> prepared scan (canonical orientation, resampled, ...).
        force: re-prepare scans that are up to date.
        progress: show progress bars (stderr).

    Returns:
        a :class:`PrepareReport`.

    Raises:
        DataError: no cases, unreadable/inconsistent input (naming the file), unwritable output.
    """
    out = Path(out_dir)
    if not cases:
        raise DataError(f"{source.path}: no scans found in the source")
    check_output_dir(out, source)
    remove_stale_temporaries(out)
    digest = params_digest(params)
    old = read_manifest(out) or {}
    old_scans: dict[str, Any] = old.get("scans", {}) if old.get("dataset") == info.name else {}
    manifest: dict[str, Any] = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "fsl_med_version": __version__,
        "dataset": info.name, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source": {"path": str(source.path), "kind": source.kind}, "params": params, "params_digest": digest,
        "orientation": params.get("orientation"), "complete": False, "scans": {}, "files": {},
    }
    wanted = {c.scan_id for c in cases}
    for sid, entry in old_scans.items():  # scans we wrote before that are no longer in the source
        if sid not in wanted:
            for name in entry.get("files", {}):
                with contextlib.suppress(OSError):
                    (out / name).unlink()
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
        prep = process(raw)
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
