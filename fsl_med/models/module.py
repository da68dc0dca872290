"""The LightningModule: losses, optimiser and schedule, training and EP1 validation/test steps."""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from fsl_med.config import from_container, to_container
from fsl_med.data.datamodule import EvalItem
from fsl_med.evaluation.metrics import VolumeResult, confusion_counts, summarize
from fsl_med.models.encoders import create_encoder
from fsl_med.models.segmenter import FewShotSegmenter

log = logging.getLogger(__name__)


def build_segmenter(cfg: DictConfig, weights: str | None = None) -> FewShotSegmenter:
    """The segmenter described by ``cfg.model`` (``weights`` overrides ``model.encoder.weights``)."""
    e = cfg.model.encoder
    encoder = create_encoder(
        e.name, weights=e.weights if weights is None else weights, finetune=e.finetune, lora_rank=e.lora_rank,
        lora_targets=list(e.lora_targets), feature_size=cfg.model.feature_size, input_size=cfg.data.image_size,
        adapter=e.adapter, imagenet_norm=e.imagenet_norm,
    )
    m = cfg.model
    return FewShotSegmenter(encoder, m.feature_size, m.proto_grid, m.test_window, m.fg_thresh, m.bg_thresh,
                            m.scale, m.mask_downsample)


class FewShotModule(L.LightningModule):
    """DINOv2 (or any registered encoder) + ALPNet, trained on self-supervised episodes.

    Args:
        config: the resolved run configuration as a plain dict (``fsl_med.config.to_container``); it is
            saved in every checkpoint under ``hyper_parameters.config``.
        weights: override of ``model.encoder.weights`` at construction (e.g. ``"none"`` when the weights
            come from a checkpoint anyway).

    Logged metrics: ``train/loss``, ``train/ce``, ``train/align``, ``val/dice``, ``val/dice_<organ>``,
    ``test/dice``, ``test/dice_<organ>``.
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

    @classmethod
    def from_config(cls, cfg: DictConfig, weights: str | None = None) -> FewShotModule:
        """Build from a ``DictConfig``."""
        return cls(to_container(cfg), weights=weights)

    # -- training -----------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """A batch of B independent episodes; all 2B images go through the encoder in one call."""
        seg = self.model
        s_img, s_fg = batch["support_image"], batch["support_mask"]
        q_img, q_lab = batch["query_image"], batch["query_label"]
        b = s_img.shape[0]
        feats = seg.encode(torch.cat([s_img, q_img], dim=0))
        s_feats, q_feats = feats[:b], feats[b:]
        s_low = seg.downsample_mask(s_fg)
        ce_total = feats.new_zeros(())
        align_total = feats.new_zeros(())
        for i in range(b):
            protos = seg.prototypes(s_feats[i:i + 1], s_low[i:i + 1], seg.train_window)
            low = seg.scores(q_feats[i:i + 1], protos)
            logits = seg.upsample(low, q_img.shape[-2:])
            ce_total = ce_total + F.cross_entropy(logits.float(), q_lab[i:i + 1], weight=self.ce_weights,
                                                  ignore_index=255)
            if self.cfg.loss.align_weight > 0:
                align_total = align_total + seg.align_loss(q_feats[i:i + 1], low, s_feats[i:i + 1], s_fg[i:i + 1])
        ce, align = ce_total / b, align_total / b
        loss = ce + self.cfg.loss.align_weight * align
        self.log_dict({"train/loss": loss, "train/ce": ce, "train/align": align}, prog_bar=True, batch_size=b)
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        """SGD (reference) or AdamW, with linear warm-up and ×gamma every ``lr_step`` steps."""
        o = self.cfg.optim
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise RuntimeError("no trainable parameters: model.encoder.finetune=frozen without an adapter")
        if o.name == "sgd":
            opt = torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
        else:
            opt = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
        warm, step, gamma = o.warmup_steps, o.lr_step, o.lr_gamma

        def factor(i: int) -> float:
            w = min(1.0, (i + 1) / warm) if warm > 0 else 1.0
            return w * gamma ** (i // step)

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    # -- evaluation ---------------------------------------------------------------------------------
    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """Evaluation items stay on the host (numpy); slices are moved in batches during prediction."""
        if isinstance(batch, EvalItem):
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def _eval_item(self, item: EvalItem, stage: str) -> None:
        t0 = time.perf_counter()
        key = (item.support_id, item.organ)
        if key not in self._protos:  # support encoded once per support scan and organ per evaluation
            self._protos[key] = self.model.support_prototypes(item.support_images, item.support_masks, self.device)
        pred, _ = self.model.predict_volume(self._protos[key], item.query_images, item.part,
                                            batch_size=self.cfg.eval.batch_size, device=self.device)
        counts = confusion_counts(pred, item.query_labels)
        self._results[stage].append(VolumeResult(item.organ, item.query_id, counts, len(item.z),
                                                 time.perf_counter() - t0))

    def _eval_end(self, stage: str) -> None:
        results = self._results[stage]
        self.last_results[stage] = list(results)
        self._results[stage] = []
        if not results:
            return
        organs = list(dict.fromkeys(r.organ for r in results))
        summary = summarize(results, organs)
        metrics = {f"{stage}/dice": summary["dice_mean"]}
        metrics.update({f"{stage}/dice_{o}": v for o, v in summary["dice"].items()})
        self.log_dict(metrics, prog_bar=stage == "val", sync_dist=True)

    def on_validation_epoch_start(self) -> None:
        self._results["val"] = []
        self._protos = {}

    def validation_step(self, item: EvalItem, batch_idx: int) -> None:
        self._eval_item(item, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_end("val")

    def on_test_epoch_start(self) -> None:
        self._results["test"] = []
        self._protos = {}

    def test_step(self, item: EvalItem, batch_idx: int) -> None:
        self._eval_item(item, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_end("test")
