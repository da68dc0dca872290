"""3D supervoxel pseudolabels (``data.episodes=supervoxel3d``; the ADNet lineage; docs "Methods": Each
paper's protocol as fields).

One Felzenszwalb-Huttenlocher graph segmentation of the whole volume, as the ADNet reference does it:

* the volume is rescaled to 0..255 (its own min and max), optionally smoothed (``sigma``, per axis divided by the
  voxel spacing; 0 = none, the reference's setting);
* the graph joins every voxel to its 26 neighbours (13 directions). An edge's weight is ``sqrt(w) * |I_a - I_b|``
  with ``w`` from the through-plane / in-plane spacing ratio ``s = dz / dx``: 1 in-plane (diagonals too), ``s**2``
  straight along z, ``(1 + s**2) / 2`` for z plus one in-plane step, ``(2 + s**2) / 3`` for z plus two;
* edges are visited in increasing weight; two segments merge when the weight is below both segments' internal
  difference plus ``scale / 255 / size`` (``scale`` 1; the thresholds rounded to float32 as the reference's
  ``float`` variables); then segments below ``min_size`` voxels are merged along the edges in the same order;
* the background is removed per slice: rescaled intensity > 10, largest 8-connected component, holes filled
  (:func:`fsl_med.data.superpixels.body_mask`); supervoxel ids are consecutive ``1..N`` inside, 0 outside.

The exact sequential algorithm is computed with far fewer sequential steps (identical result, see
:func:`felzenszwalb_3d`): zero-weight edges always merge (connected components), the merge pass stops as soon as
no later edge can pass any threshold, and the size pass only needs the Kruskal spanning forest of the segment graph
(``scipy``). The remaining loops run as plain Python, or compiled with numba when it is installed (the optional
extra ``pip install fsl-med[fast]``); both give the same labels. Edges of equal weight are visited in the order
the graph lists them (a stable sort; the reference's unstable quicksort order is machine-dependent).

Supervoxels are cached under ``data.cache_dir``/supervoxels like the 2D superpixels: the file name holds a hash of
the image file, the parameters, the volume's size and spacing and :data:`CACHE_VERSION`; writes are atomic and one
job computes an entry while others wait for it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components, minimum_spanning_tree

from fsl_med.atomic import sha256_file
from fsl_med.config import SupervoxelConfig
from fsl_med.data.superpixels import body_mask
from fsl_med.data.volume_cache import VolumeCache
from fsl_med.errors import DataError

log = logging.getLogger(__name__)

CACHE_VERSION = 2
FOREGROUND_THRESHOLD = 10.0
"""Background removal: a voxel is body when its intensity, rescaled to 0..255 over the volume, exceeds this."""
SCALE = 1.0
"""Felzenszwalb's ``scale`` (k = scale / 255 on the 0..255 image); the reference never changes it."""
ENGINES = ("auto", "python", "numba")
SUPERVOXEL_CACHE = VolumeCache("supervoxel", "supervoxels", logger=__name__)
"""The supervoxel cache (:mod:`fsl_med.data.volume_cache`): ``<cache_dir>/supervoxels/<image>-<key>.npz``."""
_STOP = 1.0 + 1e-6
"""Margin of the early stop of the merge pass: float32 rounding moves a threshold by at most 6e-8 of its value."""
_CHUNK = 1 << 16
"""Edges handed to the plain-Python merge pass at a time (it usually stops within the first)."""


# -- the sequential kernels: one source, run as plain Python (on lists) or compiled by numba (on arrays) -------------
def _merge_kernel(parent: Any, size: Any, cint: Any, eu: Any, ev: Any, costs: Any, k: float,
                  maxacc: float) -> tuple[int, float]:
    """Felzenszwalb's merge pass over edges in increasing weight (union-find with path halving, in place).

    Returns ``(i, maxacc)``: ``i`` = the edges processed (``len(costs)`` unless it stopped at edge ``i`` because its
    weight reaches the largest merged weight plus k, beyond every segment's threshold from then on)."""
    for i in range(len(costs)):
        c = costs[i]
        if c >= (maxacc + k) * 1.000001:  # _STOP
            return i, maxacc
        a = eu[i]
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        b = ev[i]
        while parent[b] != b:
            parent[b] = parent[parent[b]]
            b = parent[b]
        if a == b:
            continue
        t0 = np.float64(np.float32(cint[a] + k / size[a]))
        t1 = np.float64(np.float32(cint[b] + k / size[b]))
        if c < min(t0, t1):
            if b < a:
                a, b = b, a
            parent[b] = a
            size[a] = size[a] + size[b]
            cint[a] = c
            if c > maxacc:
                maxacc = c
    return len(costs), maxacc


