"""Encoder weight files: unwrap a checkpoint's state dict, convert Meta's DINOv2 format to timm's, resample
position embeddings, and check the result strictly against the architecture (one-line :class:`WeightsError`)."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fsl_med.errors import WeightsError, first_line
from fsl_med.models.encoder_base import EncoderSpec

logger = logging.getLogger(__name__)

_WRAPPER_KEYS = ("state_dict", "model", "teacher", "module", "model_ema", "student")
_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.")


def _unwrap_state_dict(obj: Any, path: str) -> dict[str, torch.Tensor]:
    """Find the tensor dict inside a checkpoint (``{"model": sd}``, ``{"teacher": ...}``, ...)."""
    for _ in range(4):
        if not isinstance(obj, Mapping):
            break
        if any(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"weights file {path}: no state dict of tensors found in it")
    sd = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    # Strip a common prefix such as "module." or "backbone." (DINOv2 training checkpoints).
    anchor = "patch_embed.proj.weight"
    prefixes = [k[: -len(anchor)] for k in sd if k.endswith(anchor)]
    if len(prefixes) == 1 and prefixes[0]:
        pre = prefixes[0]
        sd = {k[len(pre) :]: v for k, v in sd.items() if k.startswith(pre)}
    # Flatten DINOv2 "block chunks" (blocks.<chunk>.<i>.*) into blocks.<i>.*
    if any(_CHUNKED_BLOCK.match(k) for k in sd):
        sd = {_CHUNKED_BLOCK.sub(r"blocks.\1.", k): v for k, v in sd.items()}
    return sd


def read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``path`` (.safetensors via safetensors, else torch.load weights_only)."""
    if not path.exists():
        raise WeightsError(f"model.encoder.weights: file {path} does not exist")
    if not path.is_file():
        raise WeightsError(f"model.encoder.weights: {path} is not a file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # any read failure is the file's fault
        raise WeightsError(
            f"weights file {path} is unreadable or truncated ({type(exc).__name__}: {first_line(exc)})"
        ) from exc
    return _unwrap_state_dict(obj, str(path))


def _is_meta_format(sd: Mapping[str, torch.Tensor]) -> bool:
    return "mask_token" in sd or "register_tokens" in sd or any(".mlp.w12." in k for k in sd)


def _meta_to_timm(sd: dict[str, torch.Tensor], vit: nn.Module) -> dict[str, torch.Tensor]:
    """Convert Meta DINOv2 keys to timm's (register tokens, cls + pos[0], SwiGLU w12/w3)."""
    from timm.models.vision_transformer import _convert_dinov2

    return _convert_dinov2(dict(sd), vit)  # it pops from its argument: give it a copy


def _examples(items: list[str], n: int = 3) -> str:
    shown = ", ".join(items[:n])
    return shown + (", ..." if len(items) > n else "")


def _check_compatible(sd: Mapping[str, torch.Tensor], vit: nn.Module, path: str, name: str) -> None:
    """Strict key/shape check before loading; raises a one-line WeightsError on any mismatch.

    ``pos_embed`` may differ in its number of grid tokens (it is resampled), but not in its channel
    count or prefix-token layout.
    """
    target = vit.state_dict()
    missing = [k for k in target if k not in sd]  # model order: the first ones are the most telling
    unexpected = [k for k in sd if k not in target]
    mismatched: list[str] = []
    n_prefix = 0 if getattr(vit, "no_embed_class", False) else int(getattr(vit, "num_prefix_tokens", 1))
    for k in (k for k in target if k in sd):
        have, want = tuple(sd[k].shape), tuple(target[k].shape)
        if k == "pos_embed":
            grid = have[1] - n_prefix if len(have) == 3 else -1
            ok = len(have) == 3 and have[0] == 1 and have[2] == want[2] and grid > 0
            ok = ok and math.isqrt(grid) ** 2 == grid
        else:
            ok = have == want
        if not ok:
            mismatched.append(f"{k} {list(have)} vs {list(want)}")
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({_examples(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({_examples(unexpected)})")
        if mismatched:
            parts.append(f"{len(mismatched)} shape-mismatched ({_examples(mismatched)}; file vs model)")
        raise WeightsError(f"weights file {path} does not fit encoder {name}: " + "; ".join(parts))


def load_weights_file_into(vit: nn.Module, path: Path, spec: EncoderSpec) -> None:
    """Load a Meta-format or timm-format weight file into ``vit`` (strict; pos_embed resampled)."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    sd = read_weights_file(path)
    fmt = "Meta DINOv2"
    if _is_meta_format(sd):
        sd = _meta_to_timm(sd, vit)
    else:
        fmt = "timm"
    _check_compatible(sd, vit, str(path), spec.name)
    # timm's filter resamples pos_embed to the model grid (bicubic, antialiased), as its hub path does.
    sd = checkpoint_filter_fn(dict(sd), vit)
    try:
        vit.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise WeightsError(
            f"weights file {path} does not fit encoder {spec.name}: {first_line(exc)}"
        ) from exc
    logger.info("Loaded %s-format weights for encoder %s from %s", fmt, spec.name, path)
