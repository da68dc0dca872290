"""The ``segment`` verb: segment one organ in a user's own volume with a trained checkpoint.

One support volume with its mask marks the organ; the query volume is segmented slice by slice with the
EP1 rule (the support organ's extent is split into ``cfg.eval.npart`` parts; each query slice uses the
part at its relative position in the query range). Inputs may have any orientation and voxel size:

* Forward (to the training geometry, per volume): reorient to LAS (exact axis permutation/flips),
  resample in-plane (MRI: to 1.25 mm; CT: the volume's own in-plane field of view, without the 32 px
  border a raw scan loses in preparation, to ``image_size`` x ``image_size``) with the slice spacing unchanged (the model is 2D), then centre-crop or
  pad in-plane to ``image_size``. Images are resampled linearly, the support mask per class (linear
  membership, highest wins). Every step returns the affine that keeps each voxel at its world position.
* Intensities, before resampling: MRI images have their top 0.5 % of intensities clipped (as prepared
  CHAOS volumes); CT images that look like Hounsfield units (minimum below -500) are windowed to
  [-125, 275] HU and rescaled linearly to 0..255 (as prepared SABS volumes), otherwise used as they are.
  After resampling, images are normalised with the checkpoint's stored normaliser (``ckpt["normalizer"]``:
  fixed training statistics for CT; per-volume z-score when absent or ``None``, as for MRI).
* Backward: the prediction on the training grid is mapped onto the query's original voxel grid by
  nearest neighbour through world coordinates (``inv(A_model) @ A_query``), so the output has exactly the
  query's shape and affine; voxels that fall outside the training grid (cropped away) are 0.

Model arrays are slice-first ``[Z, H, W]`` = nibabel ``[X, Y, Z]`` transposed ``(2, 1, 0)``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fsl_med.atomic import check_output_file, refuse_overwriting_inputs
from fsl_med.errors import ConfigError, DataError
from fsl_med.prepare.geometry import (
    CANONICAL_ORIENTATION,
    crop_border_xy,
    crop_or_pad_xy,
    reorient,
    resample_image,
    resample_label,
    spacing_of,
    to_original_grid,
)
from fsl_med.prepare.sabs import CtParams

log = logging.getLogger(__name__)

MRI_INPLANE_SPACING = 1.25
"""In-plane voxel size (mm) of the prepared MRI training data (CHAOS-T2)."""
MRI_CLIP_TOP_PERCENT = 0.5
"""Top percentage of MRI intensities clipped before normalisation (as in the MRI preparation)."""
CT_HU_WINDOW = (-125.0, 275.0)
"""HU window of CT images, rescaled to :data:`CT_INTENSITY_RANGE` (as in the CT preparation)."""
CT_INTENSITY_RANGE = (0.0, 255.0)
CT_HU_MIN_THRESHOLD = -500.0
"""A CT image whose minimum is below this value is taken to be in Hounsfield units and windowed."""
CCA_CHOICES = ("3d", "2d", "none")


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

def model_grid_spacing(shape: tuple[int, ...], affine: np.ndarray, modality: str, image_size: int
                       ) -> tuple[float, float, float]:
    """Target voxel size of a volume already in LAS orientation (``shape``/``affine`` of that volume).

    MRI: 1.25 mm in-plane; CT: the in-plane field of view divided by ``image_size``. The slice spacing is
    kept.
    """
    sx, sy, sz = spacing_of(affine)
    if modality == "ct":
        return (sx * shape[0] / image_size, sy * shape[1] / image_size, sz)
    return (MRI_INPLANE_SPACING, MRI_INPLANE_SPACING, sz)


def to_model_grid(arr: np.ndarray, affine: np.ndarray, modality: str, image_size: int, *,
                  is_label: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Bring a ``[X, Y, Z]`` volume to the training geometry (see the module docstring).

    Args:
        arr: image intensities (after the intensity steps) or a binary mask, nibabel order.
        affine: its voxel-to-world (RAS) affine.
        modality: ``"mri"`` or ``"ct"``.
        image_size: in-plane size of the training data (``cfg.data.image_size``).
        is_label: resample per class (output uint8, padded with 0) instead of linearly.
    Returns:
        ``(array [image_size, image_size, Z'], affine)``; ``Z'`` is the number of slices of the LAS
        volume (unchanged by resampling, up to MONAI's rounding of the extent).
    """
    arr_c, aff_c = reorient(arr, affine, CANONICAL_ORIENTATION)
    border = CtParams().border
    if modality == "ct" and min(arr_c.shape[:2]) > image_size + 2 * border:
        # a raw CT scan: drop the border as `fsl-med prepare sabs` does, so both reach the same grid
        arr_c, aff_c = crop_border_xy(arr_c, aff_c, border)
    target = model_grid_spacing(arr_c.shape, aff_c, modality, image_size)
    if is_label:
        out, aff = resample_label(arr_c.astype(np.uint8), aff_c, target, "per_class")
        out, aff = crop_or_pad_xy(out.astype(np.float32), aff, image_size, value=0.0)
        return np.rint(out).astype(np.uint8), aff
    out, aff = resample_image(arr_c.astype(np.float32), aff_c, target)
    pad = CT_INTENSITY_RANGE[0] if modality == "ct" else float(out.min())
    return crop_or_pad_xy(out, aff, image_size, value=pad)


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
    from fsl_med.data.volumes import read_nifti

    if not path.is_file():
        raise DataError(f"{option} {path}: file not found")
    arr, affine, zooms = read_nifti(path)
    if arr.ndim != 3:
        raise DataError(f"{option} {path}: expected a 3D volume, got {arr.ndim}D shape {tuple(arr.shape)}")
    if arr.size == 0:
        raise DataError(f"{option} {path}: empty volume of shape {tuple(arr.shape)}")
    return arr, affine, zooms


