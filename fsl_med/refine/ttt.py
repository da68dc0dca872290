"""Test-time training (method.md §7): adapt the model on a query's own prediction, re-predict, restore.

Per query slice (``ttt.mode=slice``, the paper's) or once per query volume (``ttt.mode=volume``):
``ttt.steps`` SGD steps of the training loss on two random augmentations of (slice, predicted mask), one
as support and one as query; then the slice is predicted again with the real support, and the model is (unless
``ttt.restore`` is false, the reference's behaviour under ``compat=reference``)
restored bit for bit (every parameter and buffer, ``requires_grad`` flags and train/eval mode).
Which parameters adapt is ``ttt.params``: ``all`` trainable ones, ``lora`` or ``adapter`` only.
A slice whose prediction is empty is not adapted (its prediction cannot change the model's view of it),
so it keeps the plain prediction. :class:`TestTimeTraining` is the refinement callback around it.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
import zlib
from collections.abc import Callable, Iterator

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from fsl_med.config import TTT_MODES, AugmentConfig
from fsl_med.data.episodes import augment_pair
from fsl_med.data.protocol import EvalItem
from fsl_med.errors import ConfigError
from fsl_med.interrupts import raise_pending
from fsl_med.models.segmenter import FewShotSegmenter, tile3
from fsl_med.ranks import gather_objects
from fsl_med.refine.base import Refinement

log = logging.getLogger(__name__)


@contextlib.contextmanager
def restored(module: torch.nn.Module) -> Iterator[None]:
    """On exit, put ``module`` back exactly as it was on entry (state dict, requires_grad, train/eval)."""
    snapshot = {k: v.detach().clone() for k, v in module.state_dict(keep_vars=True).items()}
    flags = [p.requires_grad for p in module.parameters()]
    was_training = module.training
    try:
        yield
    finally:
        with torch.no_grad():
            for k, v in module.state_dict(keep_vars=True).items():
                v.copy_(snapshot[k])
        for p, f in zip(module.parameters(), flags, strict=True):
            p.requires_grad_(f)
        module.train(was_training)


def adapted_parameters(segmenter: FewShotSegmenter, which: str) -> list[torch.nn.Parameter]:
    """The parameters TTT updates: trainable ones (``all``), or only LoRA / adapter ones.

    Raises:
        ConfigError: the selection is empty (e.g. ``lora`` on a fully fine-tuned model).
    """
    named = [(n, p) for n, p in segmenter.named_parameters() if p.requires_grad]
    if which == "lora":
        named = [(n, p) for n, p in named if "lora_" in n]
    elif which == "adapter":
        named = [(n, p) for n, p in named if "adapter" in n]
    if not named:
        raise ConfigError(f"config key 'ttt.params': '{which}' selects no trainable parameter of this model")
    return [p for _, p in named]


class TestTimeTrainer:
    """Runs TTT on a :class:`FewShotSegmenter` with the run's loss and augmentation.

    Args:
        segmenter: the model (restored after every adaptation).
        ttt: the ``ttt`` config section (steps, lr, momentum, weight_decay, params, mode, transpose).
        ce_weights: ``[2]`` CE class weights; align_weight: weight of the alignment loss.
        augment: augmentation ranges (the training ones, 'sabs_aug').
    """

    __test__ = False  # not a pytest class

    def __init__(self, segmenter: FewShotSegmenter, ttt: DictConfig, ce_weights: torch.Tensor, align_weight: float,
                 augment: AugmentConfig) -> None:
        self.seg, self.cfg = segmenter, ttt
        self.ce_weights, self.align_weight, self.augment = ce_weights, align_weight, augment

    @classmethod
    def from_config(cls, segmenter: FewShotSegmenter, cfg: DictConfig, ce_weights: torch.Tensor,
                    ttt: DictConfig | None = None) -> TestTimeTrainer:
        """TTT with a run config's loss (``loss.align_weight``) and augmentation (``data.augment``); ``ttt``
        replaces the config's ``ttt`` section."""
        a = cfg.data.augment
        return cls(segmenter, cfg.ttt if ttt is None else ttt, ce_weights, cfg.loss.align_weight,
                   AugmentConfig(**{k: a[k] for k in a}))

    def _adapt(self, images: np.ndarray, masks: np.ndarray, rng: np.random.Generator, device: torch.device) -> None:
        params = adapted_parameters(self.seg, self.cfg.params)
        chosen = {id(p) for p in params}
        for p in self.seg.parameters():
            p.requires_grad_(id(p) in chosen)
        opt = torch.optim.SGD(params, lr=self.cfg.lr, momentum=self.cfg.momentum, weight_decay=self.cfg.weight_decay,
                              fused=all(p.device.type in ("cpu", "cuda") for p in params))
        usable = np.flatnonzero(masks.reshape(masks.shape[0], -1).any(axis=1))
        self.seg.train()
        for _ in range(self.cfg.steps):
            raise_pending()  # SIGINT/SIGTERM during evaluation stop within one TTT step (weights are restored)
            i = int(usable[rng.integers(usable.size)])
            s_img, s_mask = augment_pair(images[i], masks[i], rng, self.augment)
            q_img, q_mask = augment_pair(images[i], masks[i], rng, self.augment)
            if self.cfg.transpose:  # the reference transposes H and W of both copies (method.md §7)
                s_img, s_mask, q_img, q_mask = (a.swapaxes(-1, -2) for a in (s_img, s_mask, q_img, q_mask))
            to = dict(device=device)
            loss, _, _ = self.seg.episode_loss(
                tile3(torch.as_tensor(np.ascontiguousarray(s_img)[None], **to)),
                torch.as_tensor(np.ascontiguousarray(s_mask)[None], dtype=torch.float32, **to),
                tile3(torch.as_tensor(np.ascontiguousarray(q_img)[None], **to)),
                torch.as_tensor(np.ascontiguousarray(q_mask)[None], dtype=torch.int64, **to),
                self.ce_weights.to(device), self.align_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    def refine(self, query_images: np.ndarray, plain_pred: np.ndarray, plain_prob: np.ndarray, part: np.ndarray,
               support_images: np.ndarray, support_masks: np.ndarray, rng: np.random.Generator,
               device: torch.device | str = "cpu", batch_size: int = 8,
               on_slice: Callable[[int], None] | None = None, shots: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """TTT predictions of a query volume.

        Args:
            query_images: ``[n, H, W]`` normalised slices; plain_pred, plain_prob: ``[n, H, W]`` their plain
                prediction and foreground probability (kept for slices that are not adapted).
            part: ``[n]`` support part per slice; support_images/support_masks: ``[P * shots, H, W]``, part-major
                (query and support images may be ``[.., 3, H, W]`` 3-slice stacks).
            rng: randomness of the augmentations.
            on_slice: called after each slice (progress).
        Returns:
            ``(pred [n, H, W] uint8, fg_prob [n, H, W] float32)``. The model is unchanged afterwards, unless
            ``ttt.restore`` is false (``compat=reference``): then it keeps every adaptation, slice after slice.
        """
        device = torch.device(device)
        n = query_images.shape[0]
        pred = plain_pred.astype(np.uint8, copy=True)
        prob = plain_prob.astype(np.float32, copy=True)
        with torch.inference_mode(False), torch.enable_grad():
            if self.cfg.mode == "volume":
                groups = [np.arange(n)]
            else:
                groups = [np.array([i]) for i in range(n)]
            keep = self.cfg.get("restore") is False  # ttt.restore=false: the reference's reset that is none
            for idx in groups:
                if plain_pred[idx].any() and self.cfg.steps > 0:
                    with contextlib.nullcontext() if keep else restored(self.seg):
                        self._adapt(query_images[idx], plain_pred[idx], rng, device)
                        need, local_part = np.unique(part[idx], return_inverse=True)  # encode only used parts
                        rows = (need[:, None] * shots + np.arange(shots)).ravel()
                        protos = self.seg.support_prototypes(support_images[rows], support_masks[rows], device,
                                                             shots)
                        pred[idx], prob[idx] = self.seg.predict_volume(protos, query_images[idx], local_part,
                                                                       batch_size, device)
                if on_slice is not None:
                    on_slice(len(idx))
        return pred, prob


class TestTimeTraining(Refinement):
    """Test-time training as a refinement callback (variant ``ttt``).

    Args:
        steps: overrides the run config's ``ttt.steps``; ``None`` keeps the config's (so do the next three).
        lr: overrides ``ttt.lr``.
        mode: overrides ``ttt.mode`` (``slice``|``volume``).
        params: overrides ``ttt.params`` (``all``|``lora``|``adapter``). The loss, augmentation, momentum and
            weight decay are always the run config's (``module.cfg``).
        source: the variant adapted on (``plain``).
        name: the variant's name (``ttt``).

    The randomness of each item is keyed by (``seed``, organ, query scan), so sharding items over DDP ranks cannot
    change it. The model is restored bit for bit after every slice (or volume). A progress bar is shown on a
    terminal; :attr:`seconds` and :attr:`slices` (gathered over ranks after each test epoch) give the cost.
    """

    __test__ = False  # not a pytest class

    def __init__(self, steps: int | None = None, lr: float | None = None, mode: str | None = None,
                 params: str | None = None, source: str = "plain", name: str = "ttt") -> None:
        self.overrides = {k: v for k, v in (("steps", steps), ("lr", lr), ("mode", mode), ("params", params))
                          if v is not None}
        if "mode" in self.overrides and self.overrides["mode"] not in TTT_MODES:
            raise ConfigError(f"config key 'ttt.mode': must be one of {', '.join(TTT_MODES)}, got {mode!r}")
        self.source, self.name = source, name
        self._trainer_for: tuple[int, TestTimeTrainer] | None = None
        self.seconds, self.slices = 0.0, 0
        self._local: list[float] = [0.0, 0]  # this process's (seconds, slices) in the running test epoch

    def _ttt(self, module: L.LightningModule) -> TestTimeTrainer:
        if self._trainer_for is None or self._trainer_for[0] != id(module):
            ttt = OmegaConf.merge(module.cfg.ttt, self.overrides)
            self._trainer_for = (id(module), TestTimeTrainer.from_config(module.model, module.cfg, module.ce_weights,
                                                                         ttt))
        return self._trainer_for[1]

    @property
    def seconds_per_slice(self) -> float | None:
        """TTT seconds per query slice of the last test epoch (all ranks), ``None`` when nothing was adapted."""
        return self.seconds / self.slices if self.slices else None

    def refine(self, pred: np.ndarray, prob: np.ndarray, item: EvalItem, module: L.LightningModule
               ) -> tuple[np.ndarray, np.ndarray]:
        """TTT predictions of the item's scored slices (:meth:`TestTimeTrainer.refine`)."""
        t0 = time.perf_counter()
        n = len(item.z)
        seed = int(module.cfg.seed)
        with tqdm(total=n, desc=f"TTT {item.organ} scan {item.query_id}", unit="slice", leave=False,
                  disable=not sys.stderr.isatty(), file=sys.stderr) as bar:
            out = self._ttt(module).refine(
                item.query_images, pred, prob, item.part, item.support_images, item.support_masks,
                np.random.default_rng([seed, zlib.crc32(f"{item.organ}/{item.query_id}".encode())]),
                module.device, module.cfg.eval.batch_size, bar.update, shots=item.shots)
        dt = time.perf_counter() - t0
        self._local[0] += dt
        self._local[1] += n
        log.info("TTT %s scan %s: %d slices, %.2f s per slice", item.organ, item.query_id, n, dt / max(n, 1))
        if self._ttt(module).cfg.get("restore") is False:  # the model changed: cached features are stale
            module.reset_eval_caches()
        return out

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._local = [0.0, 0]

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        gathered = gather_objects(trainer, tuple(self._local))
        self.seconds, self.slices = sum(g[0] for g in gathered), sum(g[1] for g in gathered)
