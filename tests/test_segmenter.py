"""FewShotSegmenter: batched EP1 prediction with cached support prototypes equals the per-slice forward."""

from __future__ import annotations

import numpy as np
import torch

from fsl_med.models.encoders import create_encoder
from fsl_med.models.segmenter import FewShotSegmenter, QueryFeatureCache, tile3


def test_batched_prediction_matches_per_slice_forward():
    torch.manual_seed(0)
    seg = FewShotSegmenter(create_encoder("vit_tiny_patch14", weights="none", input_size=64)).eval()
    rng = np.random.default_rng(0)
    sup = rng.normal(size=(3, 64, 64)).astype(np.float32)
    masks = np.zeros((3, 64, 64), dtype=np.uint8)
    masks[:, 16:48, 16:48] = 1
    query = rng.normal(size=(7, 64, 64)).astype(np.float32)
    part = np.array([0, 0, 1, 1, 1, 2, 2])
    protos = seg.support_prototypes(sup, masks)
    pred, prob = seg.predict_volume(protos, query, part, batch_size=3)
    assert pred.shape == (7, 64, 64) and prob.shape == (7, 64, 64)
    with torch.no_grad():
        for i in range(7):
            p = int(part[i])
            logits = seg(tile3(torch.from_numpy(sup[p:p + 1])), torch.from_numpy(masks[p:p + 1]),
                         tile3(torch.from_numpy(query[i:i + 1])))
            assert torch.equal(logits.argmax(dim=1)[0].to(torch.uint8), torch.from_numpy(pred[i]))
            assert np.allclose(torch.softmax(logits, 1)[0, 1].numpy(), prob[i], atol=1e-5)
    assert not seg.training


def test_query_feature_cache_encodes_each_slice_once_per_scan_and_predicts_the_same():
    """Two organs of one query scan with overlapping slice ranges: the cache encodes the union of their
    slices once, and the predictions equal those of encoding each organ's slices itself."""
    torch.manual_seed(0)
    seg = FewShotSegmenter(create_encoder("vit_tiny_patch14", weights="none", input_size=64)).eval()
    rng = np.random.default_rng(1)
    volume = rng.normal(size=(12, 64, 64)).astype(np.float32)
    sup = rng.normal(size=(3, 64, 64)).astype(np.float32)
    masks = np.zeros((3, 64, 64), dtype=np.uint8)
    masks[:, 8:40, 20:52] = 1
    protos = seg.support_prototypes(sup, masks)
    cache = QueryFeatureCache(seg, batch_size=4)
    organs = {"liver": np.arange(2, 10), "spleen": np.arange(5, 12)}
    for z in organs.values():
        part = np.minimum(2, 3 * (z - z[0]) // len(z))
        feats = cache.features("scan1", z, volume[z])
        assert feats.shape == (len(z), 64, 32, 32)
        cached = seg.predict_volume(protos, volume[z], part, batch_size=4, query_feats=feats)
        direct = seg.predict_volume(protos, volume[z], part, batch_size=4)
        assert np.array_equal(cached[0], direct[0])
        assert np.allclose(cached[1], direct[1], atol=1e-5)
    assert cache.encoded == 10  # slices 2..11, not 8 + 7
    cache.features("scan2", np.arange(0, 3), volume[:3])  # a new scan replaces the cached one
    assert cache.scan == "scan2" and sorted(cache.feats) == [0, 1, 2] and cache.encoded == 13
    cache.clear()
    assert cache.scan is None and cache.encoded == 0