def _check_finite(arr: np.ndarray, path: Path, option: str) -> np.ndarray:
    from fsl_med.data.volumes import check_intensities

    img = np.asarray(arr, dtype=np.float32)
    if not np.isfinite(img).all():
        raise DataError(f"{option} {path}: contains {int((~np.isfinite(img)).sum())} NaN/inf voxels")
    check_intensities(img, f"{option} {path}")
    return img


def preprocess_intensities(img: np.ndarray, modality: str) -> np.ndarray:
    """The preparation's intensity steps, applied before resampling (returns float32; input unchanged).

    MRI: values above the 99.5th percentile are clipped. CT: if the minimum is below -500 the image is
    taken to be in HU, clipped to [-125, 275] and mapped linearly to 0..255 (-125 -> 0, 275 -> 255);
    otherwise (e.g. an already prepared 0..255 volume) it is returned as is.
    """
    if modality == "ct":
        if float(img.min()) < CT_HU_MIN_THRESHOLD:
            lo, hi = CT_HU_WINDOW
            a, b = CT_INTENSITY_RANGE
            return (a + (np.clip(img, lo, hi) - lo) * ((b - a) / (hi - lo))).astype(np.float32)
        return img
    if MRI_CLIP_TOP_PERCENT > 0:
        return np.minimum(img, np.percentile(img, 100.0 - MRI_CLIP_TOP_PERCENT)).astype(np.float32)
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


# -- the verb ---------------------------------------------------------------------------------------

