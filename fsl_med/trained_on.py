"""The leakage guard: what a model was trained on (:class:`~fsl_med.data.provenance.TrainedOn`, read from a checkpoint
by :func:`fsl_med.checkpoints.checkpoint_trained_on`) decides the data settings an evaluation or a resumed training
takes, refuses to resume on another data folder, and refuses to score scans the model trained or validated on."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fsl_med.data.provenance import TrainedOn, scans_seen
from fsl_med.run_config import is_explicit, validate_run

log = logging.getLogger(__name__)


DATA_KEYS_FROM_CHECKPOINT = ("data.fold", "data.setting", "data.test_organs")
"""The data settings evaluation (and resumed training) take from a checkpoint unless given on the command line."""


def adopt_checkpoint_data(cfg: DictConfig, trained: TrainedOn | None, path: Path,
                          explicit: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """``cfg`` with ``data.fold``, ``data.setting`` and ``data.test_organs`` taken from what the checkpoint was trained
    on, except those given on the command line (``explicit``); one note lists what was taken. A checkpoint of
    another dataset (cross-domain evaluation) gives nothing. Returns a new validated config (``cfg`` untouched)."""

    if trained is None or trained.dataset != cfg.data.dataset:
        return cfg
    values = {"data.fold": trained.fold, "data.setting": trained.setting, "data.test_organs": list(trained.test_organs)}
    new = cfg.copy()
    taken = []
    for key in DATA_KEYS_FROM_CHECKPOINT:
        ours = OmegaConf.select(cfg, key)
        ours = list(ours) if key == "data.test_organs" else ours
        if ours == values[key] or is_explicit(key, explicit):
            continue
        OmegaConf.update(new, key, values[key], merge=False)
        taken.append(f"{key}={values[key]} (config: {ours})")
    if taken:
        log.warning("note: as the checkpoint %s was trained, taken from it: %s (give them on the command line to "
                    "override)", path, ", ".join(taken))
        validate_run(new)
    return new


def check_resume_data(cfg: DictConfig, trained: TrainedOn | None, trained_root: str, path: Path) -> None:
    """Refuse to resume a run on a data folder holding other scans than the one it trained on (a copy of the folder
    elsewhere is the same data), unless ``resume_allow_other_data=true`` (then one warning says so).

    Args:
        cfg: the new run's config (``data.root``, ``resume_allow_other_data``).
        trained: the checkpoint's record of its data (None or without a fingerprint: nothing to compare).
        trained_root: the checkpoint's ``data.root``, for the message.
        path: the checkpoint.
    Raises:
        DataError: one line naming both folders and what differs.
    """
    from fsl_med.data.provenance import folder_fingerprint, label_digest
    from fsl_med.errors import DataError
    from fsl_med.prepare.datasets import scan_files

    if trained is None or not trained.fingerprint:
        return
    if trained.dataset != cfg.data.dataset:
        what = f"dataset {trained.dataset}, this run's data.dataset is {cfg.data.dataset}"
    else:
        scans = scan_files(cfg.data.root).scans
        if folder_fingerprint(scans) == trained.fingerprint:
            return
        seen = {**trained.val_scans, **trained.train_scans}
        missing = [s for s in seen if s not in scans]
        other = [s for s, d in seen.items() if s in scans and d is not None and label_digest(scans[s][1]) != d]
        bits = [f"scan(s) {', '.join(missing)} it trained on are missing"] if missing else []
        bits += [f"scan(s) {', '.join(other)} have other label files"] if other else []
        what = "; ".join(bits) or f"{len(scans)} scans whose ids or file sizes differ from the run's folder"
    same = Path(trained_root).expanduser().resolve() == Path(cfg.data.root).expanduser().resolve()
    now = f"now holds other data ({what})" if same else f"holds other data ({what})"
    line = f"resume={path}: the run trained on data.root {trained_root}, and data.root {cfg.data.root} {now}"
    if cfg.resume_allow_other_data:
        log.warning("%s; continuing on it (resume_allow_other_data=true): the checkpoint records both", line)
        return
    raise DataError(f"{line}; resuming would mix two datasets in one model: give the run's data.root, start a new "
                    "run, or set resume_allow_other_data=true")


def in_sample_scans(cfg: DictConfig, trained: TrainedOn | None, dm: Any, source: str) -> str | None:
    """Refuse to score, or take the fold's support from, scans the model trained or validated on. (The extra support
    scans of k-shot evaluation from scans are the fold's first training scans by design and are not checked.)

    Args:
        cfg: the evaluation config (``eval.allow_train_scans`` permits it).
        trained: what the model was trained on (None: untrained or unknown, nothing to check).
        dm: the evaluation's :class:`~fsl_med.data.datamodule.FewShotDataModule` (its split is resolved here).
        source: what the model is, for the message (``checkpoint <path>`` or ``the trained model``).
    Returns:
        None when no evaluated scan was seen in training; with ``eval.allow_train_scans=true`` the line the report
        and ``results.json`` begin with.
    Raises:
        DataError: a query or support scan was trained or validated on (one line naming the scans).
    """
    from fsl_med.errors import DataError

    if trained is None or trained.dataset != cfg.data.dataset:
        return None
    fingerprint = dm.fingerprint()
    assert dm.split is not None
    # the fold's support scan; k-shot's extra support scans are the fold's training scans by design (support_ids)
    overlap = scans_seen(trained, fingerprint, {s: p[1] for s, p in dm.scan_paths.items()}, dm.split.query,
                         [dm.split.support])
    if overlap.uncertain:
        log.warning("%s was trained on another data folder of %s whose scans %s share ids with scans evaluated here "
                    "but have other label files (other patients, or prepared differently): not counted as seen",
                    source, trained.dataset, ", ".join(overlap.uncertain))
    if not overlap:
        return None
    what = (f"{source} was trained on fold {trained.fold} (setting {trained.setting}) of {trained.dataset}; "
            f"evaluating fold {cfg.data.fold} uses {overlap.describe()}")
    if cfg.eval.allow_train_scans:
        line = f"IN-SAMPLE evaluation (eval.allow_train_scans=true): {what}; these Dice are not a test result"
        log.warning("%s", line)
        return line
    raise DataError(f"{what}: that would be in-sample Dice; evaluate fold {trained.fold} (drop the "
                    "data.fold override) or set eval.allow_train_scans=true for a deliberate in-sample analysis")
