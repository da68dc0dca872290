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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fsl_med.atomic import check_output_file, refuse_overwriting_inputs
from fsl_med.config import CCA_MODES, DEFAULT_CCA_MODE
from fsl_med.errors import ConfigError, DataError
from fsl_med.prepare.geometry import nearest_on_grid, spacing_of
from fsl_med.prepare.plan import CHECKPOINT_KEY as PLAN_KEY
from fsl_med.prepare.plan import Plan, Scan, default_plan, plan_from_dict

log = logging.getLogger(__name__)

CCA_CHOICES = (*CCA_MODES, "none")
DEFAULT_CCA = DEFAULT_CCA_MODE
"""Connected-component post-processing of ``segment``: that of ``eval`` (``eval.cca_mode``), per slice as the paper's
CCA (method.md §5), so that ``segment`` reproduces what ``eval`` scores."""

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
        raise ConfigError(f"--z-range {text!r}: expected A:B with integer slice indices, e.g. 10:40") from None
    if a < 0 or b < a:
        raise ConfigError(f"--z-range {text}: need 0 <= A <= B")
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
    return arr, affine, zooms


def _check_finite(arr: np.ndarray, path: Path, option: str) -> np.ndarray:
    from fsl_med.prepare.nifti import check_intensities

    img = np.asarray(arr, dtype=np.float32)
    if not np.isfinite(img).all():
        raise DataError(f"{option} {path}: contains {int((~np.isfinite(img)).sum())} NaN/inf voxels")
    check_intensities(img, f"{option} {path}")
    return img


def _few(values: list[int], n: int = 10) -> str:
    """``[1, 2, 3]``, or the first ``n`` and how many more (a message stays one readable line)."""
    return str(values) if len(values) <= n else f"{values[:n]} and {len(values) - n} more"


def _binary_mask(mask: np.ndarray, path: Path, label: int | None) -> np.ndarray:
    """The organ's binary mask from a binary or multi-label mask (see :func:`segment`)."""
    m = np.asarray(mask)
    if m.dtype.kind == "f":
        if not np.isfinite(m).all() or not np.array_equal(m, np.rint(m)):
            raise DataError(f"--support-mask {path}: mask has non-integer values")
    m = np.rint(m).astype(np.int64) if m.dtype.kind == "f" else m.astype(np.int64)
    present = [int(v) for v in np.unique(m) if v != 0]
    if not present:
        raise DataError(f"--support-mask {path}: empty mask (no foreground voxel)")
    if label is None:
        if len(present) > 1:
            raise DataError(f"--support-mask {path}: not a binary mask (labels present: {_few(present)}); "
                            "choose one with --label N")
        return m != 0
    if label not in present:
        raise ConfigError(f"--label {label}: not in the support mask {path} (labels present: {_few(present)})")
    return m == label


def _support_indices(organ_slices: np.ndarray, npart: int, shots: int) -> list[list[int]]:
    """Support slices per part (:func:`fsl_med.data.protocol.support_slices_per_part`), as a config error."""
    from fsl_med.data.protocol import support_slices_per_part

    try:
        return support_slices_per_part(organ_slices, npart, shots)
    except DataError as err:
        raise ConfigError(f"--shots-per-part {shots}: {err} on the model grid") from err


def _device(name: str) -> torch.device:
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda: CUDA is not available on this machine (use --device cpu)")
        return torch.device("cuda")
    raise ConfigError(f"--device {name}: must be cpu or cuda")


def _as_plan(plan: str | Plan) -> Plan:
    return plan if isinstance(plan, Plan) else default_plan(plan)  # an unknown kind: one-line --plan error


def _check_options(cca: str, shots_per_part: int, z_range: tuple[int, int] | str | None) -> tuple[int, int] | None:
    """The options both :func:`segment` (before the checkpoint is read) and :meth:`Segmenter.segment` check;
    returns the parsed ``z_range``."""
    if cca not in CCA_CHOICES:
        raise ConfigError(f"--cca {cca}: must be one of {', '.join(CCA_CHOICES)}")
    if shots_per_part < 1:
        raise ConfigError(f"--shots-per-part {shots_per_part}: must be >= 1")
    zr = parse_z_range(z_range) if isinstance(z_range, str) else z_range
    if zr is not None and (zr[0] < 0 or zr[1] < zr[0]):
        raise ConfigError(f"--z-range {zr[0]}:{zr[1]}: need 0 <= A <= B")
    return zr


