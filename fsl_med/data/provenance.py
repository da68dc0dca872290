"""What a model was trained on, recorded in every checkpoint, and the guard that keeps evaluation out-of-sample.

A checkpoint's :class:`TrainedOn` names the dataset, a fingerprint of the data folder, the fold, setting, excluded
labels and test organs, and the scans whose slices were trained on (``train_scans``) or used to choose the
checkpoint (``val_scans``), each with a digest of its label file. :func:`scans_seen` says which of the scans an
evaluation would score (query) or take supports from were seen in training.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

CHECKPOINT_KEY = "fsl_med_trained_on"
"""The key of a checkpoint that holds :meth:`TrainedOn.to_dict`."""


def label_digest(path: Path) -> str | None:
    """The first 16 hex digits of the SHA-256 of a label file's bytes (None if it cannot be read)."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError:
        return None
    return h.hexdigest()[:16]


def folder_fingerprint(files: Mapping[str, tuple[Path, Path]]) -> str:
    """A fingerprint of a data folder: hash of the sorted scan ids with the sizes of their image and label files.

    Args:
        files: scan id -> (image path, label path).
    Returns:
        16 hex digits; the same for a copy of the folder elsewhere, different when a scan is added, removed or
        rewritten with another size.
    """
    h = hashlib.sha256()
    for sid in sorted(files):
        img, lab = files[sid]
        sizes = []
        for p in (img, lab):
            try:
                sizes.append(str(p.stat().st_size))
            except OSError:
                sizes.append("?")
        h.update(f"{sid}:{':'.join(sizes)}\n".encode())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class TrainedOn:
    """The data a checkpoint was trained on.

    Attributes:
        dataset: dataset name (``data.dataset``).
        fingerprint: :func:`folder_fingerprint` of the data folder.
        fold, setting: the fold and setting trained.
        excluded_labels: label ids whose slices were dropped from training (Setting 2).
        test_organs: the organs held out as test organs.
        train_scans: scan id -> label digest of every scan whose slices were trained on.
        val_scans: scan id -> label digest of the validation scans (used to pick the best checkpoint).
        history: earlier records of a resumed run, oldest first (each a :meth:`to_dict`), when they differ.
    """

    dataset: str
    fingerprint: str
    fold: int
    setting: int
    excluded_labels: list[int]
    test_organs: list[str]
    train_scans: dict[str, str | None]
    val_scans: dict[str, str | None]
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (stored in the checkpoint and in ``train_summary.json``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainedOn:
        """Inverse of :meth:`to_dict`. Raises ``KeyError``/``TypeError``/``ValueError`` on a malformed record."""
        return cls(dataset=str(d["dataset"]), fingerprint=str(d["fingerprint"]), fold=int(d["fold"]),
                   setting=int(d["setting"]), excluded_labels=[int(x) for x in d["excluded_labels"]],
                   test_organs=[str(x) for x in d["test_organs"]],
                   train_scans={str(k): v for k, v in dict(d["train_scans"]).items()},
                   val_scans={str(k): v for k, v in dict(d["val_scans"]).items()},
                   history=list(d.get("history") or []))

    def after(self, earlier: TrainedOn | None) -> TrainedOn:
        """This record continuing ``earlier`` (a resumed run): the scans seen are the union of both; the fold,
        setting and organs are this one's, and a differing earlier record is kept in ``history``."""
        if earlier is None:
            return self
        prev = {k: v for k, v in earlier.to_dict().items() if k != "history"}
        if prev == {k: v for k, v in self.to_dict().items() if k != "history"}:
            return TrainedOn(**{**prev, "history": list(earlier.history)})
        train = {**earlier.train_scans, **self.train_scans}
        val = {k: v for k, v in {**earlier.val_scans, **self.val_scans}.items() if k not in train}
        return TrainedOn(self.dataset, self.fingerprint, self.fold, self.setting, list(self.excluded_labels),
                         list(self.test_organs), train, val, [*earlier.history, prev])


@dataclass(frozen=True)
class Overlap:
    """Scans an evaluation would use that a checkpoint saw in training.

    Attributes:
        query, support: ``(scan id, how)`` pairs, ``how`` = ``trained on`` or ``validated on``.
        uncertain: overlapping ids in another data folder whose label files differ from the recorded ones
            (perhaps other patients that share the ids, or the same patients prepared differently).
    """

    query: list[tuple[str, str]]
    support: list[tuple[str, str]]
    uncertain: list[str]

    def __bool__(self) -> bool:
        return bool(self.query or self.support)

    def describe(self) -> str:
        """``query scans 1, 2 (trained on); support scan 5 (validated on)``."""
        parts = []
        for role, pairs in (("query", self.query), ("support", self.support)):
            if pairs:
                by_how: dict[str, list[str]] = {}
                for sid, how in pairs:
                    by_how.setdefault(how, []).append(sid)
                noun = f"{role} scan" + ("s" if len(pairs) > 1 else "")
                parts.append(f"{noun} " + ", ".join(f"{', '.join(ids)} ({how})" for how, ids in by_how.items()))
        return "; ".join(parts)


def scans_seen(trained: TrainedOn, fingerprint: str, label_paths: Mapping[str, Path], query: Iterable[str],
               support: Iterable[str]) -> Overlap:
    """Which ``query`` and ``support`` scan ids the checkpoint trained or validated on.

    In the same data folder (equal fingerprints) equal ids are the same scans. In another folder of the same
    dataset an id counts as seen when its label file has the recorded digest (a copy, or a folder with scans
    added); an equal id whose label differs is only listed as ``uncertain``.

    Args:
        trained: the checkpoint's record.
        fingerprint: :func:`folder_fingerprint` of the evaluated folder.
        label_paths: scan id -> label file of the evaluated folder (for the digests).
    """
    seen = {**{k: ("validated on", v) for k, v in trained.val_scans.items()},
            **{k: ("trained on", v) for k, v in trained.train_scans.items()}}
    uncertain: list[str] = []

    def check(ids: Iterable[str]) -> list[tuple[str, str]]:
        out = []
        for sid in ids:
            if sid not in seen:
                continue
            how, digest = seen[sid]
            if fingerprint == trained.fingerprint or digest is None or sid not in label_paths \
                    or label_digest(label_paths[sid]) == digest:
                out.append((sid, how))
            elif sid not in uncertain:
                uncertain.append(sid)
        return out

    return Overlap(check(query), check(support), uncertain)
