"""3D supervoxels and adjacent-slice episodes (``data.episodes=supervoxel3d``, issue 30 §4; method-zoo.md §1 rows 1-2).

The graph segmentation is checked against a literal sequential Felzenszwalb (below: every edge of the 26-neighbour
graph listed voxel by voxel, visited in order, both passes) on random and real volumes, for the plain-Python engine
and, when numba is installed, the compiled one; then constructed volumes (blocks, min_size, background removal),
the cache, the episodes (adjacent pairs, size rules, swap, one-sided augmentation, determinism, Setting 2, k-shot),
a short training run on the phantom, the unchanged 2D augmentation and the one-line errors.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import ndimage

from fsl_med.cli import main
from fsl_med.config import AugmentConfig, SupervoxelConfig, load_config
from fsl_med.data.datamodule import FewShotDataModule
from fsl_med.data.episodes import augment_pair
from fsl_med.data.phantom import generate_phantom
from fsl_med.data.supervoxel_episodes import SupervoxelEpisodeDataset, valid_windows
from fsl_med.data.supervoxels import (
    edge_directions,
    felzenszwalb_3d,
    load_or_make_supervoxels,
    numba_available,
    supervoxels_volume,
)
from fsl_med.data.volumes import load_volume, make_normalizer
from fsl_med.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "experiments" / "demo.yaml")
ENGINES = ["python", *(["numba"] if numba_available() else [])]


# -- a literal sequential Felzenszwalb (the oracle) ----------------------------------------------------------------
OFFSETS = [(0, 1, 0), (0, 1, 1), (0, 0, 1), (0, 1, -1), (1, 1, 0), (1, 1, 1), (1, 0, 1), (1, -1, 0), (1, -1, -1),
           (1, 0, -1), (1, 1, -1), (1, -1, 1), (1, 0, 0)]  # the reference's edge blocks, in its order


def _weight(off: tuple[int, int, int], s: float) -> float:
    """The reference's per-direction weight for z/x spacing ratio s (in-plane 1, diagonals included)."""
    if off[0] == 0:
        return 1.0
    inplane = abs(off[1]) + abs(off[2])  # the reference's expressions (their rounding orders equal-weight ties)
    return [s ** 2, (math.sqrt(1 + s ** 2) / math.sqrt(2)) ** 2, (math.sqrt(2 + s ** 2) / math.sqrt(3)) ** 2][inplane]


