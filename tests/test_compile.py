"""``model.compile``: the encoder compiled in place with torch.compile trains through Lightning, keeps the eager
parameter names (checkpoints load into an eager model and back) and computes what the eager model computes."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from fsl_med.config import load_config
from fsl_med.data.phantom import generate_phantom
from fsl_med.models.module import FewShotModule
from fsl_med.train import train

REPO = Path(__file__).resolve().parents[1]


def test_compiled_encoder_trains_and_its_checkpoint_is_the_eager_models(tmp_path, cache_dir):
    root = generate_phantom(tmp_path / "ph", n_scans=6, size=64, depth=10, seed=0)
    base = [f"data.root={root}", "data.image_size=64", "data.num_workers=0", "trainer.max_steps=2",
            "trainer.val_check_interval=2", f"logging.output_dir={tmp_path / 'runs'}",
            "trainer.enable_progress_bar=false", f"data.cache_dir={cache_dir}", "eval.variants=[plain]"]
    cfg = load_config(REPO / "experiments" / "demo.yaml", [*base, "model.compile=default"])
    eager_cfg = load_config(REPO / "experiments" / "demo.yaml", base)
    module = FewShotModule.from_config(cfg)
    eager = FewShotModule.from_config(eager_cfg)
    assert module.model.encoder._compiled_call_impl is not None and eager.model.encoder._compiled_call_impl is None
    assert list(module.state_dict()) == list(eager.state_dict())  # no '_orig_mod.' prefixes

    eager.load_state_dict(module.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(module.model.encode(x), eager.model.encode(x), atol=1e-4, rtol=1e-4)

    res = train(cfg, module=module)
    assert res.steps == 2 and math.isfinite(res.val_dice)
    ckpt = torch.load(res.last_ckpt, map_location="cpu", weights_only=False)
    assert not any("_orig_mod" in k for k in ckpt["state_dict"])
    eager.load_state_dict(ckpt["state_dict"])  # strict: the trained compiled model is an eager checkpoint
    with torch.no_grad():
        torch.testing.assert_close(module.model.encode(x), eager.model.encode(x), atol=1e-4, rtol=1e-4)
