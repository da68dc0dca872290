"""The LightningDataModule: prepared volumes -> training episodes and EP1 evaluation items."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset

from fsl_med.config import AugmentConfig, SuperpixelConfig, SupervoxelConfig
from fsl_med.data.episodes import EpisodeDataset, EpisodeSampler
from fsl_med.data.exclusion import excluded_slices, exclusion_note
from fsl_med.data.phantom import phantom_plan
from fsl_med.data.protocol import EvalItem, build_eval_items
from fsl_med.data.provenance import TrainedOn, folder_fingerprint, label_digest
from fsl_med.data.superpixels import load_or_make_superpixels
from fsl_med.data.supervoxel_episodes import SupervoxelEpisodeDataset
from fsl_med.data.supervoxels import load_or_make_supervoxels
from fsl_med.data.volumes import Normalizer, Volume, load_volume, make_normalizer, resize_slices
from fsl_med.errors import ConfigError, DataError
from fsl_med.prepare.classmap import CLASSMAP_NAME, read_classmap
from fsl_med.prepare.datasets import (
    FoldSplit,
    excluded_labels,
    fold_split,
    get_dataset_info,
    scan_files,
    validation_split,
)
from fsl_med.prepare.manifest import incomplete_note, manifest_mismatches, read_manifest
from fsl_med.prepare.nifti import read_nifti
from fsl_med.prepare.plan import Plan, compat_mismatch, folder_plan

log = logging.getLogger(__name__)


class EvalDataset(Dataset):
    """A list of :class:`EvalItem`; with ``batch_size=None`` each batch is one item."""

    def __init__(self, items: list[EvalItem]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> EvalItem:
        return self.items[i]


class FewShotDataModule(L.LightningDataModule):
    """Training episodes from the fold's training scans; EP1 validation and test items.

    Validation uses the last ``data.num_val_scans`` training scans as query scans (held out of
    training), never the fold's query scans. Test uses the fold's query scans. Both use the fold's
    support scan, which is never trained on.
    """

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.info = get_dataset_info(cfg.data.dataset)
        self.root = Path(cfg.data.root)
        self.split: FoldSplit | None = None
        self.train_ids: list[str] = []
        self.val_ids: list[str] = []
        self.normalize: Normalizer | None = None
        self.train_set: EpisodeDataset | None = None
        self.val_set: EvalDataset | None = None
        self.test_set: EvalDataset | None = None
        self.skipped: dict[str, list[tuple[str, str, str]]] = {"val": [], "test": []}  # (scan, organ, reason)
        self.scan_paths: dict[str, tuple[Path, Path]] = {}  # scan id -> (image, label) of the folder's scans
        self._cache: dict[str, Volume] = {}
        self._sp_cache: dict[str, np.ndarray] = {}

    # -- loading ----------------------------------------------------------------------------------
    def _volume(self, scan_id: str) -> Volume:
        if scan_id not in self._cache:
            self._cache[scan_id] = load_volume(self.root, scan_id, self.info.all_label_ids, self.cfg.data.image_size)
        return self._cache[scan_id]

    def resolve_split(self) -> FewShotDataModule:
        """Check the data folder and fix the fold's scans: list the scans (files the layout does not recognise
        are logged once, as one warning line), check an existing ``classmap_1.json`` against its schema, split
        the scans and build the normaliser. Cheap (no slice is built); ``setup`` calls it. Returns ``self``.

        Raises:
            DataError: no scans, a malformed classmap, too few scans for a fold, or (CT) a bad training scan.
        """
        if self.split is not None:
            return self
        listing = scan_files(self.root)
        ids = listing.scan_ids()
        self.scan_paths = dict(listing.scans)
        note = listing.note()
        if note:
            log.warning("%s", note)
        manifest = read_manifest(self.root)
        for line in manifest_mismatches(self.root, self.scan_paths, manifest):
            log.warning("%s", line)
        unfinished = incomplete_note(self.root, manifest)
        if unfinished:
            log.warning("%s", unfinished)
        classmap = self.root / CLASSMAP_NAME
        if classmap.is_file():  # not otherwise used by training; a malformed one means a broken folder
            read_classmap(classmap)
        try:
            self.split = fold_split(self.info, ids, self.cfg.data.fold, str(self.cfg.eval.support_pick))
        except DataError as e:
            if unfinished is None:
                raise
            raise DataError(f"{e}; {unfinished}") from None
        nval = self.cfg.data.num_val_scans
        self.train_ids, self.val_ids = validation_split(self.split.train, nval)
        if nval and not self.val_ids:
            log.warning("data.num_val_scans=%d, but fold %d has only %d training scan(s) and one must remain for "
                        "training: no validation (no val/dice, no best checkpoint); set data.num_val_scans=0 "
                        "to silence this", nval, self.cfg.data.fold, len(self.train_ids))
        plan = folder_plan(self.root) if self.cfg.compat == "reference" else None  # a folder `prepare` wrote
        differ = [] if plan is None else compat_mismatch(plan, "reference")
        if differ:
            log.warning("%s was prepared with %s, not as compat=reference prepares (fsl-med prepare --compat "
                        "reference)", self.root, ", ".join(differ))
        before = bool(self.cfg.data.resize_last)  # statistics of the stored slices
        if self.info.modality == "ct":
            self.normalize = make_normalizer("ct", [self._stored_image(s) if before else self._volume(s).image
                                                    for s in self.train_ids], before)
        else:
            self.normalize = make_normalizer("mri", before_resize=before)
        log.info("fold %d: train %s, val %s, query %s, support %s (eval.support_pick=%s)", self.cfg.data.fold,
                 self.train_ids, self.val_ids, self.split.query, self.split.support, self.cfg.eval.support_pick)
        return self

    def _stored_image(self, scan_id: str) -> np.ndarray:
        """The image as stored (``[Z, H, W]``, not resized): the loaded one, or read again when the loader resized it."""
        vol = self._volume(scan_id)
        if vol.stored_shape == vol.image.shape[1:]:
            return vol.image
        return load_volume(self.root, scan_id, self.info.all_label_ids, warn=False).image

    def _superpixels(self, vol: Volume) -> np.ndarray:
        if vol.scan_id not in self._sp_cache:
            self._sp_cache[vol.scan_id] = self._make_superpixels(vol)
        return self._sp_cache[vol.scan_id]

    def _make_superpixels(self, vol: Volume) -> np.ndarray:
        """Pseudolabels ``[Z, H, W]`` of a training volume (shipped, cached or computed). With ``data.resize_last``
        (the reference) they are those of the stored slices, resized (nearest) when the loader resizes the slices;
        otherwise those of the loaded slices. With ``data.episodes=supervoxel3d``: :meth:`_make_supervoxels`."""
        if self.cfg.data.episodes == "supervoxel3d":
            return self._make_supervoxels(vol)
        if self.cfg.data.resize_last and vol.stored_shape != vol.image.shape[1:]:
            stored = load_volume(self.root, vol.scan_id, self.info.all_label_ids, warn=False)
            sp = self._make_superpixels(stored)
            return resize_slices(sp, vol.image.shape[1:], "nearest").astype(np.int32)
        sp_cfg = self.cfg.data.superpixel
        params = SuperpixelConfig(scale=sp_cfg.scale, sigma=sp_cfg.sigma, min_size=sp_cfg.min_size,
                                  body_threshold=sp_cfg.body_threshold if sp_cfg.body_threshold is not None
                                  else self.info.body_threshold, body_connectivity=sp_cfg.body_connectivity,
                                  zero_as_background=bool(sp_cfg.zero_as_background))
        shipped = self.root / f"superpix-MIDDLE_{vol.scan_id}.nii.gz"
        if params.is_reference and shipped.is_file():
            arr, _, _ = read_nifti(shipped)
            sp = np.ascontiguousarray(np.rint(arr).astype(np.int32).transpose(2, 1, 0))
            if sp.shape == vol.image.shape:
                return sp
            log.warning("%s: shape %s differs from the image; regenerating", shipped, sp.shape)
        return load_or_make_superpixels(vol.image, vol.path, params, self.cfg.data.cache_dir)

    def _make_supervoxels(self, vol: Volume) -> np.ndarray:
        """3D supervoxels ``[Z, H, W]`` of a training volume (cached or computed; ``data.supervoxel.*``), of the stored
        slices resized (nearest) with ``data.resize_last`` when the loader resizes, else of the loaded slices."""
        if self.cfg.data.resize_last and vol.stored_shape != vol.image.shape[1:]:
            stored = load_volume(self.root, vol.scan_id, self.info.all_label_ids, warn=False)
            return resize_slices(self._make_supervoxels(stored), vol.image.shape[1:], "nearest").astype(np.int32)
        sv = self.cfg.data.supervoxel
        params = SupervoxelConfig(min_size=int(sv.min_size), sigma=float(sv.sigma))
        return load_or_make_supervoxels(vol.image, vol.path, vol.spacing, params, self.cfg.data.cache_dir)

    def _build_train(self) -> EpisodeDataset | SupervoxelEpisodeDataset:
        excl = excluded_labels(self.cfg)
        rule = str(self.cfg.data.exclude_rule)
        images, sps, slices = [], [], []
        total = 0
        for v, sid in enumerate(self.train_ids):
            vol = self._volume(sid)
            assert self.normalize is not None
            images.append(self.normalize(vol.image, vol.path, vol.stored_stats))
            sps.append(self._superpixels(vol))
            dropped = excluded_slices(vol.label, excl, rule)  # Setting 2 (all False in Setting 1)
            slices += [(v, int(z)) for z in np.flatnonzero(~dropped)]
            total += len(dropped)
        if excl:
            log.info("%s", exclusion_note(excl, rule, total - len(slices), total))
        if not slices:
            raise DataError(f"{self.root}: no training slices left after the setting-2 exclusion of labels {excl} "
                            f"(data.exclude_rule={rule})")
        a = self.cfg.data.augment
        if self.cfg.data.episodes == "supervoxel3d":  # adjacent-slice episodes of 3D supervoxels (sps holds them)
            sv = self.cfg.data.supervoxel
            return SupervoxelEpisodeDataset(
                images, sps, slices, length=self.cfg.data.episodes_per_epoch, seed=self.cfg.seed,
                augment=AugmentConfig(**{k: a[k] for k in a}), min_pixels=int(sv.min_pixels),
                size_rule=str(sv.size_rule), feature_size=self.cfg.model.feature_size,
                mask_pooling=self.cfg.model.mask_pooling, shots=self.cfg.shots,
                three_slices=self.cfg.data.three_slices)
        return EpisodeDataset(
            images, sps, slices, length=self.cfg.data.episodes_per_epoch, seed=self.cfg.seed,
            augment=AugmentConfig(**{k: a[k] for k in a}), min_pixels=self.cfg.data.min_superpixel_pixels,
            feature_size=self.cfg.model.feature_size, mask_pooling=self.cfg.model.mask_pooling,
            shots=self.cfg.shots, three_slices=self.cfg.data.three_slices,
            draw_background=bool(self.cfg.data.superpixel.zero_as_background),
        )

    def _test_normalizer(self) -> Normalizer:
        """The normaliser of the test (query and support) scans: the training one, or with CT and
        ``eval.ct_stats=eval`` (the reference's validation) statistics of the fold's query and support scans."""
        assert self.split is not None and self.normalize is not None
        if self.info.modality != "ct" or self.cfg.eval.ct_stats != "eval":
            return self.normalize
        before = bool(self.cfg.data.resize_last)
        images = []
        for sid in [*self.split.query, *self.support_ids()]:
            try:
                images.append(self._stored_image(sid) if before else self._volume(sid).image)
            except DataError:
                if sid not in self.split.query:
                    raise
                continue  # an unreadable query scan: _build_eval reports it (or skips it with eval.skip_bad)
        return make_normalizer("ct", images, before)

    def _build_eval(self, query_ids: list[str], normalize: Normalizer | None = None
                    ) -> tuple[EvalDataset, list[tuple[str, str]]]:
        assert self.split is not None and self.normalize is not None
        e = self.cfg.eval
        queries, bad = [], []
        for q in query_ids:
            try:
                queries.append(self._volume(q))
            except DataError as err:
                if not e.skip_bad:
                    raise DataError(f"query scan {q}: {err} (eval.skip_bad=true / --skip-bad skips it and lists it "
                                    "in the report)") from err
                log.warning("query scan %s skipped: %s", q, err)
                bad.append((q, "*", f"unreadable: {err}"))
        items, skipped = build_eval_items(
            [self._volume(s) for s in self.support_ids()], queries, list(self.cfg.data.test_organs),
            self.info, normalize or self.normalize, e.npart, e.z_margin, bool(e.skip_no_organ_slices), self.cfg.shots,
            e.shots_source, self.cfg.data.three_slices, bool(e.score_last_slice), str(e.part_rule),
        )
        for q, organ in skipped:
            log.warning("organ '%s' absent from query scan %s: skipped (listed in the report)", organ, q)
        return EvalDataset(items), [(q, o, "organ absent from the query scan") for q, o in skipped] + bad

    def support_ids(self) -> list[str]:
        """The evaluation support scans: the fold's support scan, then (``shots`` k > 1 with
        ``eval.shots_source=scans``) k-1 more of the fold's non-query scans, deterministically: the training
        scans in the split's sorted order (validation scans are never supports).

        Raises:
            ConfigError: fewer than k-1 training scans.
        """
        assert self.split is not None
        k = self.cfg.shots
        if k == 1 or self.cfg.eval.shots_source == "slices":
            return [self.split.support]
        extra = [s for s in self.train_ids if s != self.split.support][:k - 1]
        if len(extra) < k - 1:
            raise ConfigError(f"config key 'shots': {k}-shot from scans needs {k - 1} training scans besides the "
                              f"support scan, fold {self.cfg.data.fold} has {len(extra)}")
        return [self.split.support, *extra]

    def fingerprint(self) -> str:
        """:func:`~fsl_med.data.provenance.folder_fingerprint` of the data folder (its scans as listed)."""
        self.resolve_split()
        return folder_fingerprint(self.scan_paths)

    def trained_on(self) -> TrainedOn:
        """What training on this fold uses: dataset, folder fingerprint, fold, setting, excluded labels, test organs,
        the training scans and the validation scans, each with its label file's digest."""
        self.resolve_split()
        digests = {s: label_digest(self.scan_paths[s][1]) for s in [*self.train_ids, *self.val_ids]}
        return TrainedOn(dataset=str(self.cfg.data.dataset), fingerprint=self.fingerprint(),
                         fold=int(self.cfg.data.fold), setting=int(self.cfg.data.setting),
                         excluded_labels=[int(x) for x in excluded_labels(self.cfg)],
                         test_organs=[str(o) for o in self.cfg.data.test_organs],
                         train_scans={s: digests[s] for s in self.train_ids},
                         val_scans={s: digests[s] for s in self.val_ids})

    def preprocessing_plan(self) -> Plan | None:
        """The plan the data folder was prepared with (its ``manifest.json``, or a phantom's), or ``None`` when it
        is unknown (data prepared elsewhere); stored in checkpoints for ``segment``."""
        return folder_plan(self.root) or phantom_plan(self.root)

    # -- Lightning hooks --------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Lightning calls it in one process per node before ``setup``: write the fold's training scans' superpixel
        pseudolabels into the cache (``data.cache_dir``). It only writes files and keeps no state; ``setup`` (every
        rank) reads them back. Evaluation needs none (and must not read the training scans)."""
        if self.trainer is not None and self.trainer.state.fn != "fit":
            return
        listing = scan_files(self.root)
        for sid in fold_split(self.info, listing.scan_ids(), self.cfg.data.fold).train:
            vol = load_volume(self.root, sid, self.info.all_label_ids, self.cfg.data.image_size, warn=False)  # setup warns
            self._make_superpixels(vol)

    def setup(self, stage: str | None = None) -> None:
        """Load volumes and build the datasets needed by ``stage`` (fit, validate, test)."""
        self.resolve_split()
        assert self.split is not None
        if stage in ("fit", None) and self.train_set is None:
            self.train_set = self._build_train()
            for sid in self.train_ids:  # the episode dataset holds what it needs (normalised slices, pseudolabels)
                self._cache.pop(sid, None)
        if stage in ("fit", "validate", None) and self.val_set is None and self.val_ids:
            self.val_set, self.skipped["val"] = self._build_eval(self.val_ids)
        if stage in ("test", None) and self.test_set is None:
            self.test_set, self.skipped["test"] = self._build_eval(self.split.query, self._test_normalizer())
            if not self.test_set.items:
                reasons = "; ".join(f"scan {q}/{o}: {r}" for q, o, r in self.skipped["test"])
                raise DataError(f"no query volume could be scored ({reasons or 'no query scans'})")

    def train_dataloader(self) -> DataLoader:
        return self.episode_loader()

    def episode_loader(self, total_steps: int | None = None) -> DataLoader:
        """The training DataLoader: ``data.batch_size`` episodes per step and rank, ``data.num_workers`` workers,
        pinned memory on CUDA machines. Episodes are a function of the global step (:class:`EpisodeSampler`);
        it runs to ``total_steps`` (default ``trainer.max_steps``), starting at the trainer's global step (0
        without a trainer)."""
        assert self.train_set is not None
        rank, world = 0, 1
        trainer = self.trainer
        if trainer is not None:
            rank, world = trainer.global_rank, trainer.world_size
        nw, b = self.cfg.data.num_workers, self.cfg.data.batch_size
        log.info("training episodes: %d per step on each of %d process(es), %d per step in all", b, world, b * world)
        start = (lambda: trainer.global_step) if trainer is not None else 0  # a resumed run continues there
        total = self.cfg.trainer.max_steps if total_steps is None else total_steps
        return DataLoader(
            self.train_set, batch_size=b,
            sampler=EpisodeSampler(total, b, rank, world, start), num_workers=nw,
            persistent_workers=nw > 0, pin_memory=torch.cuda.is_available(), drop_last=True,
        )

    def _eval_loader(self, ds: EvalDataset) -> DataLoader:
        """One item per batch; under DDP each rank takes every world_size-th query scan with all its organs
        (so the scan's slice features are shared on that rank), or every world_size-th item when there are
        fewer query scans than ranks; results are gathered."""
        if self.trainer is not None and self.trainer.world_size > 1:
            rank, world = self.trainer.global_rank, self.trainer.world_size
            scans = list(dict.fromkeys(it.query_id for it in ds.items))
            if len(scans) >= world:
                mine = set(scans[rank::world])
                ds = EvalDataset([it for it in ds.items if it.query_id in mine])
            else:
                ds = EvalDataset(ds.items[rank::world])
        return DataLoader(ds, batch_size=None, shuffle=False, collate_fn=lambda x: x)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            return []
        return self._eval_loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        assert self.test_set is not None
        return self._eval_loader(self.test_set)
