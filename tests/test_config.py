"""Typed config: loading, overrides, one-line errors naming the key, derived fields."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from fsl_med.config import load_config, to_yaml
from fsl_med.errors import ConfigError
from fsl_med.prepare.datasets import excluded_labels
from fsl_med.run_config import load_run_config

ROOT = "data.root=/nonexistent"


def test_experiment_files_load_and_inherit_defaults():
    for name in ("mri", "ct", "demo"):
        cfg = load_config(f"experiments/{name}.yaml", [ROOT])
        assert cfg.model.head.alp.proto_grid == 8 and cfg.loss.ce_weights == [0.05, 1.0]
    mri = load_config("experiments/mri.yaml", [ROOT, "trainer.max_steps=300", "model.encoder.weights=none"])
    assert mri.data.dataset == "chaos_t2" and mri.trainer.max_steps == 300 and mri.model.encoder.weights == "none"
    assert "max_steps: 300" in to_yaml(mri)


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("trainer.max_stpes=3", r"unknown config key 'trainer.max_stpes'.*did you mean 'trainer.max_steps'"),
        ("optim.lrr=0.1", r"unknown config key 'optim.lrr'.*did you mean 'optim.lr'"),
        ("trainer.max_steps=abc", r"wrong type for config key 'trainer.max_steps'"),
        ("optim.lr=0", r"'optim.lr': must be > 0"),
        ("optim.lr=-1e-3", r"'optim.lr': must be > 0"),
        ("data.fold=5", r"'data.fold': must be in 0..4"),
        ("data.setting=3", r"'data.setting': must be 1 or 2"),
        ("data.test_organs=[livr]", r"unknown organ 'livr'.*did you mean 'liver'"),
        ("model.encoder.name=dinov2_vitz14", r"model.encoder.name"),
        ("model.encoder.finetune=half", r"model.encoder.finetune"),
        ("optim.name=adam", r"optim.name"),
        ("model.compile=fast", r"'model.compile': must be one of off, default, reduce-overhead"),
        ("ttt.mode=batch", r"'ttt.mode': must be one of slice, volume, got 'batch'"),
        ("eval.cca_mode=4d", r"'eval.cca_mode': must be one of 2d, 3d"),
        ("logging.logger=mlflow", r"'logging.logger': must be one of csv, tensorboard, wandb, none"),
        ("model.encoder.lora_targets=[qkv,ffn]", r"'model.encoder.lora_targets': must be a non-empty subset"),
        ("nonsense", r"not of the form key=value"),
    ],
)
def test_bad_values_are_one_line_errors(override, pattern):
    """What every verb loads with (:func:`fsl_med.run_config.load_run_config`: schema, ranges and registry names)."""
    with pytest.raises(ConfigError, match=pattern) as e:
        load_run_config("experiments/mri.yaml", [ROOT, override])
    assert "\n" not in str(e.value)


def test_missing_root_and_file():
    with pytest.raises(ConfigError, match="data.root"):
        load_config(None, [])
    with pytest.raises(ConfigError, match="not found"):
        load_config("experiments/nope.yaml", [])


def test_excluded_labels_derived_from_setting():
    s1 = load_config("experiments/mri.yaml", [ROOT])
    assert excluded_labels(s1) == []
    s2 = load_config("experiments/mri.yaml", [ROOT, "data.setting=2", "data.test_organs=[liver,spleen]"])
    assert excluded_labels(s2) == [1, 4]
    ct = load_config("experiments/ct.yaml", [ROOT, "data.setting=2", "data.test_organs=[left_kidney,right_kidney]"])
    assert excluded_labels(ct) == [2, 3]


def test_cli_config_error_is_one_line_without_traceback():
    p = subprocess.run([sys.executable, "-m", "fsl_med", "train", "experiments/mri.yaml", "data.fodl=1"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert lines[-1].startswith("fsl-med: error: ") and "data.fodl" in lines[-1] and "data.fold" in lines[-1]
    assert "Traceback" not in p.stderr


def test_compile_off_survives_yaml_booleans(tmp_path):
    """YAML 1.1 reads ``off`` as false: ``model.compile=off`` (command line or file) must still mean off."""
    assert load_config("experiments/mri.yaml", [ROOT, "model.compile=off"]).model.compile == "off"
    f = tmp_path / "c.yaml"
    f.write_text(f"defaults: [{Path('experiments/mri.yaml').resolve()}]\nmodel:\n  compile: off\n")
    assert load_config(f, [ROOT]).model.compile == "off"
    assert load_config("experiments/mri.yaml", [ROOT, "model.compile=default"]).model.compile == "default"


def test_choice_fields_are_defined_once_and_used_by_their_behaviour():
    """Each choice field's values are one Literal in config; the modules implementing them use that definition."""
    from typing import get_args

    from fsl_med import config
    from fsl_med.models import encoders, lora, vit_encoder
    from fsl_med.refine import cca
    from fsl_med.segment import CCA_CHOICES

    assert encoders.FINETUNE_MODES is config.FINETUNE_MODES == get_args(config.Finetune)
    assert vit_encoder.ADAPTERS is config.ADAPTERS and lora.LORA_TARGETS is config.LORA_TARGETS
    assert cca.CCA_MODES is config.CCA_MODES and CCA_CHOICES == (*config.CCA_MODES, "none")
    from fsl_med.data import masks
    from fsl_med.models import heads
    assert masks.MASK_POOLINGS is config.MASK_POOLINGS == get_args(config.MaskPooling)
    assert tuple(heads.list_heads()) == config.HEAD_NAMES  # every registered head has its config section
    for key, choice in config.CHOICES.items():  # every default (or its compat value when unset) is one of its choices
        value = OmegaConf.select(OmegaConf.structured(config.Config), key)
        value = {**config.COMPAT["fsl_med"], **config.HEAD_DEFAULTS["alp"]}[key] if value is None else value
        assert value in get_args(choice), key


