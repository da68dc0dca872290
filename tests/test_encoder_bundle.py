"""Issue 30 §1: encoders return a bundle of named feature maps plus a pooled vector when a head asks for it
(:mod:`fsl_med.models.features`); the single map of before is its ``"out"`` entry, and heads that ask for nothing
more get exactly the tensor they got before. ``resnet101_qnet`` is the Q-Net/RPT reference ResNet-101."""

from __future__ import annotations

import functools
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fsl_med.errors import ConfigError
from fsl_med.models.encoders import create_encoder
from fsl_med.models.features import EncoderOutput, FeatureRequest
from fsl_med.models.heads.base import FewShotHead
from fsl_med.models.resnet_encoder import load_weights
from fsl_med.models.segmenter import FewShotSegmenter, QueryFeatureCache

BOTH = FeatureRequest(("out", "aux"), pooled=True)


@functools.cache
def _encoder(name: str, request: FeatureRequest | None = None, feature_size: int = 8) -> torch.nn.Module:
    """One encoder per arguments for the whole module (a ResNet-101 takes seconds to build); tests set train/eval."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random init
        return create_encoder(name, feature_size=feature_size, input_size=64, request=request).eval()


def _images(n: int = 2, seed: int = 0, size: int = 64) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_vit_bundle_maps_pooled_and_main_map_equal_forward() -> None:
    enc = _encoder("vit_tiny_patch14").eval()
    x = _images()
    with torch.no_grad():
        b = enc.bundle(x, BOTH)
        out = enc(x)
    assert set(b.maps) == {"out", "aux"}
    assert b.maps["out"].shape == (2, 64, 8, 8) and torch.equal(b.maps["out"], out)
    assert b.maps["aux"].shape == (2, 64, 16, 16)  # the middle block at twice feature_size
    assert b.pooled is not None and b.pooled.shape == (2, 64)
    # the pooled vector is the mean of the final patch tokens (before any upsampling: 64 px / 14 -> 4x4 tokens)
    tokens = enc.vit.forward_features(F.interpolate(x, size=(56, 56), mode="bilinear", align_corners=False))
    assert torch.allclose(b.pooled, tokens[:, enc.vit.num_prefix_tokens:].mean(dim=1), atol=1e-6)
    # "aux" is the middle block (block 0 of 2) with the final norm: timm's own intermediate-layer API agrees
    with torch.no_grad():
        inter = enc.vit.forward_intermediates(F.interpolate(x, size=(56, 56), mode="bilinear", align_corners=False),
                                              indices=[enc.mid_block], norm=True, intermediates_only=True)[0]
    assert enc.mid_block == 0
    assert torch.allclose(b.maps["aux"], F.interpolate(inter, size=(16, 16), mode="bilinear", align_corners=False),
                          atol=1e-5)


def test_resnet_qnet_scales_pooled_and_what_is_built() -> None:
    enc = _encoder("resnet101_qnet", BOTH).eval()
    x = _images(1)
    with torch.no_grad():
        b = enc.bundle(x, BOTH)
        out = enc(x)
    assert b.maps["out"].shape == (1, 512, 16, 16) and torch.equal(b.maps["out"], out)  # stride 4 (above feature_size 8)
    assert b.maps["aux"].shape == (1, 512, 8, 8)  # stride 8
    assert b.pooled is not None and b.pooled.shape == (1, 2048)
    dil = [m.dilation for m in (enc.backbone.layer2[1].conv2, enc.backbone.layer3[1].conv2, enc.backbone.layer4[1].conv2)]
    # replace_stride_with_dilation [True, True, False] as the reference (torchvision keeps dilation 4 in layer4,
    # whose first block strides by 2)
    assert dil == [(2, 2), (4, 4), (4, 4)] and enc.backbone.layer4[0].conv2.stride == (2, 2)
    # RPT's request: no reduce2 (an unused parameter breaks DDP); a plain request builds no layer4 either
    rpt = _encoder("resnet101_qnet", FeatureRequest(("out",), pooled=True))
    plain = _encoder("resnet101_qnet")
    assert rpt.reduce2 is None and hasattr(rpt.backbone, "layer4")
    assert plain.reduce2 is None and not hasattr(plain.backbone, "layer4")
    with pytest.raises(ConfigError, match="resnet101_qnet was built without feature map 'aux'"):
        rpt.bundle(x, BOTH)


def test_every_parameter_of_the_requested_outputs_gets_a_gradient() -> None:
    for request in (BOTH, FeatureRequest(("out",), pooled=True), FeatureRequest()):
        enc = _encoder("resnet101_qnet", request).train()
        enc.zero_grad(set_to_none=True)
        b = enc.bundle(_images(1, size=32), request)
        loss = sum(v.float().square().mean() for v in b.maps.values())
        if b.pooled is not None:
            loss = loss + b.pooled.square().mean()
        loss.backward()
        unused = [n for n, p in enc.named_parameters() if p.grad is None]
        enc.eval().zero_grad(set_to_none=True)
        assert not unused, f"{request}: parameters without gradient {unused[:3]}"


def test_deeplab_encoder_has_one_scale_and_a_pooled_vector() -> None:
    enc = _encoder("resnet101_deeplabv3").eval()
    with torch.no_grad():
        b = enc.bundle(_images(1), FeatureRequest(("out",), pooled=True))
    assert b.maps["out"].shape == (1, 256, 8, 8) and b.pooled is not None and b.pooled.shape == (1, 2048)
    with pytest.raises(ConfigError, match="resnet101_deeplabv3 has no feature map 'aux'"):
        enc.bundle(_images(1), BOTH)


def test_a_deeplab_weight_file_loads_into_resnet_qnet_with_the_layers_it_builds() -> None:
    src = _encoder("resnet101_deeplabv3")
    sd = {k: v for k, v in src.state_dict().items() if k.startswith("backbone.")}
    for request in (BOTH, FeatureRequest()):
        enc = _encoder.__wrapped__("resnet101_qnet", request)  # its own instance: loading changes weights
        load_weights(enc, sd, "deeplab.pth")
        assert torch.equal(enc.backbone.layer3[0].conv1.weight, src.backbone.layer3[0].conv1.weight)
        if hasattr(enc.backbone, "layer4"):
            assert torch.equal(enc.backbone.layer4[2].bn3.running_var, src.backbone.layer4[2].bn3.running_var)


def test_bundle_indexing_and_joining() -> None:
    b = EncoderOutput({"out": torch.arange(24.0).view(4, 6), "aux": torch.arange(8.0).view(4, 2)},
                      torch.arange(4.0)[:, None])
    assert len(b) == 4 and len(b[1:3]) == 2 and b[2].maps["aux"].tolist() == [4.0, 5.0]
    sel = torch.tensor([True, False, True, False])
    assert b[sel].pooled.flatten().tolist() == [0.0, 2.0]
    again = EncoderOutput.cat([b[:1], b[1:]])
    assert all(torch.equal(again.maps[k], b.maps[k]) for k in b.maps) and torch.equal(again.pooled, b.pooled)
    stacked = EncoderOutput.stack([b[i] for i in range(4)])
    assert torch.equal(stacked.maps["out"], b.maps["out"])


class _PooledGateHead(FewShotHead):
    """A test head that needs the bundle: PANet-like foreground score on ``"out"``, gated by a learned function of the
    pooled vector and a coarse score from ``"aux"`` (so every requested output reaches the prediction)."""

    name = "test_pooled_gate"
    prediction = "probability"
    request = FeatureRequest(("out", "aux"), pooled=True)

    def __init__(self, feature_size: int = 8, scale: float = 20.0, mask_pooling: str = "adjoint", in_channels: int = 0,
                 pooled_channels: int = 0) -> None:
        super().__init__(feature_size, scale, mask_pooling, in_channels, pooled_channels)
        self.gate = torch.nn.Linear(pooled_channels, 1)

    def support_state(self, feats: EncoderOutput, masks: torch.Tensor, training: bool) -> dict[str, torch.Tensor]:
        from fsl_med.models.heads.pooling import masked_average
        return {k: masked_average(feats.maps[k].float(), masks.float(), "adjoint").mean(0) for k in ("out", "aux")}

    def decision_map(self, query_feats: EncoderOutput, state: dict[str, torch.Tensor]) -> torch.Tensor:
        out = F.cosine_similarity(query_feats.maps["out"].float(), state["out"][None, :, None, None], dim=1)
        aux = F.cosine_similarity(query_feats.maps["aux"].float(), state["aux"][None, :, None, None], dim=1)
        aux = F.interpolate(aux[:, None], size=out.shape[-2:], mode="bilinear", align_corners=True)[:, 0]
        return torch.sigmoid(10 * (out + aux) / 2 + self.gate(query_feats.pooled.float()))[:, None]

    def episode_terms(self, support_feats, support_fg, query_feats, query_label, ce_weights, align_weight):  # noqa: ANN001
        state = self.support_state(support_feats, support_fg, True)
        p = F.interpolate(self.decision_map(query_feats, state), size=query_label.shape[-2:], mode="bilinear",
                          align_corners=True)
        logp = torch.log(torch.cat([1 - p, p], 1).clamp(1e-6, 1 - 1e-6))
        ce = F.nll_loss(logp, query_label, weight=ce_weights)
        return {"ce": ce, "align": ce.new_zeros(())}


def test_segmenter_carries_the_bundle_through_training_caching_and_prediction() -> None:
    enc = _encoder.__wrapped__("vit_tiny_patch14", BOTH)  # its own instance: trained below
    head = _PooledGateHead(8, pooled_channels=int(enc.pooled_channels))
    seg = FewShotSegmenter(enc, head, 8)
    imgs = np.random.default_rng(0).normal(size=(5, 64, 64)).astype(np.float32)
    masks = np.zeros((3, 64, 64), np.float32)
    masks[:, 20:40, 20:40] = 1
    # training: every trainable parameter (encoder and the pooled-vector gate) gets a gradient
    seg.train()
    sup = torch.from_numpy(imgs[:2])[:, None].expand(-1, 3, -1, -1)
    lab = torch.from_numpy(masks[:2]).long()
    loss, ce, _ = seg.episode_loss(sup, torch.from_numpy(masks[:2]), sup.flip(0), lab, torch.tensor([0.1, 1.0]), 1.0)
    loss.backward()
    assert head.gate.weight.grad is not None and enc.vit.blocks[0].attn.qkv.weight.grad is not None
    # evaluation: cached bundle features give the prediction of encoding on the fly; an empty query set works
    protos = seg.support_prototypes(imgs[:3], masks, shots=1)
    part = np.array([0, 1, 2, 2])
    direct = seg.predict_volume(protos, imgs[1:5], part, batch_size=3)
    cache = QueryFeatureCache(seg, batch_size=2)
    qf = cache.features("scan", np.arange(1, 5), imgs[1:5])
    assert isinstance(qf, EncoderOutput) and qf.maps["aux"].shape == (4, 64, 16, 16)
    cached = seg.predict_volume(protos, imgs[1:5], part, batch_size=3, query_feats=qf)
    assert np.array_equal(direct[0], cached[0]) and np.allclose(direct[1], cached[1], atol=1e-6)
    assert cache.encoded == 4 and len(cache.features("scan", np.arange(2, 4), imgs[2:4])) == 2 and cache.encoded == 4
    empty = seg.encode_slices(imgs[:0])
    assert isinstance(empty, EncoderOutput) and len(empty) == 0 and empty.pooled.shape == (0, 64)
