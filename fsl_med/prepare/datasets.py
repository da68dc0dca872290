"""Dataset registry: label maps, organ names, label groups, folds and the support scan of each fold.

Folds follow the reference (method.md §1.1): scan ids are sorted (numerically) into a circular list;
fold k's evaluation ids are ``ids[sep[k] : sep[k+1] + 1]`` (wrapping around), the last of which is the
support scan; every other scan is a training scan. ``eval.support_pick`` picks the ADNet lineage's support among
the same evaluation ids instead (:func:`fold_split`).
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fsl_med.config import SUPPORT_PICK_RE
from fsl_med.errors import ConfigError, DataError


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about one prepared dataset.

    Attributes:
        name: registry name (``chaos_t2``, ``sabs``).
        modality: ``"mri"`` or ``"ct"`` (decides normalisation and the body-mask threshold).
        labels: organ name -> label id of the four evaluated organs.
        classmap_names: label id -> class name used as key in ``classmap_1.json``.
        label_groups: the two Setting-2 label groups (test organs of ``label_sets`` 0 and 1).
        sep: fold boundaries in the sorted scan list.
        n_support: number of support scans appended to each fold's evaluation ids (1).
        body_threshold: intensity threshold of the body mask for superpixels.
        all_label_ids: every label id that may occur in a label volume.
    """

    name: str
    modality: str
    labels: dict[str, int]
    classmap_names: dict[int, str]
    label_groups: tuple[tuple[str, ...], ...]
    sep: tuple[int, ...]
    body_threshold: float
    all_label_ids: tuple[int, ...]
    n_support: int = 1
    aliases: tuple[str, ...] = field(default_factory=tuple)

    @property
    def n_folds(self) -> int:
        """Number of folds (5 for both datasets)."""
        return len(self.sep) - 1


_REGISTRY: dict[str, DatasetInfo] = {}


def register_dataset(info: DatasetInfo) -> None:
    """Add a dataset to the registry (its aliases resolve to it too)."""
    for key in (info.name, *info.aliases):
        _REGISTRY[key] = info


register_dataset(
    DatasetInfo(
        name="chaos_t2",
        modality="mri",
        labels={"liver": 1, "right_kidney": 2, "left_kidney": 3, "spleen": 4},
        classmap_names={0: "BG", 1: "LIVER", 2: "RK", 3: "LK", 4: "SPLEEN"},
        label_groups=(("right_kidney", "left_kidney"), ("liver", "spleen")),
        sep=(0, 4, 8, 12, 16, 20),
        body_threshold=50 + 1e-4,
        all_label_ids=(0, 1, 2, 3, 4),
        aliases=("chaos", "chaost2", "mri"),
    )
)
register_dataset(
    DatasetInfo(
        name="sabs",
        modality="ct",
        labels={"liver": 6, "right_kidney": 2, "left_kidney": 3, "spleen": 1},
        classmap_names={
            0: "BGD", 1: "SPLEEN", 2: "KID_R", 3: "KID_l", 4: "GALLBLADDER", 5: "ESOPHAGUS", 6: "LIVER",
            7: "STOMACH", 8: "AORTA", 9: "IVC", 10: "PS_VEIN", 11: "PANCREAS", 12: "AG_R", 13: "AG_L",
        },
        label_groups=(("right_kidney", "left_kidney"), ("liver", "spleen")),
        sep=(0, 6, 12, 18, 24, 30),
        body_threshold=1e-4,
        all_label_ids=tuple(range(14)),
        aliases=("sabs_ct", "btcv", "synapse", "ct"),
    )
)


def list_datasets() -> list[str]:
    """Registered dataset names (without aliases)."""
    return sorted({info.name for info in _REGISTRY.values()})


def get_dataset_info(name: str) -> DatasetInfo:
    """Look up a dataset by name or alias; unknown names raise :class:`ConfigError`."""
    key = name.lower()
    if key not in _REGISTRY:
        close = difflib.get_close_matches(key, list(_REGISTRY), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"config key 'data.dataset': unknown dataset '{name}'{hint}; valid: {', '.join(list_datasets())}")
    return _REGISTRY[key]


