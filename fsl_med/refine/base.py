"""Refinements: Lightning callbacks that derive a named evaluation variant from an earlier one.

A refinement runs after the module's ``test_step`` (``on_test_batch_end``) on the step's
:class:`~fsl_med.models.prediction.ItemPrediction`: it reads variant ``source`` (``plain`` unless set),
computes a new prediction and adds it as variant ``name``. Refinements run in the order of
``Trainer(callbacks=[...])``, so a refinement can derive from one listed before it (``ttt_cca`` is CCA applied to
``ttt``). A user's own refinement is a subclass with a ``name`` and a :meth:`Refinement.refine` method::

    class Closing(Refinement):
        name = "closing"

        def refine(self, pred, prob, item, module):
            return ndimage.binary_closing(pred, np.ones((1, 3, 3), bool)).astype(np.uint8), prob
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import numpy as np

from fsl_med.data.protocol import EvalItem
from fsl_med.errors import ConfigError
from fsl_med.models.prediction import ItemPrediction


class Refinement(L.Callback):
    """Base class of test-time refinements (a callback deriving variant ``name`` from variant ``source``).

    Attributes:
        name: the variant it produces (reported as ``test/dice_<name>``; must be unique in a run).
        source: the variant it refines (``plain``: the module's prediction).
    """

    name: str = ""
    source: str = "plain"

    def refine(self, pred: np.ndarray, prob: np.ndarray, item: EvalItem, module: L.LightningModule
               ) -> tuple[np.ndarray, np.ndarray]:
        """The refined prediction of one item.

        Args:
            pred: ``[n, H, W]`` uint8 binary prediction of the item's scored slices (variant ``source``); read-only.
            prob: ``[n, H, W]`` float32 foreground probability behind it; read-only.
            item: the EP1 item (query slices ``item.query_images``, spacing, support).
            module: the LightningModule (its ``model`` is the few-shot segmenter).
        Returns:
            ``(pred, prob)`` of the same shapes (return ``prob`` unchanged if the refinement does not change it).
        """
        raise NotImplementedError

    def apply(self, record: ItemPrediction, module: L.LightningModule) -> None:
        """Add variant ``name`` to ``record``, derived from its variant ``source`` (timed: the variant's seconds are
        the source's plus this refinement's).

        Raises:
            ConfigError: ``source`` has not been produced (a refinement ordered after one that needs it).
        """
        if not self.name:
            raise ConfigError(f"refinement {type(self).__name__} has no name: set the class attribute 'name'")
        src = record.variants.get(self.source)
        if src is None:
            raise ConfigError(f"refinement '{self.name}' derives from variant '{self.source}', which no earlier "
                              f"callback produced (have: {', '.join(record.variants)}); list the callback that makes "
                              f"'{self.source}' before '{self.name}'")
        t0 = time.perf_counter()
        pred, prob = self.refine(src.pred, src.prob, record.item, module)
        record.add(self.name, pred, prob, src.seconds + time.perf_counter() - t0)

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        if isinstance(outputs, ItemPrediction):
            self.apply(outputs, pl_module)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, source={self.source!r})"
