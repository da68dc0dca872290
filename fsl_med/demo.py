"""The embedded default: phantom data, a small random-init model, EP1 Dice before and after training."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L

from fsl_med.config import load_config
from fsl_med.data.phantom import generate_phantom
from fsl_med.evaluate import evaluate
from fsl_med.evaluation.report import metric_table
from fsl_med.models.module import FewShotModule
from fsl_med.train import train

log = logging.getLogger(__name__)


def run_demo(cfg_path: Path | None, overrides: list[str] | None = None) -> str:
    """Generate the phantom (if missing), evaluate the untrained model, train, evaluate again.

    Returns:
        A text report: the per-organ Dice table before/after training, timings and the run folders.
    """
    cfg = load_config(cfg_path, overrides)
    root = generate_phantom(cfg.data.root)
    log.info("phantom dataset in %s", root)
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # the untrained model is reproducible too
    module = FewShotModule.from_config(cfg)
    before, _ = evaluate(cfg, module=module, name_suffix="-before", global_step=0)
    res = train(cfg, module=module)
    after, path = evaluate(cfg, module=module, name_suffix="-eval", global_step=res.steps)
    organs = list(cfg.data.test_organs)
    table = metric_table({"untrained": before, f"after {res.steps} steps": after}, organs)
    sps = f"{res.seconds_per_step:.3f}" if res.seconds_per_step else "n/a"
    return "\n".join([
        "",
        f"fsl_med demo: encoder {cfg.model.encoder.name} (weights {cfg.model.encoder.weights}), "
        f"phantom fold {cfg.data.fold}, Dice % on the fold's query volumes:",
        "",
        table,
        "",
        f"training: {res.steps} steps, {sps} s/step; evaluation: {after['seconds_per_volume']:.2f} s per query volume",
        f"run folder: {res.run_dir}",
        f"results: {path}",
    ])
