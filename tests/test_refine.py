"""CCA post-processing and test-time training (method.md §6-7)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from fsl_med.config import AugmentConfig, TTTConfig
from fsl_med.errors import ConfigError
from fsl_med.evaluation.metrics import confusion_counts
from fsl_med.models.encoders import create_encoder
from fsl_med.models.segmenter import FewShotSegmenter
from fsl_med.refine.cca import largest_mass_component
from fsl_med.refine.ttt import TestTimeTrainer, restored

# ------------------------------------------------------------------ CCA


def test_cca_keeps_the_heavier_component_not_the_larger():
    pred = np.zeros((12, 12), np.uint8)
    prob = np.zeros((12, 12), np.float32)
    pred[0:5, 0:5], prob[0:5, 0:5] = 1, 0.55  # 25 px, mass 13.75
    pred[8:12, 8:12], prob[8:12, 8:12] = 1, 0.95  # 16 px, mass 15.2
    out = largest_mass_component(pred, prob)
    assert out[8:12, 8:12].all() and not out[0:5, 0:5].any()
    assert pred[0:5, 0:5].all()  # input untouched


def test_cca_8_connectivity_and_per_slice():
    pred = np.zeros((2, 6, 6), np.uint8)
    prob = np.full((2, 6, 6), 0.9, np.float32)
    pred[0, 0, 0] = pred[0, 1, 1] = pred[0, 2, 2] = 1  # one diagonal 8-connected component
    pred[0, 5, 5] = 1  # a lighter single pixel
    pred[1, 3:5, 3:5] = 1
    out = largest_mass_component(pred, prob, "2d")
    assert out[0].sum() == 3 and out[0, 5, 5] == 0
    assert out[1].sum() == 4  # every slice keeps its own winner


def test_cca_3d_keeps_one_component_for_the_volume():
    pred = np.zeros((3, 6, 6), np.uint8)
    prob = np.full((3, 6, 6), 0.8, np.float32)
    pred[0:2, 1:3, 1:3] = 1  # spans two slices: 8 voxels
    pred[2, 4:6, 4:6] = 1  # 4 voxels elsewhere
    out = largest_mass_component(pred, prob, "3d")
    assert out.sum() == 8 and out[2].sum() == 0
    assert largest_mass_component(pred, prob, "2d")[2].sum() == 4


def test_cca_empty_stays_empty_and_bad_mode():
    z = np.zeros((2, 5, 5), np.uint8)
    assert largest_mass_component(z, z.astype(np.float32)).sum() == 0
    with pytest.raises(ValueError, match="CCA mode"):
        largest_mass_component(z, z.astype(np.float32), "4d")


# ------------------------------------------------------------------ TTT


def _seg(finetune: str = "full") -> FewShotSegmenter:
    torch.manual_seed(0)
    return FewShotSegmenter(create_encoder("vit_tiny_patch14", weights="none", finetune=finetune, input_size=64))


def _ttt(seg: FewShotSegmenter, **kw) -> TestTimeTrainer:
    cfg = OmegaConf.structured(TTTConfig(**{"steps": 8, "lr": 0.05, **kw}))
    return TestTimeTrainer(seg, cfg, torch.tensor([0.05, 1.0]), 1.0, AugmentConfig())


def _case() -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:64, 0:64]
    disc = ((yy - 30) ** 2 + (xx - 26) ** 2 < 12 ** 2).astype(np.uint8)
    rng = np.random.default_rng(0)
    img = (disc * 2.0 + rng.normal(0, 0.3, (64, 64))).astype(np.float32)
    return img[None], disc[None]


def test_ttt_restores_the_model_exactly_and_changes_predictions():
    """A hard case for the plain model (dim, noisy query disc; bright, shifted support disc): TTT on the query's
    pseudo-label (here its true mask) must move the re-prediction towards it, and leave no trace in the model."""
    yy, xx = np.mgrid[0:64, 0:64]
    disc = ((yy - 30) ** 2 + (xx - 26) ** 2 < 12 ** 2).astype(np.uint8)[None]
    sdisc = ((yy - 36) ** 2 + (xx - 38) ** 2 < 10 ** 2).astype(np.uint8)[None]
    rng = np.random.default_rng(0)
    q = (disc * 1.0 + rng.normal(0, 0.5, disc.shape)).astype(np.float32)
    s = (sdisc * 2.0 + rng.normal(0, 0.2, sdisc.shape)).astype(np.float32)
    seg = _seg().eval()
    before = {k: v.clone() for k, v in seg.state_dict().items()}
    flags = [p.requires_grad for p in seg.parameters()]
    part = np.zeros(1, int)
    plain, plain_prob = seg.predict_volume(seg.support_prototypes(s, sdisc), q, part)
    pred, _ = _ttt(seg, lr=0.01, steps=16).refine(q, disc, plain_prob, part, s, sdisc, np.random.default_rng(0))
    after = seg.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit-identical
    assert [p.requires_grad for p in seg.parameters()] == flags and not seg.training
    assert confusion_counts(pred, disc).dice > confusion_counts(plain, disc).dice + 0.02
    again, _ = seg.predict_volume(seg.support_prototypes(s, sdisc), q, part)
    assert np.array_equal(again, plain)  # the restored model predicts exactly as before


def test_ttt_leaves_empty_predictions_alone_and_volume_mode():
    seg = _seg().eval()
    img, mask = _case()
    imgs = np.concatenate([img, img]), np.concatenate([mask, np.zeros_like(mask)])
    prob = np.full(imgs[0].shape, 0.25, np.float32)
    pred, p = _ttt(seg, steps=2).refine(imgs[0], imgs[1], prob, np.zeros(2, int), img, mask,
                                        np.random.default_rng(1))
    assert not pred[1].any() and np.array_equal(p[1], prob[1])  # empty slice: kept as is
    pred_v, p_v = _ttt(seg, steps=2, mode="volume").refine(imgs[0], imgs[1], prob, np.zeros(2, int), img, mask,
                                                           np.random.default_rng(1))
    # volume mode: one adaptation on the whole volume (its non-empty slices drawn by the same generator), then every
    # slice re-predicted with the real support, the empty one too
    with torch.inference_mode(False), torch.enable_grad(), restored(seg):
        _ttt(seg, steps=2, mode="volume")._adapt(imgs[0], imgs[1], np.random.default_rng(1), torch.device("cpu"))
        manual, manual_p = seg.predict_volume(seg.support_prototypes(img, mask, "cpu", 1), imgs[0], np.zeros(2, int),
                                              8, "cpu")
    assert np.array_equal(pred_v, manual) and np.allclose(p_v, manual_p)
    assert not np.array_equal(p_v[1], prob[1])  # unlike slice mode, the empty slice is re-predicted


def test_ttt_parameter_selection():
    with pytest.raises(ConfigError, match="ttt.params"):
        _ttt(_seg("full"), params="lora").refine(*_case(), np.zeros((1, 64, 64), np.float32), np.zeros(1, int),
                                                 *_case(), np.random.default_rng(0))
    seg = _seg("lora").eval()
    frozen = {n: p.clone() for n, p in seg.named_parameters() if "lora_" not in n}
    with restored(seg):
        _ttt(seg, params="lora", steps=2)._adapt(*_case(), np.random.default_rng(0), torch.device("cpu"))
        assert all(torch.equal(frozen[n], p) for n, p in seg.named_parameters() if n in frozen)
