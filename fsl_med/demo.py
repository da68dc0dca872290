"""The embedded default: phantom data, a small random-init model, EP1 Dice before and after training."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from fsl_med.data.phantom import generate_phantom
from fsl_med.evaluate import evaluate
from fsl_med.evaluation.figures import before_after_figure, dice_bar_chart
from fsl_med.evaluation.report import ORGAN_TITLES, metric_table
from fsl_med.measure import cpu_name
from fsl_med.models.module import FewShotModule
from fsl_med.run_config import load_run_config
from fsl_med.train import train

log = logging.getLogger(__name__)


def _slice_pairs(before: list[dict[str, Any]], after: list[dict[str, Any]],
                 organs: list[str]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Per organ (in ``organs`` order), the overlay slice (same query scan and z before and after) with the largest ground truth."""
    after_by = {(s["organ"], s["query"], s["z"]): s for s in after}
    best: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
    for s in before:
        a = after_by.get((s["organ"], s["query"], s["z"]))
        if a is not None and (s["organ"] not in best or s["label"].sum() > best[s["organ"]][0]["label"].sum()):
            best[s["organ"]] = (s, a)
    return [best[o] for o in organs if o in best]


def run_demo(cfg_path: Path | None, overrides: list[str] | None = None) -> str:
    """Generate the phantom (if missing), evaluate the untrained model, train, evaluate again, and draw both.

    Returns:
        A text report: seed, threads and steps, the per-organ Dice table before/after training, timings, the
        figures (``demo_dice.png``: Dice bars before/after; ``demo_before_after.png``: one slice per organ with both
        predictions) and the run folders.
    """
    t0 = time.perf_counter()
    cfg = load_run_config(cfg_path, overrides)
    root = generate_phantom(cfg.data.root)
    log.info("phantom dataset in %s", root)
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # the untrained model is reproducible too
    module = FewShotModule.from_config(cfg)
    before, _, samples_before = evaluate(cfg, module=module, name_suffix="-before", global_step=0)
    res = train(cfg, module=module)
    after, path, samples_after = evaluate(cfg, module=module, name_suffix="-eval", global_step=res.steps)
    organs = list(cfg.data.test_organs)
    trained = f"after {res.steps} steps"
    table = metric_table({"untrained": before, trained: after}, organs)
    figs = [dice_bar_chart({"untrained": before, trained: after}, organs, path.parent / "demo_dice.png", ORGAN_TITLES)]
    pairs = _slice_pairs(samples_before, samples_after, organs)
    if pairs:
        figs.append(before_after_figure(pairs, path.parent / "demo_before_after.png", ("untrained", trained),
                                        organ_titles=ORGAN_TITLES))
    sps = f"{res.seconds_per_step:.3f}" if res.seconds_per_step else "n/a"
    return "\n".join([
        "",
        f"fsl_med demo: encoder {cfg.model.encoder.name} (weights {cfg.model.encoder.weights}), phantom fold "
        f"{cfg.data.fold}, seed {cfg.seed}, {torch.get_num_threads()} thread(s) on {cpu_name()}, {res.steps} training "
        "steps; "
        "Dice % on the fold's query volumes:",
        "",
        table,
        "",
        f"training: {res.steps} steps, {sps} s/step; evaluation: {after['seconds_per_volume']:.2f} s per query volume; "
        f"demo wall time {time.perf_counter() - t0:.0f} s",
        f"figures: {', '.join(str(f) for f in figs)}",
        f"run folder: {res.run_dir}",
        f"results: {path}",
    ])
