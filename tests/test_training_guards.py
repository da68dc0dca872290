"""The training side, guarded (issue 18 §4): the loss is the method's weighted CE plus the weighted alignment term,
Felzenszwalb keeps its minimum segment size, and an episode's query is an independent augmentation of its support
slice (never the support itself). Each test fails on the bug named in its docstring."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from conftest import TINY
from scipy import ndimage

from fsl_med.config import SuperpixelConfig, load_config
from fsl_med.data.datamodule import FewShotDataModule
from fsl_med.data.phantom import generate_phantom, make_phantom_scan
from fsl_med.data.superpixels import body_mask, superpixels_2d
from fsl_med.models.module import FewShotModule

REPO = Path(__file__).resolve().parents[1]
METHOD_CE_WEIGHTS = [0.05, 1.0]  # method.md §2: background 0.05, foreground 1.0
METHOD_ALIGN_WEIGHT = 1.0


def _batch(size: int, b: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    support_mask = torch.zeros(b, size, size)
    support_mask[:, size // 4: size // 2, size // 4: size // 2] = 1
    query_label = torch.zeros(b, size, size, dtype=torch.int64)
    query_label[:, size // 3: 2 * size // 3, size // 3: 2 * size // 3] = 1
    query_label[:, :4] = 255  # ignored rows
    return {"support_image": torch.randn(b, 3, size, size, generator=g), "support_mask": support_mask,
            "query_image": torch.randn(b, 3, size, size, generator=g), "query_label": query_label}


def _up(low: torch.Tensor) -> torch.Tensor:
    return F.interpolate(low, size=(112, 112), mode="bilinear", align_corners=False)


def test_loss_is_the_weighted_ce_plus_the_weighted_alignment_term():
    """Catches swapped CE class weights, a dropped alignment term (in the segmenter or in ``training_step``) and a
    wrong alignment weight: the loss is recomputed by hand from the model's logits (log-softmax, the method's class
    weights, ignore 255) and its alignment term."""
    cfg = load_config(REPO / "experiments" / "mri.yaml", [*TINY, "data.image_size=112"])
    assert list(cfg.loss.ce_weights) == METHOD_CE_WEIGHTS and cfg.loss.align_weight == METHOD_ALIGN_WEIGHT
    torch.manual_seed(0)
    module = FewShotModule.from_config(cfg)
    assert torch.equal(module.ce_weights, torch.tensor(METHOD_CE_WEIGHTS))
    seg = module.model.train()
    batch = _batch(112)
    with torch.no_grad():
        loss, ce, align = seg.episode_loss(batch["support_image"], batch["support_mask"], batch["query_image"],
                                           batch["query_label"], module.ce_weights, cfg.loss.align_weight)
        step_loss = module.training_step(batch, 0)
        feats = seg.encode(torch.cat([batch["support_image"], batch["query_image"]]))
        b = batch["support_image"].shape[0]
        ces, aligns = [], []
        for i in range(b):
            head = seg.head
            protos = head.shot_prototypes(feats[i:i + 1], head.feature_masks(batch["support_mask"][i:i + 1]),
                                          head.train_window)
            low = head.scores(feats[b + i:b + i + 1], protos)
            logp = F.log_softmax(_up(low).float(), dim=1)[0]  # [2, H, W]
            lab = batch["query_label"][i]
            valid = lab != 255
            w = torch.tensor(METHOD_CE_WEIGHTS)[lab[valid]]
            nll = -logp.permute(1, 2, 0)[valid].gather(1, lab[valid][:, None])[:, 0]
            ces.append(float((w * nll).sum() / w.sum()))
            aligns.append(float(head.align_loss(feats[b + i:b + i + 1], low, feats[i:i + 1],
                                               batch["support_mask"][i:i + 1])))
    ce_hand, align_hand = float(np.mean(ces)), float(np.mean(aligns))
    assert align_hand > 0.01  # a term that matters
    assert abs(float(ce) - ce_hand) < 1e-5 and abs(float(align) - align_hand) < 1e-5
    assert abs(float(loss) - (ce_hand + METHOD_ALIGN_WEIGHT * align_hand)) < 1e-5
    assert abs(float(step_loss) - float(loss)) < 1e-5
    # the background weight is what makes CE differ from the unweighted mean: a swap changes it
    swapped = F.cross_entropy(_up(low).float(), batch["query_label"][b - 1:b],
                              weight=torch.tensor(METHOD_CE_WEIGHTS[::-1]), ignore_index=255)
    assert abs(float(swapped) - ces[-1]) > 1e-3


def test_every_small_superpixel_is_a_fragment_cut_by_the_body_border():
    """Catches Felzenszwalb without ``min_size``: a superpixel of fewer than ``min_size`` pixels can only be the
    inside part of a segment cut by the body mask, so it touches the outside of the body. Phantom and real-sized
    (256 px) slices; the count of superpixels stays near the body area / min_size."""
    params = SuperpixelConfig()
    image, _ = make_phantom_scan(1, size=256, depth=12, seed=0)  # [X, Y, Z]
    for z in (3, 6, 9):
        sl = np.ascontiguousarray(image[:, :, z].T)
        sp = superpixels_2d(sl, params)
        body = body_mask(sl, params.body_threshold)
        ids, counts = np.unique(sp[sp > 0], return_counts=True)
        assert len(ids) <= body.sum() / params.min_size + (counts < params.min_size).sum() + 1
        for i, c in zip(ids, counts, strict=True):
            if c < params.min_size:
                assert (ndimage.binary_dilation(sp == i) & ~body).any(), (z, i, c)
        assert len(ids) < 100


def test_episode_query_is_an_independent_augmentation_of_the_support_slice(tmp_path, cache_dir):
    """Catches an episode whose query is the support itself: over 20 episodes, support and query images (and masks)
    always differ, both come from the drawn superpixel of the same slice, and the masks overlap the same region
    (IoU well above chance)."""
    root = generate_phantom(tmp_path / "ph", n_scans=6, size=64, depth=10, seed=0)
    cfg = load_config(REPO / "experiments" / "demo.yaml", [f"data.root={root}", "data.image_size=64",
                                                          "data.num_workers=0", f"data.cache_dir={cache_dir}"])
    dm = FewShotDataModule(cfg)
    dm.setup("fit")
    ious = []
    for i in range(20):
        ep = dm.train_set[i]
        s_img, q_img = ep["support_image"], ep["query_image"]
        s_mask, q_mask = ep["support_mask"] > 0, ep["query_label"] == 1
        assert not torch.equal(s_img, q_img), i
        assert not torch.equal(s_mask, q_mask), i
        assert s_mask.any() and q_mask.any()
        ious.append(float((s_mask & q_mask).sum() / (s_mask | q_mask).sum()))
    assert np.mean(ious) > 0.2, ious  # the same superpixel, independently transformed
