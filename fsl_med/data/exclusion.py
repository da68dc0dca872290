"""Setting 2's training-slice exclusion (method.md §1.1; docs "Methods": Each paper's protocol as fields): the one
rule every kind of training episode applies (2D superpixel episodes and 3D supervoxel adjacent-slice episodes alike).

``data.exclude_rule``:

* ``any`` (SSL-ALPNet, fsl_med's default): a training slice is dropped when it contains **any** excluded label,
  so no test organ is ever seen in training;
* ``all`` (the Q-Net / RPT / CAT-Net / GMRD code, a boolean AND started from all-true): a slice is dropped only
  when it contains **every** excluded label. With one excluded label both rules agree.

On the 20 CHAOS-T2 label volumes (718 slices) ``any`` drops 463 / 324 / 558 slices for liver+spleen / kidneys /
all four labels, ``all`` drops 272 / 261 / 88 (``scripts/setting2_exclusion.py`` measures it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import get_args

import numpy as np

from fsl_med.config import ExcludeRule
from fsl_med.errors import ConfigError, DataError

EXCLUDE_RULES: tuple[str, ...] = get_args(ExcludeRule)
"""The values of ``data.exclude_rule``: ``any``, ``all``."""


def check_exclude_rule(rule: str) -> str:
    """``rule`` when it is a valid ``data.exclude_rule``; otherwise a one-line :class:`ConfigError`."""
    if rule not in EXCLUDE_RULES:
        raise ConfigError(f"config key 'data.exclude_rule': must be one of {', '.join(EXCLUDE_RULES)}, got '{rule}'")
    return rule


def excluded_slices(label: np.ndarray, labels: Sequence[int], rule: str = "any") -> np.ndarray:
    """Which slices of a label volume Setting 2 removes from training.

    Args:
        label: ``[Z, H, W]`` integer label volume (not modified).
        labels: the excluded label ids (:func:`fsl_med.prepare.datasets.excluded_labels`); empty in Setting 1.
        rule: ``any`` (drop a slice holding any of ``labels``) or ``all`` (only one holding every one of them).
    Returns:
        ``[Z]`` bool, True for a slice to drop; all False when ``labels`` is empty (either rule), or with ``all``
        when some excluded label occurs nowhere in the volume.
    Raises:
        ConfigError: an unknown rule.
        DataError: ``label`` is not a 3-D array.
    """
    check_exclude_rule(rule)
    arr = np.asarray(label)
    if arr.ndim != 3:
        raise DataError(f"Setting-2 exclusion needs a [Z, H, W] label volume, got shape {tuple(arr.shape)}")
    z = arr.shape[0]
    ids = sorted({int(x) for x in labels})
    if not ids:
        return np.zeros(z, dtype=bool)
    flat = arr.reshape(z, -1)
    present = np.stack([(flat == i).any(axis=1) for i in ids])  # [n labels, Z]
    return present.any(axis=0) if rule == "any" else present.all(axis=0)


def exclusion_note(labels: Sequence[int], rule: str, dropped: int, total: int) -> str:
    """The run log's one line on Setting 2, e.g. ``setting 2 (exclude_rule=all, labels [1, 2, 3, 4]): dropped 88 of
    718 training slices (12.3 %)``."""
    pct = f" ({100.0 * dropped / total:.1f} %)" if total else ""
    return (f"setting 2 (exclude_rule={rule}, labels {sorted(int(x) for x in labels)}): dropped {dropped} of {total} "
            f"training slices{pct}")
