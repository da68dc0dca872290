"""Typed configuration: the schema (dataclasses), loading, merging, validation and derived fields.

A run's configuration is the merge, in order, of the schema defaults, a YAML file from ``experiments/``
(which may name further YAML files to inherit from with ``defaults: [file.yaml, ...]``) and dot-list
overrides from the command line (``trainer.max_steps=300 model.encoder.weights=none``).
Unknown keys and wrong types are :class:`~fsl_med.errors.ConfigError` one-liners naming the key and the
closest valid key.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    ConfigTypeError,
    OmegaConfBaseException,
    ValidationError,
)

from fsl_med.errors import ConfigError

ORGANS = ("liver", "right_kidney", "left_kidney", "spleen")



# -- choice fields: each set of valid values is defined once, here, as a Literal; the modules that implement the
# behaviour import it (and type their arguments with it), and validate() checks every field in CHOICES with one rule.
Variant = Literal["plain", "cca", "ttt", "ttt_cca"]
"""Evaluation variants: the prediction as is, + CCA, + TTT, + TTT then CCA (method.md §6-7)."""
Optimizer = Literal["sgd", "adamw"]
Finetune = Literal["full", "frozen", "lora"]
"""``full``; ``frozen`` (encoder frozen, adapter trainable); ``lora`` (encoder frozen, LoRA and adapter trainable)."""
Adapter = Literal["none", "conv1", "conv3"]
LoraTarget = Literal["qkv", "proj", "fc1", "fc2"]
MaskPooling = Literal["nearest", "bilinear", "adjoint"]
"""``model.mask_pooling``: how a full-resolution support mask meets the feature grid in masked average pooling:
downsampled (``nearest`` [D], ``bilinear`` [A]), or ``adjoint``: the mask pulled back through the bilinear upsampling
of the features, so the prototype equals the references' upsample-then-pool exactly without a full-size feature map
(docs "Methods": ``model.mask_pooling=adjoint``)."""
CompileMode = Literal["off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
"""``model.compile``: no compilation, or the ``torch.compile`` mode the encoder is compiled with."""
CcaMode = Literal["2d", "3d"]
DEFAULT_CCA_MODE: CcaMode = "2d"
"""CCA of ``eval`` (``eval.cca_mode``) and of ``segment``: per slice, the paper's CCA (method.md §6)."""
ShotsSource = Literal["scans", "slices"]
TttMode = Literal["slice", "volume"]
TttParams = Literal["all", "lora", "adapter"]
LoggerName = Literal["csv", "tensorboard", "wandb", "none"]
Compat = Literal["fsl_med", "reference"]
"""``compat``: fsl_med's corrected behaviour, or the reference code's exactly (docs: "Reproducing the reference
code"); each behaviour is also its own field, and a field left unset (null) follows ``compat`` (:data:`COMPAT`)."""
BodyConnectivity = Literal[4, 8]
EmptyWindow = Literal["fallback", "skip"]
"""A training episode whose background finds no ALP window above the threshold: use the global prototype
(``fallback``, fsl_med) or skip the episode as the reference's training loop does (``skip``; a batch with nothing
left makes no optimiser step in one process, and zero gradients from its rank under DDP)."""
CtStats = Literal["train", "eval"]
"""Scans whose voxels give the CT normalisation of evaluated scans: the fold's training scans (``train``, fsl_med and
SSL-ALPNet) or the evaluated scans themselves, the fold's query and support scans (``eval``, the DINOv2 reference's
validation builds its dataset in ``mode='val'``)."""

VARIANTS: tuple[str, ...] = get_args(Variant)
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
FINETUNE_MODES: tuple[str, ...] = get_args(Finetune)
ADAPTERS: tuple[str, ...] = get_args(Adapter)
LORA_TARGETS: tuple[str, ...] = get_args(LoraTarget)
COMPILE_MODES: tuple[str, ...] = get_args(CompileMode)
CCA_MODES: tuple[str, ...] = get_args(CcaMode)
TTT_MODES: tuple[str, ...] = get_args(TttMode)
TTT_PARAMS: tuple[str, ...] = get_args(TttParams)
LOGGERS: tuple[str, ...] = get_args(LoggerName)
COMPATS: tuple[str, ...] = get_args(Compat)
EMPTY_WINDOWS: tuple[str, ...] = get_args(EmptyWindow)
MASK_POOLINGS: tuple[str, ...] = get_args(MaskPooling)
ExcludeRule = Literal["any", "all"]
"""``data.exclude_rule`` (Setting 2): drop a training slice that contains **any** excluded label (SSL-ALPNet,
fsl_med) or only one that contains **all** of them (the Q-Net/RPT/CAT-Net/GMRD code; docs "Methods": Each paper's
protocol as fields)."""
EpisodeKind = Literal["superpixel2d", "supervoxel3d"]
"""``data.episodes``: one slice's 2D superpixel augmented twice (SSL-ALPNet, fsl_med), or two adjacent slices sharing
a 3D supervoxel (the ADNet lineage; docs "Methods": Each paper's protocol as fields)."""
PartRule = Literal["extent", "count"]
"""``eval.part_rule``: a query slice's support part from its position in the organ's z-extent (SSL-ALPNet, fsl_med)
or from ``linspace(0, C, npart + 1)`` chunks of the C organ-containing slices (the ADNet lineage; docs "Methods":
Each paper's protocol as fields)."""
SizeRule = Literal["first", "larger"]
"""``data.supervoxel.size_rule``: the supervoxel's pixel count that must reach ``min_pixels`` in an adjacent-slice
episode: in the first slice of the pair (ADNet) or in the larger of the two (Q-Net, RPT)."""
RptVariant = Literal["2024", "2023"]
"""``model.head.rpt.variant``: the released head (2024-03 code, default) or the MICCAI-2023 release (K=10, no "+ p",
boundary + Dice losses); Zhu et al., MICCAI 2023 (YazhouZhu19/RPT), docs "Methods"."""
Launcher = Literal["inline", "local", "slurm"]
"""``protocol.launcher``: where the jobs of ``protocol``, ``ablate`` and ``compare`` run: one after another in this
process (``inline``), as ``protocol.parallel`` processes on this machine (``local``), or each as a SLURM job (``slurm``,
through submitit)."""
SLURM_TIME_RE = re.compile(r"\d+|\d+:\d{2}|\d+:\d{2}:\d{2}|\d+-\d+(:\d{2}(:\d{2})?)?")
"""``protocol.slurm.time``: sbatch's ``--time`` forms: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS."""
SLURM_MEM_RE = re.compile(r"\d+[KMGT]?")
"""``protocol.slurm.mem``: sbatch's ``--mem`` (an integer, MB by default, or with a K/M/G/T suffix)."""
SLURM_NAME_RE = re.compile(r"[A-Za-z0-9_.,-]+")
"""A SLURM partition, account or QOS name (a partition may be a comma-separated list)."""
SLURM_EXTRA_RE = re.compile(r"--([a-z][a-z0-9-]*)(=(\S.*))?")
"""One ``protocol.slurm.extra`` line: an sbatch option, ``--name=value`` or ``--flag``."""
SUPPORT_PICK_RE = re.compile(r"next|group_last|group_index:(\d+)")
"""``eval.support_pick``: ``next`` (fsl_med: the scan after the fold's queries, wrapping), ``group_last`` (ADNet: the
last of the fold's group of 5), ``group_index:N`` (Q-Net/RPT's ``supp_idx``: the N-th, 0-based); docs "Methods":
Each paper's protocol as fields."""

