"""The LightningModule: losses, optimiser and schedule, training and EP1 validation/test steps."""

from __future__ import annotations

import logging
import sys
import time
import zlib
from typing import Any

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig
from tqdm import tqdm

from fsl_med.config import VARIANTS, from_container, to_container
from fsl_med.data.datamodule import EvalItem
from fsl_med.data.provenance import CHECKPOINT_KEY, TrainedOn
from fsl_med.errors import TrainingDiverged
from fsl_med.evaluation.metrics import VolumeResult, confusion_counts, hd95, summarize
from fsl_med.models.encoders import create_encoder
from fsl_med.models.segmenter import FewShotSegmenter, QueryFeatureCache
from fsl_med.refine.cca import largest_mass_component
from fsl_med.refine.ttt import TestTimeTrainer

log = logging.getLogger(__name__)


def dice_metric_name(stage: str, variant: str, first: bool) -> str:
    """Name of a logged mean Dice: ``<stage>/dice`` for the first variant, ``<stage>/dice_<variant>`` otherwise."""
    return f"{stage}/dice" if first else f"{stage}/dice_{variant}"


def logged_dice_metrics(cfg: DictConfig) -> set[str]:
    """The mean-Dice metric names a run of ``cfg`` logs (``fsl-med run``: validation, then test)."""
    variants = list(cfg.eval.variants)
    return {"val/dice"} | {dice_metric_name("test", v, j == 0) for j, v in enumerate(variants)}


def _scan_key(scan_id: str) -> tuple[int, int, str]:
    return (0, int(scan_id), scan_id) if scan_id.isdigit() else (1, 0, scan_id)


def build_segmenter(cfg: DictConfig, weights: str | None = None) -> FewShotSegmenter:
    """The segmenter described by ``cfg.model`` (``weights`` overrides ``model.encoder.weights``); with
    ``model.compile`` other than ``off`` the encoder is compiled in place with that ``torch.compile`` mode
    (compiled on its first call; the state dict keeps the eager names)."""
    e = cfg.model.encoder
    encoder = create_encoder(
        e.name, weights=e.weights if weights is None else weights, finetune=e.finetune, lora_rank=e.lora_rank,
        lora_targets=list(e.lora_targets), feature_size=cfg.model.feature_size, input_size=cfg.data.image_size,
        adapter=e.adapter, imagenet_norm=e.imagenet_norm,
    )
    m = cfg.model
    if m.compile != "off":
        # in place (nn.Module.compile): parameter names and checkpoints are those of the eager model
        encoder.compile(mode=m.compile)
    return FewShotSegmenter(encoder, m.feature_size, m.proto_grid, m.test_window, m.fg_thresh, m.bg_thresh,
                            m.scale, m.mask_downsample)


