"""Self-supervised training episodes (method.md §2): a superpixel of a random slice, augmented twice.

Episode ``i`` is a pure function of ``(seed, i)``: the sampler hands out global episode indices (distinct
per epoch and per rank), so runs are reproducible with any number of data-loader workers.

Augmentation ('sabs_aug', method.md §2.2): one random affine (rotation, translation, shear, isotropic
zoom; matrices built with MONAI's ``create_*`` helpers), an elastic displacement field
(uniform noise, Gaussian-smoothed with σ, times α), composed into a single sampling grid and applied with
one ``grid_sample`` (bilinear for the image, bilinear-then-0.5 for the binary mask, zero border), then
MONAI's ``AdjustContrast`` gamma on the image.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import AdjustContrast
from monai.transforms.utils import create_rotate, create_scale, create_shear, create_translate
from scipy import ndimage
from torch.utils.data import Dataset, Sampler

from fsl_med.config import AugmentConfig
from fsl_med.data.masks import mask_at_feature_size
from fsl_med.data.volumes import slice_stack
from fsl_med.errors import DataError


def _sampling_grid(rng: np.random.Generator, h: int, w: int, p: AugmentConfig) -> torch.Tensor:
    """A ``[1, H, W, 2]`` grid (normalised, ``align_corners=False``) for ``grid_sample``."""
    rot = math.radians(rng.uniform(-p.rotate_deg, p.rotate_deg))
    shear = math.tan(math.radians(rng.uniform(-p.shear_deg, p.shear_deg)))
    tx, ty = rng.uniform(-p.translate_px, p.translate_px, size=2)
    zoom = rng.uniform(p.zoom_min, p.zoom_max)
    # forward map (input -> output) in centred pixel coordinates (x, y)
    fwd = (np.asarray(create_translate(2, (tx, ty)))
           @ np.asarray(create_rotate(2, rot))
           @ np.asarray(create_shear(2, (shear, 0.0)))
           @ np.asarray(create_scale(2, (zoom, zoom))))
    inv = np.linalg.inv(fwd)
    ys, xs = np.meshgrid(np.arange(h, dtype=np.float64) - (h - 1) / 2, np.arange(w, dtype=np.float64) - (w - 1) / 2,
                         indexing="ij")
    if p.elastic_alpha > 0:
        # elastic applied after the affine: out(x) = affine_out(x + d(x))
        noise = rng.uniform(-1.0, 1.0, size=(2, h, w))
        trunc = 10.0 / p.elastic_sigma  # kernel radius 10 px (ksize 21) as the reference
        dx = ndimage.gaussian_filter(noise[0], p.elastic_sigma, truncate=trunc, mode="reflect") * p.elastic_alpha
        dy = ndimage.gaussian_filter(noise[1], p.elastic_sigma, truncate=trunc, mode="reflect") * p.elastic_alpha
        xs, ys = xs + dx, ys + dy
    src_x = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]
    src_y = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
    gx = (src_x + (w - 1) / 2 + 0.5) / w * 2 - 1
    gy = (src_y + (h - 1) / 2 + 0.5) / h * 2 - 1
    return torch.from_numpy(np.stack([gx, gy], axis=-1)[None].astype(np.float32))


def warp_pair(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator,
              params: AugmentConfig) -> tuple[np.ndarray, np.ndarray]:
    """The geometric part of :func:`augment_pair`: one random affine + elastic warp of an (image, binary mask) pair.

    Args:
        image: ``[H, W]`` float32, or a ``[C, H, W]`` stack (every channel warped alike).
        mask: ``[H, W]`` binary (any dtype).
        rng: random generator (draws the affine, then the elastic noise).
        params: augmentation ranges (``enabled`` is the caller's business).
    Returns:
        New arrays ``(image float32 of the input's shape, mask [H, W] uint8)``; the inputs are not modified.
    """
    h, w = image.shape[-2:]
    chans = image.reshape(-1, h, w).astype(np.float32)
    grid = _sampling_grid(rng, h, w, params)
    stacked = torch.from_numpy(np.concatenate([chans, (mask > 0).astype(np.float32)[None]]))[None]
    warped = F.grid_sample(stacked, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
    out_mask = (warped[-1].numpy() > 0.5).astype(np.uint8)
    return warped[:-1].numpy().reshape(image.shape), out_mask


def adjust_gamma(image: np.ndarray, rng: np.random.Generator, params: AugmentConfig) -> np.ndarray:
    """The intensity part of :func:`augment_pair`: MONAI's ``AdjustContrast`` with a gamma drawn from
    ``[gamma_min, gamma_max]``, over the array's joint range. Returns a new float32 array of the input's shape."""
    gamma = rng.uniform(params.gamma_min, params.gamma_max)
    return np.asarray(AdjustContrast(gamma=gamma)(image)).reshape(image.shape).astype(np.float32)


def augment_pair(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator,
                 params: AugmentConfig) -> tuple[np.ndarray, np.ndarray]:
    """Augment an (image, binary mask) pair with one random geometric + intensity transform
    (:func:`warp_pair`, then :func:`adjust_gamma`).

    Args:
        image: ``[H, W]`` float32 (normalised intensities), or a ``[C, H, W]`` stack of slices (3-slice input:
            every channel gets the same transform, and one gamma over the stack's joint range).
        mask: ``[H, W]`` binary (any dtype).
        rng: random generator (the only source of randomness).
        params: augmentation ranges.
    Returns:
        New arrays ``(image float32 of the input's shape, mask [H, W] uint8)``; the inputs are not modified.
    """
    if not params.enabled:
        return image.astype(np.float32, copy=True), (mask > 0).astype(np.uint8)
    img, out_mask = warp_pair(image, mask, rng, params)
    return adjust_gamma(img, rng, params), out_mask


class EpisodeDataset(Dataset):
    """Self-supervised 1-way k-shot episodes from superpixel pseudolabels (k augmented supports, one query).

    Args:
        images: normalised training volumes, each ``[Z, H, W]`` float32.
        superpixels: their pseudolabels, each ``[Z, H, W]`` int (0 = outside the body).
        slices: allowed ``(volume index, z)`` pairs (Setting-2 exclusion already applied).
        length: episodes per epoch (``__len__``).
        seed: base seed; episode ``i`` depends only on ``(seed, i)``.
        augment: augmentation ranges.
        min_pixels: a pseudolabel must cover at least this many pixels (never superpixel 0).
        feature_size, mask_pooling: the support mask must stay non-empty at the feature resolution (under
            ``nearest`` and ``mask_pooling``; see :meth:`_usable`).
        shots: augmented supports per episode (k); ``1`` draws exactly the 1-shot episodes.
        three_slices: images are z-1, z, z+1 stacks (zeros beyond the volume) instead of the slice tiled ×3.
        draw_background: superpixel id 0 (the background) may be drawn as a pseudolabel, as the reference does
            (``data.superpixel.zero_as_background``, ``compat=reference``).

    Items are dicts: ``support_image [3,H,W]`` (``[k,3,H,W]`` when k > 1), ``support_mask [H,W]`` float
    (1 = fg; ``[k,H,W]``), ``query_image [3,H,W]``, ``query_label [H,W]`` int64, ``scan`` (volume index),
    ``z``, ``superpixel``.

    Raises:
        DataError: no slice has a usable superpixel.
    """

    max_tries = 20

    def __init__(self, images: Sequence[np.ndarray], superpixels: Sequence[np.ndarray],
                 slices: Sequence[tuple[int, int]], length: int, seed: int, augment: AugmentConfig,
                 min_pixels: int = 64, feature_size: int = 32, mask_pooling: str = "nearest", shots: int = 1,
                 three_slices: bool = False, draw_background: bool = False) -> None:
        self.images = list(images)
        self.superpixels = list(superpixels)
        self.length = int(length)
        self.seed = int(seed)
        self.augment = augment
        self.feature_size = feature_size
        self.mask_pooling = mask_pooling
        self.shots, self.three_slices = int(shots), bool(three_slices)
        self.candidates: list[tuple[int, int, np.ndarray]] = []
        for v, z in slices:
            sp = self.superpixels[v][z]
            counts = np.bincount(sp.ravel())
            ids = np.flatnonzero(counts >= min_pixels)
            if not draw_background:  # the reference draws from np.unique(superpix), 0 (background) included
                ids = ids[ids != 0]
            if ids.size:
                self.candidates.append((v, z, ids))
        if not self.candidates:
            raise DataError(
                f"no training slice has a superpixel of >= {min_pixels} pixels inside the body "
                "(check data.superpixel.* and data.min_superpixel_pixels)"
            )

    def __len__(self) -> int:
        return self.length

    @staticmethod
    def _rgb(img: np.ndarray) -> np.ndarray:
        """``[H, W]`` -> the slice tiled ``[3, H, W]``; a ``[3, H, W]`` stack as it is."""
        return img if img.ndim == 3 else np.repeat(img[None], 3, axis=0)

    def _usable(self, mask: np.ndarray) -> bool:
        """The support mask survives at the feature grid under ``nearest`` and under the head's own pooling: the
        rule does not depend on the head for nearest and adjoint pooling, so heads compared draw the same episodes."""
        t = torch.from_numpy(mask)
        return all(bool(mask_at_feature_size(t, self.feature_size, mode).sum() > 0)
                   for mode in dict.fromkeys(("nearest", self.mask_pooling)))

    def __getitem__(self, index: int) -> dict[str, object]:
        rng = np.random.default_rng([self.seed, int(index)])
        for _ in range(self.max_tries):
            v, z, ids = self.candidates[int(rng.integers(len(self.candidates)))]
            sp_id = int(ids[int(rng.integers(len(ids)))])
            vol = self.images[v]
            img = slice_stack(vol, z) if self.three_slices else vol[z]
            label = self.superpixels[v][z] == sp_id
            supports = [augment_pair(img, label, rng, self.augment) for _ in range(self.shots)]
            q_img, q_mask = augment_pair(img, label, rng, self.augment)
            if all(self._usable(m) for _, m in supports) and q_mask.any():
                s_imgs = np.stack([self._rgb(i) for i, _ in supports])
                s_masks = np.stack([m for _, m in supports]).astype(np.float32)
                if self.shots == 1:
                    s_imgs, s_masks = s_imgs[0], s_masks[0]
                return {
                    "support_image": torch.from_numpy(s_imgs),
                    "support_mask": torch.from_numpy(s_masks),
                    "query_image": torch.from_numpy(self._rgb(q_img)),
                    "query_label": torch.from_numpy(q_mask.astype(np.int64)),
                    "scan": v,
                    "z": z,
                    "superpixel": sp_id,
                }
        raise DataError(f"episode {index}: no usable pseudolabel after {self.max_tries} draws")


class EpisodeSampler(Sampler[int]):
    """Yields global episode indices as a pure function of the training step: resumable and rank-aware.

    The episode of batch slot ``b`` at global step ``s`` on rank ``r`` of ``w`` is
    ``(s * w + r) * batch_size + b``. One pass covers steps ``0 .. total_steps - 1`` (the whole run is one
    epoch); iteration starts at ``start_step`` (an int, or a callable giving the trainer's restored global
    step at iteration time), so a resumed run sees exactly the episodes the uninterrupted run would have
    seen, and ranks never share an episode. ``len()`` is the full pass, so Lightning's restored position
    within the epoch and the episodes left agree.

    Args:
        total_steps: steps of the whole run (``trainer.max_steps``).
        batch_size: episodes per step and rank.
        rank, world_size: this process's global rank and the number of processes.
        start_step: first global step (int or zero-argument callable).
    """

    def __init__(self, total_steps: int, batch_size: int = 1, rank: int = 0, world_size: int = 1,
                 start_step: int | Callable[[], int] = 0) -> None:
        self.total_steps, self.batch_size = max(0, int(total_steps)), int(batch_size)
        self.rank, self.world_size, self.start_step = rank, world_size, start_step

    def __len__(self) -> int:
        return self.total_steps * self.batch_size

    def __iter__(self) -> Iterator[int]:
        b, w, r = self.batch_size, self.world_size, self.rank
        start = int(self.start_step() if callable(self.start_step) else self.start_step)
        for s in range(start, self.total_steps):
            base = (s * w + r) * b
            yield from range(base, base + b)
