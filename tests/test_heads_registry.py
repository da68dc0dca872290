"""The head registry: a head is one module (the Methods page's "Adding a head" runs as written), nothing outside
``fsl_med/models/heads/`` and ``config.py`` names a head, and bad head names are one-line errors."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
from docs_text import page

from fsl_med.errors import ConfigError
from fsl_med.models.heads import create_head, list_heads, register_head
from fsl_med.models.heads.alp import AlpHead

REPO = Path(__file__).resolve().parents[1]

RUN_EXAMPLE = '''
import numpy as np
import torch
from fsl_med.models.encoders import create_encoder
from fsl_med.models.heads import create_head, list_heads
from fsl_med.models.segmenter import FewShotSegmenter

assert "cosine_threshold" in list_heads()
torch.manual_seed(0)
seg = FewShotSegmenter(create_encoder("vit_tiny_patch14", weights="none", input_size=64),
                       create_head("cosine_threshold", feature_size=32, options={"threshold": 0.3}))
rng = np.random.default_rng(0)
img = torch.as_tensor(rng.normal(size=(2, 3, 64, 64)), dtype=torch.float32)
fg = torch.zeros(2, 64, 64)
fg[:, 16:44, 20:40] = 1
before = [p.detach().clone() for p in seg.parameters()]
opt = torch.optim.SGD(seg.parameters(), lr=0.1)
for _ in range(2):
    loss, ce, align = seg.train().episode_loss(img, fg, img, fg.long(), torch.tensor([0.5, 1.0]), 1.0)
    opt.zero_grad()
    loss.backward()
    opt.step()
assert torch.isfinite(loss) and float(align) == 0.0
assert any(not torch.equal(a, b) for a, b in zip(before, seg.parameters()))
protos = seg.support_prototypes(img[:, 0].numpy(), fg.numpy())
pred, prob = seg.predict_volume(protos[:1], img[:, 0].numpy(), np.zeros(2, dtype=int))
assert pred.shape == (2, 64, 64) and pred.dtype == np.uint8 and 0 <= prob.min() <= prob.max() <= 1
assert np.array_equal(pred, (prob > 0.5).astype(np.uint8))  # probability space
print("example ok", float(loss))
'''


def test_readme_example_head_trains_and_predicts():
    """The Methods page's "Adding a head" block, as written, registers a head that trains (weights change) and predicts EP1
    volumes through FewShotSegmenter's unchanged API (in a subprocess: the registry stays clean here)."""
    text = page("methods.md")
    section = text[text.index("## Adding a head"):]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    p = subprocess.run([sys.executable, "-c", block + RUN_EXAMPLE], capture_output=True, text=True, timeout=300,
                       cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "example ok" in p.stdout


def test_nothing_outside_the_heads_and_the_config_names_a_head():
    """Adding a head touches only ``models/heads/`` and ``config.py``: no other module has a head's name as a
    string constant or imports a head module."""
    heads = set(list_heads())
    offenders = []
    for path in sorted((REPO / "fsl_med").rglob("*.py")):
        rel = path.relative_to(REPO / "fsl_med").as_posix()
        if rel.startswith("models/heads/") or rel == "config.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in heads:
                offenders.append(f"{rel}:{node.lineno} {node.value!r}")
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fsl_med.models.heads.") \
                    and node.module.rsplit(".", 1)[-1] in heads:
                offenders.append(f"{rel}:{node.lineno} imports {node.module}")
    assert not offenders, offenders


def test_registry_errors():
    with pytest.raises(ConfigError, match=r"^config key 'model.head.name': unknown head 'panett'; did you mean "
                                          r"'panet'\? \(registered: alp, panet, adnet(, \w+)*\)$"):
        create_head("panett")
    with pytest.raises(ValueError, match="already registered"):

        @register_head
        class Other(AlpHead):  # a second class under a taken name
            name = "alp"

    assert list_heads()[:3] == ["alp", "panet", "adnet"]


def test_unknown_head_on_the_command_line_is_one_line_and_writes_nothing(tmp_path, capsys):
    from fsl_med.cli import main

    out = tmp_path / "runs"
    code = main(["train", str(REPO / "experiments" / "demo.yaml"), f"data.root={tmp_path}", "model.head.name=adnt",
                 f"logging.output_dir={out}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "unknown head 'adnt'; did you mean 'adnet'?" in err and "registered: alp, panet, adnet" in err
    assert not out.exists()


def test_a_head_without_parameters_on_a_frozen_encoder_is_one_line_and_writes_nothing(tmp_path, capsys):
    """PANet (or ALPNet) on a frozen encoder without adapter has nothing to train: one line naming the head and the
    fine-tuning, exit 2, no run folder (it used to fail inside Lightning's optimiser setup)."""
    from fsl_med.cli import main

    out = tmp_path / "runs"
    (tmp_path / "data").mkdir()
    code = main(["train", str(REPO / "experiments" / "demo.yaml"), f"data.root={tmp_path / 'data'}",
                 "model.head.name=panet", "model.encoder.finetune=frozen", f"logging.output_dir={out}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "nothing to train: the panet head has no learnable parameter and model.encoder.finetune=frozen" in err
    assert not out.exists()