def _query_range(zr: tuple[int, int] | None, n_slices: int, where: Any) -> tuple[int, int]:
    """``zr`` (default: every slice) checked against the query's third array axis of ``n_slices`` slices."""
    if zr is None:
        return 0, n_slices - 1
    if zr[1] >= n_slices:
        raise ConfigError(f"--z-range {zr[0]}:{zr[1]}: outside the query's slices 0..{n_slices - 1} "
                          f"(its third array axis; {where})")
    return zr


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
            raise ConfigError(f"--ckpt {path}: the preprocessing plan of its training data is unknown (data prepared "
                              "outside fsl-med prepare, or an older checkpoint); pass --plan ct or --plan mri")
        return known
    chosen = _as_plan(plan)
    if known is not None and known != chosen:
        log.warning("--plan %s overrides the checkpoint's stored plan %s", chosen.as_dict(), known.as_dict())
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
        if batch_size < 1:
            raise ConfigError(f"--batch-size {batch_size}: must be >= 1")
        self.module, self.cfg, self.plan, self.normalize = module, cfg, plan, normalizer
        self.device, self.batch_size = device, int(batch_size)
        self.image_size, self.npart = int(cfg.data.image_size), int(cfg.eval.npart)
        self.three_slices = bool(cfg.data.three_slices)
        module.eval().to(device)

    @classmethod
    def from_checkpoint(cls, ckpt: str | Path, *, device: str = "cpu", plan: str | Plan | None = None,
                        batch_size: int = 8) -> Segmenter:
        """Load ``ckpt`` (written by ``fsl-med train``) on ``device`` (``"cpu"`` or ``"cuda"``).

        Args:
            plan: ``"ct"``/``"mri"``/a :class:`Plan`, required when the checkpoint does not know the plan of its
                training data (see :func:`checkpoint_plan`).
        Raises:
            WeightsError: missing, corrupt or foreign checkpoint. ConfigError: plan unknown and not given, bad
            device.
        """
        from fsl_med.data.volumes import Normalizer
        from fsl_med.prepare.datasets import get_dataset_info
        from fsl_med.runs import load_checkpoint, module_from_checkpoint, stored_config

        path = Path(ckpt)
        dev = _device(device)
        if path.is_dir():
            raise DataError(f"--ckpt {path}: is a folder, not a file")
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

    def prepare(self, image: np.ndarray, affine: np.ndarray, label: np.ndarray | None = None) -> Scan:
        """The plan's forward step on a source volume ``[X, Y, Z]`` (and optionally its label ids): what
        ``fsl-med prepare`` writes for the same scan, array for array."""
        return self.plan.forward(image, affine, label)

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

    def _support(self, image: Any, mask: Any, affine: np.ndarray | None, label: int | None, shots: int,
                 index: int) -> tuple[np.ndarray, np.ndarray, list[list[int]]]:
        """One support pair -> (normalised model slices, organ mask slices, slices per part)."""
        img, img_aff, img_p = _volume(image, affine, "--support-image", index)
        m, _, m_p = _volume(mask, None, "--support-mask", index)  # a mask lies on its image's grid
        if m.shape != img.shape:
            raise DataError(f"--support-mask {m_p}: shape {tuple(m.shape)} differs from the support image's "
                            f"{tuple(img.shape)}")
        organ = _binary_mask(m, m_p, label)
        ids = np.rint(m).astype(np.int64) if m.dtype.kind == "f" else m.astype(np.int64)
        if label is not None and ids.min() >= 0 and ids.max() <= 255:
            lab, value = ids.astype(np.uint8), label  # as prepare does: every label resampled, then the organ taken
        else:
            lab, value = organ.astype(np.uint8), 1
        prep = self.prepare(_check_finite(img, img_p, "--support-image"), img_aff, lab)
        assert prep.label is not None
        sup_masks = self._model_slices((prep.label == value).astype(np.uint8), "nearest") > 0
        organ_slices = np.flatnonzero(sup_masks.reshape(sup_masks.shape[0], -1).any(axis=1))
        if organ_slices.size == 0:
            raise DataError(f"--support-mask {m_p}: the organ lies outside the model's field of view after "
                            "preparation")
        images = self._normalised(prep.image, f"--support-image {img_p}")
        return images, sup_masks, _support_indices(organ_slices, self.npart, shots)

    def segment(self, query: Any, supports: Sequence[tuple[Any, Any]], *, query_affine: np.ndarray | None = None,
                support_affines: Sequence[np.ndarray] | None = None, label: int | None = None,
                z_range: tuple[int, int] | str | None = None, shots_per_part: int = 1,
                cca: str = DEFAULT_CCA) -> Segmentation:
        """Segment the supports' organ in ``query``.

        Args:
            query: NIfTI path or ``[X, Y, Z]`` array (then ``query_affine`` is its 4x4 RAS affine); any orientation
                and voxel size, intensities as from the scanner (CT in HU).
            supports: ``k >= 1`` (image, mask) pairs, paths or arrays (then ``support_affines`` gives each image's
                affine; a mask array lies on its image's grid). Without ``label`` each mask must be binary; with
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
            DataError: unreadable/non-3D input, NaN voxels, empty or non-binary mask, mask shape differing from its
                image's, organ outside the field of view. ConfigError: bad option (label absent from a mask,
                ``z_range`` outside the query, too few support slices, unknown ``cca``, no supports).
        """
        from fsl_med.data.volumes import slice_input
        from fsl_med.refine.cca import largest_mass_component

        zr = _check_options(cca, shots_per_part, z_range)
        if len(supports) < 1:
            raise ConfigError("--support-image/--support-mask: at least one support pair is needed")
        if support_affines is not None and len(support_affines) != len(supports):
            raise ConfigError(f"support_affines: {len(support_affines)} affines for {len(supports)} supports")
        q_img, q_aff, q_p = _volume(query, query_affine, "--query", 0)
        q_img = _check_finite(q_img, q_p, "--query")
        q_shape = tuple(int(v) for v in q_img.shape)
        zr = _query_range(zr, q_shape[2], q_p)
        sups = [self._support(img, m, None if support_affines is None else support_affines[i], label, shots_per_part, i)
                for i, (img, m) in enumerate(supports)]
        q_prep = self.prepare(q_img, q_aff)
        q_norm = self._normalised(q_prep.image, f"--query {q_p}")
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
        return Segmentation(mask=mask, probability=probability, affine=q_aff, z_range=(int(zr[0]), int(zr[1])),
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


def _volume(value: Any, affine: np.ndarray | None, option: str, index: int) -> tuple[np.ndarray, np.ndarray, Any]:
    """(array, affine, name) of a path or an array input (an image array needs its affine; a mask's is unused)."""
    if isinstance(value, np.ndarray):
        if value.ndim != 3 or value.size == 0:
            raise DataError(f"{option} (array {index}): expected a non-empty 3D array, got shape {value.shape}")
        if affine is None:
            if option == "--support-mask":  # a mask array lies on its image's grid
                return value, np.eye(4), f"(array {index})"
            raise ConfigError(f"{option} (array {index}): an array input needs its 4x4 affine")
        aff = np.asarray(affine, dtype=np.float64)
        if aff.shape != (4, 4) or not np.isfinite(aff).all():
            raise ConfigError(f"{option} (array {index}): affine must be a finite 4x4 matrix")
        return value, aff, f"(array {index})"
    path = Path(value)
    if path.is_dir():
        raise DataError(f"{option} {path}: is a folder, not a file")
    arr, aff, _ = _read_volume(path, option)
    return arr, aff, path


# -- the verb ---------------------------------------------------------------------------------------

def segment(ckpt: str | Path, support_image: str | Path | Sequence[str | Path],
            support_mask: str | Path | Sequence[str | Path], query: str | Path, out: str | Path, *,
            label: int | None = None, z_range: tuple[int, int] | str | None = None, shots_per_part: int = 1,
            cca: str = DEFAULT_CCA, batch_size: int = 8, device: str = "cpu", plan: str | None = None) -> SegmentResult:
    """``fsl-med segment``: read the files, :meth:`Segmenter.segment`, write the mask on the query's grid.

    Args:
        ckpt: a checkpoint written by ``fsl-med train``.
        support_image, support_mask: one path each, or ``k`` paths each (pairs in order).
        query: 3D NIfTI to segment. out: ``.nii`` / ``.nii.gz``: uint8 of the query's shape and affine, 1 = organ,
            written atomically only when everything succeeded.
        plan: ``"ct"``/``"mri"``, required for a checkpoint that does not know its preprocessing plan.
        Other arguments: see :meth:`Segmenter.segment` and :meth:`Segmenter.from_checkpoint`.
    Returns:
        A :class:`SegmentResult` (``support_slices``: the first support's slices per part).
    Raises:
        DataError, ConfigError, WeightsError: one line each, before anything is written (inputs and options are
        checked before the checkpoint is read).
    """
    from fsl_med.prepare.nifti import write_nifti

    ckpt, out, query_p = Path(ckpt), Path(out), Path(query)
    sup_imgs = [Path(p) for p in ([support_image] if isinstance(support_image, (str, Path)) else support_image)]
    sup_masks = [Path(p) for p in ([support_mask] if isinstance(support_mask, (str, Path)) else support_mask)]
    # -- options (cheap checks first)
    zr = _check_options(cca, shots_per_part, z_range)
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size}: must be >= 1")
    if len(sup_imgs) != len(sup_masks) or not sup_imgs:
        raise ConfigError(f"--support-image/--support-mask: {len(sup_imgs)} images and {len(sup_masks)} masks; "
                          "give one mask per image")
    if plan is not None:
        _as_plan(plan)
    if not (out.name.endswith(".nii.gz") or out.name.endswith(".nii")):
        raise ConfigError(f"--out {out}: must end with .nii.gz or .nii")
    if out.exists() and out.is_dir():
        raise ConfigError(f"--out {out}: is a folder")
    inputs = {"--query": query_p, "--ckpt": ckpt, **{f"--support-image {p}": p for p in sup_imgs},
              **{f"--support-mask {p}": p for p in sup_masks}}
    refuse_overwriting_inputs(out, inputs)
    check_output_file(out, "--out")  # before the work: a bad location fails now, not after inference
    _device(device)
    checks = [(ckpt, "--ckpt"), *[(p, "--support-image") for p in sup_imgs], *[(p, "--support-mask") for p in sup_masks],
              (query_p, "--query")]
    for p, opt in checks:
        if p.is_dir():
            raise DataError(f"{opt} {p}: is a folder, not a file")
        if not p.is_file():
            raise DataError(f"{opt} {p}: file not found")

    # -- inputs (read and checked before the checkpoint)
    pairs, affines = [], []
    for img_p, mask_p in zip(sup_imgs, sup_masks, strict=True):
        s_img, s_aff, _ = _read_volume(img_p, "--support-image")
        s_img = _check_finite(s_img, img_p, "--support-image")
        s_mask, m_aff, _ = _read_volume(mask_p, "--support-mask")
        if s_mask.shape != s_img.shape:
            raise DataError(f"--support-mask {mask_p}: shape {tuple(s_mask.shape)} differs from the support "
                            f"image's {tuple(s_img.shape)}")
        if not np.allclose(m_aff, s_aff, atol=1e-3):
            log.warning("%s: affine differs from the support image's; the mask is taken on the image's grid", mask_p)
        _binary_mask(s_mask, mask_p, label)
        pairs.append((s_img, s_mask))
        affines.append(s_aff)
    q_img, q_aff, _ = _read_volume(query_p, "--query")
    q_img = _check_finite(q_img, query_p, "--query")
    zr = _query_range(zr, q_img.shape[2], query_p)

    # -- checkpoint, segmentation, output
    segmenter = Segmenter.from_checkpoint(ckpt, device=device, plan=plan, batch_size=batch_size)
    res = segmenter.segment(q_img, pairs, query_affine=q_aff, support_affines=affines, label=label, z_range=zr,
                            shots_per_part=shots_per_part, cca=cca)
    write_nifti(out, res.mask, q_aff)
    voxels = int(res.mask.sum())
    voxel_ml = float(np.prod(spacing_of(q_aff))) / 1000.0  # mm^3 -> ml
    return SegmentResult(path=out, voxels=voxels, volume_ml=voxels * voxel_ml, z_range=res.z_range,
                         support_slices=res.support_slices[0], shape=tuple(q_img.shape))  # type: ignore[arg-type]
