"""The ``segment`` verb and its Python API: segment one organ in a user's own scans with a trained checkpoint.

:class:`Segmenter` loads a checkpoint once; :meth:`Segmenter.segment` segments a query volume given ``k`` support
(image, mask) pairs, from arrays with an affine or from NIfTI paths, and returns the mask and the foreground
probability on the query's own grid. ``fsl-med segment`` (:func:`segment`) is a thin wrapper that reads the files,
calls it and writes the mask::

    from fsl_med.segment import Segmenter
    seg = Segmenter.from_checkpoint("runs/mri/version_0/checkpoints/last.ckpt", device="cpu")
    out = seg.segment("image_2.nii.gz", [("image_1.nii.gz", "label_1.nii.gz")], label=1)
    out.mask, out.probability, out.affine      # [X, Y, Z] on the query's grid

* Forward: every volume (supports and query) goes through the checkpoint's preprocessing plan
  (:class:`fsl_med.prepare.plan.Plan`, the one ``fsl-med prepare`` used on the training data: intensity steps,
  reorientation to LAS, resampling, crop/pad), so a raw scan reaches exactly the training grid. A checkpoint
  trained on data prepared elsewhere does not know its plan: then ``plan="ct"|"mri"`` (``--plan``) is required.
  When ``data.image_size`` differs from the plan's size, slices are resized like the training loader does
  (image bilinear, mask nearest). Images are then normalised with the checkpoint's stored normaliser
  (``ckpt["normalizer"]``: fixed training statistics for CT; per-volume z-score for MRI).
* EP1: the support organ's extent is split into ``eval.npart`` parts; each query slice uses the part at its
  relative position in the query range; with ``k`` supports each part merges the prototypes of the ``k`` volumes'
  slices (and ``shots_per_part`` slices of each).
* Backward: the plan's inverse maps the prediction by nearest neighbour through world coordinates onto the
  query's voxel grid (exactly its shape and affine); voxels outside the training grid are 0.

Model arrays are slice-first ``[Z, H, W]`` = nibabel ``[X, Y, Z]`` transposed ``(2, 1, 0)``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fsl_med.atomic import check_output_file, refuse_overwriting_inputs
from fsl_med.config import CCA_MODES, DEFAULT_CCA_MODE
from fsl_med.errors import ConfigError, DataError, Placeholder, arg, first_line, given
from fsl_med.prepare.geometry import nearest_on_grid, spacing_of
from fsl_med.prepare.plan import CHECKPOINT_KEY as PLAN_KEY
from fsl_med.prepare.plan import Plan, Scan, check_resampling, default_plan, plan_from_dict

log = logging.getLogger(__name__)

CCA_CHOICES = (*CCA_MODES, "none")
DEFAULT_CCA = DEFAULT_CCA_MODE
"""Connected-component post-processing of ``segment``: that of ``eval`` (``eval.cca_mode``), per slice as the paper's
CCA (method.md §6), so that ``segment`` reproduces what ``eval`` scores."""

@dataclass(frozen=True)
class SegmentResult:
    """What :func:`segment` wrote.

    Attributes:
        path: the written prediction (uint8, 1 = organ, the query's shape and affine).
        voxels: number of organ voxels in the output.
        volume_ml: their volume in ml (query voxel size).
        z_range: the query slice range ``(A, B)`` (inclusive, original third array axis) that was segmented.
        support_slices: per support part, the support slices used (training-grid z indices, LAS: inferior
            to superior).
        shape: the output's shape.
    """

    path: Path
    voxels: int
    volume_ml: float
    z_range: tuple[int, int]
    support_slices: list[list[int]]
    shape: tuple[int, int, int]


def parse_z_range(text: str) -> tuple[int, int]:
    """``"A:B"`` -> ``(A, B)`` (inclusive).

    Raises:
        ConfigError: not two integers separated by ``:``, negative, or ``A > B``.
    """
    parts = str(text).split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        a, b = int(parts[0]), int(parts[1])
    except ValueError:
        raise ConfigError(f"{given('z_range', text, repr(text))}: expected A:B with integer slice indices, "
                          "e.g. 10:40") from None
    if a < 0 or b < a:
        raise ConfigError(f"{given('z_range', text)}: need 0 <= A <= B")
    return a, b


# -- geometry ---------------------------------------------------------------------------------------

def model_z_range(z_range: tuple[int, int], shape: tuple[int, int, int], affine: np.ndarray,
                  model_affine: np.ndarray, model_depth: int) -> tuple[int, int]:
    """The model-grid slices (inclusive range) that cover original slices ``z_range`` (third array axis).

    The corners of the slab ``[0, X-1] x [0, Y-1] x [A, B]`` are mapped to model voxel coordinates; for an
    axial query (third axis along inferior-superior, flipped or not) this is exactly the matching slices.
    """
    a, b = z_range
    corners = np.array([[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (a, b)]).T
    m = np.linalg.inv(np.asarray(model_affine, dtype=np.float64)) @ np.asarray(affine, dtype=np.float64)
    z = (m @ corners)[2]
    lo = int(np.clip(math.floor(z.min() + 0.5 - 1e-6), 0, model_depth - 1))
    hi = int(np.clip(math.floor(z.max() + 0.5 + 1e-6), 0, model_depth - 1))
    return lo, hi


# -- inputs -----------------------------------------------------------------------------------------

def _read_volume(path: Path, option: str) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    from fsl_med.prepare.nifti import read_nifti

    if not path.is_file():
        raise DataError(f"{option} {path}: file not found")
    arr, affine, zooms = read_nifti(path)
    if arr.ndim != 3:
        raise DataError(f"{option} {path}: expected a 3D volume, got {arr.ndim}D shape {tuple(arr.shape)}")
    if arr.size == 0:
        raise DataError(f"{option} {path}: empty volume of shape {tuple(arr.shape)}")
    if arr.dtype.kind not in "biuf":  # e.g. RGB24 (a structured dtype); complex is refused by read_nifti
        raise DataError(f"{option} {path}: voxel type {arr.dtype} is not a real number (expected a grey-value image)")
    return arr, affine, zooms


def _check_finite(arr: np.ndarray, path: Path, option: str) -> np.ndarray:
    from fsl_med.prepare.nifti import check_intensities

    img = np.asarray(arr, dtype=np.float32)
    if not np.isfinite(img).all():
        raise DataError(f"{option} {path}: contains {int((~np.isfinite(img)).sum())} NaN/inf voxels")
    check_intensities(img, f"{option} {path}")
    return img


def _finite_image(inp: Any) -> np.ndarray:
    """An image input's voxels as float32, refused when any is NaN/inf or too large (:func:`_check_finite`)."""
    return _check_finite(inp.array, inp.ref, inp.option)


def _few(values: list[int], n: int = 10) -> str:
    """``[1, 2, 3]``, or the first ``n`` and how many more (a message stays one readable line)."""
    return str(values) if len(values) <= n else f"{values[:n]} and {len(values) - n} more"


def _binary_mask(mask: np.ndarray, option: str, path: Any, label: int | None) -> np.ndarray:
    """The organ's binary mask from a binary or multi-label mask (see :func:`segment`); messages name it
    ``option path``."""
    m = np.asarray(mask)
    if m.dtype.kind == "f":
        if not np.isfinite(m).all() or not np.array_equal(m, np.rint(m)):
            raise DataError(f"{option} {path}: mask has non-integer values")
    m = np.rint(m).astype(np.int64) if m.dtype.kind == "f" else m.astype(np.int64)
    present = [int(v) for v in np.unique(m) if v != 0]
    if not present:
        raise DataError(f"{option} {path}: empty mask (no foreground voxel)")
    if label is None:
        if len(present) > 1:
            raise DataError(f"{option} {path}: not a binary mask (labels present: {_few(present)}); "
                            f"choose one with {given('label', Placeholder('N'))}")
        return m != 0
    if label not in present:
        raise ConfigError(f"{given('label', label)}: not in the support mask {path} (labels present: {_few(present)})")
    return m == label


def _support_indices(organ_slices: np.ndarray, npart: int, shots: int) -> list[list[int]]:
    """Support slices per part (:func:`fsl_med.data.protocol.support_slices_per_part`), as a config error."""
    from fsl_med.data.protocol import support_slices_per_part

    try:
        return support_slices_per_part(organ_slices, npart, shots)
    except DataError as err:
        raise ConfigError(f"{given('shots_per_part', shots)}: {err} on the model grid") from err


def _device(name: Any) -> torch.device:
    """``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a :class:`torch.device` of those kinds; a one-line ``device``
    (``--device``) error otherwise (unknown name, CUDA not available, no such GPU)."""
    if isinstance(name, torch.device):
        name = str(name)
    if not isinstance(name, str):
        raise ConfigError(f"{given('device', name, repr(name))}: must be cpu or cuda (a string or torch.device)")
    if name == "cpu":
        return torch.device("cpu")
    kind, _, index = name.partition(":")
    if kind == "cuda" and (not index or index.isdigit()):
        if not torch.cuda.is_available():
            raise ConfigError(f"{given('device', name)}: CUDA is not available on this machine (use {given('device', 'cpu')})")
        if index and int(index) >= torch.cuda.device_count():
            raise ConfigError(f"{given('device', name)}: no such GPU ({torch.cuda.device_count()} visible)")
        return torch.device(name)
    raise ConfigError(f"{given('device', name)}: must be cpu or cuda")


def _as_plan(plan: Any) -> Plan:
    """A :class:`Plan` instance, or ``"ct"``/``"mri"`` (anything else: a one-line ``plan`` error)."""
    if isinstance(plan, Plan):
        return plan
    if not isinstance(plan, str):
        raise ConfigError(f"{given('plan', plan, repr(plan))}: must be mri, ct or a Plan instance")
    return default_plan(plan)  # an unknown kind: one-line plan error


def _show(value: Any) -> str:
    """A value as a message shows it: a string as is, anything else as its repr."""
    return value if isinstance(value, str) else repr(value)


def _is_int(value: Any) -> bool:
    """An integer (Python or numpy), not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _positive_int(value: Any, name: str) -> int:
    """``value``, the argument of keyword ``name``, checked to be an integer >= 1."""
    if not _is_int(value) or value < 1:
        raise ConfigError(f"{given(name, value, repr(value))}: must be an integer >= 1")
    return int(value)


def _z_range(z_range: Any) -> tuple[int, int] | None:
    """``None``, ``"A:B"`` or a pair of integers ``(A, B)``, checked (``0 <= A <= B``)."""
    if z_range is None:
        return None
    if isinstance(z_range, str):
        return parse_z_range(z_range)
    if isinstance(z_range, np.ndarray) and z_range.ndim == 1:
        z_range = z_range.tolist()
    if not (isinstance(z_range, (tuple, list)) and len(z_range) == 2 and all(_is_int(v) for v in z_range)):
        raise ConfigError(f"{given('z_range', z_range, repr(z_range))}: expected (A, B) or 'A:B' with integer slice "
                          "indices, e.g. (10, 40)")
    a, b = int(z_range[0]), int(z_range[1])
    if a < 0 or b < a:
        raise ConfigError(f"{given('z_range', z_range, f'{a}:{b}')}: need 0 <= A <= B")
    return a, b


def _label(label: Any) -> int | None:
    """``None`` or a label id ``>= 1`` (0 is the background)."""
    if label is None:
        return None
    if not _is_int(label) or label < 1:
        raise ConfigError(f"{given('label', label, repr(label))}: must be an integer label id >= 1 (0 is the background)")
    return int(label)


def _check_options(cca: Any, shots_per_part: Any, z_range: Any) -> tuple[int, int] | None:
    """The options both :func:`segment` (before the checkpoint is read) and :meth:`Segmenter.segment` check;
    returns the parsed ``z_range``."""
    if not isinstance(cca, str) or cca not in CCA_CHOICES:
        raise ConfigError(f"{given('cca', cca, _show(cca))}: must be one of {', '.join(CCA_CHOICES)}")
    _positive_int(shots_per_part, "shots_per_part")
    return _z_range(z_range)


def _query_range(zr: tuple[int, int] | None, n_slices: int, where: Any) -> tuple[int, int]:
    """``zr`` (default: every slice) checked against the query's third array axis of ``n_slices`` slices."""
    if zr is None:
        return 0, n_slices - 1
    if zr[1] >= n_slices:
        raise ConfigError(f"{given('z_range', zr, f'{zr[0]}:{zr[1]}')}: outside the query's slices 0..{n_slices - 1} "
                          f"(its third array axis; {where})")
    return zr


@dataclass(frozen=True)
class _Input:
    """One checked input volume: ``array`` ``[X, Y, Z]``, its affine, and how messages name it: ``option``
    (``query``, ``--query`` on the command line) and ``ref`` (its path, or ``(array 0)``)."""

    array: np.ndarray
    affine: np.ndarray
    option: str
    ref: Any

    @property
    def name(self) -> str:
        return f"{self.option} {self.ref}"


_VOLUME_TYPES = (str, os.PathLike, np.ndarray, torch.Tensor)
"""What one volume may be given as: a NIfTI path, a numpy array or a torch tensor."""


def _kind(value: Any) -> str:
    """A short description of ``value`` for messages: its type, and its shape for arrays."""
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return f"{type(value).__name__} of shape {tuple(value.shape)}"
    if isinstance(value, (str, bytes, os.PathLike)):
        return f"{type(value).__name__} {str(value)!r}"
    return "None" if value is None else type(value).__name__


def _as_numpy(value: Any, what: str) -> np.ndarray | None:
    """``value`` as a numpy array when it is an array or a tensor (a tensor is detached and moved to the CPU;
    nothing is copied that need not be); ``None`` otherwise."""
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, torch.Tensor):
        t = value.detach()
        if t.is_complex():
            raise DataError(f"{what}: complex-valued voxels ({t.dtype}); store the magnitude image as real values")
        if t.dtype in (torch.bfloat16, torch.float16):
            t = t.float()
        try:
            return t.cpu().numpy()
        except (RuntimeError, TypeError) as e:  # sparse, meta or quantised tensors
            raise ConfigError(f"{what}: cannot read the tensor as an array ({first_line(e)})") from e
    return None


