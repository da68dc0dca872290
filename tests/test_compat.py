"""``compat``: fsl_med's corrected behaviour by default, the reference code's under ``compat=reference``; each
deviation is its own field too (issue 19). One constructed case per deviation where the two behaviours differ."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fsl_med.config import COMPAT, load_config
from fsl_med.data.protocol import query_plan
from fsl_med.data.superpixels import body_mask
from fsl_med.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
ROOT = "data.root=/nonexistent"


def _cfg(*overrides: str):
    return load_config(REPO / "experiments" / "mri.yaml", [ROOT, *overrides])


def test_compat_sets_every_unset_field_and_explicit_fields_win():
    ours, ref = _cfg(), _cfg("compat=reference")
    for key, value in COMPAT["reference"].items():
        from omegaconf import OmegaConf

        assert OmegaConf.select(ref, key) == value and OmegaConf.select(ours, key) == COMPAT["fsl_med"][key], key
    assert ours.eval.score_last_slice is True and ref.eval.score_last_slice is False
    mixed = _cfg("compat=reference", "eval.score_last_slice=true")  # one field back to ours, the rest reference
    assert mixed.eval.score_last_slice is True and mixed.compat == "reference"
    with pytest.raises(ConfigError, match="'compat': must be one of fsl_med, reference"):
        _cfg("compat=paper")


def test_last_slice_is_scored_by_default_and_not_under_reference():
    """An organ reaching the scan's last slice: fsl_med scores it; the reference's loop skips ``is_end``. The other
    slices keep their support parts."""
    per_slice = np.zeros(10, dtype=bool)
    per_slice[6:] = True  # slices 6..9, 9 is the last
    ours = query_plan(per_slice, npart=3)
    ref = query_plan(per_slice, npart=3, score_last_slice=False)
    assert ours.z.tolist() == [6, 7, 8, 9] and ours.part.tolist() == [0, 1, 2, 2]
    assert ref.z.tolist() == [6, 7, 8] and ref.part.tolist() == [0, 1, 2]
    inner = np.zeros(10, dtype=bool)
    inner[2:5] = True  # not reaching the end: no difference
    assert query_plan(inner, 3).z.tolist() == query_plan(inner, 3, score_last_slice=False).z.tolist() == [2, 3, 4]


def test_body_mask_keeps_the_largest_8_connected_component_as_the_reference_notebook():
    """A diagonal staircase of 12 pixels is one component with 8-connectivity (skimage's default, the notebook's)
    but 12 single pixels with 4-connectivity, where a separate 3 x 3 block (9 px) is the largest."""
    img = np.zeros((20, 20), dtype=np.float32)
    for i in range(12):
        img[i, i] = 100.0
    img[15:18, 2:5] = 100.0
    eight = body_mask(img, 50.0)  # default: 8
    four = body_mask(img, 50.0, connectivity=4)
    assert eight.sum() == 12 and all(eight[i, i] for i in range(12)) and not eight[15:18, 2:5].any()
    assert four.sum() == 9 and four[15:18, 2:5].all()
    assert _cfg().data.superpixel.body_connectivity == 8 == _cfg("compat=reference").data.superpixel.body_connectivity
    with pytest.raises(ConfigError, match="body_connectivity"):
        _cfg("data.superpixel.body_connectivity=6")


def test_felzenszwalb_segment_zero_inside_the_body_is_a_superpixel_unless_reference():
    """A slice that is all body: Felzenszwalb's segment 0 lies inside it. fsl_med keeps it as its own superpixel (no
    id 0 anywhere, nothing drawable is background); the reference notebook merges it into the background id 0 and
    its dataset may draw id 0."""
    from skimage.segmentation import felzenszwalb

    from fsl_med.config import AugmentConfig, SuperpixelConfig
    from fsl_med.data.episodes import EpisodeDataset
    from fsl_med.data.superpixels import superpixels_2d

    img = np.full((64, 64), 100.0, dtype=np.float32)
    img[:, 32:] = 200.0  # two flat halves: Felzenszwalb segments 0 (left) and 1 (right)
    fz = felzenszwalb(img.astype(np.float64), scale=1.0, sigma=1.0, min_size=400)
    assert set(np.unique(fz).tolist()) == {0, 1}
    ours = superpixels_2d(img, SuperpixelConfig(body_threshold=50.0))
    ref = superpixels_2d(img, SuperpixelConfig(body_threshold=50.0, zero_as_background=True))
    assert sorted(np.unique(ours).tolist()) == [1, 2] and np.array_equal(ours == 1, fz == 0)
    assert sorted(np.unique(ref).tolist()) == [0, 1] and np.array_equal(ref == 0, fz == 0)
    vol, sp_ours, sp_ref = img[None], ours[None], ref[None]
    kw = dict(slices=[(0, 0)], length=4, seed=0, augment=AugmentConfig(enabled=False), feature_size=8)
    assert EpisodeDataset([vol], [sp_ours], min_pixels=64, **kw).candidates[0][2].tolist() == [1, 2]
    assert EpisodeDataset([vol], [sp_ref], min_pixels=1, draw_background=True, **kw).candidates[0][2].tolist() == [0, 1]
    ours_cfg, ref_cfg = _cfg(), _cfg("compat=reference")
    assert ours_cfg.data.superpixel.zero_as_background is False and ours_cfg.data.min_superpixel_pixels == 64
    assert ref_cfg.data.superpixel.zero_as_background is True and ref_cfg.data.min_superpixel_pixels == 1


def test_ttt_restores_by_default_and_keeps_adapting_under_reference():
    """Two adapted slices: by default the model is bit-identical afterwards and slice 2 starts from the trained
    weights; with ``ttt.restore=false`` (the reference's reset that keeps references to the live weights) the model
    keeps the adaptations, so slice 2 starts from slice 1's weights and its prediction differs."""
    import torch
    from omegaconf import OmegaConf

    from fsl_med.config import AugmentConfig, TTTConfig
    from fsl_med.models.encoders import create_encoder
    from fsl_med.models.segmenter import FewShotSegmenter
    from fsl_med.refine.ttt import TestTimeTrainer

    yy, xx = np.mgrid[0:64, 0:64]
    disc = ((yy - 30) ** 2 + (xx - 26) ** 2 < 12 ** 2).astype(np.uint8)
    rng = np.random.default_rng(0)
    q = np.stack([(disc * 2.0 + rng.normal(0, 0.3, disc.shape)) for _ in range(2)]).astype(np.float32)
    masks = np.stack([disc, disc])
    prob = np.full(q.shape, 0.5, np.float32)
    part = np.zeros(2, int)
    out = {}
    for restore in (True, False):
        torch.manual_seed(0)
        seg = FewShotSegmenter(create_encoder("vit_tiny_patch14", weights="none", input_size=64)).eval()
        before = {k: v.clone() for k, v in seg.state_dict().items()}
        ttt = TestTimeTrainer(seg, OmegaConf.structured(TTTConfig(steps=4, lr=0.05, restore=restore)),
                              torch.tensor([0.05, 1.0]), 1.0, AugmentConfig())
        out[restore] = ttt.refine(q, masks, prob, part, q[:1], masks[:1], np.random.default_rng(1))[1]
        same = all(torch.equal(before[k], v) for k, v in seg.state_dict().items())
        assert same is restore, restore
    assert np.array_equal(out[True][0], out[False][0])  # slice 1: same start, same adaptation
    assert not np.array_equal(out[True][1], out[False][1])  # slice 2: from the adapted weights under reference
    assert _cfg().ttt.restore is True and _cfg("compat=reference").ttt.restore is False
