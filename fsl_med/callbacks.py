"""The test-time stage as Lightning callbacks, built from a run config.

``eval.variants`` chooses the built-in refinements (``cca``: :class:`~fsl_med.refine.cca.CCA`; ``ttt``:
:class:`~fsl_med.refine.ttt.TestTimeTraining`; ``ttt_cca``: CCA applied to the TTT variant); ``eval.refinements``
adds a user's own :class:`~fsl_med.refine.base.Refinement` classes (``"package.module:Class"`` or
``"path/to/file.py:Class"``), run after the built-ins in the listed order and scored after ``eval.variants``.
After the refinements come :class:`~fsl_med.evaluation.scoring.Scoring`,
:class:`~fsl_med.evaluation.overlays.Overlays` and, with ``eval.save_predictions``,
:class:`~fsl_med.evaluation.predictions.PredictionWriter`. The same list works in a plain
``Trainer(callbacks=...)``.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig

from fsl_med.config import VARIANTS
from fsl_med.errors import ConfigError
from fsl_med.evaluation.overlays import Overlays
from fsl_med.evaluation.predictions import PredictionWriter
from fsl_med.evaluation.scoring import Scoring
from fsl_med.refine.base import Refinement
from fsl_med.refine.cca import CCA
from fsl_med.refine.ttt import TestTimeTraining


def load_refinement(spec: str, key: str = "eval.refinements") -> Refinement:
    """Instantiate a user refinement named ``"package.module:Class"`` or ``"path/to/file.py:Class"`` (no arguments).

    Raises:
        ConfigError: malformed name, module or file not found or failing to import, no such class, or a class
            that is not a :class:`Refinement` subclass with a ``name``.
    """
    mod_name, sep, cls_name = str(spec).rpartition(":")
    if not sep or not mod_name or not cls_name:
        raise ConfigError(f"config key '{key}': '{spec}' must be 'package.module:Class' or 'path/to/file.py:Class'")
    try:
        if mod_name.endswith(".py"):
            path = Path(mod_name).expanduser()
            if not path.is_file():
                raise ConfigError(f"config key '{key}': file {path} does not exist")
            unique = f"fsl_med_user_refinement_{abs(hash(str(path.resolve())))}"
            module = sys.modules.get(unique)
            if module is None:
                loader_spec = importlib.util.spec_from_file_location(unique, path)
                assert loader_spec is not None and loader_spec.loader is not None
                module = importlib.util.module_from_spec(loader_spec)
                loader_spec.loader.exec_module(module)
                sys.modules[unique] = module
        else:
            module = importlib.import_module(mod_name)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - any import failure of user code is reported as one line
        raise ConfigError(f"config key '{key}': cannot import {mod_name} ({type(e).__name__}: {e})") from e
    cls = getattr(module, cls_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Refinement)):
        raise ConfigError(f"config key '{key}': {mod_name} has no Refinement subclass named {cls_name}")
    obj = cls()
    if not obj.name:
        raise ConfigError(f"config key '{key}': {spec} has no 'name' (the variant it produces)")
    return obj


def refinements(cfg: DictConfig, extra: list[Refinement] | tuple[Refinement, ...] = ()) -> list[Refinement]:
    """The refinement callbacks of ``cfg.eval.variants`` and ``cfg.eval.refinements``, then ``extra``, in run order.

    Raises:
        ConfigError: a user refinement cannot be loaded, or two refinements produce the same variant.
    """
    v = list(cfg.eval.variants)
    out: list[Refinement] = []
    if "cca" in v:
        out.append(CCA(cfg.eval.cca_mode))
    if "ttt" in v or "ttt_cca" in v:
        out.append(TestTimeTraining())
        if "ttt_cca" in v:
            out.append(CCA(cfg.eval.cca_mode, source="ttt", name="ttt_cca"))
    out += user_refinements(cfg, extra)
    names = ["plain", *(r.name for r in out)]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"config key 'eval.refinements': variant name(s) {dup} produced twice; give each "
                          "refinement a distinct name")
    return out


def user_refinements(cfg: DictConfig, extra: list[Refinement] | tuple[Refinement, ...] = ()) -> list[Refinement]:
    """The refinements of ``cfg.eval.refinements`` (loaded), then ``extra``."""
    return [load_refinement(s) for s in cfg.eval.get("refinements") or []] + list(extra)


def test_time_callbacks(cfg: DictConfig, run_dir: str | Path | bool | None = None,
                        extra: list[Refinement] | tuple[Refinement, ...] = (),
                        refs: list[Refinement] | None = None) -> list[Callback]:
    """Refinements, then scoring, overlays (into ``<run>/overlays``) and, with ``eval.save_predictions``,
    prediction files (``<run>/predictions``) for a test run of ``cfg``. ``run_dir``: a folder; ``True``: the run
    folder :class:`fsl_med.runs.RunFolder` binds at setup; ``None``: nothing is written.
    ``refs``: the result of :func:`refinements` (``cfg``, ``extra``) when already built (e.g. to fail early)."""
    refs = refinements(cfg, extra) if refs is None else refs
    user = [r.name for r in refs if r.name not in VARIANTS]
    variants = list(cfg.eval.variants) + user  # eval.variants, then the user's
    fixed = Path(run_dir) if run_dir not in (None, True, False) else None  # type: ignore[arg-type]
    overlays = Overlays(cfg.eval.overlay_slices, fixed / "overlays" if fixed else None, variants,
                        bind=run_dir is True)
    out: list[Callback] = [*refs, Scoring(variants, hd95=bool(cfg.eval.hd95)), overlays]
    if cfg.eval.get("save_predictions") and run_dir not in (None, False):
        out.append(PredictionWriter(fixed / "predictions" if fixed else None, variants))
    return out


test_time_callbacks.__test__ = False  # type: ignore[attr-defined]  # not a pytest test when imported by one


def find(callbacks: list[Callback], kind: type) -> list:
    """The callbacks of type ``kind`` in ``callbacks`` (e.g. ``trainer.callbacks``), in order."""
    return [c for c in callbacks if isinstance(c, kind)]