def _check_array(arr: np.ndarray, what: str, mask: bool) -> None:
    """An input array's dtype and shape: real numbers (booleans only for a mask), 3D, not empty."""
    kind = arr.dtype.kind
    if kind == "c":
        raise DataError(f"{what}: complex-valued voxels ({arr.dtype}); store the magnitude image as real values")
    if kind == "b" and not mask:
        raise DataError(f"{what}: a boolean array is a mask, not an image (intensities expected)")
    if kind not in "biuf":
        raise DataError(f"{what}: dtype {arr.dtype} is not numeric (expected real-valued voxels)")
    if arr.ndim != 3 or arr.size == 0:
        raise DataError(f"{what}: expected a non-empty 3D array, got shape {tuple(arr.shape)}")


def _array_affine(affine: Any, what: str, source: str) -> np.ndarray:
    """An array input's affine (a 4x4 array, tensor or nested list) as float64, checked like a file's."""
    from fsl_med.prepare.nifti import check_affine

    raw = affine.detach().cpu() if isinstance(affine, torch.Tensor) else affine
    try:
        aff = np.array(raw, dtype=np.float64)
    except (TypeError, ValueError):
        aff = None
    if aff is None or aff.shape != (4, 4) or not np.isfinite(aff).all():
        got = f"shape {aff.shape}" if aff is not None and aff.shape != (4, 4) else _kind(affine) if aff is None \
            else "NaN/inf entries"
        raise ConfigError(f"{what}: {source} must be a finite 4x4 matrix (got {got})")
    if not np.allclose(aff[3], (0.0, 0.0, 0.0, 1.0)):
        raise ConfigError(f"{what}: {source} must end with the row [0, 0, 0, 1] (got {aff[3].tolist()})")
    check_affine(what, aff, source)
    return aff


