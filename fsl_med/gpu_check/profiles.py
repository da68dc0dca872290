"""The two profiles of the check: what ``gpu`` (a CUDA device, real data) and ``tiny`` (the CPU, a phantom) run."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Profile:
    """What the check runs: the two encoders, step counts, batch sizes and the time budget."""

    name: str
    large: tuple[str, ...]
    large_title: str
    small: tuple[str, ...]
    small_title: str
    phantom: tuple[str, ...]
    warmup: int
    steps: int
    batch_sizes: tuple[int, ...]
    ckpt_steps: int
    ttt_steps: int
    paper_ttt_slices: int
    matmul_n: int
    budget_s: float
    row_timeout_s: int
    jobs: tuple[int, ...] = (1, 2, 4)
    """Counts of concurrent training processes of the ``jobs-b<N>`` rows."""
    jobs_steps: int = 20
    """Timed training steps of each process in each count's common window (after ``warmup`` steps)."""


GPU = Profile(
    name="gpu",
    large=("model.encoder.name=dinov2_vitl14", "model.encoder.finetune=lora", "model.encoder.lora_rank=4"),
    large_title="DINOv2 ViT-L/14, LoRA r=4",
    small=("model.encoder.name=dinov2_vits14", "model.encoder.finetune=full"),
    small_title="DINOv2 ViT-S/14, full",
    phantom=(), warmup=3, steps=10, batch_sizes=(1, 8, 32), ckpt_steps=5, ttt_steps=100, paper_ttt_slices=3,
    matmul_n=8192, budget_s=330.0, row_timeout_s=200, jobs=(1, 2, 4), jobs_steps=20,
)
TINY = Profile(
    name="tiny",
    large=("model.encoder.name=vit_tiny_patch14", "model.encoder.finetune=lora", "model.encoder.lora_rank=4"),
    large_title="tiny ViT (2 blocks, dim 64), LoRA r=4",
    small=("model.encoder.name=vit_tiny_patch14", "model.encoder.finetune=full"),
    small_title="tiny ViT (2 blocks, dim 64), full",
    phantom=("data.image_size=64",), warmup=1, steps=2, batch_sizes=(1, 2, 4), ckpt_steps=2, ttt_steps=2,
    paper_ttt_slices=2, matmul_n=512, budget_s=270.0, row_timeout_s=150, jobs=(1, 2), jobs_steps=2,
)
PROFILES = {"gpu": GPU, "tiny": TINY}
