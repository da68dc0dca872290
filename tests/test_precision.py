"""``trainer.precision=bf16-mixed`` trains and evaluates (all variants) on CPU; on CUDA the same path runs."""

from __future__ import annotations

import math
from pathlib import Path

from omegaconf import OmegaConf

from fsl_med.config import load_config
from fsl_med.data.phantom import generate_phantom
from fsl_med.evaluate import evaluate
from fsl_med.models.module import FewShotModule
from fsl_med.train import train

REPO = Path(__file__).resolve().parents[1]


def test_bf16_mixed_training_and_evaluation(tmp_path, cache_dir):
    root = generate_phantom(tmp_path / "ph", n_scans=6, size=64, depth=10, seed=0)
    cfg = load_config(REPO / "experiments" / "demo.yaml", [
        f"data.root={root}", "data.image_size=64", "data.num_workers=0", "trainer.max_steps=3",
        "trainer.val_check_interval=3", f"logging.output_dir={tmp_path / 'runs'}", "trainer.enable_progress_bar=false",
        f"data.cache_dir={cache_dir}", "trainer.precision=bf16-mixed", "eval.variants=[plain,cca,ttt,ttt_cca]",
        "ttt.steps=1", "trainer.gradient_clip_val=1.0"])  # clipping under mixed precision: no fused optimiser
    module = FewShotModule.from_config(cfg)
    res = train(cfg, module=module)
    assert res.steps == 3 and res.val_dice is not None and math.isfinite(res.val_dice)
    results = evaluate(cfg, module=module, global_step=res.steps).results
    for summary in results["variants"].values():
        assert all(0.0 <= d <= 100.0 for d in summary["dice"].values()) and len(summary["dice"]) == 4
    # the same weights evaluated in float32: bf16 autocast changes Dice by little, and not to nothing
    fp32 = evaluate(OmegaConf.merge(cfg, {"trainer": {"precision": "32-true"}, "name": "fp32"}), module=module,
                    global_step=res.steps).results
    for v in ("plain", "cca"):
        for organ, d in fp32["variants"][v]["dice"].items():
            assert abs(results["variants"][v]["dice"][organ] - d) < 5.0, (v, organ, d)
    assert fp32["variants"]["plain"]["dice_mean"] > 5.0