def _size_kernel(parent: Any, size: Any, eu: Any, ev: Any, min_size: int) -> None:
    """The min-size pass: merge along edges (in order) while either side is below ``min_size`` voxels (in place)."""
    for i in range(len(eu)):
        a = eu[i]
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        b = ev[i]
        while parent[b] != b:
            parent[b] = parent[parent[b]]
            b = parent[b]
        if a == b:
            continue
        if size[a] < min_size or size[b] < min_size:
            if b < a:
                a, b = b, a
            parent[b] = a
            size[a] = size[a] + size[b]


_compiled: dict[str, Callable[..., Any]] = {}


def numba_available() -> bool:
    """Whether numba can be imported (the optional extra ``fast``)."""
    try:
        import numba  # noqa: F401
    except Exception:  # noqa: BLE001 - an installed but broken numba (e.g. a numpy it does not support) counts as absent
        return False
    return True


def _resolve_engine(engine: str) -> str:
    if engine not in ENGINES:
        raise ValueError(f"supervoxel engine must be one of {ENGINES}, got {engine!r}")
    if engine == "auto":
        return "numba" if numba_available() else "python"
    if engine == "numba" and not numba_available():
        raise DataError("supervoxel engine 'numba' needs numba (pip install 'fsl-med[fast]')")
    return engine


def _kernel(name: str) -> Callable[..., Any]:
    if name not in _compiled:
        import numba

        _compiled[name] = numba.njit(nogil=True, cache=False)(globals()[name])
    return _compiled[name]


def _merge_pass(parent: np.ndarray, size: np.ndarray, cint: np.ndarray, eu: np.ndarray, ev: np.ndarray,
                costs: np.ndarray, k: float, engine: str) -> None:
    """Run :func:`_merge_kernel` over the sorted edges, in place on ``parent``/``size``/``cint``."""
    if costs.size == 0 or costs[0] >= k * _STOP:  # nothing can merge (all thresholds are <= k while no edge merged)
        return
    if engine == "numba":
        _kernel("_merge_kernel")(parent, size, cint, eu, ev, costs, float(k), 0.0)
        return
    p, s, ci = parent.tolist(), size.tolist(), cint.tolist()
    maxacc, start = 0.0, 0
    while start < costs.size:
        stop = min(start + _CHUNK, costs.size)
        done, maxacc = _merge_kernel(p, s, ci, eu[start:stop].tolist(), ev[start:stop].tolist(),
                                     costs[start:stop].tolist(), float(k), maxacc)
        if done < stop - start:
            break
        start = stop
    parent[:], size[:], cint[:] = p, s, ci


def _size_pass(parent: np.ndarray, size: np.ndarray, eu: np.ndarray, ev: np.ndarray, min_size: int,
               engine: str) -> None:
    """Run :func:`_size_kernel`, in place on ``parent``/``size``."""
    if eu.size == 0:
        return
    if engine == "numba":
        _kernel("_size_kernel")(parent, size, eu, ev, int(min_size))
        return
    p, s = parent.tolist(), size.tolist()
    _size_kernel(p, s, eu.tolist(), ev.tolist(), int(min_size))
    parent[:], size[:] = p, s


def _roots(parent: np.ndarray) -> np.ndarray:
    """Every node's root (the forest fully compressed), as a new array."""
    r = parent.copy()
    while True:
        nxt = r[r]
        if np.array_equal(nxt, r):
            return r
        r = nxt


