"""Synthetic abdominal MRI phantom in the prepared CHAOS-T2 layout (used by ``make demo`` and tests).

The folder written by :func:`generate_phantom` looks exactly like the prepared real data:

* ``image_{id}.nii.gz``: float64 volume of shape ``(size, size, depth)`` (nibabel array order),
  integer-valued intensities in about ``0..1300``; the body is ``> 50`` everywhere, the air
  around it ``< 50``; spacing 1.25 x 1.25 x 7.7 mm with the real data's axis flip (``-1.25`` on x).
* ``label_{id}.nii.gz``: float64 volume, same shape/affine, values 0 background, 1 liver,
  2 right kidney, 3 left kidney, 4 spleen.
* ``classmap_1.json``: ``{class name: {scan id: [z, ...]}}`` written with the same JSON formatting
  as the real file. For an organ the list holds the slices with at least one voxel of it; as in the
  real file, ``"BG"`` holds the slices with at least one foreground (organ) voxel.
* ``phantom.json``: the generation parameters, written first with ``"complete": false`` and
  rewritten LAST with ``"complete": true``; it makes a second call with the same parameters a no-op.

Anatomy follows the real array orientation: axis 0 runs from the patient's right (liver, right
kidney at low index) to the left (spleen, left kidney); axis 1 from posterior (spine, kidneys at
low index) to anterior; axis 2 from inferior to superior. Every organ has its own mean intensity and
texture (liver smooth with thin dark vessels, spleen fine-grained, kidneys a bright cortex around a
darker striped medulla and sinus) and non-organ structures (spine, spinal canal, aorta, paraspinal
muscles, a fat layer, bowel-like blobs) keep the background from being trivial.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from fsl_med.atomic import write_json, write_text
from fsl_med.errors import ConfigError, DataError
from fsl_med.prepare.classmap import build_classmap, label_slices
from fsl_med.prepare.nifti import write_nifti
from fsl_med.prepare.plan import MriPlan

__all__ = [
    "CLASS_NAMES",
    "PHANTOM_FORMAT_VERSION",
    "SPACING_MM",
    "generate_phantom",
    "make_phantom_scan",
    "phantom_affine",
    "phantom_is_complete",
]

CLASS_NAMES: tuple[str, ...] = ("BG", "LIVER", "RK", "LK", "SPLEEN")
"""Class names in label-id order, as in the real ``classmap_1.json``."""

SPACING_MM: tuple[float, float, float] = (1.25, 1.25, 7.7)
"""Voxel spacing of the prepared CHAOS-T2 volumes (and of the phantom)."""

PHANTOM_FORMAT_VERSION = 1
"""Bumped whenever the generator's output changes, so stale phantom folders are regenerated."""

_META_NAME = "phantom.json"
_CLASSMAP_NAME = "classmap_1.json"
_GENERATOR = "fsl_med.data.phantom"
_SCAN_FILE_RE = re.compile(r"^(image|label)_(\d+)\.nii\.gz$")
# temporary files left by an interrupted atomic write of one of our files (see fsl_med.atomic)
_TMP_FILE_RE = re.compile(r"^\.((image|label)_\d+\.nii\.gz|classmap_1\.json|phantom\.json)\..*\.tmp")
_MIN_BODY = 60.0  # body intensities are clipped to at least this (body masks threshold at 50)
_MAX_ATTEMPTS = 10


# --------------------------------------------------------------------------------------------------
# geometry helpers (all coordinates normalised: u = i / size, v = j / size, w = k / depth in [0, 1])
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Grid:
    """Broadcastable normalised voxel-centre coordinates of a (sub-)volume: u (I,1,1), v (1,J,1),
    w (1,1,K)."""

    u: np.ndarray
    v: np.ndarray
    w: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.u.shape[0], self.v.shape[1], self.w.shape[2])

    def crop(self, sl: tuple[slice, slice, slice]) -> _Grid:
        return _Grid(self.u[sl[0]], self.v[:, sl[1]], self.w[:, :, sl[2]])


def _make_grid(size: int, depth: int) -> _Grid:
    c = ((np.arange(size, dtype=np.float32) + 0.5) / size).astype(np.float32)
    z = ((np.arange(depth, dtype=np.float32) + 0.5) / depth).astype(np.float32)
    return _Grid(c[:, None, None], c[None, :, None], z[None, None, :])


