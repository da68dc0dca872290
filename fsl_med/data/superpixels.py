"""Superpixel pseudolabels (method.md §1.3): 2D Felzenszwalb per slice inside the body mask.

Pseudolabels are generated when missing and cached under ``data.cache_dir`` (never inside the data
folder, which may be read-only). The cache file name contains a hash of the image file's content and
of the parameters, so changing either regenerates it. A ``superpix-MIDDLE_{id}.nii.gz`` shipped with the
data is used instead when the parameters are the reference defaults.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np
from scipy import ndimage
from skimage.segmentation import felzenszwalb

from fsl_med.atomic import sha256_file
from fsl_med.config import SuperpixelConfig
from fsl_med.data.volume_cache import VolumeCache
from fsl_med.prepare.datasets import DatasetInfo

log = logging.getLogger(__name__)

CACHE_VERSION = 1
MRI_BODY_THRESHOLD = 50 + 1e-4
"""Body-mask threshold when ``body_threshold`` is unset (the MRI datasets'; the datamodule passes the dataset's)."""

SUPERPIXEL_CACHE = VolumeCache("superpixel", "pseudolabels", "data.cache_dir (prepare: --cache-dir) or FSL_MED_CACHE",
                               __name__)
"""The superpixel cache (:mod:`fsl_med.data.volume_cache`): ``<cache_dir>/superpixels/<image>-<key>.npz``."""


def body_mask(slice_2d: np.ndarray, threshold: float | None, connectivity: int = 8) -> np.ndarray:
    """Body mask of one slice: ``slice > threshold``, largest connected component, holes filled.

    ``threshold`` ``None`` is :data:`MRI_BODY_THRESHOLD`. ``connectivity``: 8 (the reference notebook's
    ``skimage.measure.label`` default, diagonal neighbours connect) or 4 (edge neighbours only). Returns a bool
    array of the slice's shape. If thresholding finds nothing it is returned as is (empty).
    """
    if connectivity not in (4, 8):
        raise ValueError(f"body mask connectivity must be 4 or 8, got {connectivity!r}")
    mask = slice_2d > (MRI_BODY_THRESHOLD if threshold is None else threshold)
    if not mask.any():
        return mask
    lab, n = ndimage.label(mask, structure=ndimage.generate_binary_structure(2, 1 if connectivity == 4 else 2))
    if n > 1:
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        mask = lab == int(sizes.argmax())
    return ndimage.binary_fill_holes(mask)


def superpixels_2d(slice_2d: np.ndarray, params: SuperpixelConfig) -> np.ndarray:
    """Superpixels of one slice: 0 outside the body, 1..N inside (consecutive); with ``params.zero_as_background``
    also 0 where Felzenszwalb's segment 0 lies inside the body (the reference notebook).

    Args:
        slice_2d: ``[H, W]`` intensities before loader normalisation.
    Returns:
        ``[H, W]`` int32 labels.
    """
    seg = felzenszwalb(slice_2d.astype(np.float64), scale=params.scale, sigma=params.sigma,
                       min_size=params.min_size)
    mask = body_mask(slice_2d, params.body_threshold, params.body_connectivity)
    # ours: Felzenszwalb segment 0 is a superpixel like the others (ids shift by one inside the body); the reference
    # notebook's off-by-one (zero_as_background) merges its pixels inside the body into the background id 0
    seg = np.where(mask, seg if params.zero_as_background else seg + 1, 0)
    _, inv = np.unique(seg, return_inverse=True)
    inv = inv.reshape(seg.shape).astype(np.int32)
    if (seg == 0).any():  # 0 is present and maps to 0 already; else shift so ids start at 1
        return inv
    return inv + 1


def superpixels_volume(image: np.ndarray, params: SuperpixelConfig) -> np.ndarray:
    """Per-slice superpixels of a ``[Z, H, W]`` volume -> ``[Z, H, W]`` int32 (ids restart per slice)."""
    return np.stack([superpixels_2d(image[z], params) for z in range(image.shape[0])]).astype(np.int32)


def cache_key(image_path: Path, params: SuperpixelConfig, image_size: int) -> str:
    """Key of a cached pseudolabel volume: content of the image file + parameters + code version."""
    fields = {**asdict(params), "zero_as_background": bool(params.zero_as_background)}  # unset (null) is false
    payload = json.dumps({"params": fields, "size": image_size, "v": CACHE_VERSION}, sort_keys=True)
    return f"{sha256_file(image_path)[:16]}-{hashlib.sha256(payload.encode()).hexdigest()[:12]}"


def load_or_make_superpixels(image: np.ndarray, image_path: Path, params: SuperpixelConfig,
                             cache_dir: str | Path) -> np.ndarray:
    """Pseudolabels of a volume, read from the cache or computed and cached (atomically).

    A cache that cannot be written for lack of permission (a shared read-only cache, a read-only mount:
    ``EACCES``, ``EPERM``, ``EROFS``) is tolerated, as a researcher reusing someone else's cache expects:
    entries already there are read, missing ones are computed and not stored, and one warning line per
    folder says so. A cache path that cannot be a folder (it, or a folder above it, is a regular file) or
    any other OS error when creating or writing it is an error.

    Args:
        image: ``[Z, H, W]`` intensities as stored (before normalisation), already at the loader size.
        image_path: the image file (its content keys the cache).
        params: superpixel parameters.
        cache_dir: cache folder (created if needed).
    Returns:
        ``[Z, H, W]`` int32 superpixel ids (0 = outside the body).
    Raises:
        DataError: the cache path is not usable as a folder (the message names it and the OS error), or
            the image file cannot be read.
    """
    return SUPERPIXEL_CACHE.load_or_make(cache_dir, image_path, cache_key(image_path, params, image.shape[-1]),
                                         image.shape, lambda: superpixels_volume(image, params))


def cache_superpixels(root: Path, scan_ids: list[str], info: DatasetInfo, cache_dir: str | Path,
                      progress: bool = True) -> float:
    """Compute (or find) the training pseudolabels of every listed scan of a prepared folder in the cache
    (``fsl-med prepare``'s last step); returns the seconds spent."""
    import sys
    import time

    from tqdm import tqdm

    from fsl_med.data.volumes import load_volume

    t0 = time.perf_counter()
    params = SuperpixelConfig(body_threshold=info.body_threshold)
    for sid in tqdm(scan_ids, desc="superpixels", unit="vol", disable=not progress, file=sys.stderr):
        vol = load_volume(root, sid, info.all_label_ids)
        load_or_make_superpixels(vol.image, vol.path, params, cache_dir)
    return time.perf_counter() - t0