def oracle(img: np.ndarray, spacing: tuple[float, float, float], min_size: int, k: float = 1 / 255) -> np.ndarray:
    """Sequential Felzenszwalb on the 26-neighbour graph: all edges (block by block, voxels in raster order), a stable
    sort by weight, the merge pass with float32 thresholds, the min-size pass; ids numbered by first voxel."""
    zs, hs, ws = img.shape
    s = spacing[0] / spacing[2]
    edges = []
    for off in OFFSETS:
        w = _weight(off, s)
        for z, y, x in np.ndindex(img.shape):
            z2, y2, x2 = z - off[0], y - off[1], x - off[2]
            if 0 <= z2 < zs and 0 <= y2 < hs and 0 <= x2 < ws:
                d = float(img[z, y, x]) - float(img[z2, y2, x2])
                edges.append((math.sqrt(w * (d * d)), (z * hs + y) * ws + x, (z2 * hs + y2) * ws + x2))
    edges.sort(key=lambda e: e[0])  # stable: ties keep the listing order
    n = img.size
    parent, size, cint = list(range(n)), [1] * n, [0.0] * n

    def root(a: int) -> int:
        while parent[a] != a:
            a = parent[a]
        return a

    for c, a, b in edges:
        a, b = root(a), root(b)
        if a != b and c < min(float(np.float32(cint[a] + k / size[a])), float(np.float32(cint[b] + k / size[b]))):
            parent[b], size[a], cint[a] = a, size[a] + size[b], c
    for _, a, b in edges:
        a, b = root(a), root(b)
        if a != b and (size[a] < min_size or size[b] < min_size):
            parent[b], size[a] = a, size[a] + size[b]
    r = np.array([root(i) for i in range(n)])
    _, first, inv = np.unique(r, return_index=True, return_inverse=True)
    rank = np.empty(first.size, dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(first.size)
    return rank[inv].reshape(img.shape)


@pytest.mark.parametrize("engine", ENGINES)
def test_felzenszwalb_3d_equals_the_sequential_algorithm(engine):
    rng = np.random.default_rng(0)
    merged = 0
    for t in range(24):
        shape = tuple(int(x) for x in rng.integers(2, 8, size=3))
        kind = t % 4
        if kind == 0:  # integer intensities: only equal neighbours merge before the min-size pass
            img = rng.integers(0, 4, size=shape) * 60.0
        elif kind == 1:  # continuous, differences around k: the merge pass merges and stops late
            img = rng.normal(size=shape) * 0.01
        elif kind == 2:  # a smooth ramp
            img = np.cumsum(rng.uniform(0, 0.003, size=shape), axis=2)
        else:
            img = rng.integers(0, 3, size=shape) * 0.002
        spacing = (float(rng.uniform(1, 6)), 1.25, 1.25)
        min_size = int(rng.integers(1, 25))
        got = felzenszwalb_3d(img, spacing, min_size, engine=engine)
        assert np.array_equal(got, oracle(img, spacing, min_size)), (t, shape, min_size)
        # min_size 1: fewer segments than components of equal neighbours = the merge pass merged across a weight > 0
        equal_parts = sum(ndimage.label(img == x, structure=np.ones((3, 3, 3)))[1] for x in np.unique(img))
        merged += int(felzenszwalb_3d(img, spacing, 1, engine=engine).max() + 1 < equal_parts)
    assert merged >= 3  # the merge pass, not only the zero-weight components, was exercised


def test_real_chaos_crop_equals_the_sequential_algorithm(chaos):
    vol = load_volume(chaos, "1")
    z0 = vol.image.shape[0] // 2
    crop = vol.image[z0 - 2:z0 + 2, 100:124, 90:114]  # through the body: many ties, noise, edges
    img = 255.0 * (crop - vol.image.min()) / (vol.image.max() - vol.image.min())
    for min_size in (50, 400):
        assert np.array_equal(felzenszwalb_3d(img, vol.spacing, min_size, engine="python"),
                              oracle(img, vol.spacing, min_size))


def test_edge_weights_follow_the_spacing():
    dirs = dict(edge_directions((2.5, 1.25, 1.25)))  # s = 2
    assert len(dirs) == 13 and all(max(abs(o) for o in off) == 1 for off in dirs)
    assert dirs[(0, 1, 0)] == dirs[(0, 1, 1)] == 1.0  # in-plane, diagonals too
    assert dirs[(1, 0, 0)] == pytest.approx(4.0)
    assert dirs[(1, 1, 0)] == pytest.approx(2.5) and dirs[(1, -1, 1)] == pytest.approx(2.0)
    # each of the 26 neighbours is reached by exactly one direction (up to sign)
    dirs_all = {d for off in dirs for d in (off, tuple(-x for x in off))}
    assert len(dirs_all) == 26


def _blocks(noise: bool) -> np.ndarray:
    """[6, 20, 20]: air (0) around two touching blocks of intensity 100 and 200 (optionally with +-1 noise)."""
    img = np.zeros((6, 20, 20))
    img[:, 3:17, 3:10] = 100
    img[:, 3:17, 10:17] = 200
    if noise:
        rng = np.random.default_rng(1)
        img[:, 3:17, 3:17] += rng.integers(-1, 2, size=(6, 14, 14))
    return img


def test_two_touching_blocks_give_two_supervoxels():
    img = _blocks(False)
    sv = supervoxels_volume(img, (2.0, 1.0, 1.0), SupervoxelConfig(min_size=50))
    assert sv.dtype == np.int32 and sv.shape == img.shape
    assert (sv[:, :3] == 0).all() and (sv[:, 17:] == 0).all()  # the air is background
    left, right = np.unique(sv[:, 3:17, 3:10]), np.unique(sv[:, 3:17, 10:17])
    assert left.size == 1 and right.size == 1 and {int(left[0]), int(right[0])} == {1, 2}
    # with noise (+-1) each block splits into supervoxels of >= min_size voxels (k = 1/255 merges nothing that big),
    # and none crosses the blocks' boundary (its edges cost ~100x the noise)
    noisy = supervoxels_volume(_blocks(True), (2.0, 1.0, 1.0), SupervoxelConfig(min_size=50))
    left, right = set(np.unique(noisy[:, 3:17, 3:10])), set(np.unique(noisy[:, 3:17, 10:17]))
    assert 0 not in left | right and not left & right and len(left) > 1
    assert np.bincount(noisy.ravel())[1:].min() >= 50


def test_min_size_merges_small_segments():
    img = _blocks(False)
    img[2:4, 6:9, 5:8] = 150  # an 18-voxel island inside the 100-block: 100 is nearer than 200 (cheaper edges)
    spacing = (2.0, 1.0, 1.0)
    small = supervoxels_volume(img, spacing, SupervoxelConfig(min_size=10))
    assert small.max() == 3 and np.unique(small[2:4, 6:9, 5:8]).size == 1
    big = supervoxels_volume(img, spacing, SupervoxelConfig(min_size=30))
    assert big.max() == 2
    assert np.unique(big[:, 3:17, 3:10]).size == 1  # the island joined its surrounding block
    # every segment of the raw segmentation reaches min_size (the volume is one connected graph)
    raw = felzenszwalb_3d(255 * img / img.max(), spacing, 30)
    assert np.bincount(raw.ravel()).min() >= 30


def test_background_removal_per_slice():
    img = np.full((3, 24, 24), 5.0)  # 5/205*255 = 6.2 < 10: air
    img[:, 2:20, 2:20] = 205  # the body (maximum 205)
    img[:, 8:12, 8:12] = 0  # a dark hole inside it: filled
    img[:, 22:24, 22:24] = 205  # a detached bright island: not the largest component
    img[1] = 5.0  # an empty slice
    sv = supervoxels_volume(img, (1.0, 1.0, 1.0), SupervoxelConfig(min_size=5))
    assert (sv[1] == 0).all()
    for z in (0, 2):
        assert (sv[z, 2:20, 2:20] > 0).all()  # hole filled
        assert (sv[z, 22:, 22:] == 0).all() and (sv[z, :2] == 0).all()
    ids = np.unique(sv)
    assert ids[0] == 0 and ids[1:].tolist() == list(range(1, ids.size))  # consecutive 1..N


def test_bad_volumes_are_one_line_errors():
    with pytest.raises(DataError, match="non-finite") as e:
        supervoxels_volume(np.full((2, 4, 4), np.nan), (1, 1, 1), SupervoxelConfig())
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match=r"\[Z, H, W\]"):
        supervoxels_volume(np.zeros((4, 4)), (1, 1, 1), SupervoxelConfig())
    assert (supervoxels_volume(np.full((2, 4, 4), 7.0), (1, 1, 1), SupervoxelConfig()) == 0).all()  # constant: air