def _smooth_field(
    rng: np.random.Generator, g: _Grid, freq: tuple[float, float], n_terms: int = 6, z_scale: float = 0.5
) -> np.ndarray:
    """Random smooth field of shape ``g.shape``, zero mean and about unit std (random Fourier features).

    ``freq`` is the range of spatial frequencies in cycles per normalised unit; ``z_scale`` damps the
    frequencies along z (slices are thick). The field is a function of the normalised coordinates, so
    evaluating it on a crop gives the crop of the full-volume field.
    """
    ni, nj, nk = g.shape
    # cos(a(u, v) + c(w)) = cos(a) cos(c) - sin(a) sin(c): an (I*J, 2T) x (2T, K) matrix product.
    plane = np.empty((ni * nj, 2 * n_terms), dtype=np.float32)
    coef = np.empty((2 * n_terms, nk), dtype=np.float32)
    for t in range(n_terms):
        direction = rng.normal(size=3)
        direction[2] *= z_scale
        direction /= np.linalg.norm(direction) + 1e-12
        f = direction * rng.uniform(*freq) * 2.0 * np.pi
        phase = rng.uniform(0.0, 2.0 * np.pi)
        a = (np.float32(f[0]) * g.u[:, :, 0] + np.float32(f[1]) * g.v[:, :, 0]).ravel()
        c = np.float32(f[2]) * g.w[0, 0, :] + np.float32(phase)
        plane[:, 2 * t] = np.cos(a)
        plane[:, 2 * t + 1] = np.sin(a)
        coef[2 * t] = np.cos(c)
        coef[2 * t + 1] = -np.sin(c)
    out = (plane @ coef).reshape(g.shape)
    out *= np.float32(np.sqrt(2.0 / n_terms))
    return out


def _grain(rng: np.random.Generator, g: _Grid, sigma_px: float) -> np.ndarray:
    """Pixel-scale noise of shape ``g.shape``, in-plane Gaussian-smoothed, rescaled to unit std."""
    noise = rng.standard_normal(g.shape, dtype=np.float32)
    if sigma_px > 0:
        noise = ndimage.gaussian_filter(noise, sigma=(sigma_px, sigma_px, 0.0), mode="wrap")
        noise /= np.float32(noise.std() + 1e-6)
    return noise


@dataclass(frozen=True)
class _Blob:
    """A deformed ellipsoid restricted to its bounding box ``sl`` (slices into the volume).

    ``grid`` holds the box's coordinates; ``mask`` (box shape) is the inside, ``r`` the deformed
    normalised radius (< 1 inside), ``x, y`` the in-plane rotated coordinates in semi-axis units.
    """

    sl: tuple[slice, slice, slice]
    grid: _Grid
    mask: np.ndarray
    r: np.ndarray
    x: np.ndarray
    y: np.ndarray


def _box(center: float, extent: float, n: int) -> slice:
    lo = int(np.floor((center - extent) * n - 0.5))
    hi = int(np.ceil((center + extent) * n - 0.5)) + 1
    return slice(min(max(lo, 0), n), min(max(hi, 0), n))


def _blob(
    rng: np.random.Generator,
    g: _Grid,
    center: tuple[float, float, float],
    semi: tuple[float, float, float],
    angle: float,
    deform: float,
    drift: tuple[float, float] = (0.0, 0.0),
    deform_freq: tuple[float, float] = (1.5, 4.0),
) -> _Blob:
    """Smooth deformed ellipsoid with in-plane rotation ``angle`` (radians), radius modulated by up to
    ``deform`` and a centre that drifts by ``drift`` (normalised units) from its bottom to its top."""
    cu, cv, cw = center
    au, av, aw = semi
    reach = 1.0 + deform  # the deformed radius is < 1 only where the plain one is < 1 + deform
    ext_uv = reach * float(np.hypot(au, av))
    ni, nj, nk = g.shape
    sl = (
        _box(cu, ext_uv + abs(drift[0]) / 2.0 * reach, ni),
        _box(cv, ext_uv + abs(drift[1]) / 2.0 * reach, nj),
        _box(cw, aw * reach, nk),
    )
    b = g.crop(sl)
    dz = (b.w - np.float32(cw)) / np.float32(aw)  # (1,1,K)
    du = b.u - (np.float32(cu) + np.float32(drift[0] / 2.0) * dz)  # (I,1,K)
    dv = b.v - (np.float32(cv) + np.float32(drift[1] / 2.0) * dz)  # (1,J,K)
    c, s = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    x = (c * du + s * dv) / np.float32(au)
    y = (c * dv - s * du) / np.float32(av)
    r = np.sqrt(x * x + y * y + dz * dz)
    field = _smooth_field(rng, b, deform_freq, n_terms=5)
    r = r / (np.float32(1.0) + np.float32(deform) * np.tanh(field))
    return _Blob(sl=sl, grid=b, mask=r < 1.0, r=r, x=x, y=y)


