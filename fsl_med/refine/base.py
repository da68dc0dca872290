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

A refinement that is not fsl_med's own is held to its contract (:meth:`Refinement.apply`): it gets read-only copies
of ``pred`` and ``prob`` and a copy of the item, so it cannot change what other variants see; whatever it raises,
a result that is not a ``(pred, prob)`` pair of the item's shape, labels outside {0, 1} (bool is fine) or a
probability outside [0, 1] (or not finite) is a one-line :class:`RefinementError` naming it (its
``eval.refinements`` entry, or ``module:Class``) and what it did.
"""

from __future__ import annotations

import copy
import inspect
import re
import time
from typing import Any

import lightning as L
import numpy as np

from fsl_med.data.protocol import EvalItem
from fsl_med.errors import ConfigError, first_line
from fsl_med.models.prediction import ItemPrediction

_VARIANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


class RefinementError(ConfigError):
    """A refinement failed or returned an invalid prediction; the message names it and what it did."""


class Refinement(L.Callback):
    """Base class of test-time refinements (a callback deriving variant ``name`` from variant ``source``).

    Attributes:
        name: the variant it produces (reported as ``test/dice_<name>``; must be unique in a run).
        source: the variant it refines (``plain``: the module's prediction).
        origin: where it came from, for error messages: its ``eval.refinements`` entry (set when loaded from there);
            empty: ``module:Class``.
    """

    name: str = ""
    source: str = "plain"
    origin: str = ""

    def refine(self, pred: np.ndarray, prob: np.ndarray, item: EvalItem, module: L.LightningModule
               ) -> tuple[np.ndarray, np.ndarray]:
        """The refined prediction of one item.

        Args:
            pred: ``[n, H, W]`` uint8 binary prediction of the item's scored slices (variant ``source``); read-only
                (change a copy: ``pred.copy()``).
            prob: ``[n, H, W]`` float32 foreground probability behind it; read-only.
            item: the EP1 item (query slices ``item.query_images``, spacing, support); a refinement that is not
                fsl_med's own gets a copy.
            module: the LightningModule (its ``model`` is the few-shot segmenter); leave its train/eval mode and
                ``requires_grad`` flags (and weights) as they were (:func:`fsl_med.refine.ttt.restored`).
        Returns:
            ``(pred, prob)`` of the item's shape: ``pred`` 0/1 (any integer, float or bool dtype), ``prob`` finite
            and in [0, 1] (return ``prob`` unchanged if the refinement does not change it). Arrays or CPU tensors.
        """
        raise NotImplementedError

    def apply(self, record: ItemPrediction, module: L.LightningModule) -> None:
        """Add variant ``name`` to ``record``, derived from its variant ``source`` (timed: the variant's seconds are
        the source's plus this refinement's).

        A refinement that is not fsl_med's own (:func:`is_builtin`) gets read-only copies of the source's arrays and
        a copy of the item, and is checked: an exception it raises, a change of the module's train/eval mode or
        ``requires_grad`` flags, and a result that :func:`checked_result` refuses are a :class:`RefinementError`.

        Raises:
            ConfigError: ``source`` has not been produced (a refinement ordered after one that needs it).
            RefinementError: the refinement failed or returned an invalid prediction (the message names it).
        """
        if not self.name:
            raise ConfigError(f"refinement {type(self).__name__} has no name: set the class attribute 'name'")
        src = record.variants.get(self.source)
        if src is None:
            raise ConfigError(f"refinement '{self.name}' derives from variant '{self.source}', which no earlier "
                              f"callback produced (have: {', '.join(record.variants)}); list the callback that makes "
                              f"'{self.source}' before '{self.name}'")
        item = record.item
        if is_builtin(self):
            t0 = time.perf_counter()
            out = self.refine(src.pred, src.prob, item, module)
            seconds = time.perf_counter() - t0
        else:
            where = f"(item: {item.organ} of query scan {item.query_id})"
            pred_in, prob_in = _read_only_copy(src.pred), _read_only_copy(src.prob)
            item_in = _item_copy(item)
            modes = _module_modes(module)
            t0 = time.perf_counter()
            try:
                out = self.refine(pred_in, prob_in, item_in, module)
            except (Exception, SystemExit) as e:  # noqa: BLE001 - user code: one line naming it
                hint = (" (pred and prob are read-only: change a copy, e.g. pred.copy())"
                        if isinstance(e, ValueError) and "read-only" in str(e) else "")
                raise RefinementError(f"refinement {describe(self)} raised {type(e).__name__}: "
                                      f"{first_line(e) or '(no message)'}{hint} {where}") from e
            seconds = time.perf_counter() - t0
            if _module_modes(module) != modes:
                raise RefinementError(f"refinement {describe(self)} changed the module's train/eval mode or "
                                      "requires_grad flags and did not restore them (e.g. with "
                                      f"fsl_med.refine.ttt.restored(module)) {where}")
            out = checked_result(self, out, item.query_labels.shape, where)
        pred, prob = out
        record.add(self.name, pred, prob, src.seconds + seconds)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Refuse a refinement that cannot work (:func:`check_refinement`) before the first item, also when it is
        composed in Python (``Trainer(callbacks=[...])``) rather than built by :func:`fsl_med.callbacks.refinements`."""
        check_refinement(self, key="")

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        if isinstance(outputs, ItemPrediction):
            self.apply(outputs, pl_module)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, source={self.source!r})"