def test_cache_is_reused_and_keyed_by_parameters(tmp_path):
    img = _blocks(True)
    src = tmp_path / "image_9.nii.gz"
    src.write_bytes(b"stand-in for the image file (its content keys the cache)")
    spacing = (2.0, 1.0, 1.0)
    a = load_or_make_supervoxels(img, src, spacing, SupervoxelConfig(min_size=50), tmp_path / "c")
    files = sorted((tmp_path / "c" / "supervoxels").glob("*.npz"))
    assert len(files) == 1 and files[0].name.startswith("image_9-")
    mtime = files[0].stat().st_mtime_ns
    # the episodes' fields are not generation parameters: same entry, read back
    b = load_or_make_supervoxels(img, src, spacing, SupervoxelConfig(min_size=50, min_pixels=7, size_rule="first"),
                                 tmp_path / "c")
    assert np.array_equal(a, b) and files[0].stat().st_mtime_ns == mtime
    np.savez_compressed(files[0], supervoxels=np.full(img.shape, 9, np.int32))  # what the cache holds is used
    assert (load_or_make_supervoxels(img, src, spacing, SupervoxelConfig(min_size=50), tmp_path / "c") == 9).all()
    load_or_make_supervoxels(img, src, spacing, SupervoxelConfig(min_size=51), tmp_path / "c")
    load_or_make_supervoxels(img, src, spacing, SupervoxelConfig(min_size=50, sigma=0.5), tmp_path / "c")
    load_or_make_supervoxels(img, src, (3.0, 1.0, 1.0), SupervoxelConfig(min_size=50), tmp_path / "c")
    src.write_bytes(b"another image")
    c = load_or_make_supervoxels(img, src, spacing, SupervoxelConfig(min_size=50), tmp_path / "c")
    assert np.array_equal(c, a)  # recomputed for the new file content
    assert len(list((tmp_path / "c" / "supervoxels").glob("*.npz"))) == 5
    assert not list((tmp_path / "c" / "supervoxels").glob("*.tmp*"))


