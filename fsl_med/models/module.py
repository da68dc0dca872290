"""The LightningModule: losses, optimiser and schedule, training, and the EP1 prediction of validation/test items.

The module predicts and nothing more: its validation and test steps return an
:class:`~fsl_med.models.prediction.ItemPrediction` with the plain variant. Refinements (CCA, TTT), scoring,
overlays and prediction files are Lightning callbacks (:mod:`fsl_med.callbacks`).
"""

from __future__ import annotations

import logging
import time
import warnings
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig

from fsl_med.config import from_container, head_options, model_container, to_container
from fsl_med.data.protocol import EvalItem
from fsl_med.data.provenance import CHECKPOINT_KEY, TrainedOn
from fsl_med.errors import TrainingDiverged
from fsl_med.models.encoders import create_encoder
from fsl_med.models.heads import create_head, get_head_class
from fsl_med.models.prediction import ItemPrediction
from fsl_med.models.segmenter import FewShotSegmenter, QueryFeatureCache
from fsl_med.prepare.plan import CHECKPOINT_KEY as PLAN_KEY
from fsl_med.ranks import gather_objects

log = logging.getLogger(__name__)


def build_segmenter(cfg: DictConfig, weights: str | None = None) -> FewShotSegmenter:
    """The segmenter described by ``cfg.model`` (``weights`` overrides ``model.encoder.weights``); with
    ``model.compile`` other than ``off`` the encoder is compiled in place with that ``torch.compile`` mode
    (compiled on its first call; the state dict keeps the eager names)."""
    e, m = cfg.model.encoder, cfg.model
    name = str(m.head.name)
    encoder = create_encoder(
        e.name, weights=e.weights if weights is None else weights, finetune=e.finetune, lora_rank=e.lora_rank,
        lora_targets=list(e.lora_targets), feature_size=m.feature_size, input_size=cfg.data.image_size,
        adapter=e.adapter, imagenet_norm=e.imagenet_norm, request=get_head_class(name).request,
    )
    if m.compile != "off":
        # in place (nn.Module.compile): parameter names and checkpoints are those of the eager model; a head that
        # requests a feature bundle calls the encoder's bundle method, which runs eagerly
        encoder.compile(mode=m.compile)
    head = create_head(name, feature_size=m.feature_size, scale=m.scale, mask_pooling=m.mask_pooling,
                       options=head_options(cfg), in_channels=int(encoder.out_channels),
                       pooled_channels=int(encoder.pooled_channels))
    return FewShotSegmenter(encoder, head, m.feature_size)


def has_trainable_parameters(cfg: DictConfig) -> bool:
    """Whether the model ``cfg`` describes has anything to train (False: a frozen encoder without adapter and a head
    without learnable parameters, e.g. ALPNet or PANet on a frozen ViT). Built on the meta device with random
    weights: no memory, no weight file read, no random numbers drawn."""
    enc_log = logging.getLogger("fsl_med.models.encoders")
    level = enc_log.level
    enc_log.setLevel(logging.ERROR)  # the random-init warning is about the real model, not this check
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            seg = build_segmenter(cfg, weights="none")
    finally:
        enc_log.setLevel(level)
    return any(p.requires_grad for p in seg.parameters())


