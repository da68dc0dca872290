"""``fsl-med prepare import``: check a folder prepared elsewhere and add what fsl_med needs.

Other projects distribute the prepared layout (``image_ID.nii.gz``, ``label_ID.nii.gz``,
``classmap_1.json``); ``.nii`` files are accepted too (the folder is listed by
:func:`fsl_med.prepare.datasets.scan_files`, as training lists it). :func:`check_prepared` lists every problem
(one line each: missing label or image, unreadable file, singular affine, not 3D, image/label shape mismatch,
NaN/inf voxels, intensities too large for float32, non-integer labels, label values outside the dataset's
label map, a malformed classmap or one that disagrees with the labels) and notes what is merely odd (files
the layout does not recognise, an image and label whose affines differ, absent organs). :func:`import_prepared`
then, unless asked only to check, writes what is missing: ``classmap_1.json``, ``manifest.json`` and the
superpixel pseudolabels in the cache.
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fsl_med import __version__
from fsl_med.errors import DataError
from fsl_med.locks import exclusive
from fsl_med.prepare.classmap import label_slices, read_classmap
from fsl_med.prepare.datasets import DatasetInfo, get_dataset_info, scan_files
from fsl_med.prepare.geometry import CANONICAL_ORIENTATION
from fsl_med.prepare.manifest import FORMAT, FORMAT_VERSION, file_record, read_manifest, write_manifest
from fsl_med.prepare.nifti import affine_mismatch, check_intensities, read_nifti
from fsl_med.prepare.pipeline import (
    CLASSMAP_NAME,
    LOCK_NAME,
    geometry_record,
    write_classmap,
)


@dataclass
class ImportReport:
    """Outcome of checking (and completing) a prepared folder."""

    folder: Path
    dataset: str
    scans: dict[str, dict[str, Any]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    written: list[str] = field(default_factory=list)
    classmap_present: bool = False
    files: dict[str, tuple[Path, Path]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems


def _check_pair(ipath: Path, lpath: Path, sid: str, info: DatasetInfo, report: ImportReport) -> None:
    try:
        img, aff, _ = read_nifti(ipath)
        lab, laff, _ = read_nifti(lpath)
    except DataError as e:
        report.problems.append(str(e))
        return
    mismatch = affine_mismatch(ipath, aff, lpath, laff)
    if mismatch:
        report.notes.append(mismatch)
    for p, a in ((ipath, img), (lpath, lab)):
        if a.ndim != 3:
            report.problems.append(f"{p}: expected a 3D volume, got shape {tuple(a.shape)}")
            return
    if img.shape != lab.shape:
        report.problems.append(f"{lpath}: label shape {tuple(lab.shape)} differs from image shape {tuple(img.shape)}")
        return
    if not np.isfinite(img).all():
        report.problems.append(f"{ipath}: contains {int((~np.isfinite(img)).sum())} NaN/inf voxels")
        return
    try:
        check_intensities(img, ipath)
    except DataError as e:
        report.problems.append(str(e))
        return
    labf = np.asarray(lab)
    if labf.dtype.kind == "f" and (not np.isfinite(labf).all() or not np.array_equal(labf, np.rint(labf))):
        report.problems.append(f"{lpath}: label has non-integer values")
        return
    label = labf.astype(np.int64)
    values = np.unique(label)
    bad = np.setdiff1d(values, np.asarray(info.all_label_ids))
    if bad.size:
        report.problems.append(f"{lpath}: label values {bad.tolist()[:5]} are outside the {info.name} label map "
                               f"{list(info.all_label_ids)}")
        return
    missing = [o for o, lid in info.labels.items() if lid not in values]
    if missing:
        report.notes.append(f"{lpath}: organs absent from this scan: {', '.join(missing)}")
    report.files[sid] = (ipath, lpath)
    report.scans[sid] = {**geometry_record(img, aff), "labels_present": [int(v) for v in values],
                         "label_slices": label_slices(label), "intensity_range": [float(img.min()), float(img.max())]}


def _check_classmap(folder: Path, info: DatasetInfo, report: ImportReport) -> bool:
    """Check an existing classmap's schema (:func:`read_classmap`, as training does) and compare it with the
    labels; returns True if the file exists."""
    path = folder / CLASSMAP_NAME
    if not path.is_file():
        return False
    try:
        cm = read_classmap(path)
    except DataError as e:
        report.problems.append(str(e))
        return True
    for lid, name in info.classmap_names.items():
        if lid == 0:
            continue
        for sid, entry in report.scans.items():
            got = (cm.get(name) or {}).get(sid)
            want = entry["label_slices"].get(str(lid), [])
            if got is None and not want:
                continue
            if got is None or sorted(int(z) for z in got) != want:
                report.problems.append(f"{path}: class {name} of scan {sid} lists slices {got} but the label has {want}")
                return True
    return True


def check_prepared(folder: str | Path, dataset: str) -> ImportReport:
    """Check every image/label pair of a prepared folder against ``dataset``'s label map.

    The folder is listed by :func:`~fsl_med.prepare.datasets.scan_files`, the rule training uses: an image
    without a label (or a label without an image) is a problem; the other files it ignores (non-numeric ids,
    a ``.nii`` beside the ``.nii.gz`` of the same scan, other NIfTI names) are listed in one note.

    Raises:
        DataError: the folder is missing, not a folder, or holds no ``image_*/label_*`` files at all
            (the expected layout is named). Per-file problems are collected in the report instead.
    """
    info = get_dataset_info(dataset)
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DataError(f"--src {folder}: {'not a folder' if root.exists() else 'folder not found'}")
    listing = scan_files(root)
    unpaired = [f for f in listing.ignored if f.kind == "unpaired"]
    if not listing.scans and not unpaired:
        other = f"; found other NIfTI file(s): {', '.join(f.name for f in listing.ignored[:5])}" if listing.ignored else ""
        raise DataError(f"{root}: no prepared volumes found; expected image_<id>.nii.gz + label_<id>.nii.gz "
                        f"(for an official download use 'fsl-med prepare {'chaos' if info.modality == 'mri' else 'sabs'}')"
                        f"{other}")
    report = ImportReport(folder=root, dataset=info.name)
    for f in unpaired:
        report.problems.append(f"{root / f.name}: {f.reason}")
    note = listing.note(kinds=("duplicate", "non_numeric", "unrecognised"))
    if note:
        report.notes.append(note)
    for sid, (ipath, lpath) in listing.scans.items():
        _check_pair(ipath, lpath, sid, info, report)
    orients = sorted({e["orientation"] for e in report.scans.values()})
    if orients and orients != [CANONICAL_ORIENTATION]:
        report.notes.append(f"{root}: orientation {', '.join(orients)} differs from fsl_med's canonical "
                            f"{CANONICAL_ORIENTATION}; volumes are used as stored")
    report.classmap_present = _check_classmap(root, info, report)
    return report


def import_prepared(folder: str | Path, dataset: str, *, check_only: bool = False) -> ImportReport:
    """Check a prepared folder and, when it is sound and ``check_only`` is false, complete it in place.

    Writes (atomically) ``classmap_1.json`` if missing and ``manifest.json`` if missing or stale (the
    superpixel cache is the ``prepare`` verb's next step: :func:`fsl_med.data.superpixels.cache_superpixels`).
    Nothing is written when problems were found or the folder is read-only (a note says so).
    """
    report = check_prepared(folder, dataset)
    if check_only or not report.ok:
        return report
    root, info = report.folder, get_dataset_info(dataset)
    writable = os.access(root, os.W_OK | os.X_OK)
    manifest: dict[str, Any] = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "fsl_med_version": __version__, "dataset": info.name,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source": {"path": str(root), "kind": "prepared"}, "params": {"imported": True}, "params_digest": None,
        "orientation": None, "complete": True, "scans": {}, "files": {},
    }
    for sid, entry in report.scans.items():
        manifest["scans"][sid] = {**entry, "files": {p.name: file_record(p) for p in report.files[sid]}}
    if not writable:
        report.notes.append(f"{root}: folder is read-only; classmap/manifest not written (the data is usable as is)")
        return report
    with exclusive(root / LOCK_NAME, f"--src {root}"):  # one writer per prepared folder, as prepare
        if not report.classmap_present:
            write_classmap(root, manifest, info)
            report.written.append(CLASSMAP_NAME)
        manifest["files"][CLASSMAP_NAME] = file_record(root / CLASSMAP_NAME)
        old = read_manifest(root)
        prepared_here = old is not None and not (old.get("params") or {}).get("imported")
        if prepared_here:  # written by `fsl-med prepare`: it records the plan and the source geometry; never replaced
            assert old is not None
            unlisted = [sid for sid in manifest["scans"] if sid not in old["scans"]]
            if unlisted:
                report.notes.append(f"{root}: manifest.json was written by fsl-med prepare and is kept (it records the "
                                    f"plan and the source geometry); scan(s) {', '.join(unlisted)} it does not list "
                                    "stay unlisted (training warns about them)")
        elif old is None or {k: v.get("files") for k, v in old["scans"].items()} != \
                {k: v["files"] for k, v in manifest["scans"].items()}:
            write_manifest(root, manifest)
            report.written.append("manifest.json")
    return report