def test_head_presets_and_per_head_defaults():
    """Each head's experiment file and defaults: ``loss.ce_weights`` and ``model.mask_pooling`` follow the head when
    left null, an explicit value wins, and the presets carry their paper's recipe."""
    for head, ce, pooling in (("alp", [0.05, 1.0], "nearest"), ("panet", [1.0, 1.0], "adjoint"),
                              ("adnet", [0.1, 1.0], "adjoint")):
        cfg = load_config("experiments/mri.yaml", [ROOT, f"model.head.name={head}"])
        assert list(cfg.loss.ce_weights) == ce and cfg.model.mask_pooling == pooling
    cfg = load_config("experiments/mri.yaml", [ROOT, "model.head.name=adnet", "loss.ce_weights=[0.3,1]",
                                                 "model.mask_pooling=bilinear"])
    assert list(cfg.loss.ce_weights) == [0.3, 1.0] and cfg.model.mask_pooling == "bilinear"
    panet = load_config("experiments/panet.yaml", [ROOT])
    assert panet.model.head.name == "panet" and panet.trainer.max_steps == 30000
    assert (panet.optim.lr_step, panet.optim.lr_gamma) == (10000, 0.1)
    adnet = load_config("experiments/adnet.yaml", [ROOT])
    assert adnet.model.head.name == "adnet" and adnet.model.encoder.name == "resnet101_deeplabv3"
    assert (adnet.trainer.max_steps, adnet.seed, adnet.optim.lr_gamma, adnet.optim.lr_step) == (50000, 2021, 0.95, 1000)
    assert adnet.model.head.adnet.threshold_init == -10.0 and adnet.model.head.adnet.threshold_weight == 1.0


@pytest.mark.parametrize(("override", "pattern"), [
    ("model.head.name=adnt", r"^config key 'model.head.name': unknown head 'adnt'; did you mean 'adnet'\? "
                             r"\(registered: alp, panet, adnet, qnet, rpt\)$"),
    ("model.head.name=none", r"unknown head 'none'"),
    ("model.proto_grid=4", r"config key 'model.proto_grid' is now 'model.head.alp.proto_grid'$"),
    ("model.mask_downsample=bilinear", r"config key 'model.mask_downsample' is now 'model.mask_pooling'$"),
    ("model.mask_pooling=area", r"'model.mask_pooling': must be one of nearest, bilinear, adjoint, got 'area'"),
    ("model.head.adnet.threshold_weight=-1", r"'model.head.adnet.threshold_weight': must be >= 0"),
    ("model.head.panet.cos_eps=0", r"'model.head.panet.cos_eps': must be > 0"),
    ("model.head.alp.proto_grid=5", r"'model.head.alp.proto_grid': feature_size \(32\) must be a multiple"),
])
def test_bad_head_settings_are_one_line_errors(override, pattern):
    with pytest.raises(ConfigError, match=pattern) as e:
        load_run_config("experiments/mri.yaml", [ROOT, override])
    assert "\n" not in str(e.value)


def test_switching_head_on_a_filled_config_takes_the_new_heads_defaults():
    """An override of ``model.head.name`` on an already loaded config (an ablation row, a compare pair): fields that
    hold the old head's default follow the new head; an explicit other value stays."""
    from fsl_med.config import apply_overrides

    alp = load_config("experiments/mri.yaml", [ROOT])
    adnet = apply_overrides(alp, ["model.head.name=adnet"])
    assert list(adnet.loss.ce_weights) == [0.1, 1.0] and adnet.model.mask_pooling == "adjoint"
    assert list(alp.loss.ce_weights) == [0.05, 1.0]  # not modified
    mine = apply_overrides(load_config("experiments/mri.yaml", [ROOT, "loss.ce_weights=[0.2,1]",
                                                                 "model.mask_pooling=bilinear"]), ["model.head.name=panet"])
    assert list(mine.loss.ce_weights) == [0.2, 1.0] and mine.model.mask_pooling == "bilinear"
    back = apply_overrides(adnet, ["model.head.name=alp"])
    assert list(back.loss.ce_weights) == [0.05, 1.0] and back.model.mask_pooling == "nearest"


def test_a_stored_config_of_before_the_head_registry_is_upgraded():
    """A checkpoint written before the head registry stores ALP's fields at ``model.*`` and
    ``model.mask_downsample``: it loads as the alp head with the same values, and the input is not modified."""
    import copy

    from fsl_med.config import from_container, model_container

    new = model_container(load_config("experiments/mri.yaml", [ROOT, "model.head.alp.test_window=4",
                                                                "model.mask_pooling=bilinear"]))
    old = copy.deepcopy(new)
    alp = old["model"].pop("head")["alp"]
    old["model"].update(alp)
    old["model"]["mask_downsample"] = old["model"].pop("mask_pooling")
    frozen = copy.deepcopy(old)
    cfg = from_container(old)
    assert old == frozen
    assert cfg.model.head.name == "alp" and cfg.model.head.alp.test_window == 4 and cfg.model.mask_pooling == "bilinear"
    assert model_container(cfg) == new
