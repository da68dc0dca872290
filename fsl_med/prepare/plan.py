"""Preprocessing plans: one per dataset kind (MRI, CT), the only statement of how a source volume reaches the
prepared grid (method.md §1.2), the way nnU-Net keeps its plans.

A plan is data (its parameters, :meth:`Plan.as_dict`, recorded in ``manifest.json`` and in every checkpoint
trained on the folder) plus two functions:

* :meth:`Plan.forward`: source volume ``[X, Y, Z]`` with its RAS affine (and optionally its label volume) →
  prepared grid. ``fsl-med prepare chaos|sabs`` and ``fsl-med segment`` / :class:`fsl_med.segmenter.Segmenter`
  both call it, so a raw scan given to ``segment`` is prepared exactly as the training data was.
* :meth:`Plan.inverse`: a label/prediction volume on the prepared grid → any source grid (nearest neighbour
  through world coordinates; outside the prepared grid 0).

Neither modifies its inputs. Arrays are in nibabel order ``[X, Y, Z]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from fsl_med.errors import ConfigError, DataError, given
from fsl_med.prepare.geometry import (
    CANONICAL_ORIENTATION,
    LABEL_RULES,
    crop_border_xy,
    crop_or_pad_xy,
    labels_per_class,
    reorient,
    reoriented_geometry,
    resample_image,
    resample_index_grid,
    resample_label,
    spacing_of,
    to_original_grid,
)

CT_GRIDS = ("exact", "reference")
"""CT in-plane grids: ``exact`` (``size`` x ``size``) or ``reference`` (the notebook's spacing rule: 257 x 257 for
Synapse's 512 px scans, resized to ``data.image_size`` by the loader), :class:`CtPlan`."""


@dataclass(frozen=True)
class Scan:
    """One volume: ``image`` ``[X, Y, Z]`` float, ``label`` ``[X, Y, Z]`` integer ids (or ``None``), RAS ``affine``."""

    image: np.ndarray
    label: np.ndarray | None
    affine: np.ndarray


@dataclass(frozen=True)
class Plan:
    """Common fields of a preprocessing plan (see the module docstring); use :class:`MriPlan` or :class:`CtPlan`."""

    modality: ClassVar[str] = ""
    size: int = 256
    label_interp: str = "per_class"
    orientation: str = CANONICAL_ORIENTATION

    def __post_init__(self) -> None:
        if self.label_interp not in LABEL_RULES:
            raise ConfigError(f"plan label_interp {self.label_interp!r}: must be one of {', '.join(LABEL_RULES)}")
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 8:
            raise ConfigError(f"plan size {self.size!r}: must be an integer >= 8")

    def as_dict(self) -> dict[str, Any]:
        """JSON-able parameters, ``modality`` first (recorded in the manifest and in checkpoints)."""
        raise NotImplementedError

    def _grid(self, image: np.ndarray, label: np.ndarray | None, affine: np.ndarray) -> Scan:
        raise NotImplementedError

    def intensities(self, image: np.ndarray) -> np.ndarray:
        """The plan's intensity steps on a source image (before any geometry); returns a new float32 array."""
        raise NotImplementedError

    def forward(self, image: np.ndarray, affine: np.ndarray, label: np.ndarray | None = None) -> Scan:
        """Source volume → prepared grid.

        Args:
            image: ``[X, Y, Z]`` intensities as they come from the scanner (MRI signal, CT in HU).
            affine: its 4x4 voxel-to-world (RAS) affine; any orientation without obliquity.
            label: optional ``[X, Y, Z]`` integer label ids (0..255) on the image's grid.
        Returns:
            a :class:`Scan` in ``orientation`` of in-plane size ``size`` x ``size`` (a :class:`CtPlan` with ``grid``
            ``"reference"``: the notebook's size, 257 x 257 for 512 px scans); its label is uint8 (or None).
        Raises:
            DataError: a CT volume not larger in-plane than twice the border.
        """
        img = self.intensities(np.asarray(image))
        img, aff = reorient(img, affine, self.orientation)
        lab = None
        if label is not None:
            lab, _ = reorient(np.asarray(label, dtype=np.uint8), affine, self.orientation)
        return self._grid(img, lab, aff)

    def grid_spacings(self, shape: tuple[int, ...], affine: np.ndarray
                      ) -> tuple[tuple[float, float, float], tuple[float, float, float]] | None:
        """``(source, grid)`` voxel sizes (mm) along the prepared axes (``orientation``) of a source volume of
        ``shape`` and ``affine``: what :meth:`forward` resamples from and to. ``None`` when the plan cannot
        prepare that shape at all (:meth:`forward` then says why)."""
        raise NotImplementedError

    def inverse(self, labels: np.ndarray, grid_affine: np.ndarray, shape: tuple[int, int, int],
                affine: np.ndarray) -> np.ndarray:
        """Prepared-grid labels ``[X, Y, Z]`` (affine ``grid_affine``) → uint8 array of ``shape`` on the grid
        ``affine`` (nearest neighbour by world position; voxels outside the prepared grid are 0)."""
        return to_original_grid(labels, grid_affine, shape, affine)

    def _labels_to(self, lab: np.ndarray, affine: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
        out, aff = resample_label(lab, affine, spacing, self.label_interp)
        out, _ = crop_or_pad_xy(out.astype(np.float32), aff, self.size, value=0.0)
        return np.rint(out).astype(np.uint8)


@dataclass(frozen=True)
class MriPlan(Plan):
    """MRI (method.md §1.2): clip the top ``clip_top_percent`` % of intensities, reorient, resample to
    ``spacing`` (image linear, labels ``label_interp``), centre-crop or pad in-plane to ``size`` with the image
    minimum (labels with 0)."""

    modality: ClassVar[str] = "mri"
    clip_top_percent: float = 0.5
    spacing: tuple[float, float, float] = (1.25, 1.25, 7.7)

    def as_dict(self) -> dict[str, Any]:
        return {"modality": "mri", "clip_top_percent": self.clip_top_percent, "spacing": list(self.spacing),
                "size": self.size, "label_interp": self.label_interp, "orientation": self.orientation}

    def intensities(self, image: np.ndarray) -> np.ndarray:
        img = np.asarray(image).astype(np.float32, copy=True)
        if self.clip_top_percent > 0:
            img = np.minimum(img, np.percentile(img, 100.0 - self.clip_top_percent)).astype(np.float32)
        return img

    def grid_spacings(self, shape: tuple[int, ...], affine: np.ndarray
                      ) -> tuple[tuple[float, float, float], tuple[float, float, float]] | None:
        return reoriented_geometry(shape, affine, self.orientation)[1], tuple(self.spacing)  # type: ignore[return-value]

    def _grid(self, image: np.ndarray, label: np.ndarray | None, affine: np.ndarray) -> Scan:
        img, new_aff = resample_image(image, affine, self.spacing)
        img, out_aff = crop_or_pad_xy(img, new_aff, self.size, value=float(img.min()))
        lab = None if label is None else self._labels_to(label, affine, self.spacing)
        return Scan(image=img, label=lab, affine=out_aff)


@dataclass(frozen=True)
class CtPlan(Plan):
    """CT (method.md §1.2): clip HU to ``hu_window`` and rescale the volume's min..max to ``intensity_range``,
    crop ``border`` px from every in-plane border, resample in-plane (z unchanged; image linear, labels
    ``label_interp``), in ``orientation``.

    ``grid`` chooses the in-plane resampling:

    * ``"exact"`` (default): to exactly ``size`` x ``size`` over the cropped extent.
    * ``"reference"`` (``prepare sabs --compat reference``): the reference notebook's rule, bugs included: spacing
      times ``(512 - 2 * border) / size`` (512 hard-coded), ``int(n * old / new spacing + 1)`` voxels per axis
      sampled from voxel 0 in the source's storage order (SimpleITK; outside the scan 0), i.e. **257 x 257** for
      Synapse's 512 px scans, whose last row and column lie outside the scan. The loader then resizes slices to
      ``data.image_size`` (as the reference's loader does; ``data.resize_last`` for its order).
    """

    modality: ClassVar[str] = "ct"
    hu_window: tuple[float, float] = (-125.0, 275.0)
    intensity_range: tuple[float, float] = (0.0, 255.0)
    border: int = 32
    grid: str = "exact"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.grid not in CT_GRIDS:
            raise ConfigError(f"plan grid {self.grid!r}: must be one of {', '.join(CT_GRIDS)}")

    def as_dict(self) -> dict[str, Any]:
        d = {"modality": "ct", "hu_window": list(self.hu_window), "intensity_range": list(self.intensity_range),
             "border": self.border, "size": self.size, "label_interp": self.label_interp,
             "orientation": self.orientation}
        if self.grid != "exact":  # recorded only when set: folders prepared before the field existed stay current
            d["grid"] = self.grid
        return d

    def intensities(self, image: np.ndarray) -> np.ndarray:
        lo, hi = self.hu_window
        img = np.clip(np.asarray(image).astype(np.float32), lo, hi)
        vmin, vmax = float(img.min()), float(img.max())
        a, b = self.intensity_range
        out = a + (img - vmin) * ((b - a) / (vmax - vmin)) if vmax > vmin else np.full_like(img, a)
        return out.astype(np.float32)

    def forward(self, image: np.ndarray, affine: np.ndarray, label: np.ndarray | None = None) -> Scan:
        if self.grid == "exact":
            return super().forward(image, affine, label)
        # the reference resamples in the source's storage order (its sampling is one-sided), then we reorient
        scan = self._reference_grid(self.intensities(np.asarray(image)), None if label is None else
                                    np.asarray(label, dtype=np.uint8), np.asarray(affine, dtype=np.float64))
        img, aff = reorient(scan.image, scan.affine, self.orientation)
        lab = None if scan.label is None else reorient(scan.label, scan.affine, self.orientation)[0]
        return Scan(image=img, label=lab, affine=aff)

    def grid_spacings(self, shape: tuple[int, ...], affine: np.ndarray
                      ) -> tuple[tuple[float, float, float], tuple[float, float, float]] | None:
        if self.grid == "exact":
            (nx, ny, _), src = reoriented_geometry(shape, affine, self.orientation)
            if min(nx, ny) <= 2 * self.border:
                return None
            return src, self._exact_spacing(src, (nx - 2 * self.border, ny - 2 * self.border))
        src = spacing_of(affine)  # the reference resamples in the source's storage order, then reorients
        if min(shape[0], shape[1]) <= 2 * self.border:
            return None
        grid = self._reference_spacing(src)
        came_from = reoriented_geometry((0, 1, 2), affine, self.orientation)[0]  # the source axis of each axis
        out_src, out_grid = [0.0] * 3, [0.0] * 3
        for i, axis in enumerate(came_from):
            out_src[i], out_grid[i] = src[axis], grid[axis]
        return (out_src[0], out_src[1], out_src[2]), (out_grid[0], out_grid[1], out_grid[2])

    def _exact_spacing(self, spacing: tuple[float, ...], cropped_xy: tuple[int, ...]) -> tuple[float, float, float]:
        """Grid voxel size of ``grid="exact"``: the cropped in-plane field onto ``size`` x ``size``, z unchanged."""
        return (spacing[0] * cropped_xy[0] / self.size, spacing[1] * cropped_xy[1] / self.size, spacing[2])

    def _reference_spacing(self, spacing: tuple[float, ...]) -> tuple[float, float, float]:
        """Grid voxel size of ``grid="reference"``: in-plane times the notebook's SPA_FAC, z unchanged."""
        factor = (512 - 2 * self.border) / self.size  # the notebook's SPA_FAC
        return (spacing[0] * factor, spacing[1] * factor, spacing[2])

    def _cropped(self, image: np.ndarray, label: np.ndarray | None, affine: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        try:
            img, cropped_aff = crop_border_xy(image, affine, self.border)
            lab = None if label is None else crop_border_xy(label.astype(np.float32), affine, self.border)[0]
        except ValueError as e:
            raise DataError(f"CT volume of in-plane size {image.shape[:2]}: {e}") from e
        return img, lab, cropped_aff

    def _grid(self, image: np.ndarray, label: np.ndarray | None, affine: np.ndarray) -> Scan:
        a, b = self.intensity_range
        img, lab, cropped_aff = self._cropped(image, label, affine)
        target = self._exact_spacing(spacing_of(cropped_aff), img.shape)
        img, new_aff = resample_image(img, cropped_aff, target)
        # guard against an off-by-one extent from floating point: exactly size x size
        img, out_aff = crop_or_pad_xy(img, new_aff, self.size, value=a)
        if lab is not None:
            lab = self._labels_to(np.rint(lab).astype(np.uint8), cropped_aff, target)
        return Scan(image=np.clip(img, a, b), label=lab, affine=out_aff)

    def _reference_grid(self, image: np.ndarray, label: np.ndarray | None, affine: np.ndarray) -> Scan:
        img, lab, cropped_aff = self._cropped(image, label, affine)
        old = spacing_of(affine)
        new = self._reference_spacing(old)
        shape = tuple(int(n * (o / w) + 1) for n, o, w in zip(img.shape, old, new, strict=True))  # z too: one empty slice more
        ratios = tuple(w / o for o, w in zip(old, new, strict=True))
        out, out_aff = resample_index_grid(img, cropped_aff, ratios, shape)  # type: ignore[arg-type]
        labels = None
        if lab is not None:
            lab_ids = np.rint(lab).astype(np.uint8)

            def resample(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
                return resample_index_grid(m, cropped_aff, ratios, shape)  # type: ignore[arg-type]

            if self.label_interp == "nearest":
                labels = np.rint(resample_index_grid(lab_ids, cropped_aff, ratios, shape, order=0)[0]).astype(np.uint8)
            else:
                labels = labels_per_class(lab_ids, resample, self.label_interp)[0]
        return Scan(image=out, label=labels, affine=out_aff)


RESAMPLING_NOTE = 4.0
"""A plan that resamples a volume more than this many times finer or coarser along an axis says so once
(:func:`check_resampling`): the prepared scan then looks unlike the training data."""

RESAMPLING_LIMIT = 16.0
"""A plan that would resample a volume more than this many times along an axis refuses it
(:func:`check_resampling`)."""

_AXIS_NAMES = {"L": "left-right", "R": "left-right", "A": "anterior-posterior", "P": "anterior-posterior",
               "S": "inferior-superior", "I": "inferior-superior"}


def check_resampling(plan: Plan, shape: tuple[int, ...], affine: np.ndarray, what: str) -> str | None:
    """Refuse a volume whose voxel size is too far from the plan's grid to be resampled sensibly; otherwise
    return a one-line note when it is far enough to matter (``None`` for ordinary scans).

    The rule, per prepared axis, with ``f`` = source voxel size / grid voxel size (:meth:`Plan.grid_spacings`):

    * ``f < 1 / RESAMPLING_LIMIT`` (downsampling more than 16-fold): the plan's linear resampling has no
      anti-aliasing, so it would read only one source voxel in ``1/f`` along that axis and ignore the rest of the
      scan (e.g. 0.05 mm slices onto the MRI plan's 7.7 mm: 1 slice in 154);
    * ``f > RESAMPLING_LIMIT`` (upsampling more than 16-fold): each source voxel would be stretched over ``f``
      grid voxels, a picture the model never saw in training (e.g. 200 mm slices onto 7.7 mm);

    * the grid's in-plane voxel more than ``RESAMPLING_LIMIT`` times longer one way than the other (the CT plan
      resamples the in-plane field to ``size`` x ``size`` whatever its pixels' shape; training scans have square
      pixels);

    all raise :class:`DataError`; beyond ``RESAMPLING_NOTE`` (4-fold) they only give the note.
    Scans near the training data's voxel size (CHAOS-T2: ~1.4-1.9 mm in-plane, 5.5-9 mm slices on the MRI plan's
    1.25 x 1.25 x 7.7 mm; Synapse CT's 512 px onto 256 px) are far inside both bounds.

    Args:
        plan: the preprocessing plan; shape, affine: the source volume's; what: the file (or array) named.
    Raises:
        DataError: one line naming ``what``, its voxel size, the plan's grid and the axis beyond the limit.
    """
    spacings = plan.grid_spacings(shape, affine)
    if spacings is None:
        return None
    src, grid = spacings
    factors = [s / g for s, g in zip(src, grid, strict=True)]
    sp = " x ".join(f"{v:.3g}" for v in spacing_of(affine))
    grid_s = " x ".join(f"{v:.3g}" for v in grid)
    axes = [_AXIS_NAMES.get(c, f"axis {i}") for i, c in enumerate(plan.orientation)]
    for i, f in enumerate(factors):
        if f < 1.0 / RESAMPLING_LIMIT or f > RESAMPLING_LIMIT:
            how = (f"downsampled {1 / f:.3g}-fold, so that linear resampling would read 1 source voxel in "
                   f"{1 / f:.0f} and ignore the rest" if f < 1 else
                   f"upsampled {f:.3g}-fold, each source voxel stretched over {f:.0f} grid voxels")
            raise DataError(f"{what}: voxel size {sp} mm cannot be resampled sensibly to the {plan.modality} "
                            f"plan's {grid_s} mm grid: its {axes[i]} axis would be {how} (at most "
                            f"{RESAMPLING_LIMIT:g}-fold either way)")
    aspect = max(grid[0], grid[1]) / min(grid[0], grid[1])  # the CT plan keeps the in-plane field, not the pixel
    if aspect > RESAMPLING_LIMIT:
        raise DataError(f"{what}: voxel size {sp} mm cannot be resampled sensibly to the {plan.modality} plan's "
                        f"{grid_s} mm grid: its in-plane voxels would be {aspect:.3g} times longer one way than the "
                        f"other (at most {RESAMPLING_LIMIT:g})")
    far = [f"{axes[i]} {'up' if f > 1 else 'down'}sampled {max(f, 1 / f):.3g}-fold" for i, f in enumerate(factors)
           if f < 1.0 / RESAMPLING_NOTE or f > RESAMPLING_NOTE]
    if aspect > RESAMPLING_NOTE:
        far.append(f"in-plane voxels {aspect:.3g} times longer one way than the other")
    if not far:
        return None
    return (f"{what}: voxel size {sp} mm is far from the {plan.modality} plan's {grid_s} mm grid ("
            f"{', '.join(far)}); segmented as it is, but it looks unlike the training data (check the result)")


_PLANS: dict[str, type[Plan]] = {"mri": MriPlan, "ct": CtPlan}
PLAN_KINDS: tuple[str, ...] = tuple(_PLANS)


PLAN_COMPAT: dict[str, dict[str, dict[str, Any]]] = {
    "fsl_med": {"mri": {}, "ct": {}},
    "reference": {"mri": {"label_interp": "per_class_rint"},
                  "ct": {"label_interp": "per_class_rint", "grid": "reference"}},
}
"""Plan fields that ``prepare --compat`` sets (the preparation side of ``compat``; docs: "Reproducing the reference code")."""


def default_plan(kind: str, compat: str = "fsl_med", **fields: Any) -> Plan:
    """The plan of ``kind`` (``"mri"`` or ``"ct"``) that ``fsl-med prepare chaos|sabs --compat COMPAT`` uses:
    the defaults, then :data:`PLAN_COMPAT` [``compat``], then the ``fields`` given (``None`` values ignored).

    Raises:
        ConfigError: unknown kind, compat or field value.
    """
    if kind not in _PLANS:
        raise ConfigError(f"{given('plan', kind)}: must be one of {', '.join(PLAN_KINDS)}")
    if compat not in PLAN_COMPAT:
        raise ConfigError(f"{given('compat', compat)}: must be one of {', '.join(PLAN_COMPAT)}")
    kw = {**PLAN_COMPAT[compat][kind], **{k: v for k, v in fields.items() if v is not None}}
    return _PLANS[kind](**kw)


def compat_mismatch(plan: Plan, compat: str) -> list[str]:
    """The fields of ``plan`` that differ from what ``prepare --compat COMPAT`` sets (:data:`PLAN_COMPAT`), as
    ``"field=value (compat: wanted)"``; empty when the folder was prepared as ``compat`` prepares."""
    fields = {f for modes in PLAN_COMPAT.values() for f in modes[plan.modality]}
    want = {**{f: getattr(type(plan)(), f) for f in sorted(fields)}, **PLAN_COMPAT[compat][plan.modality]}
    return [f"{f}={getattr(plan, f)} ({compat}: {v})" for f, v in want.items() if getattr(plan, f) != v]


def plan_from_dict(d: Any, where: str = "plan") -> Plan:
    """A plan from :meth:`Plan.as_dict`'s output (a manifest's ``params`` or a checkpoint's record).

    Raises:
        ConfigError: not a plan record (unknown modality, unknown or malformed field), naming ``where``.
    """
    if not isinstance(d, dict) or d.get("modality") not in _PLANS:
        raise ConfigError(f"{where}: not a preprocessing plan (modality must be one of {', '.join(PLAN_KINDS)})")
    cls = _PLANS[d["modality"]]
    known = {f for f in cls.__dataclass_fields__ if f != "modality"}
    unknown = sorted(set(d) - known - {"modality"})
    if unknown:
        raise ConfigError(f"{where}: unknown plan field(s) {', '.join(unknown)}")
    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k != "modality"}
    try:
        return cls(**kw)
    except TypeError as e:
        raise ConfigError(f"{where}: malformed plan ({e})") from e


CHECKPOINT_KEY = "preprocessing_plan"
"""Checkpoint entry holding the training folder's plan (:meth:`Plan.as_dict`), or ``None`` when it is unknown."""


def folder_plan(root: str | Path) -> Plan | None:
    """The plan a folder written by ``fsl-med prepare chaos|sabs`` was made with (its ``manifest.json`` ``params``),
    or ``None`` when it is unknown (no manifest: data prepared elsewhere; or imported with ``prepare import``)."""
    from fsl_med.prepare.manifest import read_manifest

    manifest = read_manifest(root)
    params = manifest.get("params") if manifest is not None else None
    if isinstance(params, dict) and params.get("modality") in _PLANS:
        return plan_from_dict(params, f"{Path(root) / 'manifest.json'} params")
    return None