COMPAT: dict[str, dict[str, Any]] = {
    "fsl_med": {"eval.score_last_slice": True, "data.superpixel.zero_as_background": False,
                "data.min_superpixel_pixels": 64, "ttt.restore": True, "model.head.alp.empty_window": "fallback",
                "data.resize_last": False, "eval.skip_no_organ_slices": False, "eval.ct_stats": "train"},
    "reference": {"eval.score_last_slice": False, "data.superpixel.zero_as_background": True,
                  "data.min_superpixel_pixels": 1, "ttt.restore": False, "model.head.alp.empty_window": "skip",
                  "data.resize_last": True, "eval.skip_no_organ_slices": True, "eval.ct_stats": "eval"},
}
"""The value each compat-dependent field takes when it is left unset (null), per ``compat``."""

CHOICES: dict[str, Any] = {
    "optim.name": Optimizer, "model.encoder.finetune": Finetune, "model.encoder.adapter": Adapter,
    "model.mask_pooling": MaskPooling, "model.compile": CompileMode, "eval.cca_mode": CcaMode,
    "eval.shots_source": ShotsSource, "ttt.mode": TttMode, "ttt.params": TttParams, "logging.logger": LoggerName,
    "compat": Compat, "data.superpixel.body_connectivity": BodyConnectivity,
    "model.head.alp.empty_window": EmptyWindow,
    "eval.ct_stats": CtStats, "data.exclude_rule": ExcludeRule, "data.episodes": EpisodeKind,
    "eval.part_rule": PartRule, "data.supervoxel.size_rule": SizeRule, "model.head.rpt.variant": RptVariant,
    "protocol.launcher": Launcher,
}
"""Single-valued choice fields -> their Literal; list fields of choices are checked as subsets (variants, LoRA targets)."""
VERB_SECTIONS = ("protocol", "ablation", "compare")
"""Config sections that only their verbs read (``fsl-med protocol``, ``fsl-med ablate``, ``fsl-med compare``): not
stored in checkpoints."""
NAME_RE = re.compile(r"[A-Za-z0-9._-]+")
"""A run ``name``: one folder name (no separator, not ``.``/``..``), so runs stay under ``logging.output_dir``."""
MAX_IMAGE_SIZE = 2048
"""``data.image_size`` bound: (2048/14)^2 = 21k ViT tokens per slice, far beyond any abdominal protocol."""
MAX_NPART = 100
"""``eval.npart`` bound: support parts per organ (3 in the protocol); more than an organ has slices is useless."""


@dataclass
class SuperpixelConfig:
    """Felzenszwalb pseudolabels (method.md §1.3): the config section and the parameters of
    :mod:`fsl_med.data.superpixels` (one class)."""

    scale: float = 1.0  # Felzenszwalb scale (larger: larger segments); 1 as the reference's MIDDLE
    sigma: float = 1.0  # Gaussian smoothing (pixels) before Felzenszwalb; 1 as the reference
    min_size: int = 400  # smallest Felzenszwalb segment in pixels; 400 as the reference
    body_threshold: float | None = None  # None: the dataset's (MRI 50 + 1e-4, CT 1e-4); bare use: MRI's
    body_connectivity: int = 8  # largest body component: 8 as the reference notebook (skimage's default), or 4
    zero_as_background: bool | None = None  # null: compat. true: Felzenszwalb segment 0 inside the body joins the
    # background id 0 and episodes may draw id 0, as the reference notebook's off-by-one (compat=reference)

    @property
    def is_reference(self) -> bool:
        """True for the reference notebook's 'MIDDLE' pseudolabels (scale 1, sigma 1, min_size 400, 8-connected body,
        segment 0 as background): then shipped ``superpix-MIDDLE_<id>.nii.gz`` files are used as they are."""
        return (self.scale, self.sigma, self.min_size, self.body_connectivity, bool(self.zero_as_background)) == \
            (1.0, 1.0, 400, 8, True)


@dataclass
class SupervoxelConfig:
    """3D Felzenszwalb supervoxels of ``data.episodes=supervoxel3d`` (the ADNet lineage's pseudolabels,
    docs "Methods": Each paper's protocol as fields): the config section and the parameters of
    :mod:`fsl_med.data.supervoxels`."""

    min_size: int = 5000  # voxels (ADNet's n_sv for CHAOS; 1000 for CMR)
    sigma: float = 0.0  # Gaussian smoothing before the 3D graph (per axis sigma / voxel spacing); 0: none, as ADNet
    min_pixels: int = 200  # an episode's supervoxel must cover this many pixels (see size_rule)
    size_rule: str = "larger"  # first (ADNet) | larger (Q-Net, RPT), see config.SizeRule


@dataclass
class AugmentConfig:
    """'sabs_aug' of the reference (method.md §2.2): the config section and the ranges
    :func:`fsl_med.data.episodes.augment_pair` draws from (one class)."""

    enabled: bool = True  # false: episodes are not augmented
    rotate_deg: float = 5.0  # rotation uniform in ±rotate_deg degrees
    translate_px: float = 5.0  # translation in x and y uniform in ±translate_px pixels
    shear_deg: float = 5.0  # shear uniform in ±shear_deg degrees
    zoom_min: float = 0.9  # isotropic zoom uniform in [zoom_min, zoom_max] (0 < zoom_min <= zoom_max)
    zoom_max: float = 1.2  # upper end of the zoom range
    elastic_alpha: float = 10.0  # elastic deformation: magnitude alpha of the smoothed [-1, 1] noise (pixels)
    elastic_sigma: float = 5.0  # elastic deformation: Gaussian smoothing sigma of the noise (pixels, > 0)
    gamma_min: float = 0.5  # gamma correction (image only), gamma uniform in [gamma_min, gamma_max] (0 < gamma_min <= gamma_max)
    gamma_max: float = 1.5  # upper end of the gamma range


@dataclass
class DataConfig:
    """Dataset, fold/setting and episode sampling."""

    dataset: str = "chaos_t2"  # registered dataset: chaos_t2 (CHAOS T2-SPIR MRI) or sabs (Synapse/BTCV CT), or an alias (chaos, mri, ct, ...)
    root: str = "???"  # folder of prepared scans (``image_<id>.nii.gz`` + ``label_<id>.nii.gz``); required
    cache_dir: str = "${oc.env:FSL_MED_CACHE,.cache/fsl_med}"  # pseudolabel cache (superpixels/, supervoxels/): $FSL_MED_CACHE, else .cache/fsl_med; not inside data.root
    fold: int = 0  # which fold's query scans are evaluated (with its support scan; the other scans train): 0..4 (method.md §1.1)
    setting: int = 1  # 1: training slices may show the test organs; 2: slices holding an excluded label are dropped (method.md §1.1)
    test_organs: list[str] = field(default_factory=lambda: list(ORGANS))  # organs evaluated and, in Setting 2, excluded from training (liver, right_kidney, left_kidney, spleen)
    exclude_labels: list[int] | None = None  # setting 2's excluded label ids; null: the test organs' (method.md §2.1).
    # Set it to reproduce a recipe, e.g. [2, 3] as [D]'s main.sh for CT with liver/spleen as test organs (its bug)
    image_size: int = 256  # slice side in pixels as loaded (28..2048); a ViT resizes it down to a multiple of its patch (256 -> 252)
    episodes_per_epoch: int = 1000  # training episodes per epoch (the episode dataset's length); training stops at trainer.max_steps
    batch_size: int = 1  # training episodes per optimiser step and process (1 in the papers)
    num_workers: int = 1  # DataLoader worker processes of the training episodes (0: the main process)
    num_val_scans: int = 1  # fold training scans held out for validation (val/dice, best checkpoint); 0: train on all (the references)
    min_superpixel_pixels: int | None = None  # null: compat (fsl_med 64; reference 1: any superpixel is drawn)
    resize_last: bool | None = None  # null: compat. true: the reference loader's order, z-score statistics and
    # pseudolabels of the slices as stored, then the resize to image_size (only matters when the sizes differ)
    three_slices: bool = False  # input = slices z-1, z, z+1 (zeros at the ends) instead of z tiled x3
    exclude_rule: str = "any"  # Setting 2: any (SSL-ALPNet) | all (the Q-Net/RPT code's rule), see config.ExcludeRule
    episodes: str = "superpixel2d"  # superpixel2d (fsl_med) | supervoxel3d (the ADNet lineage), see config.EpisodeKind
    superpixel: SuperpixelConfig = field(default_factory=SuperpixelConfig)
    supervoxel: SupervoxelConfig = field(default_factory=SupervoxelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class EncoderConfig:
    """Encoder choice, weights and fine-tuning mode (method.md §4)."""

    name: str = "dinov2_vitl14"  # registered encoder (fsl-med encoders lists them): dinov2_vit{s,b,l,g}14[_reg], resnet101_deeplabv3, resnet101_qnet, vit_tiny_patch14[_reg] (tests and demos)
    weights: str = "lvd142m"  # none (random init), the encoder's hub tag (lvd142m for DINOv2, coco for the ResNets) or a weight file path
    finetune: str = "lora"
    lora_rank: int = 4  # LoRA rank r (> 0; alpha = r) when finetune=lora; 4 as [D]
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))  # the Linear layers of every block that get LoRA (a non-empty subset); all four as [D]
    adapter: str = "none"  # input adapter before the encoder: none, conv1 (1x1 conv 3->3 + instance norm) or conv3 (1x1 convs 3->32->8->3)
    imagenet_norm: bool = False  # normalise inputs with ImageNet mean/std before the adapter and encoder (off as [D])


