"""Tests of the encoder registry, factory, weights and LoRA (CPU, tiny models, no network)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from fsl_med.errors import ConfigError, WeightsError
from fsl_med.models.encoder_base import EncoderSpec
from fsl_med.models.encoder_registry import get_encoder_spec, list_encoders, register_encoder
from fsl_med.models.encoders import create_encoder
from fsl_med.models.vit_encoder import ViTPatchEncoder

TINY = "vit_tiny_patch14"
TINY_REG = "vit_tiny_patch14_reg"
OFFICIAL = [f"dinov2_vit{s}14{r}" for s in ("s", "b", "l", "g") for r in ("", "_reg")]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _random(name: str = TINY, **kwargs) -> ViTPatchEncoder:
    """create_encoder with random weights, silencing the expected warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return create_encoder(name, weights="none", **kwargs)


def _source_model(name: str) -> torch.nn.Module:
    """A timm model shaped like ``name`` at 518 px (like the official checkpoints), random non-trivial weights."""
    spec = get_encoder_spec(name)
    model = timm.create_model(
        spec.timm_name, pretrained=False, img_size=518, num_classes=0, **spec.timm_kwargs
    )
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    return model


def _to_meta(timm_sd: dict[str, torch.Tensor], reg: bool) -> dict[str, torch.Tensor]:
    """Export a timm DINOv2 state dict to Meta's key format (inverse of timm's conversion)."""
    meta = {k: v.clone() for k, v in timm_sd.items() if k not in ("reg_token", "cls_token", "pos_embed")}
    dim = timm_sd["cls_token"].shape[-1]
    meta["mask_token"] = torch.zeros(1, dim)
    if reg:
        cls_pos = torch.randn(1, 1, dim) * 0.1  # Meta keeps a cls slot in pos_embed; timm folds it in
        meta["register_tokens"] = timm_sd["reg_token"].clone()
        meta["pos_embed"] = torch.cat([cls_pos, timm_sd["pos_embed"]], dim=1)
        meta["cls_token"] = timm_sd["cls_token"] - cls_pos
    else:
        meta["pos_embed"] = timm_sd["pos_embed"].clone()
        meta["cls_token"] = timm_sd["cls_token"].clone()
    return meta


def _reference(name: str, timm_file: Path) -> ViTPatchEncoder:
    """The same weights loaded by timm's own pretrained pipeline, wrapped in the patch-token path."""
    spec = get_encoder_spec(name)
    vit = timm.create_model(
        spec.timm_name,
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(timm_file)),
        img_size=252,
        num_classes=0,
        **spec.timm_kwargs,
    )
    return ViTPatchEncoder(vit, spec, feature_size=32).eval()


@pytest.fixture(scope="module", params=[TINY, TINY_REG])
def checkpoints(request, tmp_path_factory) -> dict:
    """Timm-format and Meta-format files of the same tiny 518-px weights."""
    name = request.param
    folder = tmp_path_factory.mktemp(name)
    torch.manual_seed(1)
    timm_sd = {k: v.clone() for k, v in _source_model(name).state_dict().items()}
    timm_file = folder / "tiny_timm.pth"
    torch.save(timm_sd, timm_file)
    meta_file = folder / "dinov2_vittiny14_pretrain.pth"
    torch.save(_to_meta(timm_sd, reg=name == TINY_REG), meta_file)
    return {
        "name": name,
        "timm_sd": timm_sd,
        "timm_file": timm_file,
        "meta_file": meta_file,
        "folder": folder,
    }


# ---------------------------------------------------------------------------------------------- registry


def test_registry_contains_official_and_tiny() -> None:
    names = list_encoders()
    assert names == sorted(names)
    for name in OFFICIAL + [TINY, TINY_REG]:
        assert name in names


