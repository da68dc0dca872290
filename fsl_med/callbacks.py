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
import inspect
import sys
from pathlib import Path

from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig

from fsl_med.config import VARIANTS
from fsl_med.errors import ConfigError, first_line
from fsl_med.evaluation.overlays import Overlays
from fsl_med.evaluation.predictions import PredictionWriter
from fsl_med.evaluation.scoring import Scoring
from fsl_med.refine.base import Refinement, check_refinement, describe
from fsl_med.refine.cca import CCA
from fsl_med.refine.ttt import TestTimeTraining


def load_refinement(spec: str, key: str = "eval.refinements") -> Refinement:
    """Instantiate a user refinement named ``"package.module:Class"`` or ``"path/to/file.py:Class"`` (no arguments);
    ``spec`` is kept as its ``origin`` (how errors name it).

    Raises:
        ConfigError: malformed name, module or file not found or failing to import, no such class, a class that is
            not a :class:`Refinement` subclass, needs constructor arguments or fails to construct, or an instance
            that :func:`check_refinement` refuses.
    """
    spec = str(spec)
    mod_name, sep, cls_name = spec.rpartition(":")
    if not sep or not mod_name or not cls_name:
        raise ConfigError(f"config key '{key}': '{spec}' must be 'package.module:Class' or 'path/to/file.py:Class'")
    try:
        if mod_name.endswith(".py"):
            path = Path(mod_name).expanduser()
            if not path.exists():
                raise ConfigError(f"config key '{key}': file {path} does not exist")
            if not path.is_file():
                raise ConfigError(f"config key '{key}': {path} is not a file")
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
    except (Exception, SystemExit) as e:  # noqa: BLE001 - any import failure of user code is reported as one line
        raise ConfigError(f"config key '{key}': cannot import {mod_name} ({type(e).__name__}: {first_line(e)})") from e
    cls = getattr(module, cls_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Refinement)):
        raise ConfigError(f"config key '{key}': {mod_name} has no Refinement subclass named {cls_name}")
    try:
        inspect.signature(cls).bind()
    except TypeError as e:
        raise ConfigError(f"config key '{key}': {spec}: {cls_name}() needs arguments ({first_line(e)}), but "
                          f"'{key}' builds it without any; give them defaults") from e
    except ValueError:  # no signature to inspect: let the call tell
        pass
    try:
        obj = cls()
    except (Exception, SystemExit) as e:  # noqa: BLE001 - user code: one line naming it
        raise ConfigError(f"config key '{key}': {spec}: {cls_name}() raised {type(e).__name__}: "
                          f"{first_line(e) or '(no message)'}") from e
    try:
        obj.origin = spec
    except AttributeError:  # a read-only attribute of the user's class: errors name module:Class instead
        pass
    check_refinement(obj, key)
    return obj


def refinements(cfg: DictConfig, extra: list[Refinement] | tuple[Refinement, ...] = ()) -> list[Refinement]:
    """The refinement callbacks of ``cfg.eval.variants`` and ``cfg.eval.refinements``, then ``extra``, in run order.

    Raises:
        ConfigError: a user refinement cannot be loaded or is refused by :func:`check_refinement`, two refinements
            produce the same variant, one that is not built from ``eval.variants`` takes a built-in variant's name,
            or one derives from a variant that no earlier one produces.
    """
    v = list(cfg.eval.variants)
    out: list[Refinement] = []
    if "cca" in v:
        out.append(CCA(cfg.eval.cca_mode))
    if "ttt" in v or "ttt_cca" in v:
        out.append(TestTimeTraining())
        if "ttt_cca" in v:
            out.append(CCA(cfg.eval.cca_mode, source="ttt", name="ttt_cca"))
    builtin = len(out)
    for r in extra:
        check_refinement(r, key="")
    out += user_refinements(cfg, extra)
    names = ["plain", *(r.name for r in out)]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"config key 'eval.refinements': variant name(s) {dup} produced twice; give each "
                          "refinement a distinct name")
    for r in out[builtin:]:
        if r.name in VARIANTS:
            raise ConfigError(f"config key 'eval.refinements': {describe(r)} produces variant '{r.name}', the name of "
                              f"a built-in variant (chosen with eval.variants); give it another name")
    made = ["plain"]
    for r in out:
        if r.source not in made:
            raise ConfigError(f"config key 'eval.refinements': refinement '{r.name}' ({describe(r)}) derives from "
                              f"variant '{r.source}', which no earlier callback produced (have: {', '.join(made)}); "
                              f"list the callback that makes '{r.source}' before '{r.name}'")
        made.append(r.name)
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