@dataclass
class AlpHeadConfig:
    """ALPNet's adaptive local prototypes (method.md §3): ``model.head.alp``."""

    proto_grid: int = 8  # training pooling window: feature_size // proto_grid (4)
    test_window: int = 2  # local pooling window at evaluation, in feature cells (must divide model.feature_size); 2 as [A]/[D]
    fg_thresh: float = 0.95  # foreground: a local window is a prototype when its mean mask exceeds this (and local ones are used only if a training-size window reaches it), in (0, 1]; 0.95 as [A]/[D]
    bg_thresh: float = 0.95  # background: the same threshold for background windows, in (0, 1]; 0.95 as [A]/[D]
    empty_window: str | None = None  # null: compat (fsl_med fallback; reference skip), see config.EmptyWindow


@dataclass
class PanetHeadConfig:
    """PANet's global foreground and background prototypes (Wang et al., ICCV 2019; docs "Methods"):
    ``model.head.panet``."""

    cos_eps: float = 1e-8  # F.cosine_similarity's eps, as the reference


@dataclass
class AdnetHeadConfig:
    """ADNet's foreground prototype and learned threshold (Hansen et al., MedIA 2022; docs "Methods"):
    ``model.head.adnet``."""

    threshold_init: float = -10.0  # T at initialisation: a pixel is foreground iff cos > -T / 20
    threshold_weight: float = 1.0  # weight of L_T = T / 20 (the reference's t_loss_scaler)
    cos_eps: float = 1e-8  # F.cosine_similarity's eps, as the reference


@dataclass
class QnetHeadConfig:
    """Q-Net's query-predicted threshold, two scales and test-time prototype refinement (Shen et al., arXiv
    2208.11451; docs "Methods"):
    ``model.head.qnet``."""

    alpha: list[float] | None = None  # weights of the two scales [fine, coarse]; null: by data.setting, Setting 1
    # [0.9, 0.1] and Setting 2 [0.6, 0.4] (the reference README's values, there edited by hand in the source)
    refine_iters: int = 7  # test-time prototype refinement steps per query slice and scale (0: none)
    refine_lr: float = 0.01  # Adam's lr of the refinement
    tau_hidden: int = 1000  # tau = Linear(hidden -> 1)(Linear(pooled -> hidden)(GAP)) as the reference; 0: one Linear
    cos_eps: float = 1e-8  # the cosine's eps (norms clamped to at least this), as the reference


@dataclass
class RptHeadConfig:
    """RPT's regional prototypes and the BaT block (Zhu et al., MICCAI 2023; docs "Methods"): ``model.head.rpt``."""

    variant: str = "2024"  # 2024 (released head) | 2023 (MICCAI release), see config.RptVariant
    fg_num: int | None = None  # regional prototypes K; null: the variant's (2024: 100, 2023: 10)
    bat_passes: int = 3  # BaT block applications (shared weights)
    attn_heads: int = 3  # attention heads of the BaT block (each d_k = C), 3 as the reference
    dropout: float = 0.1  # dropout of the BaT attention weights and output (training only), in [0, 1)
    seed: int = 1289  # farthest-point sampling's first centre (the reference's RandomState(1289)), per support part
    periphery_weight: float = 0.1  # weight of the periphery loss (2024 variant; 0: off)
    mse_weight: float = 0.1  # weight of the MSE term (2024 variant; 0: off)
    self_weight: float = 1.0  # align uses loss.align_weight (1)
    tau_hidden: int = 1000  # hidden units of the threshold predictor tau (pooled -> hidden -> 1); 0: one Linear
    cos_eps: float = 1e-8  # the cosine's eps (norms clamped to at least this)


@dataclass
class HeadConfig:
    """The few-shot head (``model.head.name``) and one config section per registered head; only the named one is
    read. A head's defaults for ``loss.ce_weights`` and ``model.mask_pooling`` are in :data:`HEAD_DEFAULTS`."""

    name: str = "alp"  # the few-shot head: alp (ALPNet), panet, adnet, qnet or rpt (docs "Methods")
    alp: AlpHeadConfig = field(default_factory=AlpHeadConfig)
    panet: PanetHeadConfig = field(default_factory=PanetHeadConfig)
    adnet: AdnetHeadConfig = field(default_factory=AdnetHeadConfig)
    qnet: QnetHeadConfig = field(default_factory=QnetHeadConfig)
    rpt: RptHeadConfig = field(default_factory=RptHeadConfig)


HEAD_DEFAULTS: dict[str, dict[str, Any]] = {
    "alp": {"loss.ce_weights": [0.05, 1.0], "model.mask_pooling": "nearest"},
    "panet": {"loss.ce_weights": [1.0, 1.0], "model.mask_pooling": "adjoint"},
    "adnet": {"loss.ce_weights": [0.1, 1.0], "model.mask_pooling": "adjoint"},
    "qnet": {"loss.ce_weights": [0.1, 1.0], "model.mask_pooling": "adjoint"},
    "rpt": {"loss.ce_weights": [0.1, 1.0], "model.mask_pooling": "adjoint"},
}
"""The value a head-dependent field takes when it is left unset (null), per ``model.head.name``."""
HEAD_NAMES: tuple[str, ...] = tuple(HEAD_DEFAULTS)

LEGACY_KEYS: dict[str, str] = {
    "model.proto_grid": "model.head.alp.proto_grid", "model.test_window": "model.head.alp.test_window",
    "model.fg_thresh": "model.head.alp.fg_thresh", "model.bg_thresh": "model.head.alp.bg_thresh",
    "model.empty_window": "model.head.alp.empty_window", "model.mask_downsample": "model.mask_pooling",
}
"""Keys of fsl_med before the head registry -> their key now: a stored config (checkpoint) is read with them moved;
a YAML file or an override using one gets a one-line error naming the new key."""


@dataclass
class ModelConfig:
    """Encoder, few-shot head and what they share (method.md §3, docs "Methods")."""

    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    feature_size: int = 32  # side of the feature grid the heads work on (coarser encoder maps are upsampled to it); 32 for 256 px
    scale: float = 20.0  # cosine scale of every head
    mask_pooling: str | None = None  # null: the head's (alp nearest [D], panet/adnet adjoint); see config.MaskPooling
    compile: str = "off"  # off, or a torch.compile mode for the encoder (default, max-autotune, ...)


@dataclass
class LossConfig:
    """The query loss's class weights and the weight of the prototype alignment loss (method.md §2.3)."""

    ce_weights: list[float] | None = None  # [background, foreground]; null: the head's (alp [0.05, 1], panet [1, 1],
    # adnet [0.1, 1]; config.HEAD_DEFAULTS)
    align_weight: float = 1.0  # weight of the prototype alignment loss (PANet's PAR); 0: off


