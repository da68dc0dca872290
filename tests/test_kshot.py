"""k-shot episodes and evaluation, and 3-slice input (z-1, z, z+1): ``shots: 1`` is exactly 1-shot."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fsl_med.config import AugmentConfig, load_config
from fsl_med.data.datamodule import FewShotDataModule
from fsl_med.data.episodes import EpisodeDataset
from fsl_med.data.phantom import generate_phantom
from fsl_med.data.protocol import build_eval_items, support_slice_indices, support_slices_per_part
from fsl_med.data.volumes import load_volume, make_normalizer, slice_input, slice_stack
from fsl_med.errors import ConfigError, DataError
from fsl_med.models.encoders import create_encoder
from fsl_med.models.segmenter import FewShotSegmenter
from fsl_med.prepare.datasets import get_dataset_info


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    return generate_phantom(tmp_path_factory.mktemp("ks") / "phantom", n_scans=8, size=64, depth=24, seed=3)


@pytest.fixture(scope="module")
def seg() -> FewShotSegmenter:
    torch.manual_seed(0)
    return FewShotSegmenter(create_encoder("vit_tiny_patch14", weights="none", input_size=64)).eval()


def _support(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    img = rng.normal(size=(3, 64, 64)).astype(np.float32)
    mask = np.zeros((3, 64, 64), dtype=np.uint8)
    mask[0, 8:40, 8:40] = 1
    mask[1, 20:60, 10:30] = 1
    mask[2, 30:34, 30:34] = 1  # too small for local prototypes: 'mask' mode
    return img, mask


def test_one_shot_prototypes_are_the_reference_ones_and_k_shots_pool_and_average(seg) -> None:
    rng = np.random.default_rng(0)
    img, mask = _support(rng)
    one = seg.support_prototypes(img, mask)  # shots=1
    with torch.no_grad():
        feats = seg.encode(torch.from_numpy(img)[:, None].expand(-1, 3, -1, -1))
        low = seg.head.feature_masks(torch.from_numpy(mask))
        for p in range(3):  # 1-shot: each part's prototypes from its own slice, exactly as before k-shot existed
            ref = seg.head.prototypes(feats[p:p + 1], low[p:p + 1], seg.head.test_window)
            assert one[p].fg.mode == ref.fg.mode and torch.equal(one[p].fg.protos, ref.fg.protos)
            assert torch.equal(one[p].bg.protos, ref.bg.protos)
    assert [p.fg.mode for p in one] == ["gridconv+", "gridconv+", "mask"]
    # k identical copies: local prototypes pooled (k copies of each), the global ones averaged (= the one)
    rep = np.repeat(np.arange(3), 3)  # part-major: part 0 three times, then part 1, ...
    three = seg.support_prototypes(img[rep], mask[rep], shots=3)
    for p1, p3 in zip(one, three, strict=True):
        n_bg = p1.bg.protos.shape[0]
        assert torch.allclose(p3.bg.protos, p1.bg.protos.repeat(3, 1))
        if p1.fg.mode == "gridconv+":
            n = p1.fg.protos.shape[0] - 1
            assert p3.fg.protos.shape[0] == 3 * n + 1 and n_bg > 0
            assert torch.allclose(p3.fg.protos[:-1], p1.fg.protos[:-1].repeat(3, 1))
            assert torch.allclose(p3.fg.protos[-1], p1.fg.protos[-1], atol=1e-6)
        else:
            assert p3.fg.mode == "mask" and torch.allclose(p3.fg.protos, p1.fg.protos, atol=1e-6)
    query = rng.normal(size=(9, 64, 64)).astype(np.float32)
    part = np.repeat(np.arange(3), 3)
    a = seg.predict_volume(one, query, part, batch_size=4)
    b = seg.predict_volume(three, query, part, batch_size=4)
    # 'mask' mode (part 2) and the background (locals only) score the same; gridconv+ reweights the global
    assert np.allclose(a[1][part == 2], b[1][part == 2], atol=1e-5)
    with pytest.raises(ValueError, match="not a whole number of parts"):
        seg.support_prototypes(img[:2], mask[:2], shots=3)


def test_episode_loss_one_shot_in_either_layout_and_k_shot(seg) -> None:
    rng = np.random.default_rng(1)
    s = torch.from_numpy(rng.normal(size=(2, 3, 64, 64)).astype(np.float32))
    m = torch.zeros(2, 64, 64)
    m[:, 10:50, 12:44] = 1
    q = torch.from_numpy(rng.normal(size=(2, 3, 64, 64)).astype(np.float32))
    lab = m.long()
    w = torch.tensor([0.05, 1.0])
    with torch.no_grad():
        one = seg.episode_loss(s, m, q, lab, w, 1.0)
        one5 = seg.episode_loss(s[:, None], m[:, None], q, lab, w, 1.0)  # [B, 1, ...]: the same 1-shot episodes
        three = seg.episode_loss(s[:, None].expand(-1, 3, -1, -1, -1), m[:, None].expand(-1, 3, -1, -1), q, lab, w,
                                 1.0)
        other = seg.episode_loss(torch.stack([s, s.flip(-1), s.flip(-2)], 1), m[:, None].expand(-1, 3, -1, -1), q,
                                 lab, w, 1.0)
    for a, b in zip(one, one5, strict=True):
        assert torch.equal(a, b)
    # k identical supports change the CE (k pooled copies of each local prototype outweigh the one averaged
    # global prototype); k different supports change it again; all stay finite
    assert not torch.allclose(three[1], one[1]) and not torch.allclose(other[0], three[0])
    assert all(torch.isfinite(x) for x in (*three, *other))


def test_kshot_episodes_extend_the_one_shot_episode(phantom) -> None:
    vol = load_volume(phantom, "1", image_size=64)
    img = make_normalizer("mri")(vol.image)
    sp = (vol.label > 0).astype(np.int64) + 1  # two big pseudolabels
    slices = [(0, z) for z in range(2, 10)]
    kw = dict(length=10, seed=5, augment=AugmentConfig(), min_pixels=16, feature_size=32)
    one = EpisodeDataset([img], [sp], slices, **kw)[3]
    three = EpisodeDataset([img], [sp], slices, shots=3, **kw)[3]
    assert one["support_image"].shape == (3, 64, 64) and three["support_image"].shape == (3, 3, 64, 64)
    assert three["support_mask"].shape == (3, 64, 64)
    # the same draw order: the k-shot episode's first support is the 1-shot support
    assert torch.equal(three["support_image"][0], one["support_image"])
    assert torch.equal(three["support_mask"][0], one["support_mask"])
    assert not torch.equal(three["support_image"][1], three["support_image"][0])  # independently augmented
    stacked = EpisodeDataset([img], [sp], slices, three_slices=True, **{**kw, "augment": AugmentConfig(enabled=False)})
    ep = stacked[0]
    z = ep["z"]
    assert np.allclose(ep["query_image"].numpy(), slice_stack(img, z))
    assert not torch.equal(ep["query_image"][0], ep["query_image"][1])


def test_slice_input_stacks_neighbours_with_zero_ends() -> None:
    vol = np.arange(4 * 2 * 2, dtype=np.float32).reshape(4, 2, 2) + 1
    st = slice_input(vol, True)
    assert st.shape == (4, 3, 2, 2) and slice_input(vol, False) is vol
    assert np.array_equal(st[0, 0], np.zeros((2, 2))) and np.array_equal(st[3, 2], np.zeros((2, 2)))
    assert np.array_equal(st[2], np.stack([vol[1], vol[2], vol[3]]))
    for z in range(4):
        assert np.array_equal(slice_stack(vol, z), st[z])


def test_support_slices_per_part() -> None:
    organ = np.arange(10, 40)
    assert support_slices_per_part(organ, 3, 1) == [[z] for z in support_slice_indices(organ, 3)]
    per = support_slices_per_part(organ, 3, 3)
    assert [len(p) for p in per] == [3, 3, 3] and sum(per, []) == sorted(sum(per, []))
    assert all(10 + 10 * p <= z < 20 + 10 * p for p, zs in enumerate(per) for z in zs)  # inside their third
    with pytest.raises(DataError, match="spans only 5 slice"):
        support_slices_per_part(np.arange(5), 3, 2)


def test_kshot_eval_items_from_scans_and_slices(phantom) -> None:
    info = get_dataset_info("chaos_t2")
    vols = [load_volume(phantom, s, info.all_label_ids, 64) for s in ("1", "2", "3", "4")]
    norm = make_normalizer("mri")
    organs = ["liver", "spleen"]
    one, _ = build_eval_items(vols[0], vols[3:], organs, info, norm)
    scans, _ = build_eval_items(vols[:3], vols[3:], organs, info, norm, shots=3, shots_source="scans")
    slices, _ = build_eval_items(vols[:1], vols[3:], organs, info, norm, shots=2, shots_source="slices")
    explicit, _ = build_eval_items(vols[:1], vols[3:], organs, info, norm, shots=1, shots_source="slices")
    for a, b in zip(one, explicit, strict=True):  # shots: 1 is the 1-shot protocol
        assert np.array_equal(a.support_images, b.support_images) and a.support_z == b.support_z and b.shots == 1
    for it1, it3 in zip(one, scans, strict=True):
        assert it3.support_id == "1+2+3" and it3.shots == 3 and it3.support_images.shape == (9, 64, 64)
        lid = info.labels[it1.organ]
        for p in range(3):  # part-major: part p's EP1 slice of scans 1, 2, 3
            for j in range(3):
                ep1 = support_slice_indices(vols[j].slices_with(lid), 3)[p]
                assert it3.support_z[3 * p + j] == ep1
            assert np.array_equal(it3.support_images[3 * p], it1.support_images[p])  # scan 1 = the 1-shot support
        assert np.array_equal(it3.query_images, it1.query_images) and np.array_equal(it3.part, it1.part)
    for it in slices:
        assert it.support_id == "1" and it.support_images.shape == (6, 64, 64)
        lid = info.labels[it.organ]
        assert it.support_z == sum(support_slices_per_part(vols[0].slices_with(lid), 3, 2), [])
    stacked, _ = build_eval_items(vols[0], vols[3:], organs, info, norm, three_slices=True)
    assert stacked[0].query_images.shape[1:] == (3, 64, 64) and stacked[0].support_images.shape == (3, 3, 64, 64)
    with pytest.raises(ValueError, match="needs 3 support scans"):
        build_eval_items(vols[:2], vols[3:], organs, info, norm, shots=3)


def test_datamodule_support_scans_are_deterministic(phantom, cache_dir) -> None:
    base = [f"data.root={phantom}", "data.image_size=64", f"data.cache_dir={cache_dir}", "data.num_workers=0"]
    dm = FewShotDataModule(load_config(None, [*base, "shots=3"]))
    dm.resolve_split()
    ids = dm.support_ids()
    assert ids[0] == dm.split.support and ids[1:] == dm.train_ids[:2] and len(set(ids)) == 3
    assert not set(ids) & set(dm.split.query) and not set(ids) & set(dm.val_ids)
    dm1 = FewShotDataModule(load_config(None, [*base, "shots=5", "eval.shots_source=slices"]))
    dm1.resolve_split()
    assert dm1.support_ids() == [dm1.split.support]
    big = FewShotDataModule(load_config(None, [*base, "shots=8"]))
    big.resolve_split()
    with pytest.raises(ConfigError, match="'shots': 8-shot from scans needs 7 training scans"):
        big.support_ids()
    with pytest.raises(ConfigError, match="'shots'"):
        load_config(None, [*base, "shots=0"])
    with pytest.raises(ConfigError, match="eval.shots_source"):
        load_config(None, [*base, "eval.shots_source=volumes"])


def test_three_slice_checkpoint_needs_three_slice_config(phantom, tmp_path) -> None:
    from fsl_med.checkpoints import check_compatible
    from fsl_med.config import to_container

    cfg = load_config(None, [f"data.root={phantom}", "model.encoder.name=vit_tiny_patch14"])
    ckpt_cfg = to_container(load_config(None, [f"data.root={phantom}", "model.encoder.name=vit_tiny_patch14",
                                               "data.three_slices=true"]))
    with pytest.raises(ConfigError, match="checkpoint was trained with data.three_slices=True, the config says False"):
        check_compatible(ckpt_cfg, cfg, tmp_path / "x.ckpt")
    check_compatible(to_container(cfg), cfg, tmp_path / "x.ckpt")  # same input: fine
