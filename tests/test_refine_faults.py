"""User refinements are named when they fail (issue 28), through the real CLI: a refinement given in
``eval.refinements`` that raises, returns the wrong shape or kind, non-finite or out-of-range probabilities, labels
outside {0, 1}, changes its read-only inputs or the module's mode, or cannot be built is one line
``fsl-med: error: ...`` naming its ``file.py:Class`` and the fault, exit 2, and no run folder is left. A refinement
that changes its copies of the inputs cannot change what the other variants and the scoring see."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from conftest import error_line

from fsl_med.cli import main
from fsl_med.data.phantom import generate_phantom

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "experiments" / "demo.yaml")
HEADER = "import numpy as np\nimport torch\n\nfrom fsl_med.refine.base import Refinement\n\n\n"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[list[str], Path]:
    """A tiny checkpoint trained 2 steps on a phantom: ``(eval overrides without the output folder, checkpoint)``."""
    tmp = tmp_path_factory.mktemp("refine_faults")
    root = generate_phantom(tmp / "ph", n_scans=6, size=48, depth=8, seed=0)
    common = [f"data.root={root}", f"data.cache_dir={tmp / 'cache'}", "data.image_size=48", "data.num_workers=0",
              "trainer.enable_progress_bar=false", "data.num_val_scans=0", "logging.logger=csv"]
    assert main(["train", DEMO, *common, f"logging.output_dir={tmp / 'runs'}", "trainer.max_steps=2",
                 "name=ck"]) == 0
    return common, tmp / "runs" / "ck" / "version_0" / "checkpoints" / "last.ckpt"


def _write(tmp_path: Path, cls: str, body: str, module_code: str = "") -> str:
    """``<tmp>/faulty.py`` with class ``cls`` (``body``: its indented members); returns the spec ``file.py:Class``."""
    path = tmp_path / "faulty.py"
    path.write_text(HEADER + module_code + f"class {cls}(Refinement):\n" + textwrap.indent(textwrap.dedent(body), "    "))
    return f"{path}:{cls}"


def _eval(trained, out: Path, spec: str, *extra: str) -> int:
    common, ckpt = trained
    return main(["eval", DEMO, *common, f"logging.output_dir={out}", f"ckpt={ckpt}", "eval.variants=[plain,cca]",
                 f"eval.refinements=[{spec}]", "name=rf", *extra])




RUNTIME_FAULTS = {
    "raises": ("def refine(self, pred, prob, item, module):\n    raise ValueError('boom')\n",
               ["raised ValueError: boom", "(item: ", " of query scan "]),
    "raises_without_message": ("def refine(self, pred, prob, item, module):\n    raise KeyError()\n",
                               ["raised KeyError: (no message)"]),
    "exits": ("def refine(self, pred, prob, item, module):\n    raise SystemExit(3)\n", ["raised SystemExit: 3"]),
    "wrong_shape": ("def refine(self, pred, prob, item, module):\n    return pred[:, :5], prob\n",
                    ["returned a prediction of shape (", ", 5, 48), expected ("]),
    "wrong_prob_shape": ("def refine(self, pred, prob, item, module):\n    return pred, prob[0]\n",
                         ["returned a probability of shape (48, 48), expected ("]),
    "nan_probability": ("def refine(self, pred, prob, item, module):\n"
                        "    return pred, np.full(prob.shape, np.nan, np.float32)\n",
                        ["returned a non-finite probability"]),
    "inf_probability": ("def refine(self, pred, prob, item, module):\n    p = prob.copy()\n    p[0, 0, 0] = np.inf\n"
                        "    return pred, p\n", ["returned a non-finite probability (1 of "]),
    "probability_above_one": ("def refine(self, pred, prob, item, module):\n    return pred, prob * 2 + 0.5\n",
                              ["returned probabilities outside [0, 1] (min 0.5"]),
    "labels_255": ("def refine(self, pred, prob, item, module):\n    return np.full(pred.shape, 255, np.uint8), prob\n",
                   ["returned labels {255} outside {0, 1}"]),
    "labels_minus_one": ("def refine(self, pred, prob, item, module):\n"
                         "    return np.full(pred.shape, -1, np.int64), prob\n", ["returned labels {-1} outside {0, 1}"]),
    "fractional_labels": ("def refine(self, pred, prob, item, module):\n"
                          "    return np.full(pred.shape, 0.5, np.float32), prob\n",
                          ["returned labels {0.5} outside {0, 1}"]),
    "string_labels": ("def refine(self, pred, prob, item, module):\n"
                      "    return np.full(pred.shape, 'a'), prob\n", ["returned a prediction of dtype <U1"]),
    "not_a_pair": ("def refine(self, pred, prob, item, module):\n    return pred\n",
                   ["returned ndarray, expected a pair (pred, prob)"]),
    "three_values": ("def refine(self, pred, prob, item, module):\n    return pred, prob, 0\n",
                     ["returned a tuple of 3, expected a pair (pred, prob)"]),
    "returns_none": ("def refine(self, pred, prob, item, module):\n    pass\n",
                     ["returned None, expected a pair (pred, prob)"]),
    "none_probability": ("def refine(self, pred, prob, item, module):\n    return pred, None\n",
                         ["returned None as the probability (return prob unchanged"]),
    "not_array_like": ("def refine(self, pred, prob, item, module):\n    return pred, {'a': 1}\n",
                       ["returned a probability of type dict, not an array of numbers"]),
    "writes_its_input": ("def refine(self, pred, prob, item, module):\n    pred[:] = 0\n    return pred, prob\n",
                         ["raised ValueError: assignment destination is read-only", "pred.copy()"]),
    "leaves_module_training": ("def refine(self, pred, prob, item, module):\n    module.train()\n"
                               "    return pred, prob\n", ["changed the module's train/eval mode"]),
    "unfreezes_parameters": ("def refine(self, pred, prob, item, module):\n"
                             "    for p in module.parameters():\n        p.requires_grad_(not p.requires_grad)\n"
                             "    return pred, prob\n", ["requires_grad flags"]),
}


@pytest.mark.parametrize("fault", list(RUNTIME_FAULTS))
def test_a_failing_refinement_is_named_in_one_line(fault, trained, tmp_path, capsys):
    body, needles = RUNTIME_FAULTS[fault]
    spec = _write(tmp_path, "Faulty", f"name = 'faulty'\n\n{body}")
    out = tmp_path / "runs"
    assert _eval(trained, out, spec) == 2
    line = error_line(capsys.readouterr().err, f"refinement {spec} ", "faulty.py:Faulty", *needles)
    assert line.count("\n") == 0
    assert not (out / "rf-eval").exists(), sorted(out.rglob("*"))  # no run folder left behind


BUILD_FAULTS = {
    "init_raises": ("class Faulty(Refinement):\n    name = 'faulty'\n\n    def __init__(self):\n"
                    "        raise RuntimeError('no GPU here')\n\n"
                    "    def refine(self, pred, prob, item, module):\n        return pred, prob\n",
                    ["Faulty() raised RuntimeError: no GPU here"]),
    "init_needs_arguments": ("class Faulty(Refinement):\n    name = 'faulty'\n\n    def __init__(self, radius):\n"
                             "        self.radius = radius\n\n"
                             "    def refine(self, pred, prob, item, module):\n        return pred, prob\n",
                             ["Faulty() needs arguments", "give them defaults"]),
    "no_name": ("class Faulty(Refinement):\n    def refine(self, pred, prob, item, module):\n        return pred, prob\n",
                ["has no 'name'"]),
    "builtin_name": ("class Faulty(Refinement):\n    name = 'ttt'\n\n"
                     "    def refine(self, pred, prob, item, module):\n        return pred, prob\n",
                     ["produces variant 'ttt', the name of a built-in variant"]),
    "name_with_a_slash": ("class Faulty(Refinement):\n    name = '../escape'\n\n"
                          "    def refine(self, pred, prob, item, module):\n        return pred, prob\n",
                          ["has name '../escape'"]),
    "name_not_a_string": ("class Faulty(Refinement):\n    name = 3\n\n"
                          "    def refine(self, pred, prob, item, module):\n        return pred, prob\n",
                          ["has name 3"]),
    "unknown_source": ("class Faulty(Refinement):\n    name = 'faulty'\n    source = 'ttt'\n\n"
                       "    def refine(self, pred, prob, item, module):\n        return pred, prob\n",
                       ["derives from variant 'ttt', which no earlier callback produced (have: plain, cca)"]),
    "no_refine": ("class Faulty(Refinement):\n    name = 'faulty'\n", ["does not define refine("]),
    "refine_takes_two": ("class Faulty(Refinement):\n    name = 'faulty'\n\n"
                         "    def refine(self, pred, prob):\n        return pred, prob\n",
                         ["refine must take (pred, prob, item, module)"]),
}


@pytest.mark.parametrize("fault", list(BUILD_FAULTS))
def test_a_refinement_that_cannot_be_built_is_named_before_anything_runs(fault, trained, tmp_path, capsys):
    code, needles = BUILD_FAULTS[fault]
    path = tmp_path / "faulty.py"
    path.write_text(HEADER + code)
    spec = f"{path}:Faulty"
    out = tmp_path / "runs"
    assert _eval(trained, out, spec) == 2
    error_line(capsys.readouterr().err, "config key 'eval.refinements'", "faulty.py:Faulty", *needles)
    assert not out.exists() or not any(out.iterdir())  # nothing made


def test_import_time_exit_and_a_folder_named_like_a_file_are_one_line_errors(trained, tmp_path, capsys):
    exits = tmp_path / "exits.py"
    exits.write_text("import sys\nsys.exit(4)\n")
    folder = tmp_path / "folder.py"
    folder.mkdir()
    for spec, needle in ((f"{exits}:X", "cannot import"), (f"{folder}:X", "is not a file")):
        assert _eval(trained, tmp_path / "runs", spec) == 2
        error_line(capsys.readouterr().err, needle)


def test_accepted_results_and_copies_protect_the_other_variants(trained, tmp_path, capsys):
    """bool labels, float 0/1 labels, a list instead of a tuple and CPU tensors are accepted; a refinement that writes
    into its copies (after making them writable) and into its copy of the item's ground truth changes neither the
    plain and CCA variants nor their scores."""
    base = tmp_path / "base"
    spec_ok = _write(tmp_path, "Fine", "name = 'fine'\n\ndef refine(self, pred, prob, item, module):\n"
                     "    return [pred.astype(bool), torch.from_numpy(prob.copy())]\n")
    assert _eval(trained, base, spec_ok) == 0
    ref = json.loads(next(base.rglob("results.json")).read_text())
    sneaky = tmp_path / "sneaky.py"
    sneaky.write_text(HEADER + textwrap.dedent("""\
        class Sneaky(Refinement):
            name = "sneaky"

            def refine(self, pred, prob, item, module):
                pred.setflags(write=True)
                prob.setflags(write=True)
                pred[:] = 1
                prob[:] = 1.0
                item.query_labels[:] = 0
                item.query_images[:] = 0
                return pred.astype(np.float64), prob
        """))
    out = tmp_path / "sneaky_runs"
    assert _eval(trained, out, f"{sneaky}:Sneaky") == 0, capsys.readouterr().err[-3000:]
    got = json.loads(next(out.rglob("results.json")).read_text())
    for v in ("plain", "cca"):
        assert got["variants"][v]["dice"] == ref["variants"][v]["dice"], v
    assert list(ref["variants"]) == ["plain", "cca", "fine"]
    assert ref["variants"]["fine"]["dice"] == ref["variants"]["plain"]["dice"]


def test_a_python_composed_refinement_is_named_module_and_class(trained, tmp_path, capsys):
    """Composed in Python (``evaluate(extra=[...])``), a failing refinement is named ``module:Class``."""
    from fsl_med.config import load_config
    from fsl_med.errors import FslMedError
    from fsl_med.evaluate import evaluate
    from fsl_med.refine.base import Refinement

    class Twice(Refinement):
        name = "twice"

        def refine(self, pred, prob, item, module):
            return pred * 2 + 1, prob

    common, ckpt = trained
    cfg = load_config(DEMO, [*common, f"logging.output_dir={tmp_path / 'runs'}", f"ckpt={ckpt}", "name=py"])
    with pytest.raises(FslMedError, match=r"^refinement (tests\.)?test_refine_faults:\S*Twice returned labels "
                                          r"\{1(, 3)?\} outside \{0, 1\}"):
        evaluate(cfg, extra=[Twice()])
    assert not (tmp_path / "runs" / "py-eval").exists()


def test_a_refinement_composed_in_a_trainer_is_checked_at_setup(trained):
    """``Trainer(callbacks=[...])`` without :func:`fsl_med.callbacks.refinements`: the same checks, before any item."""
    import lightning as L

    from fsl_med.checkpoints import module_from_checkpoint
    from fsl_med.config import load_config
    from fsl_med.data.datamodule import FewShotDataModule
    from fsl_med.errors import ConfigError
    from fsl_med.evaluation.scoring import Scoring
    from fsl_med.refine.base import Refinement

    class Escapes(Refinement):
        name = "../../outside"

        def refine(self, pred, prob, item, module):
            raise AssertionError("never called")

    common, ckpt = trained
    cfg = load_config(DEMO, [*common, f"ckpt={ckpt}"])
    module, _ = module_from_checkpoint(ckpt, cfg)
    trainer = L.Trainer(callbacks=[Escapes(), Scoring()], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, accelerator="cpu", devices=1)
    with pytest.raises(ConfigError, match=r"^refinement \S*Escapes has name '\.\./\.\./outside'"):
        trainer.test(module, datamodule=FewShotDataModule(cfg), verbose=False)


def test_fsl_med_run_checks_the_refinements_before_training(trained, tmp_path, capsys):
    common, _ = trained
    spec = _write(tmp_path, "Faulty", "name = 'cca'\n\ndef refine(self, pred, prob, item, module):\n    return pred, prob\n")
    out = tmp_path / "runs"
    assert main(["run", DEMO, *common, f"logging.output_dir={out}", "trainer.max_steps=2", "name=early",
                 "eval.variants=[plain]", f"eval.refinements=[{spec}]"]) == 2
    error_line(capsys.readouterr().err, "faulty.py:Faulty", "the name of a built-in variant")
    assert not out.exists() or not any(out.iterdir())  # no training run folder either