@dataclass
class OptimConfig:
    """Optimiser and schedule: SGD (reference) or AdamW with warm-up (random-init encoders)."""

    name: str = "sgd"  # sgd (the references) or adamw (for encoders trained from scratch)
    lr: float = 1e-3  # learning rate (> 0); 1e-3 as [A]/[D]
    momentum: float = 0.9  # SGD momentum (not used by adamw)
    weight_decay: float = 5e-4  # weight decay of every trainable parameter (>= 0)
    lr_step: int = 1000  # step decay: the lr is multiplied by lr_gamma every lr_step optimiser steps
    lr_gamma: float = 0.95  # step decay factor, in (0, 1]; 1: constant lr
    warmup_steps: int = 0  # linear lr warm-up over this many steps (0: none)


@dataclass
class TrainerConfig:
    """Lightning ``Trainer`` arguments."""

    max_steps: int = 100000  # training length in optimiser steps ([A]'s presets: 100100)
    accelerator: str = "auto"  # Lightning Trainer accelerator: auto, cpu, gpu, ...
    devices: Any = 1  # Lightning Trainer devices: a count, a list of ids, or auto
    num_nodes: int = 1  # Lightning Trainer num_nodes (>= 1)
    strategy: str = "auto"  # Lightning Trainer strategy: auto, ddp, ...
    precision: str = "32-true"  # Lightning Trainer precision: 32-true, bf16-mixed, 16-mixed, ... (the heads compute in float32)
    val_check_interval: int = 1000  # training steps between validations (val/dice on data.num_val_scans scans)
    log_every_n_steps: int = 50  # Lightning Trainer log_every_n_steps: metrics logged every n steps
    deterministic: bool = False  # Lightning Trainer deterministic: deterministic torch algorithms (slower)
    gradient_clip_val: float | None = None  # Lightning Trainer gradient_clip_val: clip gradients to this norm; null: no clipping
    ckpt_every_n_steps: int | None = None  # steps between writes of checkpoints/last.ckpt; null: every val_check_interval steps
    enable_progress_bar: bool = True  # show Lightning's progress bar (only on a terminal)


@dataclass
class EvalConfig:
    """EP1 evaluation (method.md §5)."""

    npart: int = 3  # support parts per organ (EP1, 3): each query slice uses the support slice of its part (1..100)
    batch_size: int = 4  # query slices per encoder call; 4 on a 2-core CPU: as fast as 8, 86 MB less peak memory
    z_margin: int = 0  # extra slices scored beyond the organ's z-extent on each side (0 in EP1)
    skip_no_organ_slices: bool | None = None  # null: compat (fsl_med false: [A] scores every slice of the extent;
    # reference true: [D] skips slices inside the extent without the organ)
    score_last_slice: bool | None = None  # null: follows compat (fsl_med true; reference false: never scores it)
    ct_stats: str | None = None  # null: compat (fsl_med train; reference eval), see config.CtStats
    variants: list[str] = field(default_factory=lambda: ["plain", "cca"])
    cca_mode: str = DEFAULT_CCA_MODE  # CCA per slice (2d, 8-connected, the paper's) or over the query volume (3d, 26-connected)
    hd95: bool = True  # also compute HD95 in mm per scan and organ (MONAI; fsl_med's addition)
    overlay_slices: int = 3  # overlay PNGs per organ of the first query scan, one per support part; 0: none
    skip_bad: bool = False  # skip an unreadable query scan and list it in the report instead of failing (--skip-bad)
    allow_train_scans: bool = False  # score scans the checkpoint trained on (a deliberate in-sample analysis)
    shots_source: str = "scans"  # k-shot supports: k support scans, or k slices per part of the support scan
    save_predictions: bool = False  # multi-label NIfTI per query scan and variant (prepared + source grid)
    refinements: list[str] = field(default_factory=list)  # user refinement callbacks: "module:Class" or "file.py:Class"
    part_rule: str = "extent"  # extent (fsl_med) | count (the ADNet lineage), see config.PartRule
    support_pick: str = "next"  # next (fsl_med) | group_last (ADNet) | group_index:N (Q-Net/RPT: 2), see SUPPORT_PICK_RE


@dataclass
class TTTConfig:
    """Test-time training (method.md §7): adapt on the query's own prediction, then re-predict."""

    steps: int = 100  # SGD steps per query slice (or volume with mode=volume); 0: no adaptation
    lr: float = 1e-3  # TTT learning rate (constant); 1e-3 as [D]
    momentum: float = 0.9  # TTT SGD momentum
    weight_decay: float = 5e-4  # TTT SGD weight decay
    params: str = "all"  # what adapts: all trainable parameters (with LoRA: the LoRA weights), or only lora or adapter weights
    mode: str = "slice"  # adapt per query slice (slice, the paper's) or once per query volume (volume, far cheaper)
    transpose: bool = True  # transpose both augmented copies (height and width swapped) before each step, as [D]
    restore: bool | None = None  # null: compat. false: the model keeps each adaptation (the reference's reset keeps
    # references to the live weights, so later slices, organs and scans start from the adapted model)


@dataclass
class SlurmConfig:
    """``protocol.launcher=slurm``: the resources of each job (one SLURM job per training run, sent as a job array
    through submitit). null: the partition's default."""

    partition: str | None = None  # sbatch --partition (a comma-separated list allowed); null: the cluster's default
    time: str = "24:00:00"  # sbatch --time per job (minutes or [D-]HH:MM:SS); a job preempted or near it requeues
    gpus: int = 0  # GPUs per job (--gpus-per-node); 1 for GPU training
    cpus: int = 4  # CPUs per job (--cpus-per-task): data loading and, without a GPU, the model
    mem: str | None = None  # memory per job (--mem), e.g. 32G
    account: str | None = None  # sbatch --account; null: your default account
    qos: str | None = None  # sbatch --qos; null: the default QOS
    extra: list[str] = field(default_factory=list)  # further sbatch options, e.g. ["--constraint=a100"]
    setup: list[str] = field(default_factory=list)  # shell lines run before each job (e.g. "module load cuda")
    max_requeues: int = 3  # a job stopped by SIGTERM/SIGUSR2 (preemption, time limit) requeues at most this often
    array_parallelism: int = 256  # at most this many jobs of one array run at once


@dataclass
class ProtocolConfig:
    """What ``fsl-med protocol`` runs: folds x settings x seeds, each evaluated with ``variants``; and where the jobs
    of ``protocol``, ``ablate`` and ``compare`` run (``launcher``, ``parallel``, ``jobs_per_gpu``, ``slurm``)."""

    folds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])  # folds run, each a training and an evaluation (0..4)
    settings: list[int] = field(default_factory=lambda: [1, 2])  # Settings run (1, 2); Setting 2 trains one model per test-organ group
    seeds: list[int] = field(default_factory=lambda: [1234])  # training seeds; each fold x setting x seed is one run, reported as mean ± std
    variants: list[str] = field(default_factory=lambda: ["plain", "cca", "ttt", "ttt_cca"])
    launcher: str = "inline"  # inline | local | slurm
    parallel: int | None = None  # local: jobs at once (null: GPUs x jobs_per_gpu, or 1 without a GPU)
    jobs_per_gpu: int = 1  # local: batch-1 runs sharing one GPU (gpu-check's concurrent-training row measures it)
    threads_per_job: int | None = None  # CPU threads of each job (torch.set_num_threads), under every launcher. null:
    # inline keeps torch's default (all cores), local splits the cores between its jobs, slurm uses protocol.slurm.cpus.
    # On the CPU the last bits of a float reduction depend on the thread count: equal values give equal rows
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


