"""``fsl-med bench`` (``make bench``): speed, memory and FLOP-bound fraction on the machine it runs on.

Each measurement runs in its own process (so its peak resident memory is its own) and prints one JSON
line; the parent collects them and writes ``BENCHMARKS.md`` and ``benchmarks.json``. Medians over
repeated runs after warm-up. The FLOP bound is model FLOPs (``torch.utils.flop_counter``, attention
included) divided by a float32 matmul throughput measured in the same run.

Parts (ViT-S/14 random init unless stated, 256 px, batch 1, real CHAOS data when available):

* ``matmul``: float32 GEMM GFLOP/s (best of 30 products of 2048³), the machine's reference throughput.
* ``train_full`` / ``train_lora``: seconds per training step through Lightning (compute only, and wall time
  including data), GFLOP per step, episode preparation time.
* ``eval``: seconds per scored query slice (organ, slice) and per query volume of EP1 evaluation with CCA
  over the fold's query scans, through the module's evaluation step (support encoded once per scan and
  organ, each query slice once per scan for all organs, batched, ``inference_mode``).
* ``heads``: ``train_full`` and ``eval`` once per few-shot head (``heads``, default every registered one) on the
  same encoder, each head with its own defaults (``model.head.name=<head>``): ALP's rows are ``train_full`` and
  ``eval`` themselves (measured here if those parts are not run), another head's are ``train_full_<head>`` and
  ``eval_<head>``, measured right after ALP's; the report gives each head's time relative to ALP's. A head with a
  test-time refinement inside its prediction (Q-Net) also gets that refinement's seconds per query slice
  (``refine_seconds_per_slice`` of its ``eval``, part of its evaluation time) on a row of its own.
* ``ttt``: seconds per slice of the paper's TTT (100 steps, per slice) and of the fast mode (per volume).
* ``ttt_dice``: Dice of per-slice TTT vs the fast mode from one briefly trained tiny-ViT checkpoint, with
  their seconds per slice (the paper-size comparison would take hours on a CPU).
* ``oversubscription``: seconds per training step of the demo's tiny ViT with OpenMP's default wait policy and
  with ``OMP_WAIT_POLICY=PASSIVE`` (the CLI's default), on an idle machine and beside one CPU-bound torch process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fsl_med.config import HeadConfig
from fsl_med.evaluation import table as report_table
from fsl_med.evaluation.table import Column, Table, text
from fsl_med.measure import (
    count_flops,
    default_device,
    machine_info,
    matmul_throughput,
    median_time,
    peak_rss_mb,
)

REPO = Path(__file__).resolve().parents[1]
PARTS = ("matmul", "train_full", "train_lora", "eval", "heads", "ttt", "ttt_dice", "oversubscription")
CHILD_PARTS = tuple(p for p in PARTS if p not in ("heads", "oversubscription"))
"""Parts measured in a child process of their own (``heads`` runs ``train_full`` and ``eval`` children per head,
``oversubscription`` ``train_full`` children)."""
HEAD_PARTS = ("train_full", "eval")
"""What the ``heads`` part measures for every head; ALP's rows are these parts' own, another head's ``<part>_<head>``."""
BASE_HEAD = HeadConfig().name
"""The head the others are compared with: the default ``model.head.name`` (ALPNet)."""
BUSY = "import torch\na = torch.randn(512, 512)\nwhile True:\n    a @ a\n"
"""The competing process of ``oversubscription``: another CPU-bound torch job (default OpenMP settings)."""
OVERSUB = [("default", False), ("default", True), ("PASSIVE", False), ("PASSIVE", True)]
"""``(OMP_WAIT_POLICY, beside a busy process)`` of the ``oversubscription`` runs ("default": unset)."""
REFERENCE = {  # method.md §10: the reference code on a 2-core CPU, ViT-S/14, 256 px
    "train_full": 0.57, "train_full_as_shipped": 0.96, "eval_slice": 0.16, "ttt_slice": 51.0,
    "peak_train_mb": 2000.0, "peak_eval_mb": 1400.0,
}
TARGETS = {"train_full": 0.45, "eval_slice": 0.08}
REFERENCE_MATMUL_GFLOPS = 247.0
"""float32 matmul of the machine the reference figures and targets were measured on (method.md §10); on a CPU
the report also shows them scaled by that machine's matmul over this one's (an estimate, labelled as such)."""
FAST_TTT = ["ttt.mode=volume", "ttt.steps=100"]
"""The fast TTT mode measured against the paper's per-slice TTT: one 100-step adaptation per query volume."""


def part_matmul(_: argparse.Namespace) -> dict[str, Any]:
    """float32 GEMM throughput (GFLOP/s) on the current device: the best of 30 timed 2048³ products (the
    machine's peak, which the FLOP-bound fractions are taken against; on a shared machine the median of a
    few runs swings by ±5 %), and their median."""
    dev = default_device()
    mm = matmul_throughput(dev, torch.float32, n=2048, repeats=30, warmup=3)
    return {"gflops": mm["best"] / 1e9, "median_gflops": mm["median"] / 1e9, "device": dev}