@pytest.mark.parametrize("name", list_encoders())
def test_every_spec_resolves_to_a_timm_model(name: str) -> None:
    spec = get_encoder_spec(name)
    assert spec.name == name
    if spec.family == "resnet":  # torchvision ResNet-101s (tests/test_encoder_zoo.py, tests/test_encoder_bundle.py)
        expected = {"resnet101_deeplabv3": (256, 8, "coco"), "resnet101_qnet": (512, 4, "coco")}
        assert (spec.embed_dim, spec.patch_size, spec.hub_tag) == expected[name]
        return
    assert timm.is_model(spec.timm_name)
    assert spec.patch_size == 14
    if name in OFFICIAL:
        assert spec.hub_tag == "lvd142m"
        assert spec.num_register_tokens == (4 if name.endswith("_reg") else 0)
        assert "reg4" in spec.timm_name if name.endswith("_reg") else "reg4" not in spec.timm_name
        assert timm.is_model(f"{spec.timm_name}.{spec.hub_tag}")
    dims = {"s": 384, "b": 768, "l": 1024, "g": 1536}
    if name.startswith("dinov2_vit"):
        assert spec.embed_dim == dims[name[len("dinov2_vit")]]


def test_unknown_name_suggests_closest() -> None:
    with pytest.raises(ConfigError, match=r"model\.encoder\.name.*dinov2_vits15.*'dinov2_vits14'"):
        get_encoder_spec("dinov2_vits15")
    with pytest.raises(ConfigError, match="model.encoder.name"):
        create_encoder("nope")


def test_register_encoder_rules() -> None:
    spec = get_encoder_spec(TINY)
    register_encoder(spec)  # identical re-registration is a no-op
    with pytest.raises(ValueError, match="already registered"):
        register_encoder(EncoderSpec(TINY, spec.timm_name, 32, 14, None))
    with pytest.raises(ValueError, match="no model"):
        register_encoder(EncoderSpec("bogus_enc", "not_a_timm_model", 32, 14, None))


# ------------------------------------------------------------------------------------------ construction


@pytest.mark.parametrize("name,prefix", [("dinov2_vits14", 1), ("dinov2_vits14_reg", 5)])
def test_full_size_small_models_build_and_run(name: str, prefix: int) -> None:
    enc = _random(name).eval()
    assert enc.out_channels == 384 and enc.feature_size == 32
    assert enc.vit.num_prefix_tokens == prefix
    assert enc.vit.pos_embed.shape[1] == 18 * 18 + (1 if prefix == 1 else 0)
    with torch.no_grad():
        out = enc(torch.rand(1, 3, 28, 28))
    assert out.shape == (1, 384, 32, 32)


def test_random_weights_warn() -> None:
    with pytest.warns(UserWarning, match=r"(?i)randomly initiali[sz]ed.*far below the paper"):
        create_encoder(TINY, weights="none")


@pytest.mark.parametrize("name", [TINY, TINY_REG])
def test_output_shapes(name: str) -> None:
    enc = _random(name, feature_size=32).eval()
    assert enc.spec.name == name and enc.out_channels == 64
    with torch.no_grad():
        assert enc(torch.rand(2, 3, 64, 64)).shape == (2, 64, 32, 32)
        assert enc(torch.rand(2, 3, 256, 256)).shape == (2, 64, 32, 32)
        enc.feature_size = 8  # 18x18 token grid >= 8: left as is
        assert enc(torch.rand(1, 3, 256, 256)).shape == (1, 64, 18, 18)


@pytest.mark.parametrize("name", [TINY, TINY_REG])
def test_patch_token_path(name: str) -> None:
    """Output = final normed patch tokens (prefix dropped) of the 252-resized input, then upsampled."""
    enc = _random(name).eval()
    x = torch.rand(2, 3, 256, 256)
    x_before = x.clone()
    with torch.no_grad():
        out = enc(x)
        x252 = torch.nn.functional.interpolate(x, size=(252, 252), mode="bilinear", align_corners=False)
        tokens = enc.vit.forward_features(x252)
        n_prefix = 1 + get_encoder_spec(name).num_register_tokens
        assert tokens.shape[1] == n_prefix + 18 * 18
        grid = tokens[:, n_prefix:].reshape(2, 18, 18, 64).permute(0, 3, 1, 2)
        expected = torch.nn.functional.interpolate(grid, size=(32, 32), mode="bilinear", align_corners=False)
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.equal(x, x_before)  # input not mutated