# -- episodes ----------------------------------------------------------------------------------------------------------
def test_valid_windows_size_rules_and_exclusion():
    sv = np.zeros((4, 20, 20), dtype=np.int32)
    sv[0, :15, :20] = 1  # 300 px
    sv[1, :5, :10] = 1  # 50 px
    sv[2, :5, :10] = 2  # id 2: 50 px in slice 2, 300 in slice 3
    sv[3, :15, :20] = 2
    allowed = np.ones(4, dtype=bool)
    assert {k: v.tolist() for k, v in valid_windows(sv, allowed, 2, 200, "first").items()} == {1: [0]}
    assert {k: v.tolist() for k, v in valid_windows(sv, allowed, 2, 200, "larger").items()} == {1: [0], 2: [2]}
    allowed[3] = False  # Setting 2 drops slice 3: id 2 has no pair left
    assert {k: v.tolist() for k, v in valid_windows(sv, allowed, 2, 200, "larger").items()} == {1: [0]}
    assert valid_windows(sv, allowed, 5, 1, "larger") == {}  # fewer slices than a window
    with pytest.raises(ConfigError, match="data.supervoxel.size_rule"):
        valid_windows(sv, allowed, 2, 1, "middle")


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A 64 px phantom, its first two scans normalised with their supervoxels (min_size 300)."""
    base = tmp_path_factory.mktemp("sv")
    root = generate_phantom(base / "ph", n_scans=6, size=64, depth=10, seed=0)
    norm = make_normalizer("mri")
    vols = [load_volume(root, s) for s in ("1", "2")]
    images = [norm(v.image) for v in vols]
    svs = [supervoxels_volume(v.image, v.spacing, SupervoxelConfig(min_size=300)) for v in vols]
    slices = [(i, z) for i, v in enumerate(vols) for z in range(v.image.shape[0])]
    return SimpleNamespace(root=root, base=base, images=images, svs=svs, slices=slices)


def _dataset(ph: SimpleNamespace, **kw: object) -> SupervoxelEpisodeDataset:
    slices = kw.pop("slices", ph.slices)
    args: dict = {"length": 400, "seed": 5, "augment": AugmentConfig(), "min_pixels": 50, "size_rule": "larger",
                  "feature_size": 16, **kw}
    return SupervoxelEpisodeDataset(ph.images, ph.svs, slices, **args)


def test_episodes_are_adjacent_slices_of_one_supervoxel(phantom):
    ds = _dataset(phantom)
    seen = {"swap": set(), "gamma": set(), "warp": set()}
    for i in range(60):
        ep = ds[i]
        v, zq, zs, sid = ep["scan"], ep["z"], ep["support_z"], ep["superpixel"]
        assert abs(zq - zs) == 1 and sid > 0
        sv, img = phantom.svs[v], phantom.images[v]
        raw_s, raw_q = sv[zs] == sid, sv[zq] == sid
        assert max(raw_s.sum(), raw_q.sum()) >= 50  # size_rule=larger
        assert ep["support_image"].shape == ep["query_image"].shape == (3, 64, 64)
        assert ep["support_mask"].dtype == torch.float32 and ep["query_label"].dtype == torch.int64
        # the warp went to exactly one side: the other side's mask is its slice's supervoxel, untouched
        if ep["query_warp"]:
            assert np.array_equal(ep["support_mask"].numpy() > 0, raw_s)
            assert not np.array_equal(ep["query_label"].numpy() > 0, raw_q)
        else:
            assert np.array_equal(ep["query_label"].numpy() > 0, raw_q)
            assert not np.array_equal(ep["support_mask"].numpy() > 0, raw_s)
        # gamma too: a side with neither transform is its slice exactly; a side with gamma only is not
        for side, is_q in (("support_image", False), ("query_image", True)):
            raw = np.repeat(img[zq if is_q else zs][None], 3, axis=0)
            untouched = ep["query_gamma"] != is_q and ep["query_warp"] != is_q
            assert np.array_equal(ep[side].numpy(), raw) == untouched, (i, side)
        seen["swap"].add(zs > zq)
        seen["gamma"].add(ep["query_gamma"])
        seen["warp"].add(ep["query_warp"])
    assert all(s == {False, True} for s in seen.values()), seen
    a, b = ds[17], _dataset(phantom)[17]  # a pure function of (seed, index)
    assert all(torch.equal(a[k], b[k]) for k in ("support_image", "support_mask", "query_image", "query_label"))
    other = _dataset(phantom, seed=6)
    assert any(not torch.equal(ds[i]["query_image"], other[i]["query_image"]) for i in range(3))


def test_size_rule_first_measures_the_lower_slice(phantom):
    ds = _dataset(phantom, size_rule="first", min_pixels=150, augment=AugmentConfig(enabled=False))
    for i in range(40):
        ep = ds[i]
        lo = min(ep["z"], ep["support_z"])
        assert (phantom.svs[ep["scan"]][lo] == ep["superpixel"]).sum() >= 150
        # augmentation off: both sides are their slices as they are
        assert np.array_equal(ep["query_label"].numpy() > 0, phantom.svs[ep["scan"]][ep["z"]] == ep["superpixel"])


def test_setting2_slices_and_k_shot(phantom):
    keep = [(v, z) for v, z in phantom.slices if z not in (4, 5)]
    ds = _dataset(phantom, slices=keep, shots=2)
    for i in range(30):
        ep = ds[i]
        zs = ep["support_z"].tolist()
        window = sorted([*zs, ep["z"]])
        assert window == list(range(window[0], window[0] + 3)) and not {4, 5} & set(window)
        assert abs(ep["z"] - zs[-1]) == 1  # the query follows the last support
        assert ep["support_image"].shape == (2, 3, 64, 64) and ep["support_mask"].shape == (2, 64, 64)
    with pytest.raises(DataError, match="data.supervoxel") as e:
        _dataset(phantom, min_pixels=10 ** 6)
    assert "\n" not in str(e.value)


def test_training_on_supervoxel_episodes(phantom, tmp_path):
    cache = tmp_path / "cache"
    over = [f"data.root={phantom.root}", "data.image_size=64", "data.num_workers=0", "data.batch_size=1",
            f"logging.output_dir={tmp_path / 'runs'}", "trainer.enable_progress_bar=false", "logging.logger=csv",
            f"data.cache_dir={cache}", "data.episodes=supervoxel3d", "data.supervoxel.min_size=300",
            "data.supervoxel.min_pixels=50", "data.supervoxel.size_rule=first"]
    cfg = load_config(DEMO, over)
    dm = FewShotDataModule(cfg)
    dm.setup("fit")
    assert isinstance(dm.train_set, SupervoxelEpisodeDataset)
    assert len(list((cache / "supervoxels").glob("*.npz"))) == len(dm.train_ids)
    assert not (cache / "superpixels").exists()  # no 2D pseudolabels for these episodes
    assert main(["train", DEMO, *over, "name=sv", "trainer.max_steps=2", "trainer.val_check_interval=2"]) == 0
    assert list((tmp_path / "runs" / "sv").rglob("*.ckpt"))


def test_bad_settings_are_one_line_errors():
    for bad, key in (("data.episodes=supervoxel", "data.episodes"), ("data.supervoxel.size_rule=middle",
                     "data.supervoxel.size_rule"), ("data.supervoxel.min_size=0", "data.supervoxel.min_size"),
                     ("data.supervoxel.min_pixels=0", "data.supervoxel.min_pixels")):
        with pytest.raises(ConfigError) as e:
            load_config(DEMO, [bad])
        assert key in str(e.value) and "\n" not in str(e.value)


# -- the default 2D path is unchanged --------------------------------------------------------------------------------
def test_augment_pair_numbers_unchanged():
    """augment_pair = warp_pair then adjust_gamma gives the numbers of the single function it replaced."""
    rng = np.random.default_rng(0)
    img = rng.normal(size=(48, 40)).astype(np.float32)
    mask = np.zeros((48, 40), dtype=np.uint8)
    mask[10:30, 12:28] = 1
    pinned = {1: (60.79628837108612, 656.3841182747856, 313, -0.5685434341430664),
              2: (5.107796311378479, 796.4801111379625, 364, 0.788569450378418)}
    for seed, (total, sq, area, px) in pinned.items():
        out, m = augment_pair(img, mask, np.random.default_rng(seed), AugmentConfig())
        o = out.astype(np.float64)
        assert o.sum() == pytest.approx(total, rel=1e-5, abs=1e-3) and (o ** 2).sum() == pytest.approx(sq, rel=1e-5)
        assert int(m.sum()) == area and float(out[5, 7]) == pytest.approx(px, abs=1e-5)
    stack = np.stack([img, img * 2, img - 1])
    out, m = augment_pair(stack, mask, np.random.default_rng(3), AugmentConfig())
    assert out.shape == stack.shape and out.astype(np.float64).sum() == pytest.approx(-10060.152809858322, rel=1e-5)
    assert int(m.sum()) == 256