def _config(args: argparse.Namespace, extra: list[str]) -> Any:
    from fsl_med.run_config import load_run_config

    return load_run_config(REPO / "experiments" / "mri.yaml", [
        f"data.root={args.data}", f"model.encoder.name={args.encoder}", "model.encoder.weights=none",
        f"data.cache_dir={args.cache_dir}", f"logging.output_dir={args.work}", "logging.logger=none",
        "trainer.enable_progress_bar=false", f"trainer.precision={args.precision}", *extra])


def _autocast(args: argparse.Namespace) -> Any:
    """bf16 autocast for ``--precision bf16-mixed`` (CUDA runs), else a no-op context."""
    return torch.autocast(default_device(), dtype=torch.bfloat16, enabled=args.precision.startswith("bf16"))


FLOOR_OPS_EXTRA = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward")
"""The CPU flash-attention kernels, which ``flop_registry`` lacks (see :func:`fsl_med.measure.count_flops`)."""


def _kernel_floor(fn, repeats: int = 5) -> dict[str, Any]:
    """The time ``fn()`` would take if it were nothing but its FLOP-carrying kernels (matmuls, convolutions,
    attention: the ops ``torch.utils.flop_counter`` counts, plus the CPU flash-attention kernels), each
    replayed alone on copies of its own inputs (same shapes and strides) and timed, times its number of calls.

    Elementwise work, normalisation, the optimiser and framework overhead are left out, so this is a lower
    bound on ``fn``'s time with this machine's kernels; ``flops / seconds / matmul`` is the highest FLOP-bound
    fraction those kernels allow. Returns ``{"seconds", "calls", "kernels"}`` (``kernels``: distinct
    op/shape/stride signatures, each timed once).
    """
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten, tree_map
    from torch.utils.flop_counter import flop_registry

    ops = set(flop_registry) | {getattr(torch.ops.aten, n) for n in FLOOR_OPS_EXTRA}
    calls: dict[tuple, list] = {}

    def keep(a: Any) -> Any:
        return a.detach().clone() if isinstance(a, torch.Tensor) else a

    def sig(a: Any) -> Any:
        return (tuple(a.shape), a.stride(), str(a.dtype)) if isinstance(a, torch.Tensor) else repr(a)

    class Capture(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            kwargs = kwargs or {}
            if func.overloadpacket in ops:
                key = (str(func), tuple(sig(a) for a in tree_flatten((args, kwargs))[0]))
                if key in calls:
                    calls[key][0] += 1
                else:
                    calls[key] = [1, func, tree_map(keep, args), tree_map(keep, kwargs)]
            return func(*args, **kwargs)

    with Capture():
        fn()
    total = 0.0
    for count, func, a, kw in calls.values():
        total += count * median_time(lambda f=func, a=a, kw=kw: f(*a, **kw), repeats, warmup=1)
    return {"seconds": total, "calls": sum(c[0] for c in calls.values()), "kernels": len(calls)}


def _head_figures(module: Any) -> dict[str, Any]:
    """The head of the measured model: its registered name, its own parameters (ADNet: ``threshold``), the values it
    logs (ADNet: ``T``, as the figures were taken) and its mask pooling."""
    head = module.model.head
    return {"head": head.name, "head_parameters": [n for n, _ in head.named_parameters()],
            "head_values": head.log_values(), "mask_pooling": head.mask_pooling}


def part_train(args: argparse.Namespace, finetune: str) -> dict[str, Any]:
    """Seconds per training step through the real Lightning loop, and GFLOP per step."""

    from fsl_med.data.datamodule import FewShotDataModule
    from fsl_med.models.module import FewShotModule
    from fsl_med.runs import make_trainer, new_run_dir
    from fsl_med.train import StepTimer

    warm, n = args.warmup, args.steps
    cfg = _config(args, [f"model.encoder.finetune={finetune}", f"trainer.max_steps={warm + n}",
                         "data.num_val_scans=0", f"data.num_workers={args.workers}", *args.set])
    dm = FewShotDataModule(cfg)
    dm.prepare_data()
    dm.setup("fit")
    module = FewShotModule.from_config(cfg)
    batch = next(iter(dm.train_dataloader()))
    t0 = time.perf_counter()
    for i in range(20):
        dm.train_set[i]
    data_s = (time.perf_counter() - t0) / 20

    def step() -> None:
        loss, _, _ = module.model.episode_loss(batch["support_image"], batch["support_mask"], batch["query_image"],
                                               batch["query_label"], module.ce_weights, cfg.loss.align_weight)
        loss.backward()

    flops = count_flops(step)
    module.zero_grad(set_to_none=True)

    timer = StepTimer(synchronize=True)  # the device's seconds per step (kernels, not their launch)
    trainer = make_trainer(cfg, new_run_dir(args.work, f"bench-{finetune}"), with_val=False,
                           extra_callbacks=[timer], progress_bar=False)
    trainer.fit(module, datamodule=dm)
    peak = peak_rss_mb()  # the training's own peak, before the kernel floor's copies of kernel inputs
    floor = None
    # CPU only: the replays are timed with perf_counter, without CUDA synchronisation
    if finetune == "full" and not args.set and not args.precision.startswith("bf16") and default_device() == "cpu":
        floor = _kernel_floor(step)
    compute = statistics.median(timer.times[warm:])
    # wall time of step i (end of step i-1 to end of step i): the wait before it plus its compute
    walls = statistics.median([timer.gaps[i - 1] + timer.times[i] for i in range(warm, len(timer.times))])
    out = {"seconds_per_step": compute, "wall_seconds_per_step": walls, "gflop_per_step": flops / 1e9,
           "data_seconds_per_episode": data_s, "workers": args.workers, "steps": n,
           "first_step_seconds": timer.times[0], "overrides": list(args.set), "peak_rss_mb": peak,
           **_head_figures(module)}
    if floor is not None:
        out.update(floor_seconds_per_step=floor["seconds"], floor_kernel_calls=floor["calls"],
                   floor_kernels=floor["kernels"])
    return out


def _eval_items(args: argparse.Namespace, extra: list[str], all_queries: bool = False):
    from fsl_med.data.datamodule import FewShotDataModule

    cfg = _config(args, extra)
    dm = FewShotDataModule(cfg)
    dm.setup("test")
    items = dm.test_set.items
    if not all_queries:
        items = [it for it in items if it.query_id == items[0].query_id]
    return cfg, items


def part_eval(args: argparse.Namespace) -> dict[str, Any]:
    """EP1 evaluation + CCA of the fold's query scans, all four organs, through the module's public
    prediction (what its test step returns), the CCA refinement and the scoring counts: seconds per scored (organ, query slice), per query volume and organ, and per encoded
    slice (each query slice is encoded once per scan and shared by the organs; the support once per organ).

    A head with a test-time refinement (Q-Net: ``refine_seconds``/``refined_slices``, reset before each run) also
    gives ``refine_seconds_per_slice`` (median over the timed runs of the refinement's seconds per refined query
    slice, one per scored (organ, slice); included in ``seconds_per_slice``) and ``refined_slices`` (per run; ``None``
    seconds when nothing was refined, e.g. ``refine_iters=0``)."""
    from fsl_med.evaluation.metrics import confusion_counts
    from fsl_med.models.module import FewShotModule
    from fsl_med.refine.cca import CCA

    cfg, items = _eval_items(args, ["eval.variants=[plain,cca]", "eval.hd95=false", "eval.overlay_slices=0",
                                    *args.set], all_queries=True)
    dev = default_device()
    module = FewShotModule.from_config(cfg).eval().to(dev)
    seg = module.model
    x = torch.zeros(1, 3, cfg.data.image_size, cfg.data.image_size, device=dev)
    with torch.inference_mode():
        flops = count_flops(lambda: seg.encode(x))
    encoded: list[int] = []

    cca = CCA(cfg.eval.cca_mode)
    head = seg.head
    timed_refine = hasattr(head, "reset_refine_timing")  # a head with a test-time refinement (Q-Net)
    refine: list[tuple[float, int]] = []  # (seconds, refined query slices) of each run

    def run() -> None:
        module.reset_eval_caches()  # empties the support-prototype and query-feature caches
        if timed_refine:
            head.reset_refine_timing()
        with _autocast(args), torch.inference_mode():
            for it in items:
                record = module.predict_item(it)  # what test_step returns
                cca.apply(record, module)  # what the CCA callback does with it
                for v in record.variants.values():  # what the scoring callback does (eval.hd95=false)
                    confusion_counts(v.pred, it.query_labels)
        support = {it.organ: len(it.support_z) for it in items}  # support slices, encoded once per organ
        encoded.append(module.encoded_query_slices + sum(support.values()))
        if timed_refine:
            refine.append((float(head.refine_seconds), int(head.refined_slices)))

    t = median_time(run, args.eval_repeats, warmup=1)
    slices = sum(len(it.z) for it in items)
    out = {"seconds_per_slice": t / slices, "seconds_per_volume": t / len(items), "slices": slices,
           "volumes": len(items), "query_scans": len({it.query_id for it in items}),
           "encoded_slices": encoded[-1], "seconds_per_encoded_slice": t / encoded[-1],
           "gflop_per_slice": flops / 1e9 * encoded[-1] / slices, "gflop_per_encoded_slice": flops / 1e9,
           "batch_size": cfg.eval.batch_size, "overrides": list(args.set), **_head_figures(module)}
    if timed_refine:  # part of seconds_per_slice: the median over the timed runs (the warm-up run's left out)
        per = [s / n for s, n in refine[1:] if n]
        out.update(refine_seconds_per_slice=statistics.median(per) if per else None, refined_slices=refine[-1][1])
    return out


def _ttt_trainer(cfg: Any, module: Any, overrides: list[str]) -> Any:
    from omegaconf import OmegaConf

    from fsl_med.refine.ttt import TestTimeTrainer

    tcfg = OmegaConf.merge(cfg.ttt, OmegaConf.from_dotlist([o.removeprefix("ttt.") for o in overrides]))
    return TestTimeTrainer.from_config(module.model, cfg, module.ce_weights, tcfg)


PAPER_TTT = ["ttt.steps=100", "ttt.mode=slice"]


def part_ttt(args: argparse.Namespace) -> dict[str, Any]:
    """Seconds per slice of per-slice TTT (100 steps) on one slice, and of the fast mode on a whole volume."""
    from fsl_med.models.module import FewShotModule

    cfg, items = _eval_items(args, list(args.set))
    it = items[0]
    module = FewShotModule.from_config(cfg).eval()
    seg = module.model
    protos = seg.support_prototypes(it.support_images, it.support_masks)
    pred, prob = seg.predict_volume(protos, it.query_images, it.part, cfg.eval.batch_size)
    out: dict[str, Any] = {}
    mid = np.array([len(it.z) // 2])
    for label, overrides, idx in (("paper", PAPER_TTT, mid), ("fast", FAST_TTT, np.arange(len(it.z)))):
        fg = pred[idx].copy()
        fg[:, 100:140, 100:140] = 1  # make sure every slice is adapted (empty predictions are skipped)
        t0 = time.perf_counter()
        _ttt_trainer(cfg, module, overrides).refine(it.query_images[idx], fg, prob[idx], it.part[idx],
                                                   it.support_images, it.support_masks, np.random.default_rng(0),
                                                   "cpu", cfg.eval.batch_size)
        out[f"{label}_seconds_per_slice"] = (time.perf_counter() - t0) / len(idx)
    out["fast_mode"] = " ".join(FAST_TTT)
    out["slices_fast"] = len(it.z)
    return out


def part_ttt_dice(args: argparse.Namespace) -> dict[str, Any]:
    """Per-slice (paper) vs fast TTT Dice from one briefly trained tiny-ViT checkpoint, on the first query scan
    of fold 0 (liver and right kidney; 3D Dice per volume, mean over the two organs)."""
    from fsl_med.evaluation.metrics import confusion_counts
    from fsl_med.models.module import FewShotModule
    from fsl_med.train import train

    base = ["model.encoder.name=vit_tiny_patch14", "model.encoder.finetune=full", "optim.name=adamw",
            "optim.lr=0.001", "optim.weight_decay=0.0001", "optim.warmup_steps=20",
            f"trainer.max_steps={args.tiny_steps}", "trainer.val_check_interval=100000", "data.num_val_scans=0",
            "data.num_workers=0", "data.test_organs=[liver,right_kidney]", *args.set]
    cfg = _config(args, base)
    module = FewShotModule.from_config(cfg)
    train(cfg, module=module)
    _, items = _eval_items(args, base)
    seg = module.model.eval()
    plain, base_preds = [], []
    for it in items:
        protos = seg.support_prototypes(it.support_images, it.support_masks)
        pred, prob = seg.predict_volume(protos, it.query_images, it.part, cfg.eval.batch_size)
        base_preds.append((pred, prob))
        plain.append(confusion_counts(pred, it.query_labels).dice)
    out: dict[str, Any] = {"tiny_steps": args.tiny_steps, "organs": [it.organ for it in items],
                           "query": items[0].query_id, "plain_dice": 100 * float(np.mean(plain))}
    for label, overrides in (("paper", PAPER_TTT), ("fast", FAST_TTT)):
        ttt = _ttt_trainer(cfg, module, overrides)
        dice, secs, n = [], 0.0, 0
        for i, (it, (pred, prob)) in enumerate(zip(items, base_preds, strict=True)):
            t0 = time.perf_counter()
            tp, _ = ttt.refine(it.query_images, pred, prob, it.part, it.support_images, it.support_masks,
                               np.random.default_rng([cfg.seed, i]), "cpu", cfg.eval.batch_size)
            secs += time.perf_counter() - t0
            n += len(it.z)
            dice.append(confusion_counts(tp, it.query_labels).dice)
        out[f"{label}_dice"] = 100 * float(np.mean(dice))
        out[f"{label}_seconds_per_slice"] = secs / max(n, 1)
    return out


def run_part(args: argparse.Namespace) -> dict[str, Any]:
    """Run one part in this process; returns its figures with the peak resident memory (MB)."""
    torch.manual_seed(0)
    fn = {"matmul": part_matmul, "train_full": lambda a: part_train(a, "full"),
          "train_lora": lambda a: part_train(a, "lora"), "eval": part_eval, "ttt": part_ttt,
          "ttt_dice": part_ttt_dice}[args.part]
    res = fn(args)
    res.setdefault("peak_rss_mb", peak_rss_mb())
    return res


def _fmt(v: Any, nd: int = 3) -> str:
    return "–" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def _measurements_table(rows: list[tuple[Any, ...]], scaled: Callable[[float | None], float | None]) -> Table:
    """The main benchmark table: measurement, fsl_med, reference and target (as measured and scaled to this
    machine), the FLOP-bound fraction and the peak memory."""
    out = []
    for name, v, ref, tgt, fr, mem in rows:
        own = name.startswith("TTT, fast")  # its target is 1/5 of this run's own paper TTT: nothing to scale
        out.append({"measurement": name, "fsl_med": v, "reference": ref, "reference_scaled": scaled(ref),
                    "target": tgt, "target_scaled": None if own else scaled(tgt), "flop_bound": fr, "peak_rss_mb": mem})
    cols = (text("measurement", "measurement"), Column("fsl_med", "fsl_med", digits=3, csv_digits=None),
            Column("reference", "reference"), Column("reference_scaled", "reference scaled"), Column("target", "target"),
            Column("target_scaled", "target scaled"), Column("flop_bound", "of FLOP bound", digits=None),
            Column("peak_rss_mb", "peak RSS (MB)", digits=0))
    return Table(cols, tuple(out))


def _oversubscription_table(over: dict[str, dict[str, Any]]) -> Table:
    """Seconds per training step per OpenMP wait policy, idle and beside a busy process."""
    rows = [{"policy": policy if policy != "default" else "unset (libgomp default)",
             "idle": over.get(f"oversub_{policy}_idle", {}).get("wall_seconds_per_step"),
             "busy": over.get(f"oversub_{policy}_busy", {}).get("wall_seconds_per_step")}
            for policy in dict.fromkeys(p for p, _ in OVERSUB)]
    return Table((text("policy", "OMP_WAIT_POLICY"), Column("idle", "idle (s/step)", digits=3),
                  Column("busy", "beside a busy process (s/step)", digits=3)), tuple(rows))


HEAD_MEASUREMENTS = {"train_full": ("training step, full fine-tuning (s)", "seconds_per_step", "gflop_per_step"),
                     "eval": ("evaluation, per query slice incl. CCA (s)", "seconds_per_slice", "gflop_per_slice")}
"""The figure of each part of the ``heads`` rows: ``(measurement, seconds key, GFLOP key)``."""
REFINE_KEY = "refine_seconds_per_slice"
"""The ``eval`` figure of a head with a test-time refinement (Q-Net's prototypes): its seconds per refined query slice
(one per scored (organ, slice)), part of ``seconds_per_slice``; absent for heads without one."""
REFINE_TITLE = "  of which the head's test-time refinement, per query slice (s)"


def head_rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    """One training row and one evaluation row per head of ``res["heads"]`` (those measured), each with the head
    that was measured (as its child recorded it), the part's figure it shows (``figure``) and its time relative to
    ALP's (``vs_alp``, percent); a head whose evaluation has a test-time refinement (Q-Net) gets a third row right
    after its evaluation row, the refinement's seconds per query slice (``figure`` :data:`REFINE_KEY`, no ``vs_alp``)."""
    rows = []
    for part, (title, key, gkey) in HEAD_MEASUREMENTS.items():
        labels = [part] + [f"{part}_{h}" for h in res.get("heads", []) if h != BASE_HEAD]
        found = [(label, res["parts"][label]) for label in labels if label in res["parts"]]
        base = next((f.get(key) for _, f in found if f.get("head", BASE_HEAD) == BASE_HEAD), None)
        for label, f in found:
            head, v = f.get("head", BASE_HEAD), f.get(key)
            rows.append({"head": head, "measurement": title, "label": label, "figure": key, "seconds": v,
                         "vs_alp": None if head == BASE_HEAD or not base or v is None else 100 * (v / base - 1),
                         "gflop": f.get(gkey), "peak_rss_mb": f.get("peak_rss_mb"),
                         "head_parameters": f.get("head_parameters", [])})
            if f.get(REFINE_KEY) is not None:  # Q-Net: the refinement's share of that evaluation, on its own row
                rows.append({"head": head, "measurement": REFINE_TITLE, "label": label, "figure": REFINE_KEY,
                             "seconds": f[REFINE_KEY], "vs_alp": None, "gflop": None, "peak_rss_mb": None,
                             "head_parameters": f.get("head_parameters", [])})
    return rows if res.get("heads") else []


def _heads_table(rows: list[dict[str, Any]], frac: Callable[[float | None, float | None], str]) -> Table:
    """The ``heads`` rows: head, measurement, seconds, relative to ALP, GFLOP, FLOP-bound fraction, peak memory."""
    def vs(r: dict[str, Any]) -> str:
        return "–" if r.get("vs_alp") is None else f"{r['vs_alp']:+.1f} %"

    rows = [{**r, "flop_bound": frac(r["gflop"], r["seconds"])} for r in rows]
    cols = (text("head", "head"), text("measurement", "measurement"),
            Column("seconds", "fsl_med", digits=3, csv_digits=None), Column("vs_alp", "vs ALP", fmt=vs),
            Column("gflop", "GFLOP", digits=1), Column("flop_bound", "of FLOP bound", digits=None),
            Column("peak_rss_mb", "peak RSS (MB)", digits=0))
    return Table(cols, tuple(rows))


def write_report(res: dict[str, Any], out_dir: Path) -> Path:
    """``BENCHMARKS.md`` and ``benchmarks.json`` in ``out_dir``; returns the Markdown path."""
    mm = res["parts"].get("matmul") or {}
    g = mm.get("gflops")  # absent when --parts leaves matmul out: no FLOP-bound fractions, no scaling

    def frac(gflop: float | None, secs: float | None) -> str:
        return "–" if not gflop or not secs or not g else f"{100 * gflop / secs / g:.0f} %"

    tf, tl, ev, tt, td = (res["parts"].get(k, {}) for k in ("train_full", "train_lora", "eval", "ttt", "ttt_dice"))
    m = res["machine"]
    scale = None if m.get("cuda") or not g else REFERENCE_MATMUL_GFLOPS / g

    def scaled(v: float | None) -> float | None:
        return None if v is None or scale is None else v * scale
    rows = [
        ("training step, full fine-tuning (s)", tf.get("seconds_per_step"), REFERENCE["train_full"],
         TARGETS["train_full"], frac(tf.get("gflop_per_step"), tf.get("seconds_per_step")), tf.get("peak_rss_mb")),
        ("  wall time per step incl. data (s)", tf.get("wall_seconds_per_step"), REFERENCE["train_full_as_shipped"],
         None, frac(tf.get("gflop_per_step"), tf.get("wall_seconds_per_step")), None),
        ("training step, LoRA r=4 (s)", tl.get("seconds_per_step"), None, None,
         frac(tl.get("gflop_per_step"), tl.get("seconds_per_step")), tl.get("peak_rss_mb")),
        ("evaluation, per query slice incl. CCA (s)", ev.get("seconds_per_slice"), REFERENCE["eval_slice"],
         TARGETS["eval_slice"], frac(ev.get("gflop_per_slice"), ev.get("seconds_per_slice")), ev.get("peak_rss_mb")),
        ("  per encoded slice (query slices once per scan, support once per organ) (s)",
         ev.get("seconds_per_encoded_slice"), None, None,
         frac(ev.get("gflop_per_encoded_slice"), ev.get("seconds_per_encoded_slice")), None),
        *([(REFINE_TITLE, ev[REFINE_KEY], None, None, "–", None)] if ev.get(REFINE_KEY) is not None else []),
        ("evaluation, per query volume and organ (s)", ev.get("seconds_per_volume"), None, None, "–", None),
        ("TTT, paper (100 steps per slice), per slice (s)", tt.get("paper_seconds_per_slice"), REFERENCE["ttt_slice"],
         None, "–", tt.get("peak_rss_mb")),
        (f"TTT, fast ({' '.join(FAST_TTT)}), per slice (s)", tt.get("fast_seconds_per_slice"), None,
         (tt.get("paper_seconds_per_slice") or 0) / 5 or None, "–", None),
    ]
    if tf.get("floor_seconds_per_step"):
        rows.insert(2, ("  kernel floor: the step's matmul, convolution and attention kernels alone (s)",
                        tf["floor_seconds_per_step"], None, None,
                        frac(tf.get("gflop_per_step"), tf["floor_seconds_per_step"]), None))
    for key, title in (("train_full_compile", "training step, full, torch.compile (s)"),
                       ("train_full_bf16", "training step, full, bf16 autocast (s)"),
                       ("train_lora_bf16", "training step, LoRA, bf16 autocast (s)"),
                       ("eval_bf16", "evaluation per query slice, bf16 autocast (s)")):
        part = res["parts"].get(key)
        if part:
            v = part.get("seconds_per_step", part.get("seconds_per_slice"))
            fr = frac(part.get("gflop_per_step"), v) if key == "train_full_compile" else "–"
            rows.append((title, v, None, None, fr, part.get("peak_rss_mb")))
    table = _measurements_table(rows, scaled)
    lines = [
        "# Benchmarks", "",
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), "
        f"{'GPU ' + m['cuda'] if m['cuda'] else 'no GPU'}; torch {m['torch']}, Python {m['python']}, fsl_med {m['fsl_med']}. "
        + (f"Measured float32 matmul: {g:.1f} GFLOP/s (best of 30 products of 2048³; median "
         f"{mm['median_gflops']:.1f}). " if g else "Matmul throughput not measured (part `matmul` not run). ")
        + f"Written by `make bench` on {res['date']}.", "",
        f"Encoder `{res['encoder']}` (random init), few-shot head `{tf.get('head') or ev.get('head') or BASE_HEAD}`, "
        f"256 px, batch 1, data `{res['data']}`"
        + (f", config overrides `{' '.join(res['overrides'])}`" if res.get("overrides") else "")
        + ". Medians after warm-up; FLOP-bound fraction = model FLOPs / time / measured matmul throughput.", "",
        f"Reference and target are the figures of method.md §10, measured on a machine with a "
        f"{REFERENCE_MATMUL_GFLOPS:.0f} GFLOP/s matmul; 'scaled' multiplies them by {REFERENCE_MATMUL_GFLOPS:.0f} / "
        f"{_fmt(g, 1)} (an estimate for this machine, CPU only).", "",
        table.markdown(),
    ]
    lines += ["",
              f"GFLOP per training step {_fmt(tf.get('gflop_per_step'), 1)} (reference count 95.1); per encoded "
              f"slice {_fmt(ev.get('gflop_per_encoded_slice'), 1)} (reference count 15.9), per scored query slice "
              f"{_fmt(ev.get('gflop_per_slice'), 1)} ({ev.get('slices')} scored (organ, slice) pairs of "
              f"{ev.get('query_scans')} query scans, {ev.get('encoded_slices')} slices encoded). Episode preparation {_fmt(tf.get('data_seconds_per_episode'))} s "
              f"({tf.get('workers')} data worker(s), overlapped with compute). Reference peak memory: training/TTT "
              f"{REFERENCE['peak_train_mb']:.0f} MB, evaluation {REFERENCE['peak_eval_mb']:.0f} MB."]
    if tf.get("floor_seconds_per_step"):
        fl = tf["floor_seconds_per_step"]
        lines += ["", f"Kernel floor: the {tf['floor_kernel_calls']} FLOP-carrying kernel calls of one training step "
                  f"({tf['floor_kernels']} distinct op/shape signatures), each replayed alone and timed, take {fl:.3f} s "
                  f"({frac(tf.get('gflop_per_step'), fl)} of the FLOP bound): the fastest this step can be with this "
                  f"machine's matmul and attention kernels. The other {tf['seconds_per_step'] - fl:.3f} s of the measured "
                  f"step are elementwise work, normalisation, the {tf.get('head', BASE_HEAD)} head, the optimiser and "
                  "framework overhead."]
    for key, title in (("train_full_compile", "torch.compile (model.compile=default)"),
                       ("train_full_bf16", "bf16 autocast (trainer.precision=bf16-mixed)")):
        part = res["parts"].get(key)
        if part and tf.get("seconds_per_step"):
            lines += ["", f"{title}: first step {part['first_step_seconds']:.1f} s, then {part['seconds_per_step']:.3f} "
                      f"s per step against {tf['seconds_per_step']:.3f} s in float32 eager "
                      f"({tf['seconds_per_step'] / part['seconds_per_step']:.2f}x)."]
    hrows = head_rows(res)
    res["head_rows"] = hrows
    if hrows:
        names = ", ".join(f"`{h}`" for h in dict.fromkeys(r["head"] for r in hrows))
        lines += ["", f"Few-shot heads ({names}): a training step (full fine-tuning) and the evaluation per query "
                  "slice of each, on the same encoder and data, each head with its own defaults (`model.head.name="
                  "<head>`: its `loss.ce_weights` and `model.mask_pooling`). The `alp` rows are the table above's; "
                  "each other head was measured right after them. vs ALP: the head's time over ALP's, minus 1.", "",
                  _heads_table(hrows, frac).markdown()]
        for r in hrows:
            if r["figure"] == REFINE_KEY:
                f = res["parts"][r["label"]]
                lines += ["", f"`{r['head']}`'s test-time refinement (its prototypes optimised per query slice inside "
                          f"the prediction): {r['seconds']:.3f} s per query slice, "
                          f"{100 * r['seconds'] / f['seconds_per_slice']:.0f} % of its evaluation time per slice "
                          f"({f.get('refined_slices')} query slices refined per evaluation; median of the timed runs)."]
    over = {k: v for k, v in res["parts"].items() if k.startswith("oversub_")}
    if over:
        enc = next((o.split("=", 1)[1] for o in next(iter(over.values())).get("overrides", [])
                    if o.startswith("model.encoder.name=")), "?")
        lines += ["", f"CPU oversubscription: seconds per training step (median) of the demo's encoder `{enc}` "
                  f"(batch 1, 1 data worker, {m['torch_threads']} torch threads), on an idle machine and beside one "
                  "CPU-bound torch process (a second job). OpenMP threads that spin while they wait take the cores "
                  "from each other and from the other process; `fsl-med` sets `OMP_WAIT_POLICY=PASSIVE` before torch "
                  "loads unless it is set.", "", _oversubscription_table(over).markdown()]
    if td:
        lines += ["", f"TTT Dice, tiny ViT trained {td['tiny_steps']} steps, fold-0 query scan {td['query']}, organs "
                  f"{', '.join(td['organs'])}: plain {td['plain_dice']:.2f}, paper TTT {td['paper_dice']:.2f} "
                  f"({td['paper_seconds_per_slice']:.3f} s/slice), fast TTT {td['fast_dice']:.2f} "
                  f"({td['fast_seconds_per_slice']:.3f} s/slice): difference {abs(td['paper_dice'] - td['fast_dice']):.2f} "
                  f"points, {td['paper_seconds_per_slice'] / td['fast_seconds_per_slice']:.1f}x faster."]
    report_table.write_report(out_dir, "benchmarks", lines, table, res, md_name="BENCHMARKS.md")
    return out_dir / "BENCHMARKS.md"


Run = tuple[str, str, str, list[str], int, int]
"""One child process of :func:`run_bench`: ``(label, part, precision, overrides, timed steps, warm-up steps)``."""


def plan_runs(parts: tuple[str, ...], heads: tuple[str, ...] = (BASE_HEAD,), steps: int = 10, gpu: bool = False,
              overrides: tuple[str, ...] | list[str] = ()) -> list[Run]:
    """The child runs of ``parts``, in the order they run; ``overrides`` come first in every run's overrides.

    ``heads`` (with the ``heads`` part): each other head's ``train_full``/``eval`` run follows ALP's directly, so the
    two are measured minutes apart at most; ALP's runs are added where ``heads`` stands when ``parts`` lacks them.
    """
    pre = list(overrides)
    runs: list[Run] = []
    for p in parts:
        todo = [q for q in HEAD_PARTS if q not in parts] if p == "heads" else [p] if p in CHILD_PARTS else []
        for q in todo:
            runs.append((q, q, "32-true", pre, steps, 3))
            if "heads" in parts and q in HEAD_PARTS:
                runs += [(f"{q}_{h}", q, "32-true", [*pre, f"model.head.name={h}"], steps, 3)
                         for h in heads if h != BASE_HEAD]
    # the optional speed-ups, measured: full fine-tuning compiled, and in bf16 autocast (CPU and GPU);
    # on a GPU also LoRA training and evaluation in bf16. A CPU without bf16 units emulates it (~25x
    # slower here), so on a CPU it gets 1 warm-up and 3 timed steps.
    bf16 = ("train_full", "train_lora", "eval") if gpu else ("train_full",)
    runs += [(f"{p}_bf16", p, "bf16-mixed", pre, *((steps, 3) if gpu else (3, 1))) for p in parts if p in bf16]
    if "train_full" in parts:
        runs.append(("train_full_compile", "train_full", "32-true", [*pre, "model.compile=default"], steps, 3))
    if "oversubscription" in parts and not gpu:
        runs += [(f"oversub_{policy}_{'busy' if busy else 'idle'}", "train_full", "32-true",
                  [*pre, "model.encoder.name=vit_tiny_patch14"], 4 * steps, 5) for policy, busy in OVERSUB]
    return runs


def check_heads(data: str, encoder: str, heads: tuple[str, ...] | list[str] | None,
                overrides: tuple[str, ...] | list[str] = ()) -> tuple[str, ...]:
    """The heads to measure (``None``: every registered head), and the config of each with ``overrides`` loaded
    once, before anything runs. ConfigError: an unknown head, no head, or a bad override."""
    from fsl_med.errors import ConfigError
    from fsl_med.models.heads import list_heads
    from fsl_med.run_config import load_run_config

    names = list_heads()
    heads = tuple(names) if heads is None else tuple(dict.fromkeys(heads))
    if not heads:
        raise ConfigError(f"--heads: names no head (registered: {', '.join(names)})")
    unknown = [h for h in heads if h not in names]
    if unknown:
        raise ConfigError(f"--heads: unknown head(s) {', '.join(unknown)} (registered: {', '.join(names)})")
    for h in dict.fromkeys((BASE_HEAD, *heads)):  # what every child loads: a bad override is one line here
        load_run_config(REPO / "experiments" / "mri.yaml", [f"data.root={data}", f"model.encoder.name={encoder}",
                                                            "model.encoder.weights=none", *overrides,
                                                            *([f"model.head.name={h}"] if h != BASE_HEAD else [])])
    return heads


def run_bench(data: str, out_dir: str | Path = ".", parts: tuple[str, ...] = PARTS, encoder: str = "dinov2_vits14",
              steps: int = 10, workers: int = 1, tiny_steps: int = 300, cache_dir: str | None = None,
              heads: tuple[str, ...] | list[str] | None = None, overrides: tuple[str, ...] | list[str] = ()) -> Path:
    """Run every part in a fresh process and write the report; returns the path of ``BENCHMARKS.md``.

    ``heads``: the few-shot heads of the ``heads`` part (``None``: every registered head; ALP's rows are always
    measured, the others are compared with them). ``overrides``: ``key=value`` config overrides of every part
    (``model.head.*`` included), before each part's own.
    """
    from fsl_med.errors import FslMedError

    out = Path(out_dir)
    cache = cache_dir or os.environ.get("FSL_MED_CACHE") or ".cache/fsl_med"
    heads = check_heads(str(data), encoder, heads, overrides)
    res: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M"), "encoder": encoder, "data": str(data),
                           "machine": machine_info(), "overrides": list(overrides),
                           "heads": list(heads) if "heads" in parts else [], "parts": {}}
    with tempfile.TemporaryDirectory(prefix="fsl_med_bench_") as work:
        gpu = torch.cuda.is_available()
        runs = plan_runs(parts, heads, steps, gpu, overrides)
        default_env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}  # a job with default settings
        envs: dict[str, tuple[dict[str, str], bool]] = {
            f"oversub_{policy}_{'busy' if busy else 'idle'}":
                ({**default_env, **({"OMP_WAIT_POLICY": policy} if policy != "default" else {})}, busy)
            for policy, busy in OVERSUB}
        for label, part, precision, run_overrides, n_steps, warmup in runs:
            cmd = [sys.executable, "-m", "fsl_med.bench", part, "--data", str(data), "--encoder", encoder,
                   "--steps", str(n_steps), "--warmup", str(warmup), "--workers", str(workers),
                   "--tiny-steps", str(tiny_steps), "--cache-dir", cache, "--work", work, "--precision", precision,
                   "--set", *run_overrides]
            print(f"bench: {label} ...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            env, busy = envs.get(label, (None, False))
            rival = subprocess.Popen([sys.executable, "-c", BUSY], env=default_env) if busy else None
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, env=env)
            finally:
                if rival is not None:
                    rival.kill()
                    rival.wait()
            if p.returncode != 0:
                tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
                raise FslMedError(f"bench part '{label}' failed: {tail}")
            res["parts"][label] = json.loads(p.stdout.strip().splitlines()[-1])
            print(f"bench: {label} done in {time.perf_counter() - t0:.0f} s: {res['parts'][label]}", file=sys.stderr)
    return write_report(res, out)


def main(argv: list[str] | None = None) -> int:
    """Child entry point: ``python -m fsl_med.bench PART ...`` prints the part's JSON."""
    p = argparse.ArgumentParser(prog="fsl_med.bench")
    p.add_argument("part", choices=CHILD_PARTS)
    p.add_argument("--data", required=True)
    p.add_argument("--encoder", default="dinov2_vits14")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3, help="training steps before the timed ones")
    p.add_argument("--eval-repeats", type=int, default=3, help="timed evaluations of eval (after one untimed)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--tiny-steps", type=int, default=300)
    p.add_argument("--precision", default="32-true")
    p.add_argument("--set", nargs="*", default=[], help="extra config overrides of the part (key=value)")
    p.add_argument("--cache-dir", default=".cache/fsl_med")
    p.add_argument("--work", required=True)
    args = p.parse_args(argv)
    if args.eval_repeats < 1:
        p.error(f"--eval-repeats {args.eval_repeats}: need >= 1")
    import logging
    import warnings

    from fsl_med.errors import FslMedError

    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    try:
        res = run_part(args)
    except FslMedError as e:  # a bad override: one line, which the parent quotes
        print(f"fsl_med.bench: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
