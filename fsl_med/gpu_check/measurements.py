"""What each row runs and measures: one function per kind of row, ``row_<kind>(state, row, ...)``, filling
``row.figures`` (a ``"_status"`` figure replaces the row's ``ok``) and raising on failure. Which rows exist, in
which order and with which arguments is the table of :mod:`fsl_med.gpu_check.rows`."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fsl_med.gpu_check.state import NO_CUDA, CheckState, Row, alarm_deferred, head_figures, median
from fsl_med.gpu_check.workers import JobProcess, await_all
from fsl_med.measure import count_flops, machine_info, matmul_throughput, sync

DICE_TOLERANCE = 1e-3
"""Largest allowed difference between a device and a CPU evaluation of one checkpoint (Dice as a fraction)."""


def _changed(volumes: list[dict[str, Any]], variant: str) -> str:
    """``"k of n"``: the volumes whose ``variant`` prediction differs from the plain one (TP/FP/FN)."""
    counts = {(v["organ"], v["query"], v["variant"]): (v["tp"], v["fp"], v["fn"]) for v in volumes}
    keys = [k for k in counts if k[2] == "plain"]
    return f"{sum(counts[k] != counts[(k[0], k[1], variant)] for k in keys)} of {len(keys)}"


def _with(cfg: Any, **values: Any) -> Any:
    from fsl_med.config import apply_overrides

    return apply_overrides(cfg, [f"{k}={v}" for k, v in values.items()])


def row_env(st: CheckState, row: Row) -> None:
    """Machine, GPU and library versions; the bf16 and fp32 matmul throughput, whose faster is the bound every
    fraction of the report is taken against (``st.bound``)."""
    f = row.figures
    f.update(machine_info())
    import lightning
    import timm

    f.update(lightning=lightning.__version__, timm=timm.__version__, device=st.device,
             profile=st.profile.name)
    if st.cuda:
        p = torch.cuda.get_device_properties(0)
        f.update(gpu=p.name, gpu_memory_gib=p.total_memory / 2**30, multiprocessors=p.multi_processor_count,
                 compute_capability=f"{p.major}.{p.minor}", cuda_version=torch.version.cuda,
                 cudnn=torch.backends.cudnn.version(), bf16_supported=torch.cuda.is_bf16_supported(),
                 tf32_matmul=torch.backends.cuda.matmul.allow_tf32, tf32_cudnn=torch.backends.cudnn.allow_tf32)
    else:
        f.update(gpu=NO_CUDA, cuda_version=NO_CUDA, bf16_supported="emulated on this CPU (no CUDA)")
    n = st.profile.matmul_n
    bf = matmul_throughput(st.device, torch.bfloat16, n=n, repeats=10, warmup=3)
    fp = matmul_throughput(st.device, torch.float32, n=n, repeats=5, warmup=2)
    f.update(matmul_n=n, bf16_matmul_tflops=bf["best"] / 1e12, bf16_matmul_median_tflops=bf["median"] / 1e12,
             fp32_matmul_tflops=fp["best"] / 1e12)
    st.bound = max(bf["best"], fp["best"])
    f["bound_tflops"] = st.bound / 1e12
    st.env = f


def loader_rate(dm: Any, batch: int, seconds: float = 3.0) -> dict[str, Any]:
    """Episodes per second of the training DataLoader as configured (workers, pinned memory), measured
    after its start-up and its prefetched batches, for about ``seconds`` (at least 3 batches)."""
    dl = dm.episode_loader(total_steps=10_000)
    nw = dl.num_workers
    it = iter(dl)
    for _ in range(nw * (dl.prefetch_factor or 2) + 1 if nw else 1):
        next(it)
    got, t0 = 0, time.perf_counter()
    while got < 3 or (time.perf_counter() - t0 < seconds and got < 100):
        next(it)
        got += 1
    dt = time.perf_counter() - t0
    del it
    return {"loader_workers": nw, "loader_pinned": bool(dl.pin_memory), "loader_episodes_per_s": got * batch / dt}


def row_train(st: CheckState, row: Row, encoder: str, precision: str, compile_mode: str, batch: int,
              head: str | None = None) -> tuple[Any, Any]:
    """Seconds per training step through Lightning (median after warm-up), FLOPs, peak memory and the
    data pipeline: the wait between steps and the configured DataLoader's episodes per second (not for a
    ``head`` row: the data do not depend on the head). ``head``: ``model.head.name`` of this row (after the
    user's overrides). Returns the trained module and its config."""
    from fsl_med.models.module import FewShotModule
    from fsl_med.runs import make_trainer, new_run_dir
    from fsl_med.train import StepTimer

    p = st.profile
    enc = p.large if encoder == "large" else p.small
    cfg = st.config([*enc, f"trainer.precision={precision}", f"model.compile={compile_mode}",
                     f"data.batch_size={batch}", f"trainer.max_steps={p.warmup + p.steps}",
                     "data.num_val_scans=0", *([f"model.head.name={head}"] if head else [])])
    dm = st.data_module(cfg)
    module = FewShotModule.from_config(cfg)
    f = row.figures
    f.update(head_figures(module.model), encoder=cfg.model.encoder.name, finetune=cfg.model.encoder.finetune,
             precision=precision, compile=compile_mode, batch=batch, workers=cfg.data.num_workers)
    if head is None:
        f.update(loader_rate(dm, batch))
    key = (f"{cfg.model.encoder.name}/{cfg.model.encoder.finetune}/{module.model.head.name}", batch)
    if key not in st.flops and compile_mode == "off":
        from torch.utils.data import default_collate

        b = default_collate([dm.train_set[i] for i in range(batch)])
        module.to(st.device)
        b = {k: v.to(st.device) for k, v in b.items()}

        def step() -> None:
            loss, _, _ = module.model.episode_loss(b["support_image"], b["support_mask"], b["query_image"],
                                                   b["query_label"], module.ce_weights, cfg.loss.align_weight)
            loss.backward()

        st.flops[key] = count_flops(step)
        module.zero_grad(set_to_none=True)
        del b
        st.cleanup()
    timer = StepTimer(synchronize=True)  # the device's seconds per step (kernels, not their launch)
    trainer = make_trainer(cfg, new_run_dir(st.work / "runs", f"train-{row.key}"), with_val=False,
                           extra_callbacks=[timer], progress_bar=False)
    trainer.fit(module, datamodule=dm)
    secs = median(timer.times[p.warmup:])
    wait = median(timer.gaps[p.warmup:]) if len(timer.gaps) > p.warmup else median(timer.gaps)
    flops = st.flops.get(key)
    f.update(seconds_per_step=secs, steps_per_s=1 / secs if secs else None,
             episodes_per_s=batch / secs if secs else None, first_step_seconds=timer.times[0],
             steps=len(timer.times), gflop_per_step=flops / 1e9 if flops else None,
             bound_fraction=flops / secs / st.bound if flops and secs and st.bound else None,
             wait_seconds_per_step=wait)
    f.update(st.peak_memory())
    rate = f.get("loader_episodes_per_s")
    if rate is not None and f["episodes_per_s"]:
        f["data_keeps_up"] = bool(rate >= f["episodes_per_s"])
        f["workers_needed"] = math.ceil(f["episodes_per_s"] / (rate / max(1, f["loader_workers"])))
    if compile_mode != "off":
        torch._dynamo.reset()
    return module, cfg


def row_head(st: CheckState, row: Row, head: str) -> None:
    """The small encoder with head ``head``: training steps in bf16-mixed (:func:`row_train`), then the
    prediction of the first query volume on the device under the same autocast. The prediction must be binary,
    its probabilities finite and in [0, 1]. A head with a test-time refinement (Q-Net) also gives its seconds
    per query slice (``refine_seconds_per_slice``, part of ``predict_seconds_per_slice``)."""
    from fsl_med.data.datamodule import FewShotDataModule

    precision = "bf16-mixed"
    module, cfg = row_train(st, row, "small", precision, "off", st.profile.batch_sizes[0], head=head)
    dm = FewShotDataModule(cfg)
    dm.setup("test")
    it = dm.test_set.items[0]
    module.to(st.device).eval()
    seg = module.model
    timed = hasattr(seg.head, "reset_refine_timing")  # a head with a test-time refinement (Q-Net)
    if timed:
        seg.head.reset_refine_timing()
    with torch.autocast(st.device, dtype=torch.bfloat16):
        sync(st.device)
        t0 = time.perf_counter()
        protos = seg.support_prototypes(it.support_images, it.support_masks, st.device, it.shots)
        pred, prob = seg.predict_volume(protos, it.query_images, it.part, cfg.eval.batch_size, st.device)
        sync(st.device)
        dt = time.perf_counter() - t0
    f = row.figures
    f.update(head_figures(seg), predict_slices=len(it.z), predict_seconds_per_slice=dt / max(1, len(it.z)),
             predict_foreground=float(np.mean(pred)), predict_prob_min=float(np.min(prob)),
             predict_prob_max=float(np.max(prob)), organ=it.organ, query=it.query_id)
    if timed:  # part of predict_seconds_per_slice
        n = int(seg.head.refined_slices)
        f.update(refined_slices=n, refine_seconds_per_slice=float(seg.head.refine_seconds) / n if n else None)
    if pred.shape != it.query_labels.shape or not np.isin(pred, (0, 1)).all():
        raise RuntimeError(f"head {head}: prediction of shape {pred.shape} with values {np.unique(pred)[:5]} "
                           f"(expected binary, {it.query_labels.shape})")
    if not (np.isfinite(prob).all() and prob.min() >= 0 and prob.max() <= 1):
        raise RuntimeError(f"head {head}: probabilities outside [0, 1] or not finite")


def row_jobs(st: CheckState, row: Row, batch: int) -> None:
    """Total training episodes per second of 1, 2, 4 (``profile.jobs``) concurrent training processes on the
    device: the large encoder, bf16-mixed, batch ``batch``, through Lightning with the configured DataLoader.

    ``max(jobs)`` processes start at once (this module's ``--jobs-worker``); each builds its model and trains
    ``warmup`` steps, then waits. For each count n, the first n processes are released together and each trains
    ``jobs_steps`` steps; the others wait, idle. Total episodes/s = (sum of batch x steps) / (the last end - the
    first start); the speed-up is relative to one process. Peak GPU memory is per process and count (CUDA; without
    CUDA the processes' peak RSS). The row's time limit or any error kills every process (their DataLoader workers
    with them: each runs in its own process group)."""
    p = st.profile
    extra = [*p.large, "trainer.precision=bf16-mixed", "model.compile=off", f"data.batch_size={batch}",
             "data.num_val_scans=0"]
    cfg = st.config(extra)
    st.data_module(cfg)  # superpixels computed once, before the processes read them
    counts = sorted(set(p.jobs))
    f = row.figures
    f.update(head=cfg.model.head.name, encoder=cfg.model.encoder.name, finetune=cfg.model.encoder.finetune,
             precision="bf16-mixed", batch=batch, workers=cfg.data.num_workers, warmup_steps=p.warmup,
             steps_per_process=p.jobs_steps, jobs=counts)
    from fsl_med.runs import new_run_dir

    folder = st.work / row.key
    folder.mkdir(parents=True, exist_ok=True)
    procs: list[JobProcess] = []
    try:
        for i in range(counts[-1]):
            rounds = sum(n > i for n in counts)
            spec = {"overrides": st.config_overrides([*extra, f"trainer.max_steps={p.warmup + p.jobs_steps * rounds}"]),
                    "warmup": p.warmup, "steps": p.jobs_steps, "rounds": rounds, "batch": batch,
                    "run_dir": str(new_run_dir(st.work / "runs", f"{row.key}-{i}"))}
            with alarm_deferred():  # a process started is always in `procs`, whose end the `finally` sees to
                procs.append(JobProcess.start(i, spec, folder))
        f["process_ids"] = [pr.proc.pid for pr in procs]  # the report names them even if the row fails
        await_all(procs, "ready")  # every process built and warmed up
        results: list[dict[str, Any]] = []
        for n in counts:
            active = procs[:n]
            await_all([pr for pr in active if not pr.armed], "ready")
            for pr in active:  # the common start
                pr.go()
            done = await_all(active, "done")
            t0, t1 = min(m["t0"] for m in done), max(m["t1"] for m in done)
            episodes = sum(m["episodes"] for m in done)
            res: dict[str, Any] = {
                "jobs": n, "episodes_per_s": episodes / (t1 - t0), "window_s": t1 - t0, "episodes": episodes,
                "per_process_episodes_per_s": [m["episodes"] / (m["t1"] - m["t0"]) for m in done]}
            res["speedup"] = res["episodes_per_s"] / results[0]["episodes_per_s"] if results else 1.0
            if st.cuda:
                res["peak_gpu_mb"] = [m["peak_gpu_mb"] for m in done]
            else:
                res.update(peak_gpu_mb=NO_CUDA, peak_rss_mb=[m["peak_rss_mb"] for m in done])
            results.append(res)
            f["concurrent"] = results
        best = max(results, key=lambda r: r["episodes_per_s"])
        f.update(best_jobs=best["jobs"], best_episodes_per_s=best["episodes_per_s"],
                 suggested_jobs_per_gpu=best["jobs"])
    finally:
        for pr in procs:
            pr.kill()


def row_ckpt(st: CheckState, row: Row) -> None:
    """The ``train`` verb for a few steps with validation: the checkpoint every evaluation row loads."""
    from fsl_med.models.module import FewShotModule
    from fsl_med.train import train

    p = st.profile
    cfg = st.config([*p.large, f"trainer.max_steps={p.ckpt_steps}", f"trainer.val_check_interval={p.ckpt_steps}",
                     "data.num_val_scans=1", "name=gpu-check", "trainer.precision=32-true"])
    module = FewShotModule.from_config(cfg)
    res = train(cfg, module=module, sync_timing=True)  # its seconds per step are reported
    st.ckpt = res.last_ckpt
    row.figures.update(head_figures(module.model), steps=res.steps, seconds_per_step=res.seconds_per_step,
                       val_dice=res.val_dice, checkpoint=res.last_ckpt.name)
    st.ckpt_head = module.model.head.name


def row_eval(st: CheckState, row: Row) -> None:
    """The ``eval`` verb on the device: fold 0, all four variants, TTT in the fast (per-volume) mode."""
    from fsl_med.evaluate import evaluate

    cfg = st.eval_config(["eval.variants=[plain,cca,ttt,ttt_cca]", "ttt.mode=volume",
                          f"ttt.steps={st.profile.ttt_steps}"])
    results = evaluate(cfg).results
    plain = [v for v in results["volumes"] if v["variant"] == "plain"]
    slices = sum(v["slices"] for v in plain)
    f = row.figures
    f["head"] = results["config"]["model"]["head"]["name"]  # the config evaluate built the model from
    f.update({f"dice_{k}": s["dice_mean"] for k, s in results["variants"].items()})
    f.update(volumes=len(plain), scored_slices=slices, query_scans=sorted({v["query"] for v in plain}),
             seconds_per_slice=sum(v["seconds"] for v in plain) / max(slices, 1),
             seconds_per_volume=results["variants"]["plain"]["seconds_per_volume"],
             ttt_mode=f"volume, {st.profile.ttt_steps} steps",
             ttt_changed_volumes=_changed(results["volumes"], "ttt"),
             ttt_seconds_per_slice=results["ttt_seconds_per_slice"])


def row_ttt_paper(st: CheckState, row: Row) -> None:
    """The paper's TTT (per slice, ``ttt_steps`` steps) on a few slices of the first query volume."""
    from fsl_med.checkpoints import module_from_checkpoint
    from fsl_med.data.datamodule import FewShotDataModule
    from fsl_med.refine.ttt import TestTimeTrainer

    cfg = st.eval_config(["ttt.mode=slice", f"ttt.steps={st.profile.ttt_steps}"])
    dm = FewShotDataModule(cfg)
    dm.setup("test")
    it = dm.test_set.items[0]
    module, _ = module_from_checkpoint(st.ckpt, cfg)
    module.to(st.device).eval()
    seg = module.model
    row.figures.update(head_figures(seg))
    protos = seg.support_prototypes(it.support_images, it.support_masks, st.device, it.shots)
    pred, prob = seg.predict_volume(protos, it.query_images, it.part, cfg.eval.batch_size, st.device)
    n = min(st.profile.paper_ttt_slices, len(it.z))
    idx = np.arange(len(it.z) // 2 - n // 2, len(it.z) // 2 - n // 2 + n)
    fg = pred[idx].copy()
    h, w = fg.shape[-2:]
    fg[:, h * 2 // 5:h * 3 // 5, w * 2 // 5:w * 3 // 5] = 1  # every slice is adapted (empty ones are skipped)
    ttt = TestTimeTrainer.from_config(seg, cfg, module.ce_weights)
    sync(st.device)
    t0 = time.perf_counter()
    ttt.refine(it.query_images[idx], fg, prob[idx], it.part[idx], it.support_images, it.support_masks,
               np.random.default_rng(0), st.device, cfg.eval.batch_size, shots=it.shots)
    sync(st.device)
    dt = time.perf_counter() - t0
    row.figures.update(slices=n, steps_per_slice=st.profile.ttt_steps, ttt_seconds_per_slice=dt / n,
                       seconds_per_ttt_step=dt / n / max(1, st.profile.ttt_steps), organ=it.organ,
                       query=it.query_id)
    row.figures.update(st.peak_memory())


def subset_dice(st: CheckState, accelerator: str) -> tuple[dict[str, float], str, str]:
    """Per-(organ, variant) Dice of the first query scan, plain and +CCA, through Lightning's test loop; the query
    and the model's head."""
    from fsl_med.checkpoints import module_from_checkpoint
    from fsl_med.data.datamodule import EvalDataset, FewShotDataModule
    from fsl_med.evaluation.scoring import Scoring
    from fsl_med.refine.cca import CCA
    from fsl_med.runs import make_trainer, new_run_dir

    cfg = st.eval_config(["eval.variants=[plain,cca]", f"trainer.accelerator={accelerator}",
                          "trainer.devices=1", "trainer.strategy=auto", "eval.overlay_slices=0"])
    module, _ = module_from_checkpoint(st.ckpt, cfg)
    dm = FewShotDataModule(cfg)
    dm.setup("test")
    query = dm.test_set.items[0].query_id
    dm.test_set = EvalDataset([it for it in dm.test_set.items if it.query_id == query])
    scoring = Scoring(["plain", "cca"], hd95=False)
    trainer = make_trainer(cfg, new_run_dir(st.work / "runs", f"subset-{accelerator}"), with_val=False,
                           progress_bar=False, extra_callbacks=[CCA(cfg.eval.cca_mode), scoring])
    trainer.test(module, datamodule=dm, verbose=False)
    return {f"{r.organ}/{r.variant}": r.counts.dice for r in scoring.results["test"]}, query, module.model.head.name


def row_eval_vs_cpu(st: CheckState, row: Row) -> None:
    """One query scan evaluated on the device and on the CPU (fp32, plain and +CCA): Dice must agree."""
    dev, query, head = subset_dice(st, "auto")
    cpu, _, _ = subset_dice(st, "cpu")
    if sorted(dev) != sorted(cpu):
        raise RuntimeError(f"device and CPU scored different volumes: {sorted(dev)} vs {sorted(cpu)}")
    diff = max(abs(dev[k] - cpu[k]) for k in dev)
    f = row.figures
    f.update(head=head, query=query, volumes=len(dev), device=st.device, max_abs_dice_diff=diff,
             dice_device={k: 100 * v for k, v in dev.items()}, dice_cpu={k: 100 * v for k, v in cpu.items()})
    if not st.cuda:
        f["note"] = "no CUDA: the device run was on the CPU too"
    if diff > DICE_TOLERANCE:
        raise RuntimeError(f"device and CPU Dice differ by {diff:.2e} > {DICE_TOLERANCE:g} (query {query})")


def row_segment_vs_cpu(st: CheckState, row: Row) -> None:
    """``fsl-med segment`` of one query volume (liver, the fold's support scan) on the device and on the CPU:
    the two outputs must be identical."""
    from fsl_med.prepare.datasets import discover_scans, fold_split, get_dataset_info
    from fsl_med.prepare.nifti import read_nifti
    from fsl_med.segment import segment

    split = fold_split(get_dataset_info("chaos_t2"), discover_scans(st.data), 0)
    root = Path(st.data)
    sup, query = split.support, split.query[0]
    out: dict[str, tuple[np.ndarray, float]] = {}
    for run, dev in (("device", st.device), ("cpu", "cpu")):  # two runs, also when the device is the CPU
        sync(st.device)
        t0 = time.perf_counter()
        res = segment(st.ckpt, root / f"image_{sup}.nii.gz", root / f"label_{sup}.nii.gz",
                      root / f"image_{query}.nii.gz", st.work / f"segment-{run}.nii.gz", label=1, batch_size=8,
                      device=dev, plan="mri")
        sync(st.device)
        out[run] = (read_nifti(res.path)[0], time.perf_counter() - t0)
    a, b = out["device"][0], out["cpu"][0]
    differ = int(np.count_nonzero(a != b))
    f = row.figures
    f.update(head=st.ckpt_head, support=sup, query=query, organ="liver", shape=list(a.shape),
             voxels_device=int(a.sum()),
             voxels_cpu=int(b.sum()), voxels_differing=differ, identical=differ == 0,
             seconds_device=out["device"][1], seconds_cpu=out["cpu"][1])
    if not st.cuda:
        f["note"] = "no CUDA: the device run was on the CPU too"
    if differ:
        raise RuntimeError(f"segment on {st.device} and on the CPU differ in {differ} voxels")


def row_ddp(st: CheckState, row: Row) -> None:
    """``trainer.strategy=ddp`` in one process (NCCL on CUDA, gloo without): train, then evaluate, with
    the cross-rank gather of the evaluation."""
    import torch.distributed as dist

    from fsl_med.evaluate import evaluate
    from fsl_med.models.module import FewShotModule
    from fsl_med.train import train

    p = st.profile
    env = dict(os.environ)
    try:
        cfg = st.config([*p.small, "trainer.strategy=ddp", "trainer.devices=1", "trainer.max_steps=2",
                         "trainer.val_check_interval=2", "data.num_val_scans=1", "name=gpu-check-ddp",
                         "eval.variants=[plain,cca]", "eval.overlay_slices=0"])
        module = FewShotModule.from_config(cfg)
        res = train(cfg, module=module)
        results = evaluate(_with(cfg, ckpt=str(res.last_ckpt))).results
        row.figures.update(head=module.model.head.name, backend="nccl" if st.cuda else "gloo", steps=res.steps,
                           val_dice=res.val_dice,
                           dice_plain=results["variants"]["plain"]["dice_mean"],
                           volumes=len([v for v in results["volumes"] if v["variant"] == "plain"]))
        if not st.cuda:
            row.figures["_status"] = "ok (gloo; NCCL skipped: no CUDA)"
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(env)
