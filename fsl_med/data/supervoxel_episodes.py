"""Adjacent-slice supervoxel episodes (``data.episodes=supervoxel3d``; the ADNet lineage; docs "Methods":
Each paper's protocol as fields).

An episode takes one 3D supervoxel (:mod:`fsl_med.data.supervoxels`) and ``shots + 1`` consecutive slices that all
contain it and all survive the Setting-2 exclusion. With probability 0.5 the slices are taken in reverse order;
the first ``shots`` are the supports, the last one the query (1-shot: support and query are adjacent slices). The
supervoxel must cover at least ``min_pixels`` pixels in the window's lowest slice (``size_rule=first``, ADNet) or in
the larger of its two lowest slices (``size_rule=larger``, Q-Net/RPT; for 1-shot the larger of the pair). Gamma goes
to the query or to the supports (p = 0.5), and, independently, the affine + elastic warp to the query or to the
supports (p = 0.5), never to both sides; gamma first, as the reference. The pieces are fsl_med's
(:func:`~fsl_med.data.episodes.adjust_gamma`, :func:`~fsl_med.data.episodes.warp_pair`).

Sampling differs from the reference's rejection loop in one respect: a training volume, then one of its supervoxels
that has a valid window, then one of that supervoxel's valid windows are drawn uniformly (the reference redraws the
supervoxel and window until the size rule holds, which favours supervoxels whose windows mostly pass). Episode
``i`` is a pure function of ``(seed, i)`` as in :class:`~fsl_med.data.episodes.EpisodeDataset`, whose sampler and
item layout it shares.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view
from torch.utils.data import Dataset

from fsl_med.config import AugmentConfig
from fsl_med.data.episodes import EpisodeDataset, adjust_gamma, warp_pair
from fsl_med.data.masks import mask_at_feature_size
from fsl_med.data.volumes import slice_stack
from fsl_med.errors import ConfigError, DataError

SIZE_RULES = ("first", "larger")


def valid_windows(supervoxels: np.ndarray, allowed: np.ndarray, length: int, min_pixels: int,
                  size_rule: str) -> dict[int, np.ndarray]:
    """The episode windows of one volume: supervoxel id -> sorted start slices ``z`` such that slices
    ``z .. z + length - 1`` all contain the supervoxel and are all allowed, and the size rule holds.

    Args:
        supervoxels: ``[Z, H, W]`` int ids (0 = background, never drawn).
        allowed: ``[Z]`` bool, the slices Setting 2 keeps.
        length: slices per window (shots + 1).
        min_pixels: the size the supervoxel must reach (see ``size_rule``).
        size_rule: ``first`` (the window's lowest slice) or ``larger`` (the larger of its two lowest slices).
    Returns:
        Only supervoxels with at least one window; empty when the volume has fewer than ``length`` slices.
    """
    if size_rule not in SIZE_RULES:
        raise ConfigError(f"config key 'data.supervoxel.size_rule': must be one of {', '.join(SIZE_RULES)}, "
                          f"got '{size_rule}'")
    nz = supervoxels.shape[0]
    if nz < length:
        return {}
    n = int(supervoxels.max()) + 1
    counts = np.bincount((np.arange(nz)[:, None] * n + supervoxels.reshape(nz, -1)).ravel(),
                         minlength=nz * n).reshape(nz, n)[:, 1:]
    present = (counts > 0) & np.asarray(allowed, dtype=bool)[:, None]
    ok = sliding_window_view(present, length, axis=0).all(axis=-1)  # [Z - length + 1, N]
    lowest = counts[: nz - length + 1]
    size = lowest if size_rule == "first" else np.maximum(lowest, counts[1: nz - length + 2])
    ok &= size >= min_pixels
    return {int(i) + 1: np.flatnonzero(ok[:, i]) for i in np.flatnonzero(ok.any(axis=0))}


class SupervoxelEpisodeDataset(Dataset):
    """1-way k-shot episodes of adjacent slices sharing a supervoxel (module docstring).

    Args:
        images: normalised training volumes, each ``[Z, H, W]`` float32.
        supervoxels: their supervoxels, each ``[Z, H, W]`` int (0 = outside the body).
        slices: allowed ``(volume index, z)`` pairs (Setting-2 exclusion applied); every slice of a window must be one.
        length: episodes per epoch (``__len__``).
        seed: base seed; episode ``i`` depends only on ``(seed, i)``.
        augment: augmentation ranges (``enabled=false``: neither side is augmented).
        min_pixels: ``data.supervoxel.min_pixels``.
        size_rule: ``data.supervoxel.size_rule`` (``first`` | ``larger``).
        feature_size, mask_pooling: the supports' masks must stay non-empty at the feature grid, as in
            :class:`~fsl_med.data.episodes.EpisodeDataset` (an episode failing it, or with an empty query mask after
            the warp, is redrawn).
        shots: supports per episode (k); a window has k + 1 slices.
        three_slices: images are z-1, z, z+1 stacks instead of the slice tiled ×3.

    Items are :class:`~fsl_med.data.episodes.EpisodeDataset`'s dict (``support_image``, ``support_mask``,
    ``query_image``, ``query_label``, ``scan``, ``z`` = the query slice, ``superpixel`` = the supervoxel id) plus
    ``support_z`` (int; ``[k]`` int64 tensor when k > 1), ``query_gamma`` and ``query_warp`` (bool: the side that got
    gamma / the warp is the query, else the supports).

    Raises:
        DataError: no supervoxel spans ``shots + 1`` allowed adjacent slices with the size rule.
        ConfigError: a bad ``size_rule`` or ``shots`` < 1.
    """

    max_tries = 20

    def __init__(self, images: Sequence[np.ndarray], supervoxels: Sequence[np.ndarray],
                 slices: Sequence[tuple[int, int]], length: int, seed: int, augment: AugmentConfig,
                 min_pixels: int = 200, size_rule: str = "larger", feature_size: int = 32,
                 mask_pooling: str = "nearest", shots: int = 1, three_slices: bool = False) -> None:
        if int(shots) < 1:
            raise ConfigError(f"config key 'shots': must be >= 1, got {shots}")
        self.images = list(images)
        self.supervoxels = list(supervoxels)
        self.length, self.seed, self.augment = int(length), int(seed), augment
        self.shots, self.three_slices = int(shots), bool(three_slices)
        self.feature_size, self.mask_pooling = int(feature_size), str(mask_pooling)
        allowed = [np.zeros(sv.shape[0], dtype=bool) for sv in self.supervoxels]
        for v, z in slices:
            allowed[v][z] = True
        self.candidates: list[tuple[int, list[tuple[int, np.ndarray]]]] = []
        for v, sv in enumerate(self.supervoxels):
            wins = valid_windows(sv, allowed[v], self.shots + 1, int(min_pixels), size_rule)
            if wins:
                self.candidates.append((v, sorted(wins.items())))
        if not self.candidates:
            raise DataError(f"no supervoxel spans {self.shots + 1} adjacent training slices (after the setting-2 "
                            f"exclusion) with >= {min_pixels} pixels (size_rule={size_rule}); check "
                            "data.supervoxel.min_size / min_pixels / size_rule")

    def __len__(self) -> int:
        return self.length

    def _image(self, v: int, z: int) -> np.ndarray:
        vol = self.images[v]
        return slice_stack(vol, z) if self.three_slices else vol[z]

    def _usable(self, mask: np.ndarray) -> bool:
        """A support mask survives at the feature grid under ``nearest`` and the head's pooling (the 2D episodes'
        rule, so heads compared draw the same episodes)."""
        t = torch.from_numpy(mask)
        return all(bool(mask_at_feature_size(t, self.feature_size, mode).sum() > 0)
                   for mode in dict.fromkeys(("nearest", self.mask_pooling)))

    def __getitem__(self, index: int) -> dict[str, object]:
        rng = np.random.default_rng([self.seed, int(index)])
        aug = self.augment
        for _ in range(self.max_tries):
            v, wins = self.candidates[int(rng.integers(len(self.candidates)))]
            sv_id, starts = wins[int(rng.integers(len(wins)))]
            z0 = int(starts[int(rng.integers(len(starts)))])
            zs = list(range(z0, z0 + self.shots + 1))
            if rng.random() < 0.5:
                zs = zs[::-1]
            query_gamma, query_warp = bool(rng.random() < 0.5), bool(rng.random() < 0.5)
            sides = []
            for i, z in enumerate(zs):
                img, mask = self._image(v, z), (self.supervoxels[v][z] == sv_id).astype(np.uint8)
                is_query = i == len(zs) - 1
                if aug.enabled and query_gamma == is_query:
                    img = adjust_gamma(img, rng, aug)
                if aug.enabled and query_warp == is_query:
                    img, mask = warp_pair(img, mask, rng, aug)
                sides.append((img.astype(np.float32, copy=False), mask))
            supports, (q_img, q_mask) = sides[:-1], sides[-1]
            if all(self._usable(m) for _, m in supports) and q_mask.any():
                s_imgs = np.stack([EpisodeDataset._rgb(i) for i, _ in supports])
                s_masks = np.stack([m for _, m in supports]).astype(np.float32)
                s_z: object = torch.tensor(zs[:-1], dtype=torch.int64)
                if self.shots == 1:
                    s_imgs, s_masks, s_z = s_imgs[0], s_masks[0], zs[0]
                return {
                    "support_image": torch.from_numpy(np.ascontiguousarray(s_imgs)),
                    "support_mask": torch.from_numpy(s_masks),
                    "query_image": torch.from_numpy(np.ascontiguousarray(EpisodeDataset._rgb(q_img))),
                    "query_label": torch.from_numpy(q_mask.astype(np.int64)),
                    "scan": v,
                    "z": zs[-1],
                    "superpixel": sv_id,
                    "support_z": s_z,
                    "query_gamma": query_gamma,
                    "query_warp": query_warp,
                }
        raise DataError(f"episode {index}: no usable supervoxel pair after {self.max_tries} draws")