def _paint(vol: np.ndarray, blob: _Blob, value: np.ndarray | float, where: np.ndarray | None = None) -> None:
    """Set ``vol`` (our own working array) to ``value`` (box-shaped array or scalar) inside ``blob``."""
    mask = blob.mask if where is None else blob.mask & where
    region = vol[blob.sl]
    region[mask] = value[mask] if isinstance(value, np.ndarray) else value


def _jitter(
    rng: np.random.Generator, base: tuple[float, ...], spread: tuple[float, ...]
) -> tuple[float, ...]:
    return tuple(float(b + rng.uniform(-sp, sp)) for b, sp in zip(base, spread, strict=True))


def _scale(rng: np.random.Generator, base: tuple[float, ...], rel: float) -> tuple[float, ...]:
    return tuple(float(b * rng.uniform(1.0 - rel, 1.0 + rel)) for b in base)


# --------------------------------------------------------------------------------------------------
# one scan
# --------------------------------------------------------------------------------------------------


def _draw_scan(rng: np.random.Generator, g: _Grid) -> tuple[np.ndarray, np.ndarray]:
    """One random phantom: image (S,S,D) float64 integer-valued, label (S,S,D) uint8 in 0..4."""
    px = 256.0 / g.shape[0]  # texture scales are defined for a 256-pixel slice
    vol = np.zeros(g.shape, dtype=np.float32)
    label = np.zeros(g.shape, dtype=np.uint8)
    # Three shared noise fields (fine, medium, coarse grain). Structures occupy (mostly) disjoint
    # regions, so sharing a field between them costs no visible correlation but saves much time.
    fine, mid, coarse = (_grain(rng, g, sigma / px) for sigma in (0.5, 0.8, 1.4))

    # --- body: soft tissue with low-frequency variation, subcutaneous fat rim -----------------------
    body = _blob(
        rng,
        g,
        center=(0.5, 0.48 + rng.uniform(-0.02, 0.02), 0.5),
        semi=(0.46 + rng.uniform(-0.02, 0.02), 0.35 + rng.uniform(-0.03, 0.03), 4.0),
        angle=rng.uniform(-0.05, 0.05),
        deform=0.05,
        deform_freq=(0.8, 2.0),
    )
    body_mask = np.zeros(g.shape, dtype=bool)
    body_mask[body.sl] = body.mask
    tissue = 380.0 + 55.0 * _smooth_field(rng, body.grid, (1.0, 3.0)) + 18.0 * coarse[body.sl]
    _paint(vol, body, tissue)
    _paint(vol, body, 640.0 + 25.0 * mid[body.sl], where=body.r > 0.9 + 0.02 * rng.uniform(-1, 1))

    # --- non-organ structures ---------------------------------------------------------------------
    for side in (-1.0, 1.0):  # paraspinal muscles: dark, striated
        m = _blob(
            rng,
            g,
            center=(0.5 + side * 0.1 + rng.uniform(-0.01, 0.01), 0.2, 0.5),
            semi=(0.075, 0.06, 4.0),
            angle=side * rng.uniform(0.1, 0.4),
            deform=0.1,
        )
        stripes = np.cos(m.y * np.float32(9.0 * np.pi) + np.float32(rng.uniform(0, 6.3)))
        _paint(vol, m, 240.0 + 35.0 * stripes + 12.0 * mid[m.sl])
    for _ in range(int(rng.integers(3, 7))):  # bowel-like blobs: wall + content of random brightness
        b = _blob(
            rng,
            g,
            center=(rng.uniform(0.38, 0.72), rng.uniform(0.58, 0.8), rng.uniform(0.15, 0.85)),
            semi=(rng.uniform(0.03, 0.07), rng.uniform(0.03, 0.06), rng.uniform(0.15, 0.4)),
            angle=rng.uniform(0, np.pi),
            deform=0.2,
        )
        grain = (fine, mid, coarse)[int(rng.integers(0, 3))][b.sl]
        content = rng.uniform(150.0, 950.0) + rng.uniform(10.0, 80.0) * grain
        _paint(vol, b, np.where(b.r > 0.78, np.float32(300.0), content))
    spine_c = (0.5 + rng.uniform(-0.015, 0.015), 0.25 + rng.uniform(-0.015, 0.015))
    vert = _blob(rng, g, center=(*spine_c, 0.5), semi=(0.055, 0.05, 4.0), angle=0.0, deform=0.04)
    _paint(vol, vert, np.where(vert.r > 0.8, np.float32(520.0), 980.0 + 40.0 * fine[vert.sl]))
    canal = _blob(
        rng, g, center=(spine_c[0], spine_c[1] - 0.075, 0.5), semi=(0.022, 0.02, 4.0), angle=0.0, deform=0.05
    )
    _paint(vol, canal, 1220.0)
    aorta = _blob(
        rng,
        g,
        center=(spine_c[0] + 0.035, spine_c[1] + 0.075, 0.5),
        semi=(0.022, 0.022, 4.0),
        angle=0.0,
        deform=0.05,
    )
    _paint(vol, aorta, 110.0)

    # --- organs (painted liver, spleen, right kidney, left kidney: later wins) ---------------------
    liver = _blob(
        rng,
        g,
        center=_jitter(rng, (0.3, 0.6, 0.6), (0.02, 0.02, 0.04)),
        semi=_scale(rng, (0.24, 0.23, 0.31), 0.08),
        angle=rng.uniform(-0.3, 0.1),
        deform=0.15,
        drift=_jitter(rng, (0.04, 0.0), (0.03, 0.03)),
    )
    vessels = np.abs(_smooth_field(rng, liver.grid, (4.0, 8.0), n_terms=4)) < 0.07
    liver_tex = 560.0 + 22.0 * _smooth_field(rng, liver.grid, (2.0, 4.0)) + 5.0 * coarse[liver.sl]
    _paint(vol, liver, np.where(vessels, np.float32(330.0), liver_tex))
    _paint(label, liver, 1)

    spleen = _blob(
        rng,
        g,
        center=_jitter(rng, (0.84, 0.43, 0.64), (0.02, 0.02, 0.04)),
        semi=_scale(rng, (0.075, 0.12, 0.2), 0.1),
        angle=rng.uniform(-0.5, 0.1),
        deform=0.12,
        drift=_jitter(rng, (-0.02, 0.03), (0.02, 0.02)),
    )
    _paint(vol, spleen, 770.0 + 15.0 * _smooth_field(rng, spleen.grid, (2.0, 4.0)) + 70.0 * fine[spleen.sl])
    _paint(label, spleen, 4)

    for lab_id, cu, cw in ((2, 0.28, 0.4), (3, 0.71, 0.44)):
        medial = 1.0 if cu < 0.5 else -1.0  # the hilum faces the spine
        kid = _blob(
            rng,
            g,
            center=_jitter(rng, (cu, 0.35, cw), (0.015, 0.015, 0.04)),
            semi=_scale(rng, (0.085, 0.11, 0.2), 0.08),
            angle=-medial * rng.uniform(0.2, 0.5),
            deform=0.06,
        )
        theta = np.arctan2(kid.y, kid.x)
        pyramids = np.cos(theta * np.float32(8.0) + np.float32(rng.uniform(0, 6.3)))
        medulla = 470.0 + 140.0 * pyramids + 15.0 * mid[kid.sl]
        sinus = (kid.r < 0.45) | ((kid.x * medial > 0.35) & (np.abs(kid.y) < 0.3))
        kid_tex = np.where(kid.r > 0.68, 880.0 + 20.0 * mid[kid.sl], medulla)
        _paint(vol, kid, np.where(sinus, np.float32(260.0), kid_tex))
        _paint(label, kid, lab_id)

    # --- MR-like bias field, noise, air -----------------------------------------------------------
    vol *= 1.0 + 0.06 * np.tanh(_smooth_field(rng, g, (0.5, 1.2), n_terms=4))
    vol += 8.0 * rng.standard_normal(g.shape, dtype=np.float32)
    air = np.abs(rng.normal(0.0, 6.0, size=g.shape)).astype(np.float32)
    vol = np.where(body_mask, np.clip(vol, _MIN_BODY, 1300.0), np.minimum(air, 40.0))
    label[~body_mask] = 0
    return np.round(vol).astype(np.float64), label


