"""The prediction record of one EP1 item: what the module's evaluation step hands to the test-time callbacks.

The module writes the ``plain`` variant; each refinement callback (CCA, TTT, a user's own) derives one more
named variant from an earlier one; the scoring, overlay and prediction-file callbacks read the variants.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fsl_med.data.protocol import EvalItem


@dataclass(frozen=True)
class VariantPrediction:
    """One variant's prediction of an item's scored slices.

    Attributes:
        pred: ``[n, H, W]`` uint8 binary prediction (``n`` = the item's scored slices, in ``item.z`` order).
        prob: ``[n, H, W]`` float32 foreground probability behind it.
        seconds: wall time to produce it, including the variants it was derived from.
    """

    pred: np.ndarray
    prob: np.ndarray
    seconds: float


@dataclass
class ItemPrediction:
    """The variants predicted for one query volume and organ.

    Attributes:
        item: the EP1 item (query slices, ground truth, support, spacing).
        stage: ``"val"`` or ``"test"``.
        variants: variant name -> prediction, in the order the variants were made (``plain`` first).

    The record is an accumulator: callbacks add variants with :meth:`add`; an existing variant is never replaced.
    """

    item: EvalItem
    stage: str
    variants: dict[str, VariantPrediction] = field(default_factory=dict)

    def add(self, name: str, pred: np.ndarray, prob: np.ndarray, seconds: float) -> VariantPrediction:
        """Add variant ``name``.

        Raises:
            ValueError: ``name`` exists already, or the arrays do not have the item's ``[n, H, W]`` shape.
        """
        if name in self.variants:
            raise ValueError(f"variant '{name}' was produced twice for {self.item.organ} scan {self.item.query_id}: "
                             "give each refinement a distinct name")
        shape = self.item.query_labels.shape
        if tuple(pred.shape) != shape or tuple(prob.shape) != shape:
            raise ValueError(f"variant '{name}': prediction {tuple(pred.shape)} / probability {tuple(prob.shape)} "
                             f"differ from the item's {shape}")
        v = VariantPrediction(np.asarray(pred, dtype=np.uint8), np.asarray(prob, dtype=np.float32), float(seconds))
        self.variants[name] = v
        return v