class FewShotModule(L.LightningModule):
    """DINOv2 (or any registered encoder) + ALPNet, trained on self-supervised episodes.

    Args:
        config: the resolved run configuration as a plain dict (``fsl_med.config.to_container``); it is
            saved in every checkpoint under ``hyper_parameters.config``.
        weights: override of ``model.encoder.weights`` at construction (e.g. ``"none"`` when the weights
            come from a checkpoint anyway).

    Logged metrics: ``train/loss``, ``train/ce``, ``train/align``; the evaluation metrics (``val/dice``,
    ``test/dice_<variant>[_<organ>]``) are logged by :class:`~fsl_med.evaluation.scoring.Scoring`.
    """

    def __init__(self, config: dict[str, Any], weights: str | None = None) -> None:
        super().__init__()
        self.save_hyperparameters({"config": model_container(config)})  # verb-only sections are not stored
        self.cfg = from_container(config)
        self.model = build_segmenter(self.cfg, weights)
        self.register_buffer("ce_weights", torch.tensor(list(self.cfg.loss.ce_weights), dtype=torch.float32),
                             persistent=False)
        self._protos: dict[tuple[str, str], list] = {}  # (support scan, organ) -> prototypes per part
        self._qcache: QueryFeatureCache | None = None  # query-slice features of the current query scan
        self.trained_on: TrainedOn | None = None  # the data trained on (set when training starts; in checkpoints)
        self._restored_on: TrainedOn | None = None  # the record of a checkpoint training resumes from
        # a head's test-time refinement (Q-Net's prototypes: head.refine_seconds / head.refined_slices), seconds per
        # refined query slice over all ranks in the last test epoch; None for heads without one
        self.refine_seconds_per_slice: float | None = None

    @classmethod
    def from_config(cls, cfg: DictConfig, weights: str | None = None) -> FewShotModule:
        """Build from a ``DictConfig``."""
        return cls(to_container(cfg), weights=weights)

    # -- training -----------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """A batch of B independent episodes; all 2B images go through the encoder in one call."""
        b = batch["support_image"].shape[0]
        self.model.head.set_step(int(self.global_step))  # a head's loss schedule (RPT-2023's η)
        loss, ce, align = self.model.episode_loss(batch["support_image"], batch["support_mask"], batch["query_image"],
                                                  batch["query_label"], self.ce_weights, self.cfg.loss.align_weight)
        if self.model.head.skips_episodes:  # compat=reference: episodes skipped as the reference does, counted
            # summed over ranks (one all-reduce per step, only in this mode)
            self.log("train/skipped_episodes", float(self.model.skipped_episodes), batch_size=b, sync_dist=True,
                     reduce_fx="sum")
        if loss is None:  # every episode of the batch skipped
            log.info("step %d: every episode skipped by the %s head", self.global_step + 1, self.model.head.name)
            if self.trainer.world_size == 1:
                return None  # type: ignore[return-value]  # no optimiser step (Lightning skips it), as the reference
            # DDP needs every rank in every backward: a zero loss reaching every trainable weight, so this rank adds
            # zero gradients and the step averages the other ranks' gradients over all ranks
            return torch.stack([p.sum() for p in self.parameters() if p.requires_grad]).sum() * 0.0
        if not bool(torch.isfinite(loss)):  # one host sync per step; Lightning's detect_anomaly is far slower
            raise TrainingDiverged(self._diverged(f"loss ({float(loss.detach())})", batch))
        self.log_dict({"train/loss": loss, "train/ce": ce, "train/align": align}, prog_bar=True, batch_size=b)
        extra = {f"train/{k}": v for k, v in self.model.last_terms.items() if k not in ("ce", "align")}
        extra.update({f"train/{k}": v for k, v in self.model.head.log_values().items()})
        if extra:  # the head's own loss terms and values (ADNet: train/threshold, L_T, and train/T)
            self.log_dict(extra, batch_size=b)
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
        so that evaluation can refuse scans the model has seen, and the folder's preprocessing plan
        (``checkpoint["preprocessing_plan"]``, ``None`` when unknown) so that ``segment`` prepares new scans alike."""
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        norm = getattr(dm, "normalize", None)
        if norm is not None:
            checkpoint["normalizer"] = {"mean": norm.mean, "std": norm.std}
        if self.trained_on is not None:
            checkpoint[CHECKPOINT_KEY] = self.trained_on.to_dict()
        if dm is not None and hasattr(dm, "preprocessing_plan"):
            plan = dm.preprocessing_plan()
            checkpoint[PLAN_KEY] = plan.as_dict() if plan is not None else None

    # -- evaluation ---------------------------------------------------------------------------------
    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """Evaluation items stay on the host (numpy); slices are moved in batches during prediction."""
        if isinstance(batch, EvalItem):
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def reset_eval_caches(self) -> None:
        """Forget the cached support prototypes and query-slice features (each evaluation starts afresh)."""
        self._protos = {}
        self._qcache = None

    @property
    def encoded_query_slices(self) -> int:
        """Query slices encoded since :meth:`reset_eval_caches` (each slice once per scan, shared by its organs)."""
        return 0 if self._qcache is None else self._qcache.encoded

    def predict_item(self, item: EvalItem, stage: str = "test") -> ItemPrediction:
        """The plain prediction of one EP1 item (query volume x organ).

        The support is encoded once per (support scan, organ) and each query slice once per scan (shared by the
        scan's organs) until :meth:`reset_eval_caches`. Returns a record with the ``plain`` variant: ``[n, H, W]``
        prediction and foreground probability of the item's scored slices, and the seconds it took.
        """
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
        record = ItemPrediction(item, stage)
        record.add("plain", pred, prob, time.perf_counter() - t0)
        return record

    def on_validation_epoch_start(self) -> None:
        self.reset_eval_caches()

    def validation_step(self, item: EvalItem, batch_idx: int) -> ItemPrediction:
        """The plain prediction of one item; scored by :class:`~fsl_med.evaluation.scoring.Scoring`."""
        return self.predict_item(item, "val")

    def on_test_epoch_start(self) -> None:
        self.reset_eval_caches()
        if hasattr(self.model.head, "reset_refine_timing"):
            self.model.head.reset_refine_timing()

    def on_test_epoch_end(self) -> None:
        head = self.model.head
        if hasattr(head, "refined_slices"):  # plain predictions and TTT's re-predictions alike
            costs = gather_objects(self.trainer, (float(head.refine_seconds), int(head.refined_slices)))
            n = sum(c[1] for c in costs)
            self.refine_seconds_per_slice = sum(c[0] for c in costs) / n if n else None

    def test_step(self, item: EvalItem, batch_idx: int) -> ItemPrediction:
        """The plain prediction of one item; refinement callbacks add variants, scoring callbacks score them."""
        return self.predict_item(item, "test")