class FewShotModule(L.LightningModule):
    """DINOv2 (or any registered encoder) + ALPNet, trained on self-supervised episodes.

    Args:
        config: the resolved run configuration as a plain dict (``fsl_med.config.to_container``); it is
            saved in every checkpoint under ``hyper_parameters.config``.
        weights: override of ``model.encoder.weights`` at construction (e.g. ``"none"`` when the weights
            come from a checkpoint anyway).

    Logged metrics: ``train/loss``, ``train/ce``, ``train/align``, ``val/dice``, ``val/dice_<organ>`` (plain
    prediction), ``test/dice``, ``test/dice_<organ>`` (first of ``eval.variants``) and
    ``test/dice_<variant>[_<organ>]`` for the other variants (``cca``, ``ttt``, ``ttt_cca``).
    """

    def __init__(self, config: dict[str, Any], weights: str | None = None) -> None:
        super().__init__()
        self.save_hyperparameters({"config": config})
        self.cfg = from_container(config)
        self.model = build_segmenter(self.cfg, weights)
        self.register_buffer("ce_weights", torch.tensor(list(self.cfg.loss.ce_weights), dtype=torch.float32),
                             persistent=False)
        self._results: dict[str, list[VolumeResult]] = {"val": [], "test": []}
        self.last_results: dict[str, list[VolumeResult]] = {"val": [], "test": []}
        self._protos: dict[tuple[str, str], list] = {}  # (support scan, organ) -> prototypes per part
        self._qcache: QueryFeatureCache | None = None  # query-slice features of the current query scan
        # evaluation variants: validation (checkpoint selection) is plain; test runs eval.variants
        self.variants: dict[str, list[str]] = {"val": ["plain"], "test": list(self.cfg.eval.variants)}
        self.ttt_stats: dict[str, dict[str, float]] = {s: {"seconds": 0.0, "slices": 0} for s in ("val", "test")}
        self.samples: list[dict[str, Any]] = []  # overlay slices of the last test run
        self._ttt: TestTimeTrainer | None = None
        self.trained_on: TrainedOn | None = None  # the data trained on (set when training starts; in checkpoints)
        self._restored_on: TrainedOn | None = None  # the record of a checkpoint training resumes from

    @classmethod
    def from_config(cls, cfg: DictConfig, weights: str | None = None) -> FewShotModule:
        """Build from a ``DictConfig``."""
        return cls(to_container(cfg), weights=weights)

    # -- training -----------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """A batch of B independent episodes; all 2B images go through the encoder in one call."""
        b = batch["support_image"].shape[0]
        loss, ce, align = self.model.episode_loss(batch["support_image"], batch["support_mask"], batch["query_image"],
                                                  batch["query_label"], self.ce_weights, self.cfg.loss.align_weight)
        if not bool(torch.isfinite(loss)):  # one host sync per step; Lightning's detect_anomaly is far slower
            raise TrainingDiverged(self._diverged(f"loss ({float(loss.detach())})", batch))
        self.log_dict({"train/loss": loss, "train/ce": ce, "train/align": align}, prog_bar=True, batch_size=b)
        self._last_episodes = {k: batch[k] for k in ("scan", "z", "superpixel") if k in batch}
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Stop before a non-finite gradient reaches the weights (not with fp16's loss scaling, which skips
        such steps by design)."""
        if str(self.trainer.precision).startswith("16"):
            return
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if not grads:
            return
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach()).float() for g in grads])) \
            if not hasattr(torch.nn.utils, "get_total_norm") else torch.nn.utils.get_total_norm(grads)
        if not bool(torch.isfinite(norm)):
            raise TrainingDiverged(self._diverged("gradient", getattr(self, "_last_episodes", None)))

    def _diverged(self, what: str, batch: dict[str, Any] | None) -> str:
        """One line: the step, the episode(s) (training scan ids, slices, superpixels) and what to change."""
        step = int(self.trainer.global_step) + 1 if self._trainer is not None else 0
        episodes = "unknown"
        if batch is not None and "scan" in batch:
            dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
            ids = list(getattr(dm, "train_ids", []) or [])
            scans = [int(v) for v in torch.as_tensor(batch["scan"]).reshape(-1)]
            zs = [int(v) for v in torch.as_tensor(batch["z"]).reshape(-1)]
            sps = [int(v) for v in torch.as_tensor(batch["superpixel"]).reshape(-1)] if "superpixel" in batch \
                else [None] * len(scans)
            episodes = ", ".join(f"scan {ids[v] if v < len(ids) else v} slice {z} superpixel {sp}"
                                 for v, z, sp in zip(scans, zs, sps, strict=False))
        return (f"training stopped: non-finite {what} at step {step}; episode(s): {episodes}; lower optim.lr, "
                "set trainer.gradient_clip_val, or check these scans' intensities")

    def configure_optimizers(self) -> dict[str, Any]:
        """SGD (reference) or AdamW, with linear warm-up and ×gamma every ``lr_step`` steps."""
        o = self.cfg.optim
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise RuntimeError("no trainable parameters: model.encoder.finetune=frozen without an adapter")
        # fused kernels (one pass over each parameter; 2x faster than foreach on a 2-core CPU, same update); not with
        # gradient clipping under mixed precision, where Lightning must unscale the gradients before it clips them
        trainer = self._trainer
        mixed_clip = trainer is not None and "mixed" in str(trainer.precision) and bool(trainer.gradient_clip_val)
        fused = {"fused": True} if all(p.device.type in ("cpu", "cuda") for p in params) and not mixed_clip else {}
        if o.name == "sgd":
            opt = torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, **fused)
        else:
            opt = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay, **fused)
        warm, step, gamma = o.warmup_steps, o.lr_step, o.lr_gamma

        def factor(i: int) -> float:
            w = min(1.0, (i + 1) / warm) if warm > 0 else 1.0
            return w * gamma ** (i // step)

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    def on_train_start(self) -> None:
        """Record what this training uses (:meth:`FewShotDataModule.trained_on`), continuing the record of a
        resumed checkpoint or of an earlier training of this module (the scans seen are the union)."""
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "trained_on"):
            self.trained_on = dm.trained_on().after(self._restored_on or self.trained_on)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the resumed checkpoint's training record (continued by :meth:`on_train_start`)."""
        raw = checkpoint.get(CHECKPOINT_KEY)
        if isinstance(raw, dict):
            try:
                self._restored_on = TrainedOn.from_dict(raw)
            except (KeyError, TypeError, ValueError):
                log.warning("the checkpoint's record of its training data is malformed; it is replaced")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the training data's intensity normalisation (``checkpoint["normalizer"]``: ``{"mean", "std"}``,
        both ``None`` for per-volume z-scoring) so that ``fsl-med segment`` can normalise a new volume alike, and
        what was trained on (``checkpoint["fsl_med_trained_on"]``, :class:`~fsl_med.data.provenance.TrainedOn`),
        so that evaluation can refuse scans the model has seen."""
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        norm = getattr(dm, "normalize", None)
        if norm is not None:
            checkpoint["normalizer"] = {"mean": norm.mean, "std": norm.std}
        if self.trained_on is not None:
            checkpoint[CHECKPOINT_KEY] = self.trained_on.to_dict()

    # -- evaluation ---------------------------------------------------------------------------------
    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """Evaluation items stay on the host (numpy); slices are moved in batches during prediction."""
        if isinstance(batch, EvalItem):
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def _ttt_trainer(self) -> TestTimeTrainer:
        if self._ttt is None:
            self._ttt = TestTimeTrainer.from_config(self.model, self.cfg, self.ce_weights)
        return self._ttt

    def _eval_item(self, item: EvalItem, stage: str) -> None:
        variants = self.variants[stage]
        t0 = time.perf_counter()
        key = (item.support_id, item.organ)
        if key not in self._protos:  # support encoded once per support scan and organ per evaluation
            self._protos[key] = self.model.support_prototypes(item.support_images, item.support_masks, self.device,
                                                              item.shots)
        if self._qcache is None or self._qcache.device != self.device:
            self._qcache = QueryFeatureCache(self.model, self.cfg.eval.batch_size, self.device)
        feats = self._qcache.features(item.query_id, item.z, item.query_images)  # shared by the scan's organs
        pred, prob = self.model.predict_volume(self._protos[key], item.query_images, item.part,
                                               batch_size=self.cfg.eval.batch_size, device=self.device,
                                               query_feats=feats)
        t_plain = time.perf_counter() - t0
        outs: dict[str, tuple[np.ndarray, float]] = {"plain": (pred, t_plain)}
        mode = self.cfg.eval.cca_mode
        if "cca" in variants:
            t1 = time.perf_counter()
            outs["cca"] = (largest_mass_component(pred, prob, mode), t_plain + time.perf_counter() - t1)
        if "ttt" in variants or "ttt_cca" in variants:
            t1 = time.perf_counter()
            n = len(item.z)
            with tqdm(total=n, desc=f"TTT {item.organ} scan {item.query_id}", unit="slice", leave=False,
                      disable=not sys.stderr.isatty(), file=sys.stderr) as bar:
                tpred, tprob = self._ttt_trainer().refine(
                    item.query_images, pred, prob, item.part, item.support_images, item.support_masks,
                    np.random.default_rng([self.cfg.seed, zlib.crc32(f'{item.organ}/{item.query_id}'.encode())]),
                    self.device, self.cfg.eval.batch_size, bar.update, shots=item.shots)
            dt = time.perf_counter() - t1
            self.ttt_stats[stage]["seconds"] += dt
            self.ttt_stats[stage]["slices"] += n
            log.info("TTT %s scan %s: %d slices, %.2f s per slice", item.organ, item.query_id, n, dt / max(n, 1))
            outs["ttt"] = (tpred, t_plain + dt)
            if "ttt_cca" in variants:
                t2 = time.perf_counter()
                outs["ttt_cca"] = (largest_mass_component(tpred, tprob, mode), t_plain + dt + time.perf_counter() - t2)
        for v in variants:
            p, secs = outs[v]
            h = hd95(p, item.query_labels, item.spacing) if (self.cfg.eval.hd95 and stage == "test") else float("nan")
            self._results[stage].append(VolumeResult(item.organ, item.query_id, confusion_counts(p, item.query_labels),
                                                     len(item.z), secs, v, h))
        if stage == "test":
            self._collect_samples(item, {v: outs[v][0] for v in variants})

    def _collect_samples(self, item: EvalItem, preds: dict[str, np.ndarray]) -> None:
        """Keep a few slices of the first query volume of each organ for overlay figures."""
        k = self.cfg.eval.overlay_slices
        if k == 0 or any(s["organ"] == item.organ for s in self.samples):
            return
        for p in np.unique(item.part)[:k]:
            rows = np.flatnonzero(item.part == p)
            i = int(rows[len(rows) // 2])
            s = int(p) * item.shots  # the part's first support slice

            def mid(img: np.ndarray) -> np.ndarray:
                return img[1] if img.ndim == 3 else img  # the centre slice of a 3-slice stack

            self.samples.append({
                "organ": item.organ, "query": item.query_id, "z": int(item.z[i]), "image": mid(item.query_images[i]),
                "label": item.query_labels[i], "preds": {v: pr[i] for v, pr in preds.items()},
                "support": item.support_id.split("+")[0], "support_z": int(item.support_z[s]),
                "support_image": mid(item.support_images[s]), "support_mask": item.support_masks[s],
            })

    def _gather(self, obj: Any) -> list[Any]:
        """``obj`` of every rank (a one-element list when not distributed)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return [obj]
        out: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(out, obj)
        return out

    def _eval_end(self, stage: str) -> None:
        # every rank scored a shard of the items: gather TP/FP/FN (and HD95, timings) before any ratio
        gathered = self._gather({"results": self._results[stage], "ttt": self.ttt_stats[stage],
                                 "samples": self.samples if stage == "test" else []})
        results = sorted((r for g in gathered for r in g["results"]),
                         key=lambda r: (r.organ, _scan_key(r.query_id), VARIANTS.index(r.variant)))
        self.ttt_stats[stage] = {k: sum(g["ttt"][k] for g in gathered) for k in ("seconds", "slices")}
        if stage == "test":  # overlays: the first query volume of each organ, as in a single process
            samples = sorted((x for g in gathered for x in g["samples"]),
                             key=lambda x: (x["organ"], _scan_key(x["query"]), x["z"]))
            first = {}
            for x in samples:
                first.setdefault(x["organ"], x["query"])
            self.samples = [x for x in samples if x["query"] == first[x["organ"]]]
        self.last_results[stage] = list(results)
        self._results[stage] = []
        if not results:
            return
        organs = list(dict.fromkeys(r.organ for r in results))
        metrics: dict[str, float] = {}
        for j, v in enumerate(self.variants[stage]):
            summary = summarize(results, organs, variant=v)
            key = dice_metric_name(stage, v, first=j == 0)
            metrics[key] = summary["dice_mean"]
            metrics.update({f"{key}_{o}": d for o, d in summary["dice"].items()})
        self.log_dict(metrics, prog_bar=stage == "val", sync_dist=True)

    def volumes_scored(self, stage: str) -> int:
        """(organ, query volume) pairs scored so far in the running ``stage`` on this process (an interrupted
        evaluation reports it)."""
        return len({(r.organ, r.query_id) for r in self._results[stage]})

    def on_validation_epoch_start(self) -> None:
        self._results["val"] = []
        self._protos = {}
        self._qcache = None

    def validation_step(self, item: EvalItem, batch_idx: int) -> None:
        self._eval_item(item, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_end("val")

    def on_test_epoch_start(self) -> None:
        self._results["test"] = []
        self._protos = {}
        self._qcache = None
        self.samples = []
        self.ttt_stats["test"] = {"seconds": 0.0, "slices": 0}

    def test_step(self, item: EvalItem, batch_idx: int) -> None:
        self._eval_item(item, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_end("test")