def test_imagenet_norm_and_adapters() -> None:
    enc = _random(TINY).eval()
    x = torch.rand(1, 3, 56, 56)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        plain = enc((x - mean) / std)
        enc.imagenet_norm = True
        assert torch.allclose(enc(x), plain, atol=1e-6)
    for adapter, n_params in (
        ("conv1", 3 * 3 + 3 + 3 + 3),
        ("conv3", 3 * 32 + 32 + 64 + 32 * 8 + 8 + 16 + 8 * 3 + 3),
    ):
        enc = _random(TINY, adapter=adapter)
        assert sum(p.numel() for p in enc.adapter.parameters()) == n_params
        assert enc(x).shape == (1, 64, 32, 32)
    with pytest.raises(ConfigError, match="model.encoder.adapter"):
        create_encoder(TINY, adapter="conv2")


# ------------------------------------------------------------------------------------------- finetuning


def _backprop(enc: ViTPatchEncoder) -> None:
    enc.zero_grad(set_to_none=True)
    enc(torch.rand(2, 3, 42, 42)).pow(2).mean().backward()


def test_full_finetune_grads_everywhere() -> None:
    enc = _random(TINY, finetune="full")
    _backprop(enc)
    params = list(enc.vit.named_parameters())
    assert all(p.requires_grad for _, p in params)
    assert all(p.grad is not None for _, p in params), [n for n, p in params if p.grad is None]
    assert len(enc.trainable_parameters()) == len(list(enc.parameters()))


def test_frozen_finetune_only_adapter_trains() -> None:
    enc = _random(TINY, finetune="frozen", adapter="conv1")
    _backprop(enc)
    assert all(not p.requires_grad and p.grad is None for p in enc.vit.parameters())
    assert all(p.grad is not None for p in enc.adapter.parameters())
    assert {id(p) for p in enc.trainable_parameters()} == {id(p) for p in enc.adapter.parameters()}


def test_lora_only_lora_and_adapter_train() -> None:
    enc = _random(TINY, finetune="lora", lora_rank=2, adapter="conv3")
    _backprop(enc)
    named = dict(enc.vit.named_parameters())
    lora = {n: p for n, p in named.items() if "lora_" in n}
    # 2 blocks x 4 targets x (A, B)
    assert len(lora) == 2 * 4 * 2
    assert all(p.requires_grad and p.grad is not None for p in lora.values())
    assert any(p.grad.abs().sum() > 0 for n, p in lora.items() if "lora_B" in n)
    assert all(not p.requires_grad and p.grad is None for n, p in named.items() if "lora_" not in n)
    assert all(p.grad is not None for p in enc.adapter.parameters())
    expected = set(map(id, lora.values())) | set(map(id, enc.adapter.parameters()))
    assert {id(p) for p in enc.trainable_parameters()} == expected
    a = next(p for n, p in lora.items() if "blocks.0.attn.qkv.lora_A" in n)
    assert a.shape == (2, 64)


def test_lora_starts_as_identity_and_respects_targets() -> None:
    torch.manual_seed(3)
    base = _random(TINY, finetune="full").eval()
    torch.manual_seed(3)
    lora = _random(TINY, finetune="lora", lora_targets=("qkv",)).eval()
    x = torch.rand(1, 3, 56, 56)
    with torch.no_grad():
        assert torch.allclose(base(x), lora(x), atol=1e-6)  # lora_B starts at zero
    lora_names = [n for n, _ in lora.vit.named_parameters() if "lora_" in n]
    assert lora_names and all(".attn.qkv." in n for n in lora_names)


def test_finetune_config_errors() -> None:
    with pytest.raises(ConfigError, match="model.encoder.finetune"):
        create_encoder(TINY, finetune="partial")
    with pytest.raises(ConfigError, match="model.encoder.lora_rank"):
        create_encoder(TINY, finetune="lora", lora_rank=0)
    with pytest.raises(ConfigError, match="model.encoder.lora_targets"):
        create_encoder(TINY, finetune="lora", lora_targets=("qkv", "mlp"))
    with pytest.raises(ConfigError, match="model.encoder.input_size"):
        create_encoder(TINY, input_size=10)


# ------------------------------------------------------------------------------------------------ weights


