"""FewShotSegmenter: batched EP1 prediction with cached support prototypes equals the per-slice forward."""

from __future__ import annotations

import numpy as np
import torch

from fsl_med.models.encoders import create_encoder
from fsl_med.models.segmenter import FewShotSegmenter, tile3


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