LAUNCH_KEYS: tuple[str, ...] = (
    "protocol.launcher", "protocol.parallel", "protocol.jobs_per_gpu", "protocol.threads_per_job", "protocol.slurm",
    "logging.logger",
    "logging.wandb_project", "logging.wandb_entity", "logging.wandb_group", "trainer.enable_progress_bar",
)
"""Fields that say where and how the jobs run and are logged, not what they compute: a protocol folder's jobs
resume under other values of these (e.g. started ``local``, continued on ``slurm``)."""


@dataclass
class AblationRun:
    """One row of ``fsl-med ablate``: ``overrides`` (``key=value`` strings) on top of the base config.

    ``reuse`` names an earlier row whose trained checkpoint this row evaluates instead of training (for
    evaluation-time changes: ``shots``, ``eval.*``, ``ttt.*``); ``variants`` replaces ``ablation.variants``.
    """

    name: str = "???"  # row name (required, unique); the row's runs are named ``<name>-<row name>``
    overrides: list[str] = field(default_factory=list)  # key=value strings applied on top of the base config for this row
    reuse: str | None = None  # an earlier row's name: evaluate that row's checkpoint instead of training; null: train
    variants: list[str] | None = None


@dataclass
class AblationConfig:
    """What ``fsl-med ablate`` runs: every row of ``runs`` is trained (or reused) and evaluated with
    ``variants`` on the base config's fold, setting and seed."""

    runs: list[AblationRun] = field(default_factory=list)  # the rows to train (or reuse) and evaluate, in order; at least one
    variants: list[str] = field(default_factory=lambda: ["plain", "cca", "ttt", "ttt_cca"])


@dataclass
class ReportedDice:
    """One number a paper reports, shown in ``fsl-med compare``'s *reported* column (never mixed with re-runs).

    ``source`` is required (the paper and its table, e.g. "Hansen et al., MedIA 2022, Table 3"): a number whose source
    is not stated is a config error, not a guess (docs "Methods": Comparing heads in one command). ``encoder`` null:
    every row of ``head``."""

    head: str | None = None  # the head the number belongs to (one of compare.heads); required
    setting: int = 1  # the Setting it was reported for (1 or 2; one of protocol.settings)
    dice: float | None = None  # mean Dice (%) over the organs, as the paper reports it
    source: str | None = None  # paper and table, e.g. "Hansen et al., MedIA 2022, Table 3"; required
    encoder: str | None = None  # the row's encoder (one of the compared encoders); null: every row of the head


@dataclass
class CompareConfig:
    """What ``fsl-med compare`` runs: every head x every encoder (empty: ``model.encoder.name``) through the
    ``protocol`` section's folds, settings, seeds and variants, with one report.

    ``encoder_overrides``: encoder name -> ``key=value`` strings applied on top of the config for that encoder's rows
    (e.g. another lr, fewer steps, ``protocol.variants`` without TTT); they may not change what is compared (data,
    seed, folds, settings, seeds, evaluation). ``reported``: paper numbers with their source (empty: none verified)."""

    heads: list[str] = field(default_factory=lambda: list(HEAD_NAMES))  # heads compared (each registered, no duplicates)
    encoders: list[str] = field(default_factory=list)  # encoders compared (model.encoder.name values); empty: model.encoder.name alone
    encoder_overrides: dict[str, list[str]] = field(default_factory=dict)  # encoder name -> key=value strings for that encoder's rows (steps, lr, variants, ...)
    reported: list[ReportedDice] = field(default_factory=list)  # papers' numbers with their source, shown in the report's reported column; empty: none verified
    paper_protocol: dict[str, str] = field(default_factory=dict)  # head -> its paper's preset (e.g. adnet:
    # adnet_reference.yaml, relative to the compare config's folder): each such head gets a twin row under that
    # preset's protocol (PROTOCOL_KEYS), shown in a "paper's protocol" column
    paper_protocol_encoders: list[str] | None = None  # encoders with paper-protocol twins; null: all, []: none


PROTOCOL_KEYS: tuple[str, ...] = (
    "data.episodes", "data.supervoxel", "data.exclude_rule", "data.exclude_labels", "data.num_val_scans",
    "eval.part_rule", "eval.support_pick", "eval.skip_no_organ_slices",
)
"""The evaluation and training *protocol* of a paper (docs "Methods": Each paper's protocol as fields), as opposed to
its recipe (encoder, weights, optimiser, steps, seed): what ``fsl-med compare`` takes from a head's
``experiments/<head>_reference.yaml`` for its "paper's protocol" column."""


@dataclass
class LoggingConfig:
    """Where runs are written and which logger records metrics."""

    logger: str = "csv"  # metrics logger: csv, tensorboard, wandb (offline without an API key) or none
    output_dir: str = "lightning_logs"  # where run folders are written: ``<output_dir>/<name>/version_N``
    wandb_project: str = "fsl_med"  # W&B project (logging.logger=wandb)
    wandb_entity: str | None = None  # W&B entity (user or team); null: W&B's default
    wandb_group: str | None = None  # W&B group of the run (protocol, ablate, compare: their folder, set per job)


@dataclass
class Config:
    """The full run configuration."""

    name: str = "run"  # run name: runs are written to ``<logging.output_dir>/<name>/version_N`` (letters, digits, . _ -)
    compat: str = "fsl_med"  # fsl_med (corrected behaviour) or reference (the reference code's, bugs included)
    seed: int = 1234  # seeds Python, NumPy, torch and loader workers; episode i is a function of (seed, i); 0..2**32-1
    shots: int = 1  # k-shot: k augmented supports per training episode, k supports per part in evaluation
    ckpt: str | None = None  # checkpoint to evaluate (train: to resume when resume is null): a .ckpt path, or latest (the newest ``last.ckpt`` of runs named ``name``); null: none (evaluate the encoder as configured)
    resume: str | None = None  # checkpoint a training resumes (weights, optimiser, step; data.fold/setting/test_organs from it unless given): a .ckpt path or latest; null: ckpt, else a new run
    resume_allow_other_data: bool = False  # resume (or ckpt=) on a data.root holding other scans than the run's
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ttt: TTTConfig = field(default_factory=TTTConfig)
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    ablation: AblationConfig = field(default_factory=AblationConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def _all_keys(node: Any, prefix: str = "") -> list[str]:
    keys: list[str] = []
    if isinstance(node, DictConfig):
        for k in node.keys():
            full = f"{prefix}{k}"
            keys.append(full)
            keys.extend(_all_keys(node._get_node(k), f"{full}."))
    return keys


def _closest(key: str) -> str:
    valid = _all_keys(OmegaConf.structured(Config))
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if not match:  # try on the last component only, keeping the parent
        parent, _, last = key.rpartition(".")
        siblings = [k for k in valid if k.rpartition(".")[0] == parent]
        match = difflib.get_close_matches(f"{parent}.{last}" if parent else last, siblings, n=1, cutoff=0.3)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _translate(err: OmegaConfBaseException, where: str) -> ConfigError:
    key = getattr(err, "full_key", None) or ""
    if isinstance(err, (ConfigKeyError, ConfigAttributeError)) and key in LEGACY_KEYS:
        return ConfigError(f"{where}: config key '{key}' is now '{LEGACY_KEYS[key]}'")
    if isinstance(err, (ConfigKeyError, ConfigAttributeError)) and key:
        return ConfigError(f"{where}: unknown config key '{key}'{_closest(key)}")
    if isinstance(err, (ValidationError, ConfigTypeError)) and key:
        msg = str(err).splitlines()[0]
        return ConfigError(f"{where}: wrong type for config key '{key}': {msg}")
    first = str(err).splitlines()[0] if str(err) else type(err).__name__
    return ConfigError(f"{where}: {first}" + (f" (key '{key}')" if key else ""))


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    """Read a YAML config, resolving ``defaults: [other.yaml]`` (relative to its folder) first."""
    if path.is_dir():
        raise ConfigError(f"config file {path}: is a folder, not a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: circular 'defaults' chain")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); a config file is UTF-8 YAML") from e
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from e
    except yaml.YAMLError as e:
        line = f" line {e.problem_mark.line + 1}" if getattr(e, "problem_mark", None) else ""
        raise ConfigError(f"{path}:{line} is not valid YAML") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of keys, got {type(raw).__name__}")
    parents = raw.pop("defaults", []) or []
    if isinstance(parents, str):
        parents = [parents]
    merged = OmegaConf.create()
    for parent in parents:
        merged = OmegaConf.merge(merged, _read_yaml(path.parent / str(parent), (*seen, path.resolve())))
    return OmegaConf.merge(merged, OmegaConf.create(raw))