def segment(ckpt: str | Path, support_image: str | Path, support_mask: str | Path, query: str | Path,
            out: str | Path, *, label: int | None = None, z_range: tuple[int, int] | str | None = None,
            shots_per_part: int = 1, cca: str = "3d", batch_size: int = 8, device: str = "cpu") -> SegmentResult:
    """Segment the support mask's organ in a query volume and write the prediction on the query's grid.

    Args:
        ckpt: a checkpoint written by ``fsl-med train`` (its stored config gives the model, the dataset's
            modality, ``data.image_size`` and ``eval.npart``; ``ckpt["normalizer"]`` the normalisation).
        support_image: 3D NIfTI ``[X, Y, Z]``, any orientation and voxel size.
        support_mask: 3D NIfTI of the support image's shape (its geometry is taken to be the image's).
            Without ``label`` it must be binary (0 and one other value); with ``label`` it may hold several
            labels and ``label`` must be one of them.
        query: 3D NIfTI ``[X, Y, Z]`` to segment, any orientation and voxel size.
        out: output ``.nii`` / ``.nii.gz``: uint8 ``[X, Y, Z]`` of the query's shape with the query's affine,
            1 = organ. Written atomically, only when everything succeeded.
        label: label id of the organ in a multi-label support mask.
        z_range: ``(A, B)`` or ``"A:B"``: only query slices ``A..B`` (inclusive) along the query's *original*
            third array axis are segmented; voxels outside are 0. Default: the whole volume. Support parts
            are assigned by relative position in the range on the model grid (LAS, inferior to superior):
            ``part = min(npart - 1, floor(npart * (z - A') / (B' - A' + 1)))`` with ``A'..B'`` the model
            slices covering ``A..B``.
        shots_per_part: support slices per part (k-shot); with ``k > 1`` the organ must span at least
            ``npart * k`` support slices on the model grid; the k slices' prototypes are merged.
        cca: connected-component post-processing on the model grid: ``"3d"`` (keep the largest
            foreground-mass component of the volume), ``"2d"`` (per slice), or ``"none"``.
        batch_size: query slices per encoder call.
        device: ``"cpu"`` or ``"cuda"``.
    Returns:
        A :class:`SegmentResult`.
    Raises:
        DataError: missing/unreadable/non-3D file, NaN voxels, empty or non-binary support mask, support
            mask shape differing from the support image's, organ outside the model grid's field of view.
        ConfigError: bad option (``label`` absent from the mask, ``z_range`` outside the query, too few
            support slices for ``shots_per_part``, unknown ``cca``/``device``, bad output suffix).
        WeightsError: missing or corrupt checkpoint.
    """
    from fsl_med.data.datasets import get_dataset_info
    from fsl_med.data.volumes import Normalizer, slice_input, write_nifti
    from fsl_med.refine.cca import largest_mass_component
    from fsl_med.runs import load_checkpoint, module_from_checkpoint, stored_config

    ckpt, out = Path(ckpt), Path(out)
    sup_img_p, sup_mask_p, query_p = Path(support_image), Path(support_mask), Path(query)
    # -- options (cheap checks first)
    if cca not in CCA_CHOICES:
        raise ConfigError(f"--cca {cca}: must be one of {', '.join(CCA_CHOICES)}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size}: must be >= 1")
    if shots_per_part < 1:
        raise ConfigError(f"--shots-per-part {shots_per_part}: must be >= 1")
    if not (out.name.endswith(".nii.gz") or out.name.endswith(".nii")):
        raise ConfigError(f"--out {out}: must end with .nii.gz or .nii")
    if out.exists() and out.is_dir():
        raise ConfigError(f"--out {out}: is a folder")
    refuse_overwriting_inputs(out, {"--query": query_p, "--support-image": sup_img_p, "--support-mask": sup_mask_p,
                                    "--ckpt": ckpt})
    check_output_file(out, "--out")  # before the work: a bad location fails now, not after inference
    zr = parse_z_range(z_range) if isinstance(z_range, str) else z_range
    if zr is not None and (zr[0] < 0 or zr[1] < zr[0]):
        raise ConfigError(f"--z-range {zr[0]}:{zr[1]}: need 0 <= A <= B")
    dev = _device(device)
    for p, opt in ((ckpt, "--ckpt"), (sup_img_p, "--support-image"), (sup_mask_p, "--support-mask"),
                   (query_p, "--query")):
        if p.is_dir():
            raise DataError(f"{opt} {p}: is a folder, not a file")
        if not p.is_file():
            raise DataError(f"{opt} {p}: file not found")

    # -- inputs (read and checked before the checkpoint)
    s_img, s_aff, _ = _read_volume(sup_img_p, "--support-image")
    s_img = _check_finite(s_img, sup_img_p, "--support-image")
    s_mask, m_aff, _ = _read_volume(sup_mask_p, "--support-mask")
    if s_mask.shape != s_img.shape:
        raise DataError(f"--support-mask {sup_mask_p}: shape {tuple(s_mask.shape)} differs from the support "
                        f"image's {tuple(s_img.shape)}")
    if not np.allclose(m_aff, s_aff, atol=1e-3):
        log.warning("%s: affine differs from the support image's; the mask is taken on the image's grid", sup_mask_p)
    organ = _binary_mask(s_mask, sup_mask_p, label)
    q_img, q_aff, _ = _read_volume(query_p, "--query")
    q_img = _check_finite(q_img, query_p, "--query")
    q_shape = tuple(int(v) for v in q_img.shape)
    if zr is None:
        zr = (0, q_shape[2] - 1)
    elif zr[1] >= q_shape[2]:
        raise ConfigError(f"--z-range {zr[0]}:{zr[1]}: outside the query's slices 0..{q_shape[2] - 1} "
                          f"(its third array axis; {query_p})")

    # -- checkpoint config (inputs were checked first: their errors come without loading it)
    ck = load_checkpoint(ckpt)
    cfg = stored_config(ck, ckpt)
    norm_d = ck.get("normalizer") or {}
    modality = get_dataset_info(cfg.data.dataset).modality
    size, npart = int(cfg.data.image_size), int(cfg.eval.npart)
    normalize = Normalizer(mean=norm_d.get("mean"), std=norm_d.get("std"))
    if modality == "ct" and normalize.mean is None:
        log.warning("%s has no stored CT intensity statistics: normalising each volume by its own mean/std", ckpt)

    # -- to the training geometry; model arrays [Z, H, W]
    s_grid, _ = to_model_grid(preprocess_intensities(s_img, modality), s_aff, modality, size)
    m_grid, _ = to_model_grid(organ.astype(np.uint8), s_aff, modality, size, is_label=True)
    q_grid, q_model_aff = to_model_grid(preprocess_intensities(q_img, modality), q_aff, modality, size)
    sup_images = normalize(s_grid.transpose(2, 1, 0), f"--support-image {sup_img_p}")
    sup_masks = np.ascontiguousarray(m_grid.transpose(2, 1, 0) > 0)
    organ_slices = np.flatnonzero(sup_masks.reshape(sup_masks.shape[0], -1).any(axis=1))
    if organ_slices.size == 0:
        raise DataError(f"--support-mask {sup_mask_p}: the organ lies outside the model's {size}x{size} field "
                        "of view after resampling")
    parts = _support_indices(organ_slices, npart, shots_per_part)
    q_norm = normalize(q_grid.transpose(2, 1, 0), f"--query {query_p}")
    za, zb = model_z_range(zr, q_shape, q_aff, q_model_aff, q_norm.shape[0])  # type: ignore[arg-type]
    zs = np.arange(za, zb + 1)
    part = np.minimum(npart - 1, (npart * (zs - za)) // (zb - za + 1)).astype(np.int64)

    # -- model
    module, _ = module_from_checkpoint(ckpt, cfg, ck)
    del ck
    module.eval().to(dev)
    seg = module.model
    flat = [z for zs_p in parts for z in zs_p]
    three = bool(cfg.data.three_slices)  # the model's input: slice tiled x3, or z-1, z, z+1 stacks
    with torch.inference_mode():
        protos = seg.support_prototypes(slice_input(sup_images, three)[flat], sup_masks[flat].astype(np.float32),
                                        dev, shots_per_part)
        pred, prob = seg.predict_volume(protos, slice_input(q_norm, three)[zs], part, batch_size=batch_size,
                                        device=dev)
    if cca != "none":
        pred = largest_mass_component(pred, prob, cca)
    full = np.zeros(q_norm.shape, dtype=np.uint8)
    full[zs] = pred

    # -- back to the query's grid
    result = to_original_grid(full.transpose(2, 1, 0), q_model_aff, q_shape, q_aff)  # type: ignore[arg-type]
    result[:, :, :zr[0]] = 0
    result[:, :, zr[1] + 1:] = 0
    write_nifti(out, result, q_aff)
    voxels = int(result.sum())
    voxel_ml = float(np.prod(spacing_of(q_aff))) / 1000.0  # mm^3 -> ml
    return SegmentResult(path=out, voxels=voxels, volume_ml=voxels * voxel_ml, z_range=(int(zr[0]), int(zr[1])),
                         support_slices=[[int(z) for z in p] for p in parts], shape=q_shape)  # type: ignore[arg-type]