_SCAN_FILE_RE = re.compile(r"^(image|label)_(.+?)\.(nii\.gz|nii)$")
_NIFTI_RE = re.compile(r"\.nii(\.gz)?$", re.IGNORECASE)
_EXPECTED_PREFIXES = ("superpix-",)  # shipped pseudolabels: part of the layout, not listed as ignored
_LAYOUT = "image_<id>.nii.gz + label_<id>.nii.gz"


def scan_sort_key(scan_id: str) -> tuple[int, str]:
    """Sort key of scan ids: numeric ids numerically, then the others by name."""
    return (int(scan_id), scan_id) if scan_id.isdigit() else (1 << 30, scan_id)


@dataclass(frozen=True)
class IgnoredFile:
    """A NIfTI file of a data folder that is not part of a scan.

    Attributes:
        name: file name (in the listed folder).
        reason: why it is ignored, e.g. ``non-numeric id``.
        kind: ``unpaired`` (an image without label or a label without image), ``duplicate`` (a ``.nii``
            beside the ``.nii.gz`` of the same scan), ``non_numeric`` or ``unrecognised`` (another name).
    """

    name: str
    reason: str
    kind: str


@dataclass(frozen=True)
class ScanListing:
    """What a prepared folder holds: its scans and the NIfTI files it ignores.

    Attributes:
        root: the folder.
        scans: scan id -> ``(image path, label path)``, sorted numerically.
        ignored: NIfTI files that are not part of a scan, each with the reason, in name order.
    """

    root: Path
    scans: dict[str, tuple[Path, Path]]
    ignored: list[IgnoredFile]

    def note(self, kinds: tuple[str, ...] | None = None) -> str | None:
        """One line listing the ignored files (of ``kinds``; all by default), or None when there are none."""
        items = [f for f in self.ignored if kinds is None or f.kind in kinds]
        if not items:
            return None
        listed = ", ".join(f"{f.name} ({f.reason})" for f in items)
        return f"{self.root}: ignoring {len(items)} file(s) the prepared layout does not recognise: {listed}"

    def scan_ids(self) -> list[str]:
        """The scan ids, sorted numerically.

        Raises:
            DataError: the folder holds no image/label pair (the expected layout and any ignored files are named).
        """
        if not self.scans:
            other = ""
            if self.ignored:
                more = f" and {len(self.ignored) - 5} more" if len(self.ignored) > 5 else ""
                other = (f"; found {len(self.ignored)} other NIfTI file(s): "
                         f"{', '.join(f.name for f in self.ignored[:5])}{more}")
            raise DataError(f"{self.root}: no prepared volumes found; expected the prepared layout {_LAYOUT}"
                            f" (run 'fsl-med prepare' on the official download first){other}")
        return list(self.scans)

    def paths(self, scan_id: str) -> tuple[Path, Path]:
        """``(image path, label path)`` of one scan.

        Raises:
            DataError: the scan is not in the folder, or only its image or label is (the message names the file).
        """
        if scan_id in self.scans:
            return self.scans[scan_id]
        for f in self.ignored:
            if f.kind == "unpaired" and f.name.split(".")[0] in (f"image_{scan_id}", f"label_{scan_id}"):
                raise DataError(f"{self.root / f.name}: {f.reason}")
        raise DataError(f"{self.root / f'image_{scan_id}.nii.gz'}: file not found")


DEFAULT_ROOTS: dict[str, tuple[str, str]] = {
    "data/CHAOST2/chaos_MR_T2_normalized": (
        "FSL_MED_DATA_MRI", "make download-mri, then make prepare-mri SRC=data/downloads/CHAOS_Train_Sets.zip"),
    "data/SABS/sabs_CT_normalized": ("FSL_MED_DATA_CT", "make prepare-ct SRC=<the Synapse RawData/Training folder>"),
}
"""The default prepared folders (relative to the working folder: what ``make prepare-mri``/``prepare-ct`` write and
``experiments/mri.yaml``/``ct.yaml`` read unless their variable is set): variable and how to get the data."""