# -- the graph ---------------------------------------------------------------------------------------------------------
def edge_directions(spacing: Sequence[float]) -> list[tuple[tuple[int, int, int], float]]:
    """The 13 directions ``(dz, dy, dx)`` of the 26-neighbour graph with their weight ``w`` (cost = sqrt(w) |dI|), in
    the order the reference lists its edges (the order of equal-weight edges).

    Args:
        spacing: voxel size ``(z, y, x)`` in mm; only ``s = z / x`` is used (in-plane spacing assumed isotropic).
    """
    s = float(spacing[0]) / float(spacing[2])
    w1, w2, w3, w4 = 1.0, s ** 2, (math.sqrt(1 + s ** 2) / math.sqrt(2)) ** 2, (math.sqrt(2 + s ** 2) / math.sqrt(3)) ** 2
    return [((0, 1, 0), w1), ((0, 1, 1), w1), ((0, 0, 1), w1), ((0, 1, -1), w1),
            ((1, 1, 0), w3), ((1, 1, 1), w4), ((1, 0, 1), w3), ((1, -1, 0), w3), ((1, -1, -1), w4),
            ((1, 0, -1), w3), ((1, 1, -1), w4), ((1, -1, 1), w4), ((1, 0, 0), w2)]


def _side(o: int) -> tuple[slice, slice]:
    """Slices of the voxel ``a`` and its neighbour ``b = a - o`` along one axis (offset o in -1, 0, 1)."""
    if o > 0:
        return slice(1, None), slice(None, -1)
    if o < 0:
        return slice(None, -1), slice(1, None)
    return slice(None), slice(None)


