"""The EP1 evaluation protocol (method.md §5): support slices per part and query slice ranges.

1-way 1-shot: the organ's extent in the support scan is split into ``npart`` parts and the middle slice
of each part is a support slice; a query slice at relative position p in the query organ's extent uses
the support slice of part ``floor(p * npart)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fsl_med.errors import DataError


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


def query_plan(organ_mask_per_slice: np.ndarray, npart: int = 3, z_margin: int = 0,
               skip_no_organ_slices: bool = False) -> QueryPlan:
    """Slices of a query scan scored for one organ.

    Args:
        organ_mask_per_slice: ``[Z]`` bool, whether each slice of the query label has the organ.
        npart: number of support parts.
        z_margin: extra slices scored beyond the organ extent on each side (0 in the protocol).
        skip_no_organ_slices: skip slices inside the extent without the organ ([D]'s variant).
    Returns:
        A :class:`QueryPlan`; empty (``len(z) == 0``) when the organ is absent from the scan.
    """
    present = np.flatnonzero(organ_mask_per_slice)
    if present.size == 0:
        return QueryPlan(z=np.zeros(0, dtype=np.int64), part=np.zeros(0, dtype=np.int64))
    z_min, z_max = int(present[0]), int(present[-1])
    lo = max(0, z_min - z_margin)
    hi = min(len(organ_mask_per_slice) - 1, z_max + z_margin)
    z = np.arange(lo, hi + 1)
    if skip_no_organ_slices:
        z = z[organ_mask_per_slice[z]]
    span = (z_max - z_min) / npart
    if span > 0:
        part = np.floor((z - z_min) / span).astype(np.int64)
    else:
        part = np.zeros_like(z)
    part = np.clip(part, 0, npart - 1)
    return QueryPlan(z=z.astype(np.int64), part=part)