def default_mri_root() -> Path:
    """The prepared CHAOS-T2 folder used when none is given: ``$FSL_MED_DATA_MRI``, else the folder
    ``make prepare-mri`` writes (``data/CHAOST2/chaos_MR_T2_normalized``). It may not exist (see
    :func:`missing_data_hint`)."""
    default = next(iter(DEFAULT_ROOTS))
    return Path(os.environ.get(DEFAULT_ROOTS[default][0]) or default)


def missing_data_hint(root: str | Path) -> str:
    """How to get the data of a missing data folder: for a default folder, the make targets that write it and
    its variable; for any other, how to point at the data. One clause, no trailing full stop."""
    key = Path(root).as_posix()
    if key in DEFAULT_ROOTS:
        var, how = DEFAULT_ROOTS[key]
        return f"the default folder; get the data with `{how}`, or set {var} or DATA= to a prepared folder"
    return "set data.root or DATA= to a prepared folder"


def mri_data_folder(data: str | Path | None, flag: str = "--data") -> Path:
    """The prepared CHAOS-T2 folder a command reads: ``data`` when given, else :func:`default_mri_root`.

    Raises:
        DataError: the folder does not exist (one line naming it, the flag and how to get the data).
    """
    root = Path(data) if data else default_mri_root()
    if not root.is_dir():
        hint = "a prepared CHAOS-T2 folder; set DATA= or FSL_MED_DATA_MRI" if data else missing_data_hint(root)
        raise DataError(f"{flag} {root}: folder not found ({hint})")
    return root


