"""The encoder zoo: every registered encoder (DINOv2 S/B/L/G with and without registers, ALPNet's ResNet-101
DeepLabv3, the tiny test ViTs) and any timm ViT by name: output shape at 32×32, gradients reach exactly the
trained parameters in each fine-tuning mode, and weights load from a generated state dict in the official
key format (Meta DINOv2 ``*_pretrain.pth``; torchvision DeepLabv3 and ImageNet ResNet-101).

The ViTs are built one block deep (``arch_overrides={"depth": 1}``): the same embedding width, heads,
register tokens, MLP type and key format as the official architecture, at a cost a CPU test can pay.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import timm
import torch

from fsl_med.errors import ConfigError, WeightsError
from fsl_med.models.encoder_registry import get_encoder_spec, list_encoders
from fsl_med.models.encoders import create_encoder

ALL = list_encoders()
VITS = [n for n in ALL if get_encoder_spec(n).family == "vit"]


def _build(name: str, **kw) -> torch.nn.Module:
    spec = get_encoder_spec(name)
    if spec.family == "vit" and "depth" not in spec.timm_kwargs:
        kw.setdefault("arch_overrides", {"depth": 1})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return create_encoder(name, input_size=32, **kw)


def _grads(enc: torch.nn.Module) -> tuple[set[str], set[str]]:
    """(names with a non-zero gradient, names that require grad) after one backward pass at 32×32."""
    enc.train()
    enc(torch.rand(2, 3, 32, 32)).square().mean().backward()
    got = {n for n, p in enc.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    return got, {n for n, p in enc.named_parameters() if p.requires_grad}


def test_registry_has_the_zoo() -> None:
    for name in ("dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14", "dinov2_vitg14", "dinov2_vits14_reg",
                 "dinov2_vitb14_reg", "dinov2_vitl14_reg", "dinov2_vitg14_reg", "resnet101_deeplabv3"):
        assert name in ALL


@pytest.mark.parametrize("name", ALL)
def test_output_shape_at_32(name: str) -> None:
    enc = _build(name).eval()
    with torch.no_grad():
        out = enc(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, get_encoder_spec(name).embed_dim, 32, 32)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ALL)
def test_gradients_reach_the_trained_parameters(name: str) -> None:
    got, trainable = _grads(_build(name, finetune="full"))
    assert got == trainable and len(trainable) == len(list(_build(name).parameters()))

    got, trainable = _grads(_build(name, finetune="lora", lora_rank=2))
    lora = {n for n in trainable if "lora_" in n}
    assert lora and trainable - lora <= {"proj.weight", "reduce1.weight"}  # a ResNet's projection trains with LoRA
    # B starts at zero, so the first step moves every B (A's gradient is B^T·… = 0); nothing frozen moves
    assert {n for n in lora if "lora_B" in n} <= got <= trainable

    got, trainable = _grads(_build(name, finetune="frozen", adapter="conv1"))
    assert got and all(n.startswith(("adapter.", "proj.", "reduce1.")) for n in trainable) and got == trainable


def _source_vit(name: str) -> torch.nn.Module:
    """A one-block timm model shaped like ``name`` at 518 px (as the official checkpoints), random weights."""
    spec = get_encoder_spec(name)
    kw = {"depth": 1, **spec.timm_kwargs}
    model = timm.create_model(spec.timm_name, pretrained=False, img_size=518, num_classes=0, **kw)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    return model


def _meta_format(sd: dict[str, torch.Tensor], n_reg: int, swiglu: bool) -> dict[str, torch.Tensor]:
    """timm DINOv2 keys -> Meta's ``dinov2_vit*14[_reg4]_pretrain.pth`` keys (ViT-g's SwiGLU MLP: fc1/fc2 ->
    w12/w3; register tokens; a cls slot in ``pos_embed``)."""
    out = {}
    for k, v in sd.items():
        if k in ("reg_token", "cls_token", "pos_embed"):
            continue
        if swiglu:
            k = k.replace(".mlp.fc1.", ".mlp.w12.").replace(".mlp.fc2.", ".mlp.w3.")
        out[k] = v.clone()
    dim = sd["cls_token"].shape[-1]
    out["mask_token"] = torch.zeros(1, dim)
    out["cls_token"] = sd["cls_token"].clone()
    if n_reg:  # Meta keeps a cls slot in pos_embed; timm folds it into cls_token
        out["register_tokens"] = sd["reg_token"].clone()
        out["pos_embed"] = torch.cat([torch.zeros(1, 1, dim), sd["pos_embed"]], dim=1)
    else:
        out["pos_embed"] = sd["pos_embed"].clone()
    return out


@pytest.mark.parametrize("name", VITS)
def test_vit_loads_official_meta_format(name: str, tmp_path: Path) -> None:
    spec = get_encoder_spec(name)
    torch.manual_seed(0)
    src = _source_vit(name)
    sd = {k: v.detach().clone() for k, v in src.state_dict().items()}
    path = tmp_path / f"{name}_pretrain.pth"
    torch.save(_meta_format(sd, spec.num_register_tokens, "giant" in spec.timm_name), path)
    enc = _build(name, weights=str(path), arch_overrides={"depth": 1, **spec.timm_kwargs})
    got = enc.vit.state_dict()
    for k, v in sd.items():
        if k != "pos_embed":  # resampled from 37x37 to the 2x2 grid of 32 px
            assert torch.equal(got[k], v), k
    assert got["pos_embed"].shape[-1] == sd["pos_embed"].shape[-1]


def _torchvision_deeplab_sd() -> dict[str, torch.Tensor]:
    """A state dict in the key format of torchvision's official ``deeplabv3_resnet101_coco-586e9e4e.pth``."""
    from torchvision.models.segmentation import deeplabv3_resnet101

    torch.manual_seed(0)
    model = deeplabv3_resnet101(weights=None, weights_backbone=None, num_classes=21, aux_loss=True)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_resnet_loads_torchvision_deeplab_and_imagenet_formats(tmp_path: Path) -> None:
    sd = _torchvision_deeplab_sd()
    assert any(k.startswith("classifier.") for k in sd) and any(k.startswith("aux_classifier.") for k in sd)
    path = tmp_path / "deeplabv3_resnet101_coco.pth"
    torch.save(sd, path)
    enc = _build("resnet101_deeplabv3", weights=str(path))
    got = enc.state_dict()
    backbone = {k: v for k, v in sd.items() if k.startswith("backbone.")}
    assert backbone and all(torch.equal(got[k], v) for k, v in backbone.items())
    # an ImageNet ResNet-101 (conv1.weight, layer1..., fc.*) goes into the same backbone
    imagenet = {k[len("backbone."):]: v for k, v in backbone.items()} | {"fc.weight": torch.zeros(1000, 2048),
                                                                         "fc.bias": torch.zeros(1000)}
    torch.save({"state_dict": imagenet}, tmp_path / "resnet101.pth")
    enc2 = _build("resnet101_deeplabv3", weights=str(tmp_path / "resnet101.pth"))
    assert all(torch.equal(enc2.state_dict()[k], v) for k, v in backbone.items())
    # the projection comes along when the file has it (an fsl_med encoder state dict)
    torch.save(enc.state_dict(), tmp_path / "encoder.pth")
    enc3 = _build("resnet101_deeplabv3", weights=str(tmp_path / "encoder.pth"))
    assert torch.equal(enc3.proj.weight, enc.proj.weight)
    with torch.no_grad():
        x = torch.rand(1, 3, 32, 32)
        assert torch.equal(enc3.eval()(x), enc.eval()(x))