def test_meta_format_matches_timm_pipeline(checkpoints: dict) -> None:
    name = checkpoints["name"]
    enc = create_encoder(name, weights=str(checkpoints["meta_file"]), input_size=256).eval()
    ref = _reference(name, checkpoints["timm_file"])
    rand = _random(name).eval()
    x = torch.rand(2, 3, 256, 256)
    with torch.no_grad():
        out, expected = enc(x), ref(x)
        assert not torch.allclose(rand(x), expected, atol=1e-3)
    assert out.shape == (2, 64, 32, 32)
    assert torch.allclose(out, expected, atol=1e-5)


def test_timm_format_variants_match(checkpoints: dict) -> None:
    name, folder, timm_sd = checkpoints["name"], checkpoints["folder"], checkpoints["timm_sd"]
    wrapped = folder / "wrapped.pt"
    torch.save({"epoch": 3, "model": {f"module.{k}": v for k, v in timm_sd.items()}}, wrapped)
    safe = folder / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in timm_sd.items()}, str(safe))
    ref = _reference(name, checkpoints["timm_file"])
    x = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        expected = ref(x)
        for path in (checkpoints["timm_file"], wrapped, safe):
            enc = create_encoder(name, weights=path, finetune="frozen").eval()
            assert torch.allclose(enc(x), expected, atol=1e-5), path


@pytest.mark.parametrize("checkpoints", [TINY_REG], indirect=True)
def test_meta_register_checkpoint_into_plain_model_is_rejected(checkpoints: dict) -> None:
    path = checkpoints["meta_file"]
    with pytest.raises(
        WeightsError, match=r"does not fit encoder vit_tiny_patch14: .*unexpected \(reg_token\)"
    ) as exc:
        create_encoder(TINY, weights=str(path))
    assert str(path) in str(exc.value) and "\n" not in str(exc.value)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "dinov2_vits14_pretrain.pth"
    with pytest.raises(WeightsError, match="does not exist") as exc:
        create_encoder(TINY, weights=str(path))
    assert str(path) in str(exc.value)


def test_truncated_file(checkpoints: dict, tmp_path: Path) -> None:
    data = checkpoints["meta_file"].read_bytes()
    for suffix in (".pth", ".safetensors"):
        path = tmp_path / f"half{suffix}"
        if suffix == ".safetensors":
            full = tmp_path / "full.safetensors"
            save_file({k: v.contiguous() for k, v in checkpoints["timm_sd"].items()}, str(full))
            data = full.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        with pytest.raises(WeightsError, match="unreadable or truncated") as exc:
            create_encoder(checkpoints["name"], weights=str(path))
        assert str(path) in str(exc.value) and "\n" not in str(exc.value)


def test_other_architecture(tmp_path: Path) -> None:
    other = timm.create_model(
        "vit_small_patch14_dinov2",
        pretrained=False,
        img_size=98,
        num_classes=0,
        embed_dim=32,
        depth=3,
        num_heads=2,
    )
    path = tmp_path / "other.pth"
    torch.save(other.state_dict(), path)
    with pytest.raises(WeightsError) as exc:
        create_encoder(TINY, weights=str(path))
    msg = str(exc.value)
    assert str(path) in msg and TINY in msg and "\n" not in msg
    assert (
        "unexpected (blocks.2." in msg
        and "shape-mismatched" in msg
        and "cls_token [1, 1, 32] vs [1, 1, 64]" in msg
    )


def test_not_a_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "list.pth"
    torch.save([1, 2, 3], path)
    with pytest.raises(WeightsError, match="no state dict"):
        create_encoder(TINY, weights=str(path))


def test_hub_download_failure_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)  # read once at import by huggingface_hub
    with pytest.raises(
        WeightsError, match=r"hub download .* failed.*local file path as model\.encoder\.weights"
    ) as exc:
        create_encoder("dinov2_vits14", weights="lvd142m")
    assert "\n" not in str(exc.value)


def test_hub_tag_on_encoder_without_hub_weights() -> None:
    with pytest.raises(WeightsError, match="no hub weights"):
        create_encoder(TINY, weights="lvd142m")
