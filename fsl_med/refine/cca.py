"""Connected-component post-processing (method.md §6): keep the component of largest foreground *mass*.

``2d`` mode (the paper's): per slice, 8-connectivity, keep the component whose summed foreground
probability is largest. ``3d`` mode: 26-connectivity over the whole volume, one component kept.
Both are vectorised: the volume is labelled once (in 2D mode with a structure that does not connect
slices), masses are summed per label with ``bincount``, and the winner of each slice is picked with one
sort, never a Python loop over components. :class:`CCA` is the refinement callback around it.
"""

from __future__ import annotations

import lightning as L
import numpy as np
from scipy import ndimage

from fsl_med.config import CCA_MODES
from fsl_med.data.protocol import EvalItem
from fsl_med.errors import ConfigError
from fsl_med.refine.base import Refinement

_STRUCT_2D = np.zeros((3, 3, 3), dtype=bool)
_STRUCT_2D[1] = True  # 8-connected within a slice, no link between slices
_STRUCT_3D = np.ones((3, 3, 3), dtype=bool)  # 26-connected


def largest_mass_component(pred: np.ndarray, fg_prob: np.ndarray, mode: str = "2d") -> np.ndarray:
    """Keep, per slice (``2d``) or per volume (``3d``), the foreground component of largest summed probability.

    Args:
        pred: ``[Z, H, W]`` (or ``[H, W]``) binary prediction.
        fg_prob: same shape, foreground probability of each pixel.
        mode: ``"2d"`` or ``"3d"``.

    Returns:
        A new uint8 array of ``pred``'s shape. An empty prediction (or slice) stays empty; ties go to
        the component with the lower label (first in raster order). Inputs are not modified.

    Raises:
        ValueError: unknown mode or shape mismatch.
    """
    if mode not in CCA_MODES:
        raise ValueError(f"CCA mode must be one of {CCA_MODES}, got {mode!r}")
    if pred.shape != fg_prob.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from probability shape {fg_prob.shape}")
    squeeze = pred.ndim == 2
    p = (np.asarray(pred) > 0)[None] if squeeze else np.asarray(pred) > 0
    prob = np.asarray(fg_prob, dtype=np.float64)[None] if squeeze else np.asarray(fg_prob, dtype=np.float64)
    labels, n = ndimage.label(p, structure=_STRUCT_2D if mode == "2d" else _STRUCT_3D)
    out = np.zeros(p.shape, dtype=np.uint8)
    if n == 0:
        return out[0] if squeeze else out
    flat = labels.ravel()
    mass = np.bincount(flat, weights=prob.ravel(), minlength=n + 1)[1:]
    if mode == "3d":
        keep = np.zeros(n + 1, dtype=bool)
        keep[1 + int(np.argmax(mass))] = True
    else:
        # slice of each component: any of its voxels (components never span slices in 2D mode)
        first = np.zeros(n + 1, dtype=np.int64)
        nz = np.flatnonzero(flat)
        first[flat[nz[::-1]]] = nz[::-1]  # the last write per label is its first voxel
        comp_slice = first[1:] // (p.shape[1] * p.shape[2])
        order = np.lexsort((np.arange(n), -mass, comp_slice))  # by slice, then mass desc, then label
        winners = order[np.r_[True, comp_slice[order][1:] != comp_slice[order][:-1]]]
        keep = np.zeros(n + 1, dtype=bool)
        keep[1 + winners] = True
    out[keep[labels]] = 1
    return out[0] if squeeze else out


class CCA(Refinement):
    """Connected-component post-processing as a refinement callback (variant ``cca``, or ``<source>_cca``).

    Args:
        mode: ``"2d"`` (per slice, the paper's) or ``"3d"`` (one component per volume).
        source: the variant it post-processes (``plain``; ``ttt`` gives ``ttt_cca``).
        name: the variant's name (default ``cca`` for ``plain``, ``<source>_cca`` otherwise).
    """

    def __init__(self, mode: str = "2d", source: str = "plain", name: str | None = None) -> None:
        if mode not in CCA_MODES:
            raise ConfigError(f"config key 'eval.cca_mode': must be one of {list(CCA_MODES)}, got {mode!r}")
        self.mode, self.source = mode, source
        self.name = name or ("cca" if source == "plain" else f"{source}_cca")

    def refine(self, pred: np.ndarray, prob: np.ndarray, item: EvalItem, module: L.LightningModule
               ) -> tuple[np.ndarray, np.ndarray]:
        """The largest-mass component of ``pred`` (per slice or per volume); ``prob`` unchanged."""
        return largest_mass_component(pred, prob, self.mode), prob