def make_phantom_scan(
    scan_index: int, size: int = 256, depth: int = 24, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Generate one phantom scan in memory, deterministically from ``seed + scan_index``.

    Returns:
        image: (size, size, depth) float64, integer-valued, body > 50, air < 50.
        label: (size, size, depth) float64 with values in {0, 1, 2, 3, 4}; every organ is present.
    """
    _check_params(1, size, depth, seed)
    if isinstance(scan_index, bool) or not isinstance(scan_index, (int, np.integer)) or scan_index < 1:
        raise ConfigError(f"phantom: scan_index must be an integer >= 1, got {scan_index!r}")
    rng = np.random.default_rng(seed + scan_index)
    g = _make_grid(size, depth)
    for _ in range(_MAX_ATTEMPTS):  # redraw (still deterministic) in the unlikely case an organ vanished
        image, label = _draw_scan(rng, g)
        present = np.bincount(label.ravel(), minlength=len(CLASS_NAMES))
        if np.all(present[1:] > 0) and present[0] > 0:
            return image, label.astype(np.float64)
    raise DataError(
        f"phantom: scan {scan_index} (size={size}, depth={depth}) lost an organ; use a larger size/depth"
    )


# --------------------------------------------------------------------------------------------------
# folder layout
# --------------------------------------------------------------------------------------------------


def phantom_affine(size: int, depth: int) -> np.ndarray:
    """(4, 4) voxel-to-world affine with the real data's spacing and x flip, centred on the origin."""
    sx, sy, sz = SPACING_MM
    aff = np.diag([-sx, sy, sz, 1.0])
    aff[:3, 3] = [sx * (size - 1) / 2.0, -sy * (size - 1) / 2.0, -sz * (depth - 1) / 2.0]
    return aff


_LIMITS = {"n_scans": (1, 200), "size": (32, 1024), "depth": (8, 512)}
"""Phantom parameter ranges (a 1024 x 1024 x 512 float32 scan is already 2 GiB)."""


def _check_params(n_scans: int, size: int, depth: int, seed: int) -> None:
    for name, value in (("n_scans", n_scans), ("size", size), ("depth", depth)):
        lo, hi = _LIMITS[name]
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= value <= hi:
            raise ConfigError(f"phantom: {name} must be an integer in {lo}..{hi}, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"phantom: seed must be a non-negative integer, got {seed!r}")


def _params(n_scans: int, size: int, depth: int, seed: int) -> dict[str, int]:
    return {"n_scans": int(n_scans), "size": int(size), "depth": int(depth), "seed": int(seed)}


def _read_meta(out_dir: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((out_dir / _META_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("generator") == _GENERATOR else None


def phantom_plan(out_dir: str | Path) -> MriPlan | None:
    """The preprocessing plan a phantom folder stands for (its volumes are drawn directly on the MRI plan's grid,
    at the phantom's in-plane size), or ``None`` when ``out_dir`` is not a phantom."""
    meta = _read_meta(Path(out_dir))
    size = meta.get("params", {}).get("size") if meta is not None else None
    return MriPlan(size=size) if isinstance(size, int) and not isinstance(size, bool) else None


def _expected_files(n_scans: int) -> list[str]:
    names = [f"{kind}_{i}.nii.gz" for i in range(1, n_scans + 1) for kind in ("image", "label")]
    return [*names, _CLASSMAP_NAME]


def phantom_is_complete(out_dir: str | Path) -> bool:
    """True when ``out_dir`` holds a phantom whose generation finished (``phantom.json`` says
    complete and every image, label and the classmap it lists exists and is non-empty)."""
    out_dir = Path(out_dir)
    meta = _read_meta(out_dir)
    if meta is None or meta.get("complete") is not True:
        return False
    params = meta.get("params")
    if not isinstance(params, dict) or not isinstance(params.get("n_scans"), int):
        return False
    for name in _expected_files(params["n_scans"]):
        p = out_dir / name
        if not p.is_file() or p.stat().st_size == 0:
            return False
    return True


def _meta(params: dict[str, int], complete: bool) -> dict[str, Any]:
    return {
        "generator": _GENERATOR,
        "format_version": PHANTOM_FORMAT_VERSION,
        "params": params,
        "scan_ids": [str(i) for i in range(1, params["n_scans"] + 1)],
        "complete": complete,
    }


def _prepare_dir(out_dir: Path, n_scans: int, overwrite: bool) -> None:
    """Create ``out_dir``; refuse to write over a foreign dataset; remove stale phantom files."""
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"phantom: output path {out_dir} exists and is not a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"phantom: cannot create {out_dir} ({e.strerror or e})") from e
    ours = _read_meta(out_dir) is not None
    scan_files = [p for p in out_dir.iterdir() if _SCAN_FILE_RE.match(p.name)]
    if not ours and not overwrite and (scan_files or (out_dir / _CLASSMAP_NAME).exists()):
        raise DataError(
            f"phantom: {out_dir} already holds a dataset not made by the phantom generator "
            "(no phantom.json); refusing to overwrite it (choose another --out)"
        )
    if not ours:
        return
    for p in out_dir.iterdir():
        m = _SCAN_FILE_RE.match(p.name)
        stale_scan = m is not None and not 1 <= int(m.group(2)) <= n_scans
        leftover_tmp = _TMP_FILE_RE.match(p.name) is not None
        if (stale_scan or leftover_tmp) and p.is_file():
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


def generate_phantom(
    out_dir: str | Path,
    n_scans: int = 10,
    size: int = 256,
    depth: int = 24,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write a phantom dataset in the prepared CHAOS-T2 layout into ``out_dir`` and return it.

    Scan ids are ``"1"..str(n_scans)``; scan ``i`` is drawn from ``default_rng(seed + i)``. Volumes
    are ``(size, size, depth)`` (``n_scans >= 1``, ``size >= 32``, ``depth >= 8``, ``seed >= 0``). If ``out_dir`` already holds a complete phantom made with the same
    parameters (and generator version) nothing is written, unless ``overwrite`` is true. A folder
    holding other data (NIfTI files but no ``phantom.json``) is only written into with ``overwrite``.
    Every file is written atomically; ``phantom.json`` is rewritten as complete last. On regeneration,
    scans of a previous phantom beyond ``n_scans`` and temporary files of interrupted writes are removed.

    Raises:
        ConfigError: a parameter is out of range.
        DataError: ``out_dir`` is not a folder or holds a foreign dataset.
    """
    _check_params(n_scans, size, depth, seed)
    out_dir = Path(out_dir)
    params = _params(n_scans, size, depth, seed)
    if not overwrite and phantom_is_complete(out_dir):
        meta = _read_meta(out_dir) or {}
        if meta.get("params") == params and meta.get("format_version") == PHANTOM_FORMAT_VERSION:
            return out_dir

    _prepare_dir(out_dir, n_scans, overwrite)
    write_json(out_dir / _META_NAME, _meta(params, complete=False))
    affine = phantom_affine(size, depth)
    slices: dict[str, dict[str, list[int]]] = {}
    for i in range(1, n_scans + 1):
        image, label = make_phantom_scan(i, size=size, depth=depth, seed=seed)
        write_nifti(out_dir / f"image_{i}.nii.gz", image, affine)
        write_nifti(out_dir / f"label_{i}.nii.gz", label, affine)
        slices[str(i)] = label_slices(label.astype(np.uint8))
    write_text(out_dir / _CLASSMAP_NAME, json.dumps(build_classmap(dict(enumerate(CLASS_NAMES)), slices)))
    write_json(out_dir / _META_NAME, _meta(params, complete=True))
    return out_dir
