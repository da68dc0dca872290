"""The EP1 evaluation protocol (method.md §5): support slices per part, query slice ranges, and the evaluation
items (:class:`EvalItem`, one per query volume and organ, built by :func:`build_eval_items`).

1-way 1-shot: the organ's extent in the support scan is split into ``npart`` parts and the middle slice
of each part is a support slice; a query slice at relative position p in the query organ's extent uses
the support slice of part ``floor(p * npart)`` (``eval.part_rule=extent``), or, with ``eval.part_rule=count``
(the ADNet lineage), the part of its chunk when the organ-containing slices are cut into ``npart`` chunks by count
(:func:`count_parts`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import get_args

import numpy as np

from fsl_med.config import PartRule
from fsl_med.data.volumes import Normalizer, Volume, slice_input
from fsl_med.errors import ConfigError, DataError
from fsl_med.prepare.datasets import DatasetInfo

PART_RULES: tuple[str, ...] = get_args(PartRule)
"""The values of ``eval.part_rule``: ``extent`` (SSL-ALPNet, fsl_med), ``count`` (the ADNet lineage)."""


def support_slice_indices(organ_slices: np.ndarray, npart: int = 3) -> list[int]:
    """z indices of the support slices, one per part.

    Args:
        organ_slices: sorted z indices of the support scan that contain the organ.
        npart: number of parts (3 in the protocol).
    Returns:
        ``[organ_slices[int(pct_i * n)] for pct_i in (1/(2 npart), 3/(2 npart), ...)]``, i.e. for npart 3
        the slices at 1/6, 1/2 and 5/6 of the extent.
    Raises:
        DataError: the organ is absent (no slices).
    """
    n = len(organ_slices)
    if n == 0:
        raise DataError("organ absent from the support scan")
    pcts = [(2 * i + 1) / (2 * npart) for i in range(npart)]
    return [int(organ_slices[min(int(p * n), n - 1)]) for p in pcts]


def support_slices_per_part(organ_slices: np.ndarray, npart: int = 3, shots: int = 1) -> list[list[int]]:
    """Support slices of each part: EP1's middle slice (``shots == 1``), or ``shots`` slices spread within each
    part, the middles of ``shots`` equal sub-parts (the EP1 choice with ``npart * shots`` parts).

    Returns:
        ``npart`` lists of ``shots`` z indices.
    Raises:
        DataError: the organ is absent, or spans fewer than ``npart * shots`` slices.
    """
    if shots == 1:
        return [[z] for z in support_slice_indices(organ_slices, npart)]
    n = len(organ_slices)
    if n < npart * shots:
        raise DataError(f"the support organ spans only {n} slice(s), fewer than {npart} parts x {shots} shots = "
                        f"{npart * shots}")
    flat = support_slice_indices(organ_slices, npart * shots)
    return [flat[p * shots:(p + 1) * shots] for p in range(npart)]


@dataclass(frozen=True)
class QueryPlan:
    """Which query slices are scored and which support part each uses.

    Attributes:
        z: query slice indices, ascending.
        part: the support part of each slice, same length as ``z``.
    """

    z: np.ndarray
    part: np.ndarray


def count_parts(n_slices: int, npart: int = 3) -> np.ndarray:
    """Support part of each of ``n_slices`` organ-containing query slices under ``eval.part_rule=count`` (the ADNet
    lineage; docs "Methods": Each paper's protocol as fields): the slices, in z order, are cut into ``npart`` chunks
    at ``linspace(0, n_slices, npart + 1)`` truncated to integers.

    Args:
        n_slices: C, the number of organ-containing slices (>= 0).
        npart: number of support parts (>= 1).
    Returns:
        ``[C]`` int64 parts in 0..npart-1, non-decreasing. C = 11, npart = 3 gives chunks of 3/4/4 slices
        (``extent`` gives 4/3/4 on a contiguous organ). With C < npart some chunks are empty and the leading
        parts are skipped (C = 2 gives parts 1, 2; C = 1 gives part 2), as the reference's loop over empty chunks.
    Raises:
        ValueError: ``n_slices < 0`` or ``npart < 1``.
    """
    if n_slices < 0 or npart < 1:
        raise ValueError(f"count_parts needs n_slices >= 0 and npart >= 1, got {n_slices} and {npart}")
    bounds = np.linspace(0, n_slices, npart + 1).astype(np.int64)
    part = np.searchsorted(bounds, np.arange(n_slices), side="right") - 1
    return np.clip(part, 0, npart - 1).astype(np.int64)


def query_plan(organ_mask_per_slice: np.ndarray, npart: int = 3, z_margin: int = 0,
               skip_no_organ_slices: bool = False, score_last_slice: bool = True,
               part_rule: str = "extent") -> QueryPlan:
    """Slices of a query scan scored for one organ.

    Args:
        organ_mask_per_slice: ``[Z]`` bool, whether each slice of the query label has the organ.
        npart: number of support parts.
        z_margin: extra slices scored beyond the organ extent on each side (0 in the protocol).
        skip_no_organ_slices: skip slices inside the extent without the organ ([D]'s variant).
        score_last_slice: false drops the scan's last slice after the parts are assigned, as the reference's
            validation loop does (it skips ``is_end``; ``compat=reference``); the other slices keep their parts.
        part_rule: ``extent`` (SSL-ALPNet): part ``floor((z - z_min) / ((z_max - z_min) / npart))``, clamped.
            ``count`` (ADNet, Q-Net, RPT): the C organ-containing slices are cut into chunks by
            :func:`count_parts`; any other scored slice (inside the extent without the organ, or within
            ``z_margin``, both absent from the lineage's protocol, which scores organ-containing slices only) takes
            the part of the nearest organ-containing slice, the lower one on a tie. The organ-containing slices
            thus get the lineage's parts whatever ``skip_no_organ_slices`` and ``z_margin`` say.
    Returns:
        A :class:`QueryPlan`; empty (``len(z) == 0``) when the organ is absent from the scan.
    Raises:
        ConfigError: an unknown ``part_rule``.
    """
    if part_rule not in PART_RULES:
        raise ConfigError(f"config key 'eval.part_rule': must be one of {', '.join(PART_RULES)}, got '{part_rule}'")
    present = np.flatnonzero(organ_mask_per_slice)
    if present.size == 0:
        return QueryPlan(z=np.zeros(0, dtype=np.int64), part=np.zeros(0, dtype=np.int64))
    z_min, z_max = int(present[0]), int(present[-1])
    lo = max(0, z_min - z_margin)
    hi = min(len(organ_mask_per_slice) - 1, z_max + z_margin)
    z = np.arange(lo, hi + 1)
    if skip_no_organ_slices:
        z = z[organ_mask_per_slice[z]]
    if part_rule == "count":
        organ_part = count_parts(present.size, npart)
        after = np.clip(np.searchsorted(present, z), 0, present.size - 1)  # first organ slice >= z (or the last)
        before = np.clip(after - 1, 0, present.size - 1)
        nearest = np.where(np.abs(z - present[before]) <= np.abs(present[after] - z), before, after)
        part = organ_part[nearest]
    else:
        span = (z_max - z_min) / npart
        if span > 0:
            part = np.floor((z - z_min) / span).astype(np.int64)
        else:
            part = np.zeros_like(z)
        part = np.clip(part, 0, npart - 1)
    if not score_last_slice:
        keep = z != len(organ_mask_per_slice) - 1
        z, part = z[keep], part[keep]
    return QueryPlan(z=z.astype(np.int64), part=part.astype(np.int64))


@dataclass(frozen=True)
class EvalItem:
    """One query volume scored for one organ (EP1).

    Attributes:
        organ, label_id: the organ and its label id.
        query_id, support_id: scan ids.
        query_images: ``[n, H, W]`` float32 normalised query slices (``[n, 3, H, W]`` with 3-slice input),
            ``z`` their indices.
        query_labels: ``[n, H, W]`` uint8 binary ground truth of the organ.
        part: ``[n]`` support part of each query slice.
        support_images: ``[npart * shots, H, W]`` float32, part-major (``[.., 3, H, W]`` with 3-slice input);
            ``support_masks``: ``[npart * shots, H, W]`` binary; ``shots``: support slices per part.
        support_z: z indices of the support slices (in their own support scans).
        spacing: ``(z, y, x)`` voxel size of the query scan in mm.
        query_path: the query's prepared image file (its grid and affine, for prediction files).
    """

    organ: str
    label_id: int
    query_id: str
    support_id: str
    query_images: np.ndarray
    query_labels: np.ndarray
    z: np.ndarray
    part: np.ndarray
    support_images: np.ndarray
    support_masks: np.ndarray
    support_z: list[int]
    spacing: tuple[float, float, float]
    shots: int = 1
    query_path: str = ""


def build_eval_items(support: Volume | Sequence[Volume], queries: list[Volume], organs: list[str],
                     info: DatasetInfo, normalize: Normalizer, npart: int = 3, z_margin: int = 0,
                     skip_no_organ_slices: bool = False, shots: int = 1, shots_source: str = "scans",
                     three_slices: bool = False, score_last_slice: bool = True, part_rule: str = "extent"
                     ) -> tuple[list[EvalItem], list[tuple[str, str]]]:
    """EP1 items for every (organ, query scan), 1-shot or k-shot.

    Args:
        support: the fold's support scan, or (k-shot from scans) ``shots`` support scans, the fold's first.
        shots: support slices per part; ``shots_source`` ``scans`` takes each part's EP1 slice from each of
            the ``shots`` support scans, ``slices`` takes ``shots`` slices per part from the first support scan
            (:func:`support_slices_per_part`). ``shots == 1`` is the 1-shot protocol exactly.
        three_slices: slices become ``[3, H, W]`` stacks (z-1, z, z+1; zeros beyond the volume).
        score_last_slice, part_rule: see :func:`query_plan`.
    Returns:
        ``(items, skipped)`` where ``skipped`` lists ``(query_id, organ)`` pairs whose organ is absent
        from the query scan (they are reported, never scored). Items come query-major.
    Raises:
        DataError: an organ is absent from a support scan (names scan and organ), or spans too few slices
            for ``shots`` slices per part.
    """
    sups = [support] if isinstance(support, Volume) else list(support)
    if shots_source == "scans" and len(sups) != shots:
        raise ValueError(f"{shots}-shot from scans needs {shots} support scans, got {len(sups)}")
    sups = sups if shots_source == "scans" else sups[:1]
    items: list[EvalItem] = []
    skipped: list[tuple[str, str]] = []
    sup_norm = [slice_input(normalize(v.image, v.path, v.stored_stats), three_slices) for v in sups]
    support_id = "+".join(v.scan_id for v in sups)
    supports = {}
    for organ in organs:
        lid = info.labels[organ]
        picks: list[list[tuple[int, int]]] = [[] for _ in range(npart)]  # per part: (support scan, z)
        for i, v in enumerate(sups):
            organ_slices = v.slices_with(lid)
            if organ_slices.size == 0:
                raise DataError(f"support scan {v.path}: organ '{organ}' (label {lid}) is absent")
            try:
                per_part = support_slices_per_part(organ_slices, npart, shots if shots_source == "slices" else 1)
            except DataError as err:
                raise DataError(f"support scan {v.path}, organ '{organ}': {err} (shots={shots})") from err
            for p, zs in enumerate(per_part):
                picks[p] += [(i, z) for z in zs]
        flat = [iz for part in picks for iz in part]  # part-major
        s_imgs = np.stack([sup_norm[i][z] for i, z in flat])
        s_masks = np.stack([(sups[i].label[z] == lid).astype(np.uint8) for i, z in flat])
        supports[organ] = (lid, [z for _, z in flat], s_imgs, s_masks)
    # query-major order: the organs of one query scan follow each other, so its slice features are shared
    for q in queries:
        q_norm = slice_input(normalize(q.image, q.path, q.stored_stats), three_slices)
        for organ in organs:
            lid, sz, s_imgs, s_masks = supports[organ]
            per_slice = (q.label == lid).reshape(q.label.shape[0], -1).any(axis=1)
            plan = query_plan(per_slice, npart, z_margin, skip_no_organ_slices, score_last_slice, part_rule)
            if plan.z.size == 0:
                skipped.append((q.scan_id, organ))
                continue
            contiguous = bool(np.all(np.diff(plan.z) == 1))  # then a view: the organs share the scan's slices
            q_imgs = q_norm[plan.z[0]:plan.z[-1] + 1] if contiguous else q_norm[plan.z]
            items.append(EvalItem(
                organ=organ, label_id=lid, query_id=q.scan_id, support_id=support_id,
                query_images=q_imgs, query_labels=(q.label[plan.z] == lid).astype(np.uint8),
                z=plan.z, part=plan.part, support_images=s_imgs, support_masks=s_masks, support_z=sz,
                spacing=q.spacing, shots=shots, query_path=str(q.path),
            ))
    return items, skipped