def load_config(path: str | os.PathLike[str] | None = None, overrides: list[str] | None = None) -> DictConfig:
    """Build and validate a run configuration.

    Args:
        path: a YAML file (may be ``None`` for the schema defaults only).
        overrides: dot-list ``key=value`` strings applied last.

    Returns:
        A structured (typed) ``DictConfig`` of :class:`Config`, with interpolations resolved.

    Raises:
        ConfigError: unknown key, wrong type, malformed override or out-of-range value.
    """
    cfg = OmegaConf.structured(Config)
    if path is not None:
        try:
            cfg = OmegaConf.merge(cfg, _read_yaml(Path(path)))
        except OmegaConfBaseException as e:
            raise _translate(e, str(path)) from e
        except (TypeError, ValueError) as e:  # e.g. a mapping where the schema has a list
            raise ConfigError(f"{path}: {str(e).splitlines()[0] if str(e) else type(e).__name__} (a section has the "
                              "wrong kind of value: a mapping for a list or the reverse)") from e
    cfg = apply_overrides(cfg, overrides or [])
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        raise _translate(e, "config") from e
    _normalise(cfg)
    validate(cfg)
    return cfg


def _normalise(cfg: DictConfig) -> None:
    """Undo YAML 1.1's reading of ``off`` as a boolean: ``model.compile=off`` (command line or YAML file)
    arrives in the string field as ``'False'``."""
    if cfg.model.compile in ("False", "false"):
        cfg.model.compile = "off"
    if cfg.data.cache_dir == "":  # FSL_MED_CACHE set but empty: the default, not the current folder
        cfg.data.cache_dir = ".cache/fsl_med"
    defaults = {**COMPAT.get(str(cfg.compat), {}), **HEAD_DEFAULTS.get(str(cfg.model.head.name), {})}
    for key, value in defaults.items():  # unset compat- and head-dependent fields follow compat and the head
        if OmegaConf.select(cfg, key) is None:
            OmegaConf.update(cfg, key, value)


def apply_overrides(cfg: DictConfig, overrides: list[str], where: str = "override") -> DictConfig:
    """A new config with dot-list ``key=value`` strings merged into ``cfg`` (which is not modified); not
    validated. Raises a one-line ConfigError naming ``where`` and the item for an unknown key, a wrong type or
    a malformed item."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{where} '{item}' is not of the form key=value")
        key = item.split("=", 1)[0].strip()
        old_head = OmegaConf.select(cfg, "model.head.name", default=None)
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as e:
            raise _translate(e, f"{where} '{item}'") from e
        except TypeError as e:  # a mapping where the schema has a list, or the reverse
            raise ConfigError(f"{where} '{item}': wrong kind of value for '{key}' ({e})") from e
        except Exception as e:  # yaml parsing of the value
            raise ConfigError(f"{where} '{item}': cannot parse value for '{key}'") from e
        follow_head(cfg, old_head)  # a filled-in config (e.g. an ablation row's base) may switch head
    return cfg


QNET_ALPHA: dict[int, list[float]] = {1: [0.9, 0.1], 2: [0.6, 0.4]}
"""Q-Net's scale weights [fine, coarse] per ``data.setting`` when ``model.head.qnet.alpha`` is null (the reference README's
values; its code trains with 0.9/0.1 whatever the setting, because the value is edited by hand in the source)."""


def head_options(cfg: DictConfig) -> dict[str, Any]:
    """The constructor options of the configured head: its section ``model.head.<name>`` as plain values, with the
    fields that follow another setting resolved (Q-Net's ``alpha`` by ``data.setting``)."""
    name = str(cfg.model.head.name)
    options = OmegaConf.to_container(cfg.model.head[name], resolve=True)
    assert isinstance(options, dict)
    if name == "qnet" and options.get("alpha") is None:
        options["alpha"] = list(QNET_ALPHA[int(cfg.data.setting)])
    return options


def follow_head(cfg: DictConfig, old_head: str | None, keep: tuple[str, ...] = ()) -> None:
    """In place: after ``model.head.name`` changed from ``old_head`` in a filled-in config, each field of
    :data:`HEAD_DEFAULTS` that holds ``old_head``'s default takes the new head's (a value set to something else, or a
    key in ``keep``, stays). Nothing happens when the head is unchanged or either name is unknown."""
    new_head = OmegaConf.select(cfg, "model.head.name", default=None)
    if new_head == old_head or old_head not in HEAD_DEFAULTS or new_head not in HEAD_DEFAULTS:
        return
    for key, value in HEAD_DEFAULTS[old_head].items():
        if key not in keep and OmegaConf.select(cfg, key) == value:
            OmegaConf.update(cfg, key, HEAD_DEFAULTS[new_head][key], merge=False)


def unknown_head(name: str, names: tuple[str, ...] | list[str]) -> ConfigError:
    """The one-line error of a ``model.head.name`` that is not one of ``names``: the closest name and all of them."""
    close = difflib.get_close_matches(str(name), list(names), n=1, cutoff=0.0)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"config key 'model.head.name': unknown head '{name}'{hint} (registered: {', '.join(names)})")


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config key '{key}': {msg}")