def scan_files(root: str | Path) -> ScanListing:
    """List the scans of a prepared folder and the NIfTI files it ignores (the one rule every reader uses).

    Rules: a scan is ``image_<id>`` + ``label_<id>`` with a numeric id, each stored as ``.nii.gz`` or ``.nii``
    (when both exist, ``.nii.gz`` is used and the ``.nii`` is ignored). Ignored and listed: non-numeric ids,
    an image without a label, a label without an image, and any other ``*.nii``/``*.nii.gz`` file.
    Not listed: other files (``manifest.json``, ``classmap_1.json``, READMEs), shipped ``superpix-*``
    pseudolabels and hidden files (e.g. temporaries of an interrupted write).

    Raises:
        DataError: the folder is missing or not a folder.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"data folder not found: {root} ({missing_data_hint(root)})")
    if not root.is_dir():
        raise DataError(f"data.root is not a folder: {root}")
    ignored: list[IgnoredFile] = []
    found: dict[tuple[str, str], dict[str, Path]] = {}
    try:
        entries = sorted(root.iterdir(), key=lambda q: q.name)
    except OSError as e:
        raise DataError(f"{root}: cannot list the folder ({e.strerror or e})") from e
    for p in entries:
        name = p.name
        if name.startswith(".") or not _NIFTI_RE.search(name) or name.startswith(_EXPECTED_PREFIXES):
            continue
        m = _SCAN_FILE_RE.match(name)
        if not m:
            ignored.append(IgnoredFile(name, "not named image_<id>.nii[.gz] or label_<id>.nii[.gz]", "unrecognised"))
        elif not re.fullmatch(r"[0-9]+", m.group(2)):
            ignored.append(IgnoredFile(name, "non-numeric id", "non_numeric"))
        else:
            found.setdefault((m.group(1), m.group(2)), {})[m.group(3)] = p
    chosen: dict[tuple[str, str], Path] = {}
    for key, by_ext in found.items():
        chosen[key] = by_ext.get("nii.gz") or by_ext["nii"]
        if len(by_ext) > 1:
            ignored.append(IgnoredFile(by_ext["nii"].name, "a .nii.gz of the same scan exists", "duplicate"))
    scans: dict[str, tuple[Path, Path]] = {}
    for sid in sorted({sid for _, sid in chosen}, key=scan_sort_key):
        img, lab = chosen.get(("image", sid)), chosen.get(("label", sid))
        if img is not None and lab is not None:
            scans[sid] = (img, lab)
        elif img is not None:
            ignored.append(IgnoredFile(img.name, f"no matching label_{sid}.nii.gz", "unpaired"))
        elif lab is not None:
            ignored.append(IgnoredFile(lab.name, f"no matching image_{sid}.nii.gz", "unpaired"))
    ignored.sort(key=lambda f: f.name)
    return ScanListing(root=root, scans=scans, ignored=ignored)


def discover_scans(root: str | Path) -> list[str]:
    """Scan ids of a prepared folder (``image_{id}`` with a matching ``label_{id}``, see :func:`scan_files`),
    sorted numerically. Files the layout does not recognise are skipped (:meth:`ScanListing.note` lists them).

    Raises:
        DataError: the folder is missing, not a folder, or holds no image/label pair (the expected prepared
            layout is named in the message).
    """
    return scan_files(root).scan_ids()


@dataclass(frozen=True)
class FoldSplit:
    """Scan ids of one fold: training scans, evaluation (query) scans and the support scan."""

    train: list[str]
    query: list[str]
    support: str


def parse_support_pick(value: str) -> int | None:
    """``eval.support_pick`` as the support's 0-based position in the fold's group (ascending scan order): ``None``
    for ``next``, -1 for ``group_last``, N for ``group_index:N``.

    Raises:
        ConfigError: any other value (one line naming the key).
    """
    m = SUPPORT_PICK_RE.fullmatch(str(value))
    if m is None:
        raise ConfigError(f"config key 'eval.support_pick': must be next, group_last or group_index:N (N = 0-based "
                          f"position in the fold's group), got '{value}'")
    if value == "next":
        return None
    return -1 if value == "group_last" else int(m.group(1))


def fold_split(info: DatasetInfo, scan_ids: list[str], fold: int, support_pick: str = "next") -> FoldSplit:
    """The reference split of ``scan_ids`` (sorted) for ``fold``.

    Fold k's evaluation group is the scans at sorted positions ``sep[k] .. sep[k+1] + n_support - 1`` (the last one
    wraps to position 0 in the last fold). Every other scan is a training scan, whichever support is picked, so the
    fold's query and support scans are never trained on. ``support_pick`` (``eval.support_pick``; docs "Methods":
    Each paper's protocol as fields) chooses the support among the group:

    * ``next`` (SSL-ALPNet, fsl_med): the group in circular order, the last one (the scan after the queries) is the
      support; CHAOS-T2 fold 0: queries 1, 2, 3, 5, support 8; fold 4: queries 36-39, support 1;
    * ``group_last`` (ADNet's ``get_folds`` sets, listed in ascending scan order): the group's highest position;
      folds 0-3 as ``next``, fold 4: support 39, queries 1, 36, 37, 38;
    * ``group_index:N`` (Q-Net / RPT's ``supp_idx``): the N-th (0-based) of the group in ascending order; N = 2,
      fold 0: support 3, queries 1, 2, 5, 8.

    With ``group_*`` the queries are the rest of the group, ascending. The groups equal the lineage's ``get_folds``
    for CHAOS-T2 (5 scans each) and SABS (7 each). With fewer scans than the dataset's standard count (e.g. a
    phantom or a subset), the fold boundaries are scaled proportionally so that every fold still has >= 1 query
    scan and 1 support scan.

    Raises:
        ConfigError: ``fold`` is out of range, ``support_pick`` is invalid or ``group_index:N`` lies beyond the group.
        DataError: too few scans to form a fold (needs at least n_folds + 1... in practice 3).
    """
    if not 0 <= fold < info.n_folds:
        raise ConfigError(f"config key 'data.fold': must be in 0..{info.n_folds - 1}, got {fold}")
    pick = parse_support_pick(support_pick)
    ids = sorted(scan_ids, key=scan_sort_key)
    n = len(ids)
    if n < 3:
        raise DataError(f"need at least 3 scans to split into train/query/support, found {n}")
    standard = info.sep[-1]
    if n == standard:
        sep = list(info.sep)
    else:
        sep = [round(s * n / standard) for s in info.sep]
    start, stop = sep[fold], sep[fold + 1]
    if stop <= start:
        stop = start + 1
    val = [ids[i % n] for i in range(start, stop + info.n_support)]
    if pick is None:
        support = val[-1]
        query = val[:-1]
    else:
        group = sorted(set(val), key=scan_sort_key)
        if not -len(group) <= pick < len(group):
            raise ConfigError(f"config key 'eval.support_pick': {support_pick} is outside fold {fold}'s group of "
                              f"{len(group)} {info.name} scans ({', '.join(group)}); N must be 0..{len(group) - 1}")
        support = group[pick]
        query = [s for s in group if s != support]
    train = [s for s in ids if s not in val]
    if not train:
        raise DataError(f"fold {fold}: no training scans left out of {n}")
    return FoldSplit(train=train, query=query, support=support)


def validation_split(train: list[str], num_val: int) -> tuple[list[str], list[str]]:
    """``(training scans, validation scans)``: the last ``num_val`` of a fold's training scans are held out for
    validation, as long as one scan remains for training; otherwise there is no validation (``[]``)."""
    train = list(train)
    if num_val > 0 and len(train) > num_val:
        return train[:-num_val], train[-num_val:]
    return train, []


def check_data_settings(cfg: Any) -> DatasetInfo:
    """Check ``cfg.data``'s dataset name, fold and test organs (and ``cfg.protocol.folds``) against the registry;
    returns the dataset.

    Raises:
        ConfigError: unknown dataset or organ (with the closest valid name), a fold out of range, or an
            ``eval.support_pick=group_index:N`` beyond a checked fold's group of the dataset's standard layout.
    """
    info = get_dataset_info(cfg.data.dataset)
    if not 0 <= cfg.data.fold < info.n_folds:
        raise ConfigError(f"config key 'data.fold': must be in 0..{info.n_folds - 1}, got {cfg.data.fold}")
    folds = list(cfg.protocol.folds) if "protocol" in cfg else []
    if not all(0 <= f < info.n_folds for f in folds):
        raise ConfigError(f"config key 'protocol.folds': must be a non-empty list of folds in 0..{info.n_folds - 1}, "
                          f"got {folds}")
    for organ in cfg.data.test_organs:
        if organ not in info.labels:
            close = difflib.get_close_matches(organ, list(info.labels), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(
                f"config key 'data.test_organs': unknown organ '{organ}'{hint}; valid: {', '.join(info.labels)}"
            )
    pick = parse_support_pick(str(cfg.eval.support_pick)) if "eval" in cfg else None
    for fold in sorted({int(cfg.data.fold), *folds}):  # the standard layout's group; a smaller folder is checked by fold_split
        size = info.sep[fold + 1] - info.sep[fold] + info.n_support
        if pick is not None and pick >= size:
            raise ConfigError(f"config key 'eval.support_pick': {cfg.eval.support_pick} is outside fold {fold}'s "
                              f"group of {size} {info.name} scans; N must be 0..{size - 1}")
    explicit = cfg.data.get("exclude_labels")
    valid = [x for x in info.all_label_ids if x != 0]
    if explicit is not None and not all(isinstance(x, int) and x in valid for x in explicit):
        raise ConfigError(f"config key 'data.exclude_labels': must be label ids of {info.name} ({valid}), "
                          f"got {list(explicit)}")
    return info


def excluded_labels(cfg: Any) -> list[int]:
    """Label ids whose slices are dropped from training: in Setting 2 ``data.exclude_labels`` when set, else the
    test organs'; none in Setting 1."""
    if cfg.data.setting == 1:
        return []
    if cfg.data.get("exclude_labels") is not None:
        return sorted(int(x) for x in cfg.data.exclude_labels)
    info = get_dataset_info(cfg.data.dataset)
    return sorted(info.labels[o] for o in cfg.data.test_organs)
