"""``manifest.json`` of a prepared folder: what was prepared, from what, how, and each file's checksum.

Layout::

    {"format": "fsl_med-prepared", "format_version": 1, "fsl_med_version": "0.1.0",
     "dataset": "chaos_t2", "source": {"path": ..., "kind": "zip"|"folder"|"prepared"},
     "params": {...}, "params_digest": "...", "orientation": "LAS", "complete": true,
     "scans": {"1": {"source": {"files": [...], "fingerprint": ...},
                     "shape": [256, 256, 37], "spacing": [1.25, 1.25, 7.7], "orientation": "LAS",
                     "affine": [[...]], "source_shape": [...], "source_spacing": [...],
                     "source_orientation": "LPS", "source_affine": [[...]],
                     "labels_present": [0, 1, 2, 3, 4], "label_slices": {"1": [z, ...]},
                     "files": {"image_1.nii.gz": {"sha256": ..., "bytes": ...}, ...},
                     "seconds": 1.2}},
     "files": {"classmap_1.json": {"sha256": ..., "bytes": ...}}}

The manifest is rewritten atomically after every scan with ``"complete": false`` and a last time with
``"complete": true``, so an interrupted preparation resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Any

from fsl_med.atomic import sha256_file, write_json

MANIFEST_NAME = "manifest.json"
FORMAT = "fsl_med-prepared"
FORMAT_VERSION = 1


def file_record(path: Path) -> dict[str, Any]:
    """``{"sha256": ..., "bytes": ...}`` of one file."""
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def params_digest(params: dict[str, Any]) -> str:
    """Short stable hash of preparation parameters (and the manifest format)."""
    payload = json.dumps({"params": params, "format_version": FORMAT_VERSION}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    """The folder's manifest, or ``None`` when it has none or it is unreadable / of another format."""
    p = Path(folder) / MANIFEST_NAME
    try:
        m = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(m, dict) or m.get("format") != FORMAT or not isinstance(m.get("scans"), dict):
        return None
    return m


def write_manifest(folder: str | Path, manifest: dict[str, Any]) -> Path:
    """Atomically write ``manifest`` to ``folder/manifest.json``."""
    return write_json(Path(folder) / MANIFEST_NAME, manifest)


def files_match(folder: Path, records: dict[str, dict[str, Any]]) -> bool:
    """True when every recorded file exists with the recorded size and SHA-256."""
    for name, rec in records.items():
        p = folder / name
        if not p.is_file() or p.stat().st_size != rec.get("bytes") or sha256_file(p) != rec.get("sha256"):
            return False
    return True


def scan_is_current(folder: Path, entry: dict[str, Any] | None, digest: str, fingerprint: str) -> bool:
    """True when a scan's prepared files are intact and were made from the same source with the same params."""
    if not entry:
        return False
    return (entry.get("params_digest") == digest and entry.get("source", {}).get("fingerprint") == fingerprint
            and files_match(folder, entry.get("files", {})))


def incomplete_note(folder: str | Path, manifest: dict[str, Any] | None = None) -> str | None:
    """One line when ``folder``'s manifest says its preparation did not finish (``complete`` false): how many scans
    were prepared of how many, and how to finish it; None for a complete preparation or a folder without one."""
    m = read_manifest(folder) if manifest is None else manifest
    if m is None or m.get("complete", True):
        return None
    expected = m.get("expected_scans")
    of = f" of {len(expected)}" if isinstance(expected, list) else ""
    src = (m.get("source") or {}).get("path", "the source")
    return (f"{folder}: its preparation is incomplete ({len(m['scans'])}{of} scans prepared, manifest.json says "
            f"complete: false); rerun fsl-med prepare {'sabs' if m.get('dataset') == 'sabs' else 'chaos'} "
            f"--src {src} --out {folder} to finish it")


def manifest_mismatches(folder: str | Path, scans: dict[str, tuple[Path, Path]],
                        manifest: dict[str, Any] | None = None) -> list[str]:
    """Warnings for a prepared folder whose scans disagree with its manifest (cheap: names and sizes only).

    Args:
        folder: the data folder.
        scans: scan id -> (image, label) as listed (:func:`fsl_med.prepare.datasets.scan_files`).
        manifest: the folder's manifest (read when None).
    Returns:
        one line per kind of disagreement: scans the manifest does not list (another dataset's or a copy's files
        mixed in), and scans whose files are not the recorded size (rewritten since); empty when the folder has no
        manifest or agrees with it.
    """
    m = read_manifest(folder) if manifest is None else manifest
    if m is None:
        return []
    out: list[str] = []
    listed = m["scans"]
    unlisted = [sid for sid in scans if sid not in listed]
    if unlisted and not m.get("params", {}).get("imported"):
        out.append(f"{folder}: holds scan(s) {', '.join(unlisted[:8])}{' ...' if len(unlisted) > 8 else ''} that "
                   f"its manifest.json does not list: not made by its preparation (another dataset's or a copy's "
                   f"files mixed in?); they are used as they are")
    changed = []
    for sid, paths in scans.items():
        recorded = listed.get(sid, {}).get("files", {})
        for p in paths:
            want = (recorded.get(p.name) or {}).get("bytes")
            with contextlib.suppress(OSError):
                if want is not None and p.stat().st_size != want:
                    changed.append(p.name)
    if changed:
        out.append(f"{folder}: file(s) {', '.join(changed[:6])}{' ...' if len(changed) > 6 else ''} differ from the "
                   "size manifest.json records: rewritten after the preparation")
    return out