def _edges(image: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All edges ``(a, b, cost)`` of the 26-neighbour graph of a ``[Z, H, W]`` float64 image (flat voxel indices)."""
    idx_t = np.int32 if image.size < 2 ** 31 else np.int64
    ids = np.arange(image.size, dtype=idx_t).reshape(image.shape)
    us, vs, cs = [], [], []
    for off, w in edge_directions(spacing):
        sa, sb = zip(*(_side(o) for o in off), strict=True)
        d = image[sa] - image[sb]
        cs.append(np.sqrt(w * (d * d)).ravel())  # the reference's order of operations (ties depend on it)
        us.append(ids[sa].ravel())
        vs.append(ids[sb].ravel())
    return np.concatenate(us), np.concatenate(vs), np.concatenate(cs)


def felzenszwalb_3d(image: np.ndarray, spacing: Sequence[float], min_size: int, sigma: float = 0.0,
                    scale: float = SCALE, engine: str = "auto") -> np.ndarray:
    """Felzenszwalb-Huttenlocher segmentation of a volume on its 26-neighbour graph (module docstring).

    Equal to the sequential algorithm (sorted edges, merge pass, then min-size pass), computed as: (1) zero-weight
    edges come first and always merge (their thresholds are positive), so their connected components are merged at
    once; (2) the merge pass over the remaining edges stops at the first edge whose weight reaches the largest
    merged weight plus k, since no threshold can exceed that from then on (for an image of integer intensities it
    stops at once); (3) in the min-size pass an edge merges only if it lies on the Kruskal spanning forest of the
    segment graph (any other edge joins two segments that a cheaper path already joined or that are both at least
    ``min_size``), so only the forest's edges are visited.

    Args:
        image: ``[Z, H, W]`` intensities (the caller rescales: the reference uses 0..255); not modified.
        spacing: voxel size ``(z, y, x)``.
        min_size: minimum segment size in voxels (>= 1).
        sigma: Gaussian smoothing before the graph (per axis ``sigma / spacing``); 0 = none.
        scale: Felzenszwalb's scale (k = scale / 255).
        engine: ``python`` (plain loops), ``numba`` (compiled) or ``auto`` (numba when installed).
    Returns:
        ``[Z, H, W]`` int32 segment ids ``0..N-1``, numbered in raster order of their first voxel.
    Raises:
        ValueError: not a 3D array, non-finite values, ``min_size`` < 1, ``scale`` <= 0, ``sigma`` < 0, a bad engine.
    """
    if image.ndim != 3 or image.size == 0:
        raise ValueError(f"felzenszwalb_3d needs a non-empty [Z, H, W] volume, got shape {image.shape}")
    if min_size < 1 or scale <= 0 or sigma < 0:
        raise ValueError(f"felzenszwalb_3d: min_size >= 1, scale > 0 and sigma >= 0 needed, got {min_size}, "
                         f"{scale}, {sigma}")
    if len(spacing) != 3 or not all(float(x) > 0 and math.isfinite(float(x)) for x in spacing):
        raise ValueError(f"felzenszwalb_3d: spacing must be three positive numbers (z, y, x), got {tuple(spacing)}")
    img = np.asarray(image, dtype=np.float64)
    if not np.isfinite(img).all():
        raise ValueError("felzenszwalb_3d: the volume has non-finite values")
    engine = _resolve_engine(engine)
    if sigma > 0:
        img = ndimage.gaussian_filter(img, sigma=[sigma / float(x) for x in spacing])
    n = img.size
    k = float(scale) / 255.0
    u, v, c = _edges(img, spacing)
    # (1) zero-weight edges: connected components, internal difference 0
    zero = c == 0
    graph = coo_matrix((np.ones(int(zero.sum()), dtype=np.int8), (u[zero], v[zero])), shape=(n, n))
    m0, lab0 = connected_components(graph, directed=False)
    lab0 = lab0.astype(u.dtype)
    u, v, c = lab0[u[~zero]], lab0[v[~zero]], c[~zero]
    keep = u != v
    u, v, c = u[keep], v[keep], c[keep]
    order = np.argsort(c, kind="stable")
    u, v, c = u[order], v[order], c[order]
    del order, keep, zero, graph
    # (2) the merge pass (usually nothing to do after the zero-weight components)
    parent = np.arange(m0, dtype=np.int64)
    size0 = np.bincount(lab0, minlength=m0).astype(np.int64)
    cint = np.zeros(m0, dtype=np.float64)
    _merge_pass(parent, size0.copy(), cint, u, v, c, k, engine)
    root1 = _roots(parent)
    seg_ids, lab1 = np.unique(root1, return_inverse=True)
    m1 = seg_ids.size
    size1 = np.bincount(lab1, weights=size0, minlength=m1).astype(np.int64)
    # (3) the min-size pass over the edges between segments, in order: compiled, all of them; in plain Python only
    # the Kruskal forest of the segment graph (edge rank = position in the sorted order), the only edges that merge
    a, b = lab1[u], lab1[v]
    cross = a != b
    a, b = a[cross].astype(np.int64), b[cross].astype(np.int64)
    del u, v, c
    if engine == "python":
        rank = np.flatnonzero(cross)
        lo, hi = np.minimum(a, b), np.maximum(a, b)
        _, first = np.unique(lo * m1 + hi, return_index=True)  # the first (cheapest) edge of each segment pair
        w = rank[first].astype(np.float64) + 1.0
        forest = minimum_spanning_tree(coo_matrix((w, (lo[first], hi[first])), shape=(m1, m1)).tocsr()).tocoo()
        fo = np.argsort(forest.data, kind="stable")
        a, b = forest.row[fo].astype(np.int64), forest.col[fo].astype(np.int64)
    parent2 = np.arange(m1, dtype=np.int64)
    _size_pass(parent2, size1, a, b, int(min_size), engine)
    final = _roots(parent2)[lab1][lab0]
    _, first_vox, inv = np.unique(final, return_index=True, return_inverse=True)
    rank_of = np.empty(first_vox.size, dtype=np.int64)
    rank_of[np.argsort(first_vox, kind="stable")] = np.arange(first_vox.size)
    return rank_of[inv].reshape(image.shape).astype(np.int32)


# -- pseudolabels -----------------------------------------------------------------------------------------------------
def rescale_255(image: np.ndarray) -> np.ndarray:
    """``255 * (image - min) / (max - min)`` as float64 (a new array); all zeros for a constant volume."""
    img = np.asarray(image, dtype=np.float64)
    lo, span = float(img.min()), float(img.max() - img.min())
    return np.zeros_like(img) if span == 0 else 255.0 * (img - lo) / span


def foreground_mask(image255: np.ndarray, threshold: float = FOREGROUND_THRESHOLD) -> np.ndarray:
    """Per-slice body mask of a 0..255 volume: ``> threshold``, largest 8-connected component, holes filled.

    Returns ``[Z, H, W]`` bool; a slice with nothing above the threshold is all background."""
    return np.stack([body_mask(image255[z], threshold, 8) for z in range(image255.shape[0])])


def supervoxels_volume(image: np.ndarray, spacing: Sequence[float], params: SupervoxelConfig,
                       engine: str = "auto") -> np.ndarray:
    """Supervoxel pseudolabels of a volume (module docstring).

    Args:
        image: ``[Z, H, W]`` intensities as stored (before normalisation); not modified.
        spacing: voxel size ``(z, y, x)`` in mm.
        params: ``min_size`` (voxels) and ``sigma``; ``min_pixels``/``size_rule`` are the episodes'.
        engine: see :func:`felzenszwalb_3d`.
    Returns:
        ``[Z, H, W]`` int32: 0 outside the body, supervoxels ``1..N`` (consecutive, raster order) inside.
    Raises:
        DataError: a volume that is not ``[Z, H, W]`` or has non-finite values.
    """
    if image.ndim != 3 or image.size == 0:
        raise DataError(f"supervoxels need a [Z, H, W] volume, got shape {image.shape}")
    if not np.isfinite(image).all():
        raise DataError("supervoxels: the volume has non-finite intensities")
    img = rescale_255(image)
    seg = felzenszwalb_3d(img, spacing, int(params.min_size), float(params.sigma), SCALE, engine)
    fg = foreground_mask(img)
    out = np.zeros(seg.shape, dtype=np.int32)
    if fg.any():
        _, first, inv = np.unique(seg[fg], return_index=True, return_inverse=True)
        rank_of = np.empty(first.size, dtype=np.int32)
        rank_of[np.argsort(first, kind="stable")] = np.arange(1, first.size + 1, dtype=np.int32)
        out[fg] = rank_of[inv.ravel()]
    return out


def cache_key(image_path: Path, params: SupervoxelConfig, shape: Sequence[int], spacing: Sequence[float]) -> str:
    """Key of a cached supervoxel volume: the image file's content, the generation parameters (``min_size``,
    ``sigma``; not the episodes' ``min_pixels``/``size_rule``), the volume's shape and spacing, the code version."""
    payload = json.dumps({"min_size": int(params.min_size), "sigma": float(params.sigma), "scale": SCALE,
                          "fg": FOREGROUND_THRESHOLD, "shape": [int(x) for x in shape],
                          "spacing": [round(float(x), 6) for x in spacing], "v": CACHE_VERSION}, sort_keys=True)
    return f"{sha256_file(image_path)[:16]}-{hashlib.sha256(payload.encode()).hexdigest()[:12]}"








def load_or_make_supervoxels(image: np.ndarray, image_path: Path, spacing: Sequence[float],
                             params: SupervoxelConfig, cache_dir: str | Path, engine: str = "auto") -> np.ndarray:
    """Supervoxels of a volume, read from the cache or computed and cached (atomically, one writer per entry).

    A read-only cache (``EACCES``, ``EPERM``, ``EROFS``) is tolerated with one warning per folder: entries there are
    read, missing ones computed without being stored.

    Args:
        image: ``[Z, H, W]`` intensities as stored, at the loader size.
        image_path: the image file (its content keys the cache).
        spacing: the volume's voxel size ``(z, y, x)`` (at the loader size).
        params: supervoxel parameters.
        cache_dir: cache folder (``supervoxels/`` is created in it).
        engine: see :func:`felzenszwalb_3d`.
    Returns:
        ``[Z, H, W]`` int32 (0 = background, 1..N supervoxels).
    Raises:
        DataError: the cache path cannot be a folder, or another OS error writing it.
    """
    return SUPERVOXEL_CACHE.load_or_make(cache_dir, image_path, cache_key(image_path, params, image.shape, spacing),
                                         image.shape, lambda: supervoxels_volume(image, spacing, params, engine))
