"""Tests of the synthetic phantom dataset (fsl_med.data.phantom)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from fsl_med.data.phantom import (
    CLASS_NAMES,
    SPACING_MM,
    generate_phantom,
    make_phantom_scan,
    phantom_is_complete,
)
from fsl_med.errors import ConfigError, DataError

N, SIZE, DEPTH = 3, 64, 12
IDS = [str(i) for i in range(1, N + 1)]


def _load(folder: Path, kind: str, sid: str) -> np.ndarray:
    return np.asarray(nib.load(str(folder / f"{kind}_{sid}.nii.gz")).dataobj)


def _generate(folder: Path, **kw: int) -> Path:
    params = {"n_scans": N, "size": SIZE, "depth": DEPTH, "seed": 0, **kw}
    return generate_phantom(folder, **params)


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _generate(tmp_path_factory.mktemp("phantom") / "data")


def test_layout_and_headers(phantom: Path) -> None:
    expected = {f"{k}_{i}.nii.gz" for i in IDS for k in ("image", "label")} | {
        "classmap_1.json",
        "phantom.json",
    }
    assert {p.name for p in phantom.iterdir()} == expected  # also: no temporary files left behind
    assert phantom_is_complete(phantom)
    for sid in IDS:
        for kind in ("image", "label"):
            img = nib.load(str(phantom / f"{kind}_{sid}.nii.gz"))
            assert img.shape == (SIZE, SIZE, DEPTH)
            assert img.get_data_dtype() == np.float64
            assert np.allclose(img.header.get_zooms(), SPACING_MM)
            assert img.affine[0, 0] < 0 < img.affine[1, 1]  # the real data's x flip


def test_labels_and_images(phantom: Path) -> None:
    for sid in IDS:
        image, label = _load(phantom, "image", sid), _load(phantom, "label", sid)
        assert set(np.unique(label).tolist()) == {0.0, 1.0, 2.0, 3.0, 4.0}  # every organ in every scan
        assert np.isfinite(image).all()
        assert image.min() >= 0 and image.max() <= 1300
        body = image > 50
        assert body.mean() > 0.3
        assert np.array_equal(ndimage.binary_fill_holes(body), body)  # no < 50 hole inside the body
        assert (image[label > 0] > 50).all()
        fg_slices = (label > 0).any(axis=(0, 1))
        assert 0 < fg_slices.sum() < DEPTH  # some slices have no organ


def test_anatomy_and_contrast(phantom: Path) -> None:
    image, label = _load(phantom, "image", "1"), _load(phantom, "label", "1")
    centroid = {c: np.argwhere(label == c).mean(axis=0) for c in range(1, 5)}
    assert centroid[1][0] < centroid[4][0]  # liver on the patient's right (low axis-0), spleen left
    assert centroid[2][0] < centroid[3][0]  # right kidney before left kidney along axis 0
    assert max(centroid[2][1], centroid[3][1]) < centroid[1][1]  # kidneys posterior to the liver
    stats = {c: (image[label == c].mean(), image[label == c].std()) for c in range(1, 5)}
    assert abs(stats[1][0] - stats[4][0]) > 50  # liver and spleen means differ
    assert stats[2][1] > 2 * stats[1][1] and stats[3][1] > 2 * stats[1][1]  # kidneys far more textured


def test_classmap_matches_labels(phantom: Path) -> None:
    text = (phantom / "classmap_1.json").read_text()
    classmap = json.loads(text)
    assert text == json.dumps(classmap)  # same compact formatting as the real file
    assert list(classmap) == list(CLASS_NAMES)
    for name, per_scan in classmap.items():
        assert list(per_scan) == IDS
        for sid, zs in per_scan.items():
            label = _load(phantom, "label", sid)
            c = CLASS_NAMES.index(name)
            # as in the real file, "BG" lists the slices holding foreground
            hit = (label > 0) if c == 0 else (label == c)
            assert zs == np.flatnonzero(hit.any(axis=(0, 1))).tolist()
            assert all(type(z) is int for z in zs)


def test_deterministic_and_idempotent(phantom: Path, tmp_path: Path) -> None:
    other = _generate(tmp_path / "again")
    for sid in IDS:
        for kind in ("image", "label"):
            assert np.array_equal(_load(phantom, kind, sid), _load(other, kind, sid))
    image, label = make_phantom_scan(2, size=SIZE, depth=DEPTH, seed=0)
    assert np.array_equal(image, _load(phantom, "image", "2"))
    assert np.array_equal(label, _load(phantom, "label", "2"))
    assert (other / "classmap_1.json").read_text() == (phantom / "classmap_1.json").read_text()

    before = _mtimes(other)
    assert _generate(other) == other
    assert _mtimes(other) == before  # nothing rewritten


def test_different_seed_differs(phantom: Path, tmp_path: Path) -> None:
    other = _generate(tmp_path / "seed7", seed=7)
    for sid in IDS:
        assert not np.array_equal(_load(phantom, "image", sid), _load(other, "image", sid))
        assert not np.array_equal(_load(phantom, "label", sid), _load(other, "label", sid))


def test_regenerates_on_new_params_or_damage(tmp_path: Path) -> None:
    folder = _generate(tmp_path / "p")
    _generate(folder, n_scans=2)
    assert not (folder / "image_3.nii.gz").exists() and not (folder / "label_3.nii.gz").exists()
    meta = json.loads((folder / "phantom.json").read_text())
    assert meta["complete"] is True and meta["params"]["n_scans"] == 2
    assert list(json.loads((folder / "classmap_1.json").read_text())["LIVER"]) == ["1", "2"]

    (folder / "label_2.nii.gz").unlink()
    assert not phantom_is_complete(folder)
    _generate(folder, n_scans=2)
    assert phantom_is_complete(folder)
    assert np.array_equal(_load(folder, "label", "2"), make_phantom_scan(2, SIZE, DEPTH, 0)[1])

    leftover = folder / ".image_7.nii.gz.x1y2.tmp.nii.gz"  # as left by a killed atomic write
    leftover.write_bytes(b"")
    before = _mtimes(folder)
    generate_phantom(folder, n_scans=2, size=SIZE, depth=DEPTH, overwrite=True)
    assert not leftover.exists()
    del before[leftover.name]
    after = _mtimes(folder)
    assert all(after[name] >= before[name] for name in before) and after != before


def test_incomplete_marker_and_missing(tmp_path: Path) -> None:
    assert not phantom_is_complete(tmp_path / "missing")
    folder = _generate(tmp_path / "p", n_scans=1)
    meta = json.loads((folder / "phantom.json").read_text())
    (folder / "phantom.json").write_text(json.dumps({**meta, "complete": False}))
    assert not phantom_is_complete(folder)
    (folder / "phantom.json").write_text("{not json")
    assert not phantom_is_complete(folder)


def test_refuses_foreign_dataset(tmp_path: Path) -> None:
    folder = tmp_path / "real"
    folder.mkdir()
    (folder / "image_1.nii.gz").write_bytes(b"real data")
    with pytest.raises(DataError, match="phantom.json"):
        _generate(folder)
    assert (folder / "image_1.nii.gz").read_bytes() == b"real data"
    generate_phantom(folder, n_scans=1, size=SIZE, depth=DEPTH, overwrite=True)
    assert phantom_is_complete(folder)

    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(DataError, match="not a folder"):
        _generate(not_a_dir)


@pytest.mark.parametrize(
    "kw", [{"n_scans": 0}, {"size": 8}, {"depth": 2}, {"seed": -1}, {"size": 64.0}, {"n_scans": True}]
)
def test_invalid_params(tmp_path: Path, kw: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        generate_phantom(tmp_path / "x", **{"n_scans": 1, "size": SIZE, "depth": DEPTH, **kw})  # type: ignore[arg-type]
    assert not (tmp_path / "x").exists()