def validate(cfg: DictConfig) -> None:
    """Check value ranges and cross-field consistency; raise :class:`ConfigError` on the first problem.

    Names that live in registries (the dataset, its organs and folds, the encoder) are checked by
    :func:`fsl_med.run_config.check_registries`, which the verbs call, and again where the objects are built."""
    if OmegaConf.is_missing(cfg.data, "root"):
        raise ConfigError("config key 'data.root' is not set: pass data.root=PATH (or DATA=PATH to make)")
    head = str(cfg.model.head.name)  # first: the head decides other fields
    if head not in HEAD_NAMES:
        raise unknown_head(head, HEAD_NAMES)
    for key, choice in CHOICES.items():  # then: compat decides other fields
        valid = get_args(choice)
        value = OmegaConf.select(cfg, key)
        _check(value in valid, key, f"must be one of {', '.join(map(str, valid))}, got '{value}'")
    _check(cfg.data.fold >= 0, "data.fold", f"must be >= 0, got {cfg.data.fold}")
    _check(cfg.data.setting in (1, 2), "data.setting", f"must be 1 or 2, got {cfg.data.setting}")
    _check(len(cfg.data.test_organs) > 0, "data.test_organs", "must name at least one organ")
    _check(len(set(cfg.data.test_organs)) == len(cfg.data.test_organs), "data.test_organs", "has duplicates")
    _check(NAME_RE.fullmatch(str(cfg.name)) is not None and cfg.name not in (".", ".."), "name",
           f"must be one folder name of letters, digits, '.', '_' and '-' (it names the run folder "
           f"<logging.output_dir>/<name>), got {cfg.name!r}")
    _check(0 <= cfg.seed < 2**32, "seed", f"must be in 0..{2**32 - 1} (numpy's seed range), got {cfg.seed}")
    for key in ("data.root", "data.cache_dir", "logging.output_dir", "ckpt", "resume", "model.encoder.weights"):
        value = OmegaConf.select(cfg, key, throw_on_missing=False)
        if isinstance(value, str) and value.startswith("~"):
            try:
                Path(value).expanduser()
            except RuntimeError as e:
                raise ConfigError(f"config key '{key}': cannot expand {value!r} ({e})") from e
    _check(28 <= cfg.data.image_size <= MAX_IMAGE_SIZE, "data.image_size",
           f"must be in 28..{MAX_IMAGE_SIZE}, got {cfg.data.image_size}")
    _check(cfg.data.episodes_per_epoch > 0, "data.episodes_per_epoch", "must be > 0")
    _check(cfg.data.batch_size > 0, "data.batch_size", "must be > 0")
    _check(cfg.data.num_workers >= 0, "data.num_workers", "must be >= 0")
    _check(cfg.data.num_val_scans >= 0, "data.num_val_scans", "must be >= 0")
    _check(cfg.data.min_superpixel_pixels >= 1, "data.min_superpixel_pixels", "must be >= 1")
    _check(cfg.shots >= 1, "shots", f"must be >= 1, got {cfg.shots}")
    aug = cfg.data.augment
    _check(0 < aug.zoom_min <= aug.zoom_max, "data.augment.zoom_min", "need 0 < zoom_min <= zoom_max")
    _check(0 < aug.gamma_min <= aug.gamma_max, "data.augment.gamma_min", "need 0 < gamma_min <= gamma_max")
    _check(aug.elastic_sigma > 0, "data.augment.elastic_sigma", "must be > 0")

    enc = cfg.model.encoder
    _check(enc.lora_rank > 0, "model.encoder.lora_rank", f"must be > 0, got {enc.lora_rank}")
    targets = list(enc.lora_targets)
    _check(len(targets) > 0 and all(t in LORA_TARGETS for t in targets), "model.encoder.lora_targets",
           f"must be a non-empty subset of {list(LORA_TARGETS)}, got {targets}")
    _check(bool(enc.weights), "model.encoder.weights", "must be 'none', a hub tag or a file path")
    m = cfg.model
    _check(m.feature_size > 0, "model.feature_size", f"must be > 0, got {m.feature_size}")
    a = m.head.alp
    _check(a.proto_grid > 0 and m.feature_size % a.proto_grid == 0, "model.head.alp.proto_grid",
           f"feature_size ({m.feature_size}) must be a multiple of proto_grid ({a.proto_grid})")
    _check(a.test_window > 0 and m.feature_size % a.test_window == 0, "model.head.alp.test_window",
           f"must divide feature_size ({m.feature_size})")
    _check(0 < a.fg_thresh <= 1 and 0 < a.bg_thresh <= 1, "model.head.alp.fg_thresh", "thresholds must be in (0, 1]")
    _check(m.scale > 0, "model.scale", "must be > 0")
    for name in ("panet", "adnet", "qnet", "rpt"):
        _check(m.head[name].cos_eps > 0, f"model.head.{name}.cos_eps", "must be > 0")
    q = m.head.qnet
    _check(q.alpha is None or (len(q.alpha) == 2 and min(q.alpha) >= 0 and sum(q.alpha) > 0), "model.head.qnet.alpha",
           f"must be two non-negative weights [fine, coarse] with a positive sum (or null: by data.setting), "
           f"got {None if q.alpha is None else list(q.alpha)}")
    _check(q.refine_iters >= 0, "model.head.qnet.refine_iters", f"must be >= 0, got {q.refine_iters}")
    _check(q.refine_lr > 0 and math.isfinite(q.refine_lr), "model.head.qnet.refine_lr", "must be > 0")
    r = m.head.rpt
    for key in ("tau_hidden",):
        _check(q[key] >= 0 and r[key] >= 0, f"model.head.qnet.{key}", "must be >= 0 (0: a single Linear)")
    _check(r.fg_num is None or r.fg_num >= 1, "model.head.rpt.fg_num", f"must be >= 1 (or null), got {r.fg_num}")
    _check(r.bat_passes >= 0, "model.head.rpt.bat_passes", "must be >= 0")
    _check(r.attn_heads >= 1, "model.head.rpt.attn_heads", "must be >= 1")
    _check(0 <= r.dropout < 1, "model.head.rpt.dropout", "must be in [0, 1)")
    _check(0 <= r.seed < 2**32, "model.head.rpt.seed", f"must be in 0..{2**32 - 1}")
    for key in ("periphery_weight", "mse_weight", "self_weight"):
        _check(r[key] >= 0, f"model.head.rpt.{key}", "must be >= 0")
    _check(math.isfinite(m.head.adnet.threshold_init), "model.head.adnet.threshold_init", "must be finite")
    _check(m.head.adnet.threshold_weight >= 0, "model.head.adnet.threshold_weight", "must be >= 0")
    _check(len(cfg.loss.ce_weights) == 2 and min(cfg.loss.ce_weights) >= 0, "loss.ce_weights",
           "must be two non-negative weights [background, foreground]")
    _check(cfg.loss.align_weight >= 0, "loss.align_weight", "must be >= 0")
    o = cfg.optim
    _check(o.lr > 0 and math.isfinite(o.lr), "optim.lr", f"must be > 0, got {o.lr}")
    _check(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    _check(o.lr_step > 0, "optim.lr_step", "must be > 0")
    _check(0 < o.lr_gamma <= 1, "optim.lr_gamma", "must be in (0, 1]")
    _check(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    _check(cfg.trainer.max_steps > 0, "trainer.max_steps", f"must be > 0, got {cfg.trainer.max_steps}")
    _check(cfg.trainer.val_check_interval > 0, "trainer.val_check_interval", "must be > 0")
    _check(cfg.trainer.ckpt_every_n_steps is None or cfg.trainer.ckpt_every_n_steps > 0,
           "trainer.ckpt_every_n_steps", "must be > 0 (or null: every val_check_interval steps)")
    _check(0 < cfg.eval.npart <= MAX_NPART, "eval.npart", f"must be in 1..{MAX_NPART} (support parts per organ; the "
           f"protocol uses 3), got {cfg.eval.npart}")
    _check(cfg.eval.batch_size > 0, "eval.batch_size", "must be > 0")
    _check(cfg.eval.z_margin >= 0, "eval.z_margin", "must be >= 0")
    lists = [("eval.variants", cfg.eval.variants), ("protocol.variants", cfg.protocol.variants),
             ("ablation.variants", cfg.ablation.variants)]
    lists += [(f"ablation.runs[{i}].variants", r.variants) for i, r in enumerate(cfg.ablation.runs)
              if r.variants is not None]
    for key, variants in lists:
        bad = [v for v in variants if v not in VARIANTS]
        _check(not bad and len(variants) > 0, key, f"must be a non-empty subset of {list(VARIANTS)}, got {list(variants)}")
    _check(cfg.eval.overlay_slices >= 0, "eval.overlay_slices", "must be >= 0")
    _check(SUPPORT_PICK_RE.fullmatch(str(cfg.eval.support_pick)) is not None, "eval.support_pick",
           f"must be next, group_last or group_index:N (N = 0-based position in the fold's group), "
           f"got '{cfg.eval.support_pick}'")
    sv = cfg.data.supervoxel
    _check(sv.min_size >= 1, "data.supervoxel.min_size", f"must be >= 1, got {sv.min_size}")
    _check(sv.sigma >= 0, "data.supervoxel.sigma", f"must be >= 0, got {sv.sigma}")
    _check(sv.min_pixels >= 1, "data.supervoxel.min_pixels", f"must be >= 1, got {sv.min_pixels}")
    t = cfg.ttt
    _check(t.steps >= 0, "ttt.steps", f"must be >= 0, got {t.steps}")
    _check(t.lr > 0 and math.isfinite(t.lr), "ttt.lr", f"must be > 0, got {t.lr}")
    _check(t.weight_decay >= 0, "ttt.weight_decay", "must be >= 0")
    pr = cfg.protocol
    _check(len(pr.folds) > 0 and all(f >= 0 for f in pr.folds), "protocol.folds",
           f"must be a non-empty list of folds >= 0, got {list(pr.folds)}")
    _check(len(pr.settings) > 0 and all(s in (1, 2) for s in pr.settings), "protocol.settings",
           f"must be a non-empty subset of [1, 2], got {list(pr.settings)}")
    _check(len(pr.seeds) > 0, "protocol.seeds", "must name at least one seed")
    _check(all(0 <= x < 2**32 for x in pr.seeds), "protocol.seeds", f"must be in 0..{2**32 - 1}, got {list(pr.seeds)}")
    _check(pr.parallel is None or pr.parallel >= 1, "protocol.parallel", f"must be >= 1 (or null), got {pr.parallel}")
    _check(pr.jobs_per_gpu >= 1, "protocol.jobs_per_gpu", f"must be >= 1, got {pr.jobs_per_gpu}")
    _check(pr.threads_per_job is None or pr.threads_per_job >= 1, "protocol.threads_per_job",
           f"must be >= 1 (or null: the launcher's default), got {pr.threads_per_job}")
    _validate_slurm(cfg)
    _validate_compare(cfg)


def _validate_slurm(cfg: DictConfig) -> None:
    """``protocol.slurm``: each value in a form sbatch accepts (checked before anything is submitted)."""
    sl = cfg.protocol.slurm
    for key in ("partition", "account", "qos"):
        v = sl[key]
        _check(v is None or SLURM_NAME_RE.fullmatch(str(v)) is not None, f"protocol.slurm.{key}",
               f"must be a SLURM name (letters, digits, _ . , -), got '{v}'")
    _check(SLURM_TIME_RE.fullmatch(str(sl.time)) is not None, "protocol.slurm.time",
           f"must be minutes or [D-]HH:MM:SS as sbatch --time takes it, got '{sl.time}'")
    _check(sl.gpus >= 0, "protocol.slurm.gpus", f"must be >= 0, got {sl.gpus}")
    _check(sl.cpus >= 1, "protocol.slurm.cpus", f"must be >= 1, got {sl.cpus}")
    _check(sl.mem is None or SLURM_MEM_RE.fullmatch(str(sl.mem)) is not None, "protocol.slurm.mem",
           f"must be an integer with an optional K/M/G/T suffix (e.g. 32G), got '{sl.mem}'")
    _check(sl.max_requeues >= 0, "protocol.slurm.max_requeues", f"must be >= 0, got {sl.max_requeues}")
    _check(sl.array_parallelism >= 1, "protocol.slurm.array_parallelism", f"must be >= 1, got {sl.array_parallelism}")
    for i, line in enumerate(sl.extra):
        m = SLURM_EXTRA_RE.fullmatch(str(line))
        _check(m is not None and "\n" not in str(line), f"protocol.slurm.extra[{i}]",
               f"must be one sbatch option such as --constraint=a100, got '{line}'")
        _check(m is None or m.group(1) not in SLURM_OWN_OPTIONS, f"protocol.slurm.extra[{i}]",
               f"--{m.group(1) if m else ''} is set by fsl_med (use protocol.slurm.* or leave it)")
    for i, line in enumerate(sl.setup):
        _check("\n" not in str(line), f"protocol.slurm.setup[{i}]", "must be one shell line")


SLURM_OWN_OPTIONS = ("output", "error", "array", "signal", "open-mode", "job-name", "partition", "time",
                     "gpus-per-node", "cpus-per-task", "mem", "account", "qos", "nodes", "ntasks-per-node")
"""sbatch options that ``protocol.slurm`` fields or submitit set: not accepted in ``protocol.slurm.extra``."""


def _validate_compare(cfg: DictConfig) -> None:
    """``compare``: heads (registered, no duplicates), encoders (no duplicates; names are checked against the encoder
    registry by :mod:`fsl_med.compare`) and every ``reported`` entry (a source, a head and setting that are compared,
    a Dice in 0..100, at most one entry per report cell)."""
    c = cfg.compare
    heads = list(c.heads)
    _check(len(heads) > 0, "compare.heads", f"is empty: list the heads to compare (registered: {', '.join(HEAD_NAMES)})")
    for h in heads:
        if h not in HEAD_NAMES:
            close = difflib.get_close_matches(str(h), HEAD_NAMES, n=1, cutoff=0.0)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"config key 'compare.heads': unknown head '{h}'{hint} (registered: {', '.join(HEAD_NAMES)})")
    _check(len(set(heads)) == len(heads), "compare.heads", f"has duplicates: {heads}")
    encoders = list(c.encoders) or [str(cfg.model.encoder.name)]
    _check(len(set(encoders)) == len(encoders), "compare.encoders", f"has duplicates: {encoders}")
    for h in c.paper_protocol:  # a head or encoder named there but not compared is ignored (as encoder_overrides)
        _check(h in HEAD_NAMES, f"compare.paper_protocol.{h}", f"unknown head '{h}' (registered: {', '.join(HEAD_NAMES)})")
    cells: dict[tuple[str, str, int], int] = {}
    for i, r in enumerate(c.reported):
        key = f"compare.reported[{i}]"
        _check(bool(r.source and str(r.source).strip()), f"{key}.source", "is not set: a reported number needs its "
               "source (paper and table); do not fill numbers from memory (docs \"Methods\": Comparing heads)")
        _check(r.head is not None, f"{key}.head", f"is not set: name the head the number belongs to ({heads})")
        _check(r.head in heads, f"{key}.head", f"'{r.head}' is not compared (compare.heads: {heads})")
        _check(r.setting in list(cfg.protocol.settings), f"{key}.setting",
               f"Setting {r.setting} is not run (protocol.settings: {list(cfg.protocol.settings)})")
        _check(r.dice is not None and math.isfinite(r.dice) and 0 <= r.dice <= 100, f"{key}.dice",
               f"must be the mean Dice in % (0..100), got {r.dice}")
        _check(r.encoder is None or r.encoder in encoders, f"{key}.encoder",
               f"'{r.encoder}' is not compared (encoders: {encoders}; null: every row of the head)")
        for e in [r.encoder] if r.encoder is not None else encoders:
            cell = (str(r.head), str(e), int(r.setting))
            _check(cell not in cells, key, f"gives a second number for head {r.head}, encoder {e}, Setting {r.setting} "
                   f"(compare.reported[{cells.get(cell)}] gives one)")
            cells[cell] = i


def to_container(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain Python containers (for checkpoints, reports and loggers)."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def model_container(cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    """:func:`to_container` without the verb-only sections (:data:`VERB_SECTIONS`): what a checkpoint stores.
    :func:`from_container` fills those sections with their defaults again."""
    data = to_container(cfg) if isinstance(cfg, DictConfig) else dict(cfg)
    return {k: v for k, v in data.items() if k not in VERB_SECTIONS}


def from_container(data: dict[str, Any]) -> DictConfig:
    """Rebuild a validated config from :func:`to_container` output (e.g. stored in a checkpoint)."""
    cfg = OmegaConf.structured(Config)
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.create(upgrade_legacy(data)))
    except OmegaConfBaseException as e:
        raise _translate(e, "stored config") from e
    _normalise(cfg)
    validate(cfg)
    return cfg


def upgrade_legacy(data: dict[str, Any]) -> dict[str, Any]:
    """A copy of a stored config (plain containers) with the keys of :data:`LEGACY_KEYS` moved to their new place
    (``data`` is not modified); a config without them is returned as an equal copy."""
    cfg = OmegaConf.create(data)
    for old, new in LEGACY_KEYS.items():
        parent, _, leaf = old.rpartition(".")
        node = OmegaConf.select(cfg, parent)
        if isinstance(node, DictConfig) and leaf in node:
            value = node[leaf]
            del node[leaf]
            if OmegaConf.select(cfg, new) is None:
                OmegaConf.update(cfg, new, value, force_add=True)
    return OmegaConf.to_container(cfg)  # type: ignore[return-value]


def to_yaml(cfg: DictConfig) -> str:
    """The resolved config as YAML text."""
    return OmegaConf.to_yaml(cfg, resolve=True)