def check_refinement(ref: Refinement, key: str = "eval.refinements") -> None:
    """Refuse a refinement that cannot work, before anything runs: no ``name`` or one that is not a folder-safe
    variant name (letters, digits, ``_``, ``-``; it names prediction folders and metrics), a ``source`` that is not
    a name, or a ``refine`` that is not overridden or does not take ``(pred, prob, item, module)``.

    Raises:
        ConfigError: naming ``ref`` (:func:`fsl_med.refine.base.describe`; after config key ``key`` unless empty)
            and what is wrong.
    """
    who = f"config key '{key}': {describe(ref)}" if key else f"refinement {describe(ref)}"
    name = getattr(ref, "name", None)
    if not name:
        raise ConfigError(f"{who} has no 'name' (the variant it produces)")
    if not isinstance(name, str) or not _VARIANT_NAME.match(name):
        raise ConfigError(f"{who} has name {name!r}: a variant name is letters, digits, '_' and "
                          "'-', starting with a letter or digit (it names metrics and prediction folders)")
    source = getattr(ref, "source", None)
    if not isinstance(source, str) or not source:
        raise ConfigError(f"{who} has source {source!r}: the name of the variant it refines "
                          "('plain' or an earlier refinement's name)")
    refine = getattr(type(ref), "refine", None)
    if refine is Refinement.refine or not callable(refine):
        raise ConfigError(f"{who} does not define refine(self, pred, prob, item, module)")
    try:
        inspect.signature(ref.refine).bind(None, None, None, None)
    except TypeError as e:
        raise ConfigError(f"{who}: refine must take (pred, prob, item, module): "
                          f"{first_line(e)}") from e
    except ValueError:  # no signature to inspect
        pass


def is_builtin(ref: Refinement) -> bool:
    """Whether ``ref`` is one of fsl_med's own refinements (a class defined in the ``fsl_med`` package)."""
    return type(ref).__module__.split(".")[0] == "fsl_med"


def describe(ref: Refinement) -> str:
    """How error messages name ``ref``: its ``eval.refinements`` entry (``file.py:Class``) when it was loaded from
    there, else ``module:Class``."""
    origin = getattr(ref, "origin", "")
    if isinstance(origin, str) and origin:
        return origin
    return f"{type(ref).__module__}:{type(ref).__qualname__}"