def test_resnet_bad_weights_are_one_line(tmp_path: Path) -> None:
    sd = _torchvision_deeplab_sd()
    del sd["backbone.layer4.2.conv3.weight"]
    torch.save(sd, tmp_path / "cut.pth")
    with pytest.raises(WeightsError, match=r"cut\.pth does not fit encoder resnet101_deeplabv3: 1 missing "
                                           r"\(backbone\.layer4\.2\.conv3\.weight\)"):
        _build("resnet101_deeplabv3", weights=str(tmp_path / "cut.pth"))
    with pytest.raises(WeightsError, match="does not exist"):
        _build("resnet101_deeplabv3", weights=str(tmp_path / "nope.pth"))


def test_resnet_frozen_and_lora_keep_batchnorm_statistics() -> None:
    for mode in ("frozen", "lora"):
        enc = _build("resnet101_deeplabv3", finetune=mode).train()
        bn = enc.backbone.bn1
        before = bn.running_mean.clone()
        enc(torch.rand(2, 3, 32, 32) * 5)
        assert not bn.training and torch.equal(bn.running_mean, before)
    enc = _build("resnet101_deeplabv3", finetune="full").train()
    before = enc.backbone.bn1.running_mean.clone()
    enc(torch.rand(2, 3, 32, 32) * 5)
    assert not torch.equal(enc.backbone.bn1.running_mean, before)


def test_any_timm_vit_by_name() -> None:
    spec = get_encoder_spec("timm:vit_small_patch16_224.dino")
    assert (spec.timm_name, spec.embed_dim, spec.patch_size, spec.hub_tag) == ("vit_small_patch16_224", 384, 16,
                                                                               "dino")
    enc = _build("timm:deit_tiny_patch16_224").eval()
    with torch.no_grad():
        assert enc(torch.rand(1, 3, 32, 32)).shape == (1, 192, 32, 32)
    got, trainable = _grads(_build("timm:deit_tiny_patch16_224", finetune="lora", lora_rank=2))
    assert trainable and all("lora_" in n for n in trainable)
    with pytest.raises(ConfigError, match="not a ViT"):
        get_encoder_spec("timm:resnet50")
    with pytest.raises(ConfigError, match="timm has no architecture 'vit_nonexistent'"):
        get_encoder_spec("timm:vit_nonexistent")
    with pytest.raises(WeightsError, match="hub download"):  # no internet here; the error is one line
        _build("timm:deit_tiny_patch16_224.fb_in1k", weights="fb_in1k")


def test_encoders_verb_lists_the_zoo(capsys) -> None:
    from fsl_med.cli import main

    assert main(["encoders"]) == 0
    out = capsys.readouterr().out
    assert "resnet101_deeplabv3" in out and "dinov2_vitg14_reg" in out and "timm:<architecture>" in out
