"""Superpixels and self-supervised episodes: on a 256 px phantom volume (any volume will do, so these always run)
and, for Setting 2's slice exclusion, on real CHAOS volumes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fsl_med.config import AugmentConfig, SuperpixelConfig, load_config
from fsl_med.data.datamodule import FewShotDataModule
from fsl_med.data.episodes import EpisodeDataset, augment_pair
from fsl_med.data.masks import mask_at_feature_size
from fsl_med.data.phantom import generate_phantom
from fsl_med.data.superpixels import body_mask, load_or_make_superpixels, superpixels_2d
from fsl_med.data.volumes import load_volume, make_normalizer
from fsl_med.prepare.datasets import get_dataset_info


@pytest.fixture(scope="module")
def vol(tmp_path_factory):
    """A phantom scan at the real in-plane size (256 px), prepared layout, CHAOS-T2 label ids."""
    root = generate_phantom(tmp_path_factory.mktemp("episodes") / "ph", n_scans=4, size=256, depth=16, seed=3)
    return load_volume(root, "3", get_dataset_info("chaos_t2").all_label_ids)


def test_superpixels_inside_body_and_consecutive(vol):
    z = vol.image.shape[0] // 2
    sp = superpixels_2d(vol.image[z], SuperpixelConfig())
    assert sp.shape == vol.image[z].shape
    body = body_mask(vol.image[z], 50 + 1e-4)
    assert (sp[~body] == 0).all() and (sp[body] > 0).all()  # 0 exactly outside the body
    assert body.sum() < body.size  # this slice has air around the body
    ids = np.unique(sp)
    assert ids[0] == 0 and ids[1:].tolist() == list(range(1, len(ids)))
    assert len(ids) > 5


def test_superpixel_cache_is_keyed_by_parameters(vol, tmp_path):
    img = vol.image[:3]
    a = load_or_make_superpixels(img, vol.path, SuperpixelConfig(), tmp_path)
    files = sorted((tmp_path / "superpixels").glob("*.npz"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    b = load_or_make_superpixels(img, vol.path, SuperpixelConfig(), tmp_path)
    assert np.array_equal(a, b) and files[0].stat().st_mtime_ns == mtime  # read back, not regenerated
    c = load_or_make_superpixels(img, vol.path, SuperpixelConfig(min_size=100), tmp_path)
    assert len(list((tmp_path / "superpixels").glob("*.npz"))) == 2
    assert c.max() >= a.max()  # smaller min_size -> at least as many superpixels
    assert not list((tmp_path / "superpixels").glob("*.tmp*"))


def test_augment_does_not_mutate_and_keeps_shapes():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(64, 64)).astype(np.float32)
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[20:40, 20:40] = 1
    img0, mask0 = img.copy(), mask.copy()
    out_i, out_m = augment_pair(img, mask, np.random.default_rng(1), AugmentConfig())
    assert np.array_equal(img, img0) and np.array_equal(mask, mask0)
    assert out_i.shape == img.shape and out_m.shape == mask.shape and set(np.unique(out_m)) <= {0, 1}
    assert 200 < out_m.sum() < 800  # 400 px square, zoom 0.9-1.2, small deformation
    assert not np.array_equal(out_i, img)


def test_sampler_never_yields_background_or_empty_prototype(vol, tmp_path):
    norm = make_normalizer("mri")
    sp = load_or_make_superpixels(vol.image, vol.path, SuperpixelConfig(), tmp_path)
    slices = [(0, z) for z in range(vol.image.shape[0])]
    ds = EpisodeDataset([norm(vol.image)], [sp], slices, length=150, seed=7, augment=AugmentConfig(),
                        min_pixels=64, feature_size=32, mask_pooling="nearest")
    for i in range(150):
        ep = ds[i]
        assert ep["superpixel"] != 0
        assert ep["support_image"].shape == (3, 256, 256) and ep["query_label"].dtype == torch.int64
        assert mask_at_feature_size(ep["support_mask"], 32, "nearest").sum() > 0  # non-empty prototype
        assert ep["query_label"].sum() > 0
    a, b = ds[3], ds[3]
    assert torch.equal(a["support_image"], b["support_image"]) and torch.equal(a["query_label"], b["query_label"])
    assert not torch.equal(ds[4]["support_image"], a["support_image"])
    # heads compared draw the same episodes: adjoint pooling (PANet, ADNet) keeps nearest's (ALP's) sampling rule
    adj = EpisodeDataset([norm(vol.image)], [sp], slices, length=150, seed=7, augment=AugmentConfig(),
                         min_pixels=64, feature_size=32, mask_pooling="adjoint")
    for i in range(150):
        x, y = ds[i], adj[i]
        assert (x["z"], x["superpixel"]) == (y["z"], y["superpixel"]) and torch.equal(x["query_label"], y["query_label"])


def test_setting2_drops_slices_with_test_organs(chaos_subset, cache_dir, tiny):
    cfg = load_config("experiments/mri.yaml", [*tiny, f"data.root={chaos_subset}", f"data.cache_dir={cache_dir}",
                                               "data.setting=2", "data.test_organs=[liver,spleen]"])
    dm = FewShotDataModule(cfg)
    dm.setup("fit")
    ds = dm.train_set
    assert ds is not None and dm.train_ids == ["3"]
    label = dm._volume("3").label
    used = {z for _, z, _ in ds.candidates}
    assert used, "setting 2 left no training slices"
    for z in used:
        assert not np.isin(label[z], [1, 4]).any()
    # setting 1 keeps them
    cfg1 = load_config("experiments/mri.yaml", [*tiny, f"data.root={chaos_subset}", f"data.cache_dir={cache_dir}"])
    dm1 = FewShotDataModule(cfg1)
    dm1.setup("fit")
    assert len(dm1.train_set.candidates) > len(ds.candidates)


def test_episode_sampler_is_a_function_of_the_step_and_rank():
    from fsl_med.data.episodes import EpisodeSampler

    s0, s1 = EpisodeSampler(5, 2, rank=0, world_size=2), EpisodeSampler(5, 2, rank=1, world_size=2)
    e0 = list(s0)
    assert e0 == list(s0) and len(e0) == len(s0) == 10  # deterministic, 5 steps x 2 episodes
    assert not set(e0) & set(s1)  # ranks draw different episodes
    assert len(set(e0)) == 10  # steps draw different episodes
    # a run resumed at step 3 continues with exactly the episodes of steps 3 and 4
    assert list(EpisodeSampler(5, 2, rank=0, world_size=2, start_step=3)) == e0[6:]
    assert list(EpisodeSampler(5, 2, rank=0, world_size=2, start_step=lambda: 4)) == e0[8:]