def checked_result(ref: Refinement, out: Any, shape: tuple[int, ...], where: str = ""
                   ) -> tuple[np.ndarray, np.ndarray]:
    """``ref``'s ``refine`` result ``out`` as ``(pred, prob)`` arrays, checked: a pair (tuple or list) of arrays (or
    CPU tensors) of ``shape``; ``pred`` bool, integer or float with values 0 and 1 only; ``prob`` a real dtype,
    finite and in [0, 1].

    Raises:
        RefinementError: naming ``ref`` and what is wrong (``where``: appended, e.g. the item).
    """
    who = f"refinement {describe(ref)}"
    tail = f" {where}" if where else ""
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        got = f"a {type(out).__name__} of {len(out)}" if isinstance(out, (tuple, list)) else _kind(out)
        raise RefinementError(f"{who} returned {got}, expected a pair (pred, prob){tail}")
    pred, prob = (_as_array(x, what, who, tail) for x, what in zip(out, ("prediction", "probability"), strict=True))
    for what, a in (("prediction", pred), ("probability", prob)):
        if a.shape != tuple(shape):
            raise RefinementError(f"{who} returned a {what} of shape {a.shape}, expected {tuple(shape)} (the item's "
                                  f"scored slices, H, W){tail}")
    if pred.dtype.kind not in "biuf":
        raise RefinementError(f"{who} returned a prediction of dtype {pred.dtype}, expected labels 0/1 (bool, "
                              f"integer or float){tail}")
    if pred.dtype.kind != "b":
        values = np.unique(pred)
        bad = values[~np.isin(values, (0, 1))]
        if bad.size:
            shown = ", ".join(_fmt(v) for v in values[:6]) + (", ..." if values.size > 6 else "")
            raise RefinementError(f"{who} returned labels {{{shown}}} outside {{0, 1}}{tail}")
    if prob.dtype.kind not in "biuf":
        raise RefinementError(f"{who} returned a probability of dtype {prob.dtype}, expected real numbers{tail}")
    finite = np.isfinite(prob)
    if not finite.all():
        n = int((~finite).sum())
        raise RefinementError(f"{who} returned a non-finite probability ({n} of {prob.size} voxels NaN or "
                              f"infinite){tail}")
    if prob.size and (prob.min() < 0 or prob.max() > 1):
        raise RefinementError(f"{who} returned probabilities outside [0, 1] (min {_fmt(prob.min())}, max "
                              f"{_fmt(prob.max())}){tail}")
    return pred, prob


def _kind(x: Any) -> str:
    return "None" if x is None else type(x).__name__


def _fmt(v: Any) -> str:
    return f"{v:g}" if isinstance(v, (float, np.floating)) else str(v)


def _as_array(x: Any, what: str, who: str, tail: str) -> np.ndarray:
    """``x`` (array-like or tensor) as a NumPy array, or a :class:`RefinementError`."""
    if x is None:
        hint = " (return prob unchanged when the refinement does not change it)" if what == "probability" else ""
        raise RefinementError(f"{who} returned None as the {what}{hint}{tail}")
    try:
        if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor (any device)
            x = x.detach().cpu().numpy()
        a = np.asarray(x)
    except Exception as e:  # noqa: BLE001 - anything NumPy cannot take
        raise RefinementError(f"{who} returned a {what} that is not an array ({type(x).__name__}: "
                              f"{first_line(e)}){tail}") from e
    if a.dtype == object:
        raise RefinementError(f"{who} returned a {what} of type {type(x).__name__}, not an array of numbers{tail}")
    return a


def _read_only_copy(a: np.ndarray) -> np.ndarray:
    out = np.array(a, copy=True)
    out.flags.writeable = False
    return out


def _item_copy(item: EvalItem) -> EvalItem:
    """A deep copy of ``item`` (changing it changes nothing the other variants or the scoring see)."""
    return copy.deepcopy(item)


def _module_modes(module: Any) -> tuple[bool, ...]:
    """The train/eval flag of every submodule and the ``requires_grad`` flag of every parameter of ``module``."""
    if not hasattr(module, "modules") or not hasattr(module, "parameters"):
        return ()
    return (*(m.training for m in module.modules()), *(p.requires_grad for p in module.parameters()))
