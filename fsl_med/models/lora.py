"""LoRA on an encoder through peft: the ViT's Linear layers (:data:`LORA_TARGETS`) or the ResNet's 1x1 convolutions."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from fsl_med.config import LORA_TARGETS
from fsl_med.errors import ConfigError


def _lora_regex(targets: Sequence[str]) -> str:
    """Regex (fullmatch on module names) for Linear layers inside transformer blocks."""
    attn = [t for t in LORA_TARGETS[:2] if t in targets]
    mlp = [t for t in LORA_TARGETS[2:] if t in targets]
    alts = []
    if attn:
        alts.append(rf"attn\.({'|'.join(attn)})")
    if mlp:
        alts.append(rf"mlp\.({'|'.join(mlp)})")
    return rf"blocks\.\d+\.({'|'.join(alts)})"


RESNET_LORA_REGEX = r"layer\d\.\d+\.conv[13]"
"""LoRA targets of the ResNet backbone: the 1×1 convolutions of its bottleneck blocks (peft's Conv2d LoRA does
not carry the dilation of the 3×3 ones in the dilated layer3/layer4)."""


def inject_lora(vit: nn.Module, rank: int, targets: Sequence[str], regex: str | None = None) -> nn.Module:
    """Freeze ``vit`` and inject peft LoRA (scale 1, gaussian init, no dropout) on the layers ``regex``
    (default: the ViT Linear layers ``targets``) matches; returns the model."""
    from peft import LoraConfig, inject_adapter_in_model

    vit.requires_grad_(False)
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        lora_dropout=0.0,
        init_lora_weights="gaussian",
        target_modules=regex or _lora_regex(targets),
        bias="none",
    )
    vit = inject_adapter_in_model(config, vit)
    n_lora = 0
    for n, p in vit.named_parameters():
        p.requires_grad = "lora_" in n
        n_lora += int("lora_" in n)
    if n_lora == 0:
        raise ConfigError(
            f"model.encoder.lora_targets: {list(targets)} matched no Linear layer of the encoder"
        )
    return vit