def _as_path(value: Any, option: str, expected: str = "a NIfTI path, a numpy array or a torch tensor") -> Path:
    """A path input: a ``str`` or ``os.PathLike`` that is not empty (anything else: a one-line error saying what
    was ``expected``)."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        raise ConfigError(f"{option}: expected {expected}, got {_kind(value)}")
    if not value.strip():
        raise ConfigError(f"{option}: empty path")
    return Path(value)


def _existing_file(path: Path, option: str) -> Path:
    if path.is_dir():
        raise DataError(f"{option} {path}: is a folder, not a file")
    if not path.is_file():
        raise DataError(f"{option} {path}: file not found")
    return path


def _input(value: Any, affine: Any, option: str, index: int, source: str, mask: bool = False) -> _Input:
    """One volume given as a path, an array or a tensor, checked: an array needs its affine (``source`` names the
    argument that gives it: ``query_affine``, ``support_affines[i]``), except a ``mask`` array, which lies on its
    image's grid; a path must not come with one (its affine is the file's)."""
    if value is None:
        raise ConfigError(f"{option}: missing (None); give a NIfTI path, a numpy array or a torch tensor")
    what = f"{option} (array {index})"
    arr = _as_numpy(value, what)
    if arr is not None:
        _check_array(arr, what, mask=mask)
        if affine is None:
            if mask:
                return _Input(arr, np.eye(4), option, f"(array {index})")
            raise ConfigError(f"{what}: an array input needs its 4x4 affine ({source})")
        return _Input(arr, _array_affine(affine, what, source), option, f"(array {index})")
    path = _as_path(value, option)
    if affine is not None:
        raise ConfigError(f"{source}: given for {option} {path}, a file whose affine is its header's; pass an affine "
                          "only with an array")
    arr, aff, _ = _read_volume(_existing_file(path, option), option)
    return _Input(arr, aff, option, path)


def _support_pairs(supports: Any) -> list[tuple[Any, Any]]:
    """``supports`` as a list of (image, mask) pairs: a list, tuple or any iterable (a generator) of pairs, or one
    pair given alone (a tuple or list of two volumes, e.g. ``(image, mask)``)."""
    if supports is None or isinstance(supports, (*_VOLUME_TYPES, bytes, dict)) or not isinstance(supports, Iterable):
        raise ConfigError(f"supports: expected a list of (image, mask) pairs, got {_kind(supports)}")
    items = list(supports)
    if not items:
        raise ConfigError("supports: at least one support pair is needed")
    if isinstance(supports, (tuple, list)) and len(items) == 2 and isinstance(items[0], _VOLUME_TYPES):
        items = [tuple(items)]  # one (image, mask) pair, not a list of pairs
    for i, pair in enumerate(items):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ConfigError(f"supports[{i}]: expected an (image, mask) pair, got {_kind(pair)}"
                              + (f" of {len(pair)}" if isinstance(pair, (tuple, list)) else ""))
    return [(img, m) for img, m in items]


def _support_affines(affines: Any, n: int) -> list[Any]:
    """``support_affines`` as one entry per support (``None`` for path supports): a list, tuple, iterable or
    ``[k, 4, 4]`` array; a single 4x4 affine is accepted for a single support."""
    if affines is None:
        return [None] * n
    if isinstance(affines, (np.ndarray, torch.Tensor)) and affines.ndim == 2:
        if n != 1:
            raise ConfigError(f"support_affines: one 4x4 affine for {n} supports; give a list of {n}")
        return [affines]
    if isinstance(affines, (str, bytes, dict)) or not isinstance(affines, Iterable):
        raise ConfigError(f"support_affines: expected a list of 4x4 affines, got {_kind(affines)}")
    out = list(affines)
    if len(out) != n:
        raise ConfigError(f"support_affines: {len(out)} affines for {n} supports")
    return out


def checkpoint_plan(ck: dict[str, Any], path: Path, plan: str | Plan | None = None) -> Plan:
    """The preprocessing plan to apply to new scans for checkpoint ``ck`` (read from ``path``).

    ``plan`` (``"ct"``, ``"mri"`` or a :class:`Plan`) overrides the stored one (a warning says so when they
    differ). Raises:
        ConfigError: the checkpoint does not know its plan (trained on data prepared elsewhere, or written before
            plans were stored) and ``plan`` is not given; or ``plan`` is not ``ct``/``mri``.
        WeightsError: the stored plan is malformed.
    """
    from fsl_med.errors import WeightsError

    stored = ck.get(PLAN_KEY)
    known: Plan | None = None
    if stored is not None:
        try:
            known = plan_from_dict(stored, f"{path}: stored preprocessing plan")
        except ConfigError as e:
            raise WeightsError(str(e)) from e
    if plan is None:
        if known is None:
            raise ConfigError(f"{arg('ckpt')} {path}: the preprocessing plan of its training data is unknown (data "
                              "prepared outside fsl-med prepare, or an older checkpoint); pass "
                              f"{given('plan', 'ct')} or {given('plan', 'mri')}")
        return known
    chosen = _as_plan(plan)
    if known is not None and known != chosen:
        log.warning("%s %s overrides the checkpoint's stored plan %s", arg("plan"), chosen.as_dict(), known.as_dict())
    return chosen


@dataclass(frozen=True)
class Segmentation:
    """What :meth:`Segmenter.segment` returns, on the query's own grid.

    Attributes:
        mask: uint8 ``[X, Y, Z]`` of the query's shape, 1 = organ (after CCA); 0 outside ``z_range``.
        probability: float32 ``[X, Y, Z]`` foreground probability (before CCA); 0 outside ``z_range``.
        affine: the query's affine.
        z_range: the query slices ``(A, B)`` (inclusive, original third array axis) that were segmented.
        support_slices: per support volume, per part, the slices used (plan-grid z indices, LAS: inferior first).
    """

    mask: np.ndarray
    probability: np.ndarray
    affine: np.ndarray
    z_range: tuple[int, int]
    support_slices: list[list[list[int]]]


class Segmenter:
    """A trained checkpoint ready to segment new scans (load once, segment many). See the module docstring.

    Build it with :meth:`from_checkpoint`; :meth:`segment` segments one query; :meth:`prepare` is the forward step
    applied to every input (the checkpoint's plan, identical to ``fsl-med prepare``'s).
    """

    def __init__(self, module: Any, cfg: Any, plan: Plan, normalizer: Any, device: torch.device,
                 batch_size: int = 8) -> None:
        _positive_int(batch_size, "batch_size")
        self.module, self.cfg, self.plan, self.normalize = module, cfg, plan, normalizer
        self.device, self.batch_size = device, int(batch_size)
        self.image_size, self.npart = int(cfg.data.image_size), int(cfg.eval.npart)
        self.three_slices = bool(cfg.data.three_slices)
        module.eval().to(device)

    @classmethod
    def from_checkpoint(cls, ckpt: str | os.PathLike[str], *, device: str | torch.device = "cpu",
                        plan: str | Plan | None = None, batch_size: int = 8) -> Segmenter:
        """Load ``ckpt`` (written by ``fsl-med train``) on ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a
        :class:`torch.device`).

        Args:
            plan: ``"ct"``/``"mri"``/a :class:`Plan`, required when the checkpoint does not know the plan of its
                training data (see :func:`checkpoint_plan`).
        Raises:
            DataError: ``ckpt`` missing or a folder. WeightsError: corrupt or foreign checkpoint. ConfigError: plan
            unknown and not given, bad plan, device or batch size, ``ckpt`` not a path.
        """
        from fsl_med.checkpoints import load_checkpoint, module_from_checkpoint, stored_config
        from fsl_med.data.volumes import Normalizer
        from fsl_med.prepare.datasets import get_dataset_info

        dev = _device(device)
        _positive_int(batch_size, "batch_size")
        if plan is not None:
            _as_plan(plan)
        path = _existing_file(_as_path(ckpt, arg("ckpt"), "a checkpoint path"), arg("ckpt"))
        ck = load_checkpoint(path)
        cfg = stored_config(ck, path)
        chosen = checkpoint_plan(ck, path, plan)
        modality = get_dataset_info(cfg.data.dataset).modality
        if chosen.modality != modality:
            log.warning("%s was trained on %s data; new scans are prepared with the %s plan", path, modality,
                        chosen.modality)
        norm_d = ck.get("normalizer") or {}
        normalizer = Normalizer(mean=norm_d.get("mean"), std=norm_d.get("std"),
                                before_resize=bool(cfg.data.resize_last))
        if modality == "ct" and normalizer.mean is None:
            log.warning("%s has no stored CT intensity statistics: normalising each volume by its own mean/std", path)
        module, _ = module_from_checkpoint(path, cfg, ck)
        del ck
        return cls(module, cfg, chosen, normalizer, dev, batch_size)

    def prepare(self, image: Any, affine: Any, label: Any = None) -> Scan:
        """The plan's forward step on a source volume ``[X, Y, Z]`` (array or tensor) with its 4x4 affine (and
        optionally its label ids 0..255 on the same grid): what ``fsl-med prepare`` writes for the same scan,
        array for array. The inputs are checked as :meth:`segment` checks them and never modified.

        Raises:
            DataError, ConfigError: one line naming ``image``, ``affine`` or ``label`` and what is wrong.
        """
        img = _input(image, affine, "image", 0, "affine")
        lab = None
        if label is not None:
            lab = _as_numpy(label, "label (array)")
            if lab is None:
                raise ConfigError(f"label: expected a numpy array or a torch tensor, got {_kind(label)}")
            _check_array(lab, "label (array)", mask=True)
            if lab.shape != img.array.shape:
                raise DataError(f"label (array): shape {tuple(lab.shape)} differs from the image's "
                                f"{tuple(img.array.shape)}")
            if lab.dtype.kind == "f" and not (np.isfinite(lab).all() and np.array_equal(lab, np.rint(lab))):
                raise DataError("label (array): label ids must be integers (non-integer or NaN/inf values)")
            if lab.size and (lab.min() < 0 or lab.max() > 255):
                raise DataError(f"label (array): label ids must lie in 0..255 (range {lab.min()}..{lab.max()})")
        return self._prepare(_finite_image(img), img.affine, lab, img.name)

    def _prepare(self, image: np.ndarray, affine: np.ndarray, label: np.ndarray | None, what: str) -> Scan:
        """:meth:`Plan.forward`, its errors naming ``what``."""
        try:
            return self.plan.forward(image, affine, label)
        except DataError as e:
            raise DataError(f"{what}: {e}") from e

    def _normalised(self, grid: np.ndarray, what: str) -> np.ndarray:
        """Plan grid image ``[X, Y, Z]`` -> normalised model slices ``[Z, H, W]``, as the data module normalises a
        loaded volume (with ``data.resize_last`` the statistics of the grid, before the resize)."""
        from fsl_med.data.volumes import image_stats

        slices = self._model_slices(grid, "bilinear")
        resized = slices.shape[1:] != (grid.shape[1], grid.shape[0])
        stats = image_stats(np.ascontiguousarray(grid.transpose(2, 1, 0), dtype=np.float32)) if resized else None
        return self.normalize(slices, what, stats)

    def _model_slices(self, grid: np.ndarray, mode: str) -> np.ndarray:
        """Plan grid ``[X, Y, Z]`` -> model slices ``[Z, H, W]`` at ``data.image_size`` (resized like the loader)."""
        from fsl_med.data.volumes import resize_slices

        zyx = np.ascontiguousarray(grid.transpose(2, 1, 0))
        if zyx.shape[1:] == (self.image_size, self.image_size):
            return zyx
        return resize_slices(zyx, self.image_size, mode)

    def _support(self, img: _Input, m: _Input, label: int | None, shots: int
                 ) -> tuple[np.ndarray, np.ndarray, list[list[int]]]:
        """One support pair -> (normalised model slices, organ mask slices, slices per part)."""
        if m.array.shape != img.array.shape:
            raise DataError(f"{m.name}: shape {tuple(m.array.shape)} differs from the support image's "
                            f"{tuple(img.array.shape)}")
        organ = _binary_mask(m.array, m.option, m.ref, label)
        ids = np.rint(m.array).astype(np.int64) if m.array.dtype.kind == "f" else m.array.astype(np.int64)
        if label is not None and ids.min() >= 0 and ids.max() <= 255:
            lab, value = ids.astype(np.uint8), label  # as prepare does: every label resampled, then the organ taken
        else:
            lab, value = organ.astype(np.uint8), 1
        self._check_geometry(img)
        prep = self._prepare(_finite_image(img), img.affine, lab, img.name)
        assert prep.label is not None
        sup_masks = self._model_slices((prep.label == value).astype(np.uint8), "nearest") > 0
        organ_slices = np.flatnonzero(sup_masks.reshape(sup_masks.shape[0], -1).any(axis=1))
        if organ_slices.size == 0:
            raise DataError(f"{m.name}: the organ lies outside the model's field of view after preparation")
        images = self._normalised(prep.image, img.name)
        return images, sup_masks, _support_indices(organ_slices, self.npart, shots)

    def _check_geometry(self, inp: _Input) -> None:
        """Refuse a volume the plan cannot resample sensibly; note one it resamples far (:func:`check_resampling`)."""
        note = check_resampling(self.plan, inp.array.shape, inp.affine, inp.name)
        if note is not None:
            log.warning("%s", note)

    def segment(self, query: Any, supports: Any, *, query_affine: Any = None, support_affines: Any = None,
                label: int | None = None, z_range: tuple[int, int] | str | None = None, shots_per_part: int = 1,
                cca: str = DEFAULT_CCA) -> Segmentation:
        """Segment the supports' organ in ``query``.

        Args:
            query: NIfTI path, ``[X, Y, Z]`` numpy array or torch tensor (an array or tensor needs ``query_affine``,
                its 4x4 RAS affine; a tensor is read detached, on the CPU); any orientation and voxel size,
                intensities as from the scanner (CT in HU).
            supports: ``k >= 1`` (image, mask) pairs (a list, tuple or generator; one pair may also be given
                alone as ``(image, mask)``), each a path, array or tensor (an image array needs its entry of
                ``support_affines``, a list with ``None`` for path images; a single 4x4 affine serves a single
                support; a mask array lies on its image's grid). Without ``label`` each mask must be binary; with
                it, it may hold several labels and ``label`` must be one of them.
            z_range: ``(A, B)`` or ``"A:B"``: only query slices ``A..B`` (inclusive, the query's original third array
                axis) are segmented. Default: all.
            shots_per_part: slices of each support per part (the organ must span ``npart * shots_per_part``
                slices of each support); per part, the ``k * shots_per_part`` prototypes are merged.
            cca: ``"2d"`` (per slice, the default, as ``eval``), ``"3d"`` (largest mass component of the volume)
                or ``"none"``.
        Returns:
            a :class:`Segmentation` on the query's grid.
        Raises:
            DataError: unreadable/non-3D input, complex, boolean (image) or non-numeric arrays, NaN voxels, a
                singular affine, empty or non-binary mask, mask shape differing from its image's, a voxel size
                the plan cannot resample (:func:`fsl_med.prepare.plan.check_resampling`), organ outside the
                field of view. ConfigError: bad option or argument type (label absent from a mask or not an
                integer >= 1, ``z_range`` malformed or outside the query, too few support slices, unknown ``cca``,
                no supports, an affine missing, malformed or given for a path). Every message is one line naming
                the argument (``query``, ``supports[i] image``, ``support_affines``, ...).
        """
        zr = _check_options(cca, shots_per_part, z_range)
        lab = _label(label)
        pairs = _support_pairs(supports)
        affines = _support_affines(support_affines, len(pairs))
        q = _input(query, query_affine, "query", 0, "query_affine")
        sups = [(_input(img, affines[i], f"supports[{i}] image", i, f"support_affines[{i}]"),
                 _input(m, None, f"supports[{i}] mask", i, "", mask=True)) for i, (img, m) in enumerate(pairs)]
        return self._run(q, sups, lab, zr, shots_per_part, cca)

    def _run(self, q: _Input, supports: list[tuple[_Input, _Input]], label: int | None, zr: tuple[int, int] | None,
             shots_per_part: int, cca: str) -> Segmentation:
        """:meth:`segment` on checked inputs (the CLI's path too, so that messages name its files)."""
        from fsl_med.data.volumes import slice_input
        from fsl_med.refine.cca import largest_mass_component

        q_img = _finite_image(q)
        q_aff = q.affine
        q_shape = tuple(int(v) for v in q_img.shape)
        zr = _query_range(zr, q_shape[2], q.ref)
        self._check_geometry(q)
        sups = [self._support(img, m, label, shots_per_part) for img, m in supports]
        q_prep = self._prepare(q_img, q_aff, None, q.name)
        q_norm = self._normalised(q_prep.image, q.name)
        za, zb = model_z_range(zr, q_shape, q_aff, q_prep.affine, q_norm.shape[0])  # type: ignore[arg-type]
        zs = np.arange(za, zb + 1)
        part = np.minimum(self.npart - 1, (self.npart * (zs - za)) // (zb - za + 1)).astype(np.int64)
        # part-major support slices: for each part, every support's slices of that part
        images = [slice_input(imgs, self.three_slices)[idx[p]] for p in range(self.npart) for imgs, _, idx in sups]
        masks = [m[idx[p]] for p in range(self.npart) for _, m, idx in sups]
        shots = len(sups) * shots_per_part
        seg = self.module.model
        with torch.inference_mode():
            protos = seg.support_prototypes(np.concatenate(images), np.concatenate(masks).astype(np.float32),
                                            self.device, shots)
            pred, prob = seg.predict_volume(protos, slice_input(q_norm, self.three_slices)[zs], part,
                                            batch_size=self.batch_size, device=self.device)
        if cca != "none":
            pred = largest_mass_component(pred, prob, cca)
        full = np.zeros(q_norm.shape, dtype=np.uint8)
        full_p = np.zeros(q_norm.shape, dtype=np.float32)
        full[zs], full_p[zs] = pred, prob
        mask = self._to_query(full, q_prep, q_shape, q_aff)  # type: ignore[arg-type]
        probability = self._to_query(full_p, q_prep, q_shape, q_aff)  # type: ignore[arg-type]
        for arr in (mask, probability):
            arr[:, :, :zr[0]] = 0
            arr[:, :, zr[1] + 1:] = 0
        return Segmentation(mask=mask, probability=probability, affine=np.array(q_aff), z_range=(int(zr[0]), int(zr[1])),
                            support_slices=[[[int(z) for z in p] for p in idx] for _, _, idx in sups])

    def _to_query(self, slices: np.ndarray, prepared: Scan, shape: tuple[int, int, int],
                  affine: np.ndarray) -> np.ndarray:
        """Model slices ``[Z, h, w]`` -> the plan's grid (``prepared``, nearest) -> the query's grid (the plan's
        inverse)."""
        from fsl_med.data.volumes import resize_slices

        hw = (prepared.image.shape[1], prepared.image.shape[0])
        if slices.shape[1:] != hw:
            slices = resize_slices(slices, hw, "nearest").astype(slices.dtype)
        grid = slices.transpose(2, 1, 0)
        if slices.dtype == np.uint8:
            return self.plan.inverse(grid, prepared.affine, shape, affine)
        return nearest_on_grid(grid, prepared.affine, shape, affine).astype(np.float32)


# -- the verb ---------------------------------------------------------------------------------------

def _paths(value: Any, option: str) -> list[Path]:
    """One path or a sequence of paths (``--support-image`` repeated) as a list of paths."""
    if isinstance(value, (str, os.PathLike)):
        return [_as_path(value, option, "a NIfTI path")]
    if isinstance(value, (np.ndarray, torch.Tensor)):
        raise ConfigError(f"{option}: segment() reads NIfTI files: expected a path, got {_kind(value)} (use "
                          "Segmenter.segment for arrays)")
    if value is None or isinstance(value, (bytes, dict)) or not isinstance(value, Iterable):
        raise ConfigError(f"{option}: expected a NIfTI path or a list of paths, got {_kind(value)}")
    return [_as_path(v, option, "NIfTI paths") for v in value]


def segment(ckpt: str | Path, support_image: str | Path | Sequence[str | Path],
            support_mask: str | Path | Sequence[str | Path], query: str | Path, out: str | Path, *,
            label: int | None = None, z_range: tuple[int, int] | str | None = None, shots_per_part: int = 1,
            cca: str = DEFAULT_CCA, batch_size: int = 8, device: str = "cpu", plan: str | None = None) -> SegmentResult:
    """``fsl-med segment``: read the files, :meth:`Segmenter.segment`, write the mask on the query's grid.

    Args:
        ckpt: a checkpoint written by ``fsl-med train``.
        support_image: one path, or ``k`` paths (``k`` supports).
        support_mask: one path, or ``k`` paths, paired in order with ``support_image``.
        query: 3D NIfTI to segment.
        out: ``.nii`` / ``.nii.gz``: uint8 of the query's shape and affine, 1 = organ, written atomically only
            when everything succeeded.
        plan: ``"ct"``/``"mri"``, required for a checkpoint that does not know its preprocessing plan.
            The other arguments are those of :meth:`Segmenter.segment` and :meth:`Segmenter.from_checkpoint`.

    Returns:
        A :class:`SegmentResult` (``support_slices``: the first support's slices per part).
    Raises:
        DataError, ConfigError, WeightsError: one line each, before anything is written (inputs and options are
        checked before the checkpoint is read); arrays instead of paths are a one-line error (use
        :meth:`Segmenter.segment`).
    """
    from fsl_med.prepare.nifti import write_nifti

    # messages name the keywords (``query``), or the flags (``--query``) when the CLI calls (errors.spelled_as)
    o_ckpt, o_query, o_out, o_img, o_mask = (arg(k) for k in ("ckpt", "query", "out", "support_image", "support_mask"))
    ckpt, out = _as_path(ckpt, o_ckpt, "a checkpoint path"), _as_path(out, o_out, "an output .nii.gz path")
    query_p = _paths(query, o_query)
    if len(query_p) != 1:
        raise ConfigError(f"{o_query}: one query volume per call, got {len(query_p)}")
    query_p = query_p[0]
    sup_imgs = _paths(support_image, o_img)
    sup_masks = _paths(support_mask, o_mask)
    # -- options (cheap checks first)
    zr = _check_options(cca, shots_per_part, z_range)
    lab = _label(label)
    _positive_int(batch_size, "batch_size")
    if len(sup_imgs) != len(sup_masks) or not sup_imgs:
        raise ConfigError(f"{o_img}/{o_mask}: {len(sup_imgs)} images and {len(sup_masks)} masks; "
                          "give one mask per image")
    if plan is not None:
        _as_plan(plan)
    if not (out.name.endswith(".nii.gz") or out.name.endswith(".nii")):
        raise ConfigError(f"{o_out} {out}: must end with .nii.gz or .nii")
    if out.exists() and out.is_dir():
        raise ConfigError(f"{o_out} {out}: is a folder")
    inputs = {o_query: query_p, o_ckpt: ckpt, **{f"{o_img} {p}": p for p in sup_imgs},
              **{f"{o_mask} {p}": p for p in sup_masks}}
    refuse_overwriting_inputs(out, inputs, o_out)
    check_output_file(out, o_out)  # before the work: a bad location fails now, not after inference
    _device(device)
    checks = [(ckpt, o_ckpt), *[(p, o_img) for p in sup_imgs], *[(p, o_mask) for p in sup_masks], (query_p, o_query)]
    for p, opt in checks:
        _existing_file(p, opt)

    # -- inputs (read and checked before the checkpoint)
    pairs: list[tuple[_Input, _Input]] = []
    for img_p, mask_p in zip(sup_imgs, sup_masks, strict=True):
        s_img, s_aff, _ = _read_volume(img_p, o_img)
        img_in = _Input(_check_finite(s_img, img_p, o_img), s_aff, o_img, img_p)  # float32 once
        s_mask, m_aff, _ = _read_volume(mask_p, o_mask)
        if s_mask.shape != s_img.shape:
            raise DataError(f"{o_mask} {mask_p}: shape {tuple(s_mask.shape)} differs from the support "
                            f"image's {tuple(s_img.shape)}")
        if not np.allclose(m_aff, s_aff, atol=1e-3):
            log.warning("%s: affine differs from the support image's; the mask is taken on the image's grid", mask_p)
        _binary_mask(s_mask, o_mask, mask_p, lab)
        pairs.append((img_in, _Input(s_mask, s_aff, o_mask, mask_p)))
    q_img, q_aff, _ = _read_volume(query_p, o_query)
    q_in = _Input(_check_finite(q_img, query_p, o_query), q_aff, o_query, query_p)
    _query_range(zr, q_img.shape[2], query_p)

    # -- checkpoint, segmentation, output
    segmenter = Segmenter.from_checkpoint(ckpt, device=device, plan=plan, batch_size=batch_size)
    res = segmenter._run(q_in, pairs, lab, zr, shots_per_part, cca)
    write_nifti(out, res.mask, q_aff)
    voxels = int(res.mask.sum())
    voxel_ml = float(np.prod(spacing_of(q_aff))) / 1000.0  # mm^3 -> ml
    return SegmentResult(path=out, voxels=voxels, volume_ml=voxels * voxel_ml, z_range=res.z_range,
                         support_slices=res.support_slices[0], shape=tuple(q_img.shape))  # type: ignore[arg-type]
