"""Hardening, round 3 (issue 28): the Python API (:class:`fsl_med.segment.Segmenter` and :func:`fsl_med.segment.segment`)
is as strict as the CLI. Every bad argument is an :class:`fsl_med.errors.FslMedError` with one line naming the
argument and what is wrong (never a raw error of pathlib, nibabel, numpy or torch); the forms a user naturally has
(a torch tensor, one ``(image, mask)`` pair, a generator of pairs, a boolean mask) are accepted and give the mask of
the equivalent array/list form. Voxel sizes the plan cannot resample sensibly are refused, far ones noted once; a
header's invalid intensity scaling (``scl_slope``/``scl_inter``) is read as stated in one note.

One tiny checkpoint (2 training steps on a 48 px phantom) serves the whole module.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch

from fsl_med.cli import main
from fsl_med.data.phantom import generate_phantom
from fsl_med.errors import ConfigError, DataError, FslMedError, WeightsError
from fsl_med.prepare.nifti import read_nifti, write_nifti
from fsl_med.prepare.plan import MriPlan, check_resampling, default_plan
from fsl_med.segment import Segmenter, segment

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "experiments" / "demo.yaml")


@pytest.fixture(scope="module")
def ctx(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A phantom, a checkpoint trained on it for 2 steps, its :class:`Segmenter`, and the phantom's scans 1 (query)
    and 2 (support) as arrays and paths."""
    base = tmp_path_factory.mktemp("api_strict")
    root = generate_phantom(base / "phantom", n_scans=6, size=48, depth=8, seed=0)
    runs = base / "runs"
    assert main(["train", DEMO, f"data.root={root}", f"logging.output_dir={runs}", f"data.cache_dir={base / 'cache'}",
                 "data.image_size=48", "data.num_workers=0", "trainer.max_steps=2", "trainer.enable_progress_bar=false",
                 "data.num_val_scans=0", "name=strict"]) == 0
    ckpt = runs / "strict" / "version_0" / "checkpoints" / "last.ckpt"
    q, qa, _ = read_nifti(root / "image_1.nii.gz")
    s, sa, _ = read_nifti(root / "image_2.nii.gz")
    m, _, _ = read_nifti(root / "label_2.nii.gz")
    folder = base / "a_folder"
    folder.mkdir()
    not_ckpt = base / "not.ckpt"
    not_ckpt.write_text("not a checkpoint")
    rgb = base / "rgb.nii.gz"
    rgb_data = np.zeros((8, 8, 4), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.save(nib.Nifti1Image(rgb_data, np.eye(4)), str(rgb))
    return SimpleNamespace(rgb=rgb, root=root, ckpt=ckpt, seg=Segmenter.from_checkpoint(ckpt), q=q.astype(np.float32), qa=qa,
                           s=s.astype(np.float32), sa=sa, m=m.astype(np.uint8), folder=folder, not_ckpt=not_ckpt,
                           qp=root / "image_1.nii.gz", sp=root / "image_2.nii.gz", mp=root / "label_2.nii.gz")


def _call(c: SimpleNamespace, **change: Any) -> Any:
    """:meth:`Segmenter.segment` on the phantom's arrays (query 1, support 2, liver), with ``change`` applied."""
    kw: dict[str, Any] = {"query": c.q, "supports": [(c.s, c.m)], "query_affine": c.qa, "support_affines": [c.sa],
                          "label": 1}
    kw.update(change)
    return c.seg.segment(kw.pop("query"), kw.pop("supports"), **kw)


def _one_line(err: BaseException, *needles: str) -> str:
    """The message of an error of a Python call: one line, holding ``needles``, naming keywords, never a flag."""
    msg = str(err)
    assert "\n" not in msg.strip() and msg.strip(), msg
    assert not re.search(r"(^|[ /(])--[a-z]", msg), msg  # e.g. plan='pet', not --plan pet
    for n in needles:
        assert n in msg, (n, msg)
    return msg


def _singular(a: np.ndarray) -> np.ndarray:
    b = np.array(a, dtype=np.float64)
    b[:3, 2] = b[:3, 0]  # the third voxel axis parallel to the first
    return b


def _entry(a: np.ndarray, at: tuple[int, int], value: float) -> np.ndarray:
    b = np.array(a, dtype=np.float64)
    b[at] = value
    return b


def _with(arr: np.ndarray, value: Any, dtype: Any = None) -> np.ndarray:
    out = np.array(arr, dtype=dtype or arr.dtype)
    out[3, 3, 3] = value
    return out


# Each case: Segmenter.segment with one argument changed -> (error type, words the one-line message holds).
SEGMENT_CASES: dict[str, tuple[Any, type[FslMedError], tuple[str, ...]]] = {
    # the query volume
    "query None": (lambda c: {"query": None}, ConfigError, ("query", "None")),
    "query int": (lambda c: {"query": 5}, ConfigError, ("query", "got int")),
    "query bytes": (lambda c: {"query": b"image.nii.gz"}, ConfigError, ("query", "got bytes")),
    "query list": (lambda c: {"query": c.q.tolist()}, ConfigError, ("query", "got list")),
    "query empty path": (lambda c: {"query": "", "query_affine": None}, ConfigError, ("query", "empty path")),
    "query folder": (lambda c: {"query": c.folder, "query_affine": None}, DataError, ("query", "is a folder")),
    "query missing": (lambda c: {"query": c.folder / "nope.nii.gz", "query_affine": None}, DataError,
                      ("query", "nope.nii.gz", "file not found")),
    "query not NIfTI": (lambda c: {"query": c.not_ckpt, "query_affine": None}, DataError,
                        ("not.ckpt", "not a NIfTI file")),
    "query RGB NIfTI": (lambda c: {"query": c.rgb, "query_affine": None}, DataError,
                        ("query", "rgb.nii.gz", "not a real number")),
    "query path with an affine": (lambda c: {"query": c.qp}, ConfigError, ("query_affine", "given for query",
                                                                            "image_1.nii.gz")),
    "query array without affine": (lambda c: {"query_affine": None}, ConfigError,
                                   ("query (array 0)", "needs its 4x4 affine", "query_affine")),
    "query complex": (lambda c: {"query": c.q.astype(np.complex64)}, DataError,
                      ("query (array 0)", "complex-valued voxels")),
    "query complex tensor": (lambda c: {"query": torch.from_numpy(c.q.astype(np.complex64))}, DataError,
                             ("query (array 0)", "complex-valued voxels")),
    "query bool": (lambda c: {"query": c.q > 0}, DataError, ("query (array 0)", "boolean")),
    "query object dtype": (lambda c: {"query": c.q.astype(object)}, DataError, ("query (array 0)", "not numeric")),
    "query str dtype": (lambda c: {"query": c.q.astype(str)}, DataError, ("query (array 0)", "not numeric")),
    "query 2D": (lambda c: {"query": c.q[:, :, 0]}, DataError, ("query (array 0)", "3D", "(48, 48)")),
    "query 4D": (lambda c: {"query": c.q[..., None]}, DataError, ("query (array 0)", "3D")),
    "query empty": (lambda c: {"query": c.q[:, :, :0]}, DataError, ("query (array 0)", "non-empty")),
    "query NaN": (lambda c: {"query": _with(c.q, np.nan)}, DataError, ("query (array 0)", "1 NaN/inf voxels")),
    "query inf": (lambda c: {"query": _with(c.q, np.inf)}, DataError, ("query (array 0)", "1 NaN/inf voxels")),
    "query too large": (lambda c: {"query": _with(c.q, 1e30, np.float64)}, DataError, ("query (array 0)",)),
    # its affine
    "affine singular": (lambda c: {"query_affine": _singular(c.qa)}, DataError,
                        ("query (array 0)", "singular affine", "query_affine")),
    "affine 3x3": (lambda c: {"query_affine": c.qa[:3, :3]}, ConfigError, ("query_affine", "4x4", "(3, 3)")),
    "affine NaN": (lambda c: {"query_affine": _entry(c.qa, (0, 0), np.nan)}, ConfigError, ("query_affine", "NaN/inf")),
    "affine last row": (lambda c: {"query_affine": _entry(c.qa, (3, 0), 1.0)}, ConfigError,
                        ("query_affine", "[0, 0, 0, 1]")),
    "affine of strings": (lambda c: {"query_affine": "eye"}, ConfigError, ("query_affine", "4x4")),
    "affine extreme spacing": (lambda c: {"query_affine": np.diag([10.0, 10.0, 0.05, 1.0])}, DataError,
                               ("query (array 0)", "10 x 10 x 0.05 mm", "cannot be resampled sensibly",
                                "154-fold")),
    # supports
    "supports empty": (lambda c: {"supports": []}, ConfigError, ("at least one support pair",)),
    "supports None": (lambda c: {"supports": None}, ConfigError, ("supports", "None")),
    "supports a path": (lambda c: {"supports": str(c.sp)}, ConfigError, ("supports", "list of (image, mask) pairs")),
    "supports an array": (lambda c: {"supports": c.s}, ConfigError, ("supports", "ndarray")),
    "supports a dict": (lambda c: {"supports": {"image": c.s}}, ConfigError, ("supports", "dict")),
    "supports a triple": (lambda c: {"supports": [(c.s, c.m, c.m)]}, ConfigError, ("supports[0]", "pair", "of 3")),
    "supports three paths": (lambda c: {"supports": [str(c.sp), str(c.mp), str(c.sp)], "support_affines": None},
                             ConfigError, ("supports[0]", "pair", "str")),
    "support image None": (lambda c: {"supports": [(None, c.m)]}, ConfigError, ("supports[0] image", "None")),
    "support mask int": (lambda c: {"supports": [(c.s, 3)]}, ConfigError, ("supports[0] mask", "got int")),
    "support image complex": (lambda c: {"supports": [(c.s.astype(np.complex128), c.m)]}, DataError,
                              ("supports[0] image (array 0)", "complex-valued")),
    "support image NaN": (lambda c: {"supports": [(_with(c.s, np.nan), c.m)]}, DataError,
                          ("supports[0] image (array 0)", "NaN/inf")),
    "support mask shape": (lambda c: {"supports": [(c.s, c.m[:40])]}, DataError,
                           ("supports[0] mask (array 0)", "differs from the support image")),
    "support mask complex": (lambda c: {"supports": [(c.s, c.m.astype(np.complex64))]}, DataError,
                             ("supports[0] mask (array 0)", "complex-valued")),
    "support mask object": (lambda c: {"supports": [(c.s, c.m.astype(object))]}, DataError,
                            ("supports[0] mask (array 0)", "not numeric")),
    "support mask fractional": (lambda c: {"supports": [(c.s, c.m * 0.5)]}, DataError,
                                ("supports[0] mask (array 0)", "non-integer")),
    "support mask empty": (lambda c: {"supports": [(c.s, np.zeros_like(c.m))]}, DataError,
                           ("supports[0] mask (array 0)", "empty mask")),
    "support image without affine": (lambda c: {"support_affines": None}, ConfigError,
                                     ("supports[0] image (array 0)", "support_affines[0]")),
    "support affine singular": (lambda c: {"support_affines": [_singular(c.sa)]}, DataError,
                                ("supports[0] image (array 0)", "singular affine", "support_affines[0]")),
    "support affines too many": (lambda c: {"support_affines": [c.sa, c.sa]}, ConfigError,
                                 ("support_affines", "2 affines for 1 supports")),
    "support affines one for two": (lambda c: {"supports": [(c.s, c.m)] * 2, "support_affines": c.sa}, ConfigError,
                                    ("support_affines", "one 4x4 affine for 2 supports")),
    "support affines a string": (lambda c: {"support_affines": "A"}, ConfigError, ("support_affines", "str")),
    "support path with an affine": (lambda c: {"supports": [(c.sp, c.mp)]}, ConfigError,
                                    ("support_affines[0]", "given for supports[0] image")),
    "support affine extreme": (lambda c: {"support_affines": [np.diag([0.05, 0.05, 200.0, 1.0])]}, DataError,
                               ("supports[0] image (array 0)", "0.05 x 0.05 x 200 mm", "cannot be resampled")),
    # options
    "label True": (lambda c: {"label": True}, ConfigError, ("label=True", "integer label id >= 1")),
    "label float": (lambda c: {"label": 1.0}, ConfigError, ("label=1.0", "integer")),
    "label negative": (lambda c: {"label": -1}, ConfigError, ("label=-1", ">= 1")),
    "label zero": (lambda c: {"label": 0}, ConfigError, ("label=0", "background")),
    "label str": (lambda c: {"label": "1"}, ConfigError, ("label='1'",)),
    "label absent": (lambda c: {"label": 7}, ConfigError, ("label=7", "not in the support mask")),
    "z_range triple": (lambda c: {"z_range": (1, 2, 3)}, ConfigError, ("z_range=", "(A, B)")),
    "z_range strings": (lambda c: {"z_range": ("1", "3")}, ConfigError, ("z_range=",)),
    "z_range floats": (lambda c: {"z_range": (1.5, 3)}, ConfigError, ("z_range=", "integer")),
    "z_range bools": (lambda c: {"z_range": (False, True)}, ConfigError, ("z_range=",)),
    "z_range reversed": (lambda c: {"z_range": (3, 1)}, ConfigError, ("z_range=(3, 1)", "A <= B")),
    "z_range negative": (lambda c: {"z_range": [-1, 2]}, ConfigError, ("z_range=[-1, 2]",)),
    "z_range text": (lambda c: {"z_range": "1-3"}, ConfigError, ("z_range='1-3'", "A:B")),
    "z_range outside": (lambda c: {"z_range": (0, 99)}, ConfigError, ("z_range=(0, 99)", "outside the query")),
    "shots zero": (lambda c: {"shots_per_part": 0}, ConfigError, ("shots_per_part=0", ">= 1")),
    "shots float": (lambda c: {"shots_per_part": 1.5}, ConfigError, ("shots_per_part=1.5",)),
    "shots str": (lambda c: {"shots_per_part": "2"}, ConfigError, ("shots_per_part='2'",)),
    "cca unknown": (lambda c: {"cca": "4d"}, ConfigError, ("cca='4d'", "2d")),
    "cca None": (lambda c: {"cca": None}, ConfigError, ("cca=None",)),
}


@pytest.mark.parametrize("case", list(SEGMENT_CASES))
def test_segmenter_segment_refuses_bad_arguments_in_one_line(case, ctx):
    change, kind, needles = SEGMENT_CASES[case]
    before = (ctx.q.copy(), ctx.s.copy(), ctx.m.copy(), ctx.qa.copy(), ctx.sa.copy())
    with pytest.raises(FslMedError) as info:
        _call(ctx, **change(ctx))
    assert type(info.value) is kind, (case, type(info.value), str(info.value))
    _one_line(info.value, *needles)
    for a, b in zip(before, (ctx.q, ctx.s, ctx.m, ctx.qa, ctx.sa), strict=True):
        assert np.array_equal(a, b)  # inputs never modified


FROM_CHECKPOINT_CASES: dict[str, tuple[Any, type[FslMedError], tuple[str, ...]]] = {
    "ckpt folder": (lambda c: {"ckpt": c.folder}, DataError, ("ckpt", "is a folder")),
    "ckpt missing": (lambda c: {"ckpt": c.folder / "last.ckpt"}, DataError, ("ckpt", "file not found")),
    "ckpt not a checkpoint": (lambda c: {"ckpt": c.not_ckpt}, WeightsError, ("not.ckpt", "cannot read checkpoint")),
    "ckpt None": (lambda c: {"ckpt": None}, ConfigError, ("ckpt", "None")),
    "ckpt int": (lambda c: {"ckpt": 3}, ConfigError, ("ckpt", "got int")),
    "ckpt empty": (lambda c: {"ckpt": ""}, ConfigError, ("ckpt", "empty path")),
    "device gpu": (lambda c: {"device": "gpu"}, ConfigError, ("device='gpu'", "cpu or cuda")),
    "device int": (lambda c: {"device": 0}, ConfigError, ("device=0",)),
    "device cuda:x": (lambda c: {"device": "cuda:x"}, ConfigError, ("device='cuda:x'",)),
    "plan unknown": (lambda c: {"plan": "pet"}, ConfigError, ("plan='pet'", "mri, ct")),
    "plan dict": (lambda c: {"plan": {"modality": "mri"}}, ConfigError, ("plan=", "Plan instance")),
    "plan class": (lambda c: {"plan": MriPlan}, ConfigError, ("plan=", "Plan instance")),
    "batch size zero": (lambda c: {"batch_size": 0}, ConfigError, ("batch_size=0", ">= 1")),
    "batch size str": (lambda c: {"batch_size": "8"}, ConfigError, ("batch_size='8'",)),
}


@pytest.mark.parametrize("case", list(FROM_CHECKPOINT_CASES))
def test_from_checkpoint_refuses_bad_arguments_in_one_line(case, ctx):
    change, kind, needles = FROM_CHECKPOINT_CASES[case]
    kw = {"ckpt": ctx.ckpt, **change(ctx)}
    with pytest.raises(FslMedError) as info:
        Segmenter.from_checkpoint(kw.pop("ckpt"), **kw)
    assert type(info.value) is kind, (case, type(info.value), str(info.value))
    _one_line(info.value, *needles)


PREPARE_CASES: dict[str, tuple[Any, type[FslMedError], tuple[str, ...]]] = {
    "image complex": (lambda c: (c.q.astype(np.complex64), c.qa, None), DataError, ("image (array 0)", "complex")),
    "image None": (lambda c: (None, c.qa, None), ConfigError, ("image", "None")),
    "image 2D": (lambda c: (c.q[0], c.qa, None), DataError, ("image (array 0)", "3D")),
    "affine singular": (lambda c: (c.q, _singular(c.qa), None), DataError, ("image (array 0)", "singular affine")),
    "affine missing": (lambda c: (c.q, None, None), ConfigError, ("image (array 0)", "needs its 4x4 affine")),
    "label shape": (lambda c: (c.q, c.qa, c.m[:10]), DataError, ("label (array)", "differs from the image")),
    "label out of range": (lambda c: (c.q, c.qa, c.m.astype(np.int32) + 300), DataError, ("label (array)", "0..255")),
    "label negative": (lambda c: (c.q, c.qa, c.m.astype(np.int32) - 1), DataError, ("label (array)", "0..255")),
    "label fractional": (lambda c: (c.q, c.qa, c.m * 0.5), DataError, ("label (array)", "integers")),
    "label a path": (lambda c: (c.q, c.qa, str(c.mp)), ConfigError, ("label", "str")),
}


@pytest.mark.parametrize("case", list(PREPARE_CASES))
def test_prepare_refuses_bad_arguments_in_one_line(case, ctx):
    make, kind, needles = PREPARE_CASES[case]
    with pytest.raises(FslMedError) as info:
        ctx.seg.prepare(*make(ctx))
    assert type(info.value) is kind, (case, type(info.value), str(info.value))
    _one_line(info.value, *needles)


VERB_CASES: dict[str, tuple[Any, type[FslMedError], tuple[str, ...]]] = {
    "query array": (lambda c: {"query": c.q}, ConfigError, ("query", "reads NIfTI files", "Segmenter.segment")),
    "query tensor": (lambda c: {"query": torch.zeros(2, 2, 2)}, ConfigError, ("query", "Tensor")),
    "query None": (lambda c: {"query": None}, ConfigError, ("query", "None")),
    "query two": (lambda c: {"query": [c.qp, c.qp]}, ConfigError, ("query", "one query volume")),
    "ckpt None": (lambda c: {"ckpt": None}, ConfigError, ("ckpt", "None")),
    "out None": (lambda c: {"out": None}, ConfigError, ("out", "None")),
    "support image int": (lambda c: {"support_image": 7}, ConfigError, ("support_image", "int")),
    "support mask missing": (lambda c: {"support_mask": c.folder / "m.nii.gz"}, DataError,
                             ("support_mask", "file not found")),
    "label True": (lambda c: {"label": True}, ConfigError, ("label=True",)),
    "z_range triple": (lambda c: {"z_range": [1, 2, 3]}, ConfigError, ("z_range=",)),
    "batch size str": (lambda c: {"batch_size": "8"}, ConfigError, ("batch_size=",)),
    "device int": (lambda c: {"device": 1}, ConfigError, ("device=1",)),
    "plan int": (lambda c: {"plan": 1}, ConfigError, ("plan=1",)),
}


@pytest.mark.parametrize("case", list(VERB_CASES))
def test_segment_function_refuses_bad_arguments_in_one_line(case, ctx, tmp_path):
    change, kind, needles = VERB_CASES[case]
    kw = {"ckpt": ctx.ckpt, "support_image": ctx.sp, "support_mask": ctx.mp, "query": ctx.qp,
          "out": tmp_path / "p.nii.gz", "label": 1, **change(ctx)}
    with pytest.raises(FslMedError) as info:
        segment(kw.pop("ckpt"), kw.pop("support_image"), kw.pop("support_mask"), kw.pop("query"), kw.pop("out"), **kw)
    assert type(info.value) is kind, (case, type(info.value), str(info.value))
    _one_line(info.value, *needles)
    assert list(tmp_path.iterdir()) == []  # nothing written


# -- one message, two spellings: the keyword of a Python call, the flag on the command line ----------------

def _planless(ctx: SimpleNamespace, tmp_path: Path) -> Path:
    """``ctx.ckpt`` without its stored preprocessing plan (as if trained on data prepared elsewhere)."""
    from fsl_med.prepare.plan import CHECKPOINT_KEY

    ck = torch.load(ctx.ckpt, map_location="cpu", weights_only=False)
    ck[CHECKPOINT_KEY] = None
    torch.save(ck, tmp_path / "planless.ckpt")
    return tmp_path / "planless.ckpt"


# Each case: (keyword -> (Python value, CLI value; None: not given)) -> (words of the Python call's message, words
# of the same error through `fsl-med segment`).
SPELLING_CASES: dict[str, Any] = {
    "plan unknown to the checkpoint": lambda c, t: (
        {"ckpt": (p := _planless(c, t), str(p))},
        (f"ckpt {p}: the preprocessing plan", "pass plan='ct' or plan='mri'"),
        (f"--ckpt {p}: the preprocessing plan", "pass --plan ct or --plan mri")),
    "label absent": lambda c, t: ({"label": (7, "7")}, ("label=7: not in the support mask",),
                                  ("--label 7: not in the support mask",)),
    "no label for a multi-label mask": lambda c, t: ({"label": (None, None)}, ("choose one with label=N",),
                                                     ("choose one with --label N",)),
    "z_range reversed": lambda c, t: ({"z_range": ("3:1", "3:1")}, ("z_range='3:1': need 0 <= A <= B",),
                                      ("--z-range 3:1: need 0 <= A <= B",)),
    "z_range malformed": lambda c, t: ({"z_range": ("1-3", "1-3")}, ("z_range='1-3': expected A:B",),
                                       ("--z-range '1-3': expected A:B",)),
    "z_range outside": lambda c, t: ({"z_range": ((0, 99), "0:99")}, ("z_range=(0, 99): outside the query",),
                                     ("--z-range 0:99: outside the query",)),
    "shots zero": lambda c, t: ({"shots_per_part": (0, "0")}, ("shots_per_part=0: must be an integer >= 1",),
                                ("--shots-per-part 0: must be an integer >= 1",)),
    "batch size zero": lambda c, t: ({"batch_size": (0, "0")}, ("batch_size=0: must be an integer >= 1",),
                                     ("--batch-size 0: must be an integer >= 1",)),
    "out not NIfTI": lambda c, t: ({"out": (t / "p.txt", str(t / "p.txt"))}, (f"out {t / 'p.txt'}: must end with",),
                                   (f"--out {t / 'p.txt'}: must end with",)),
    "out is the query": lambda c, t: ({"out": (c.qp, str(c.qp))}, (f"out {c.qp}: is the input query {c.qp}",),
                                      (f"--out {c.qp}: is the input --query {c.qp}",)),
    "query missing": lambda c, t: ({"query": (t / "q.nii.gz", str(t / "q.nii.gz"))},
                                   (f"query {t / 'q.nii.gz'}: file not found",),
                                   (f"--query {t / 'q.nii.gz'}: file not found",)),
    "support mask missing": lambda c, t: ({"support_mask": (t / "m.nii.gz", str(t / "m.nii.gz"))},
                                          (f"support_mask {t / 'm.nii.gz'}: file not found",),
                                          (f"--support-mask {t / 'm.nii.gz'}: file not found",)),
    "ckpt a folder": lambda c, t: ({"ckpt": (c.folder, str(c.folder))}, (f"ckpt {c.folder}: is a folder",),
                                   (f"--ckpt {c.folder}: is a folder",)),
    "images without masks": lambda c, t: ({"support_image": ([c.sp, c.sp], [str(c.sp), str(c.sp)])},
                                          ("support_image/support_mask: 2 images and 1 masks",),
                                          ("--support-image/--support-mask: 2 images and 1 masks",)),
}
if not torch.cuda.is_available():
    SPELLING_CASES["no CUDA"] = lambda c, t: (
        {"device": ("cuda", "cuda")}, ("device='cuda': CUDA is not available on this machine (use device='cpu')",),
        ("--device cuda: CUDA is not available on this machine (use --device cpu)",))


@pytest.mark.parametrize("case", list(SPELLING_CASES))
def test_errors_name_the_keyword_in_python_and_the_flag_on_the_command_line(case, ctx, tmp_path, capsys):
    """The same check, one message: :func:`segment` names the keyword it was called with (``plan='ct'``), the
    ``segment`` verb the flag (``--plan ct``); nothing is written either way."""
    change, py_words, cli_words = SPELLING_CASES[case](ctx, tmp_path)
    given = {"ckpt": (ctx.ckpt, str(ctx.ckpt)), "support_image": (ctx.sp, str(ctx.sp)),
             "support_mask": (ctx.mp, str(ctx.mp)), "query": (ctx.qp, str(ctx.qp)),
             "out": (tmp_path / "p.nii.gz", str(tmp_path / "p.nii.gz")), "label": (1, "1"), **change}
    kw = {k: py for k, (py, _) in given.items()}
    before = sorted(tmp_path.iterdir())
    with pytest.raises(FslMedError) as info:
        segment(kw.pop("ckpt"), kw.pop("support_image"), kw.pop("support_mask"), kw.pop("query"), kw.pop("out"), **kw)
    _one_line(info.value, *py_words)
    argv = ["segment"]
    for key, (_, cli_value) in given.items():
        for v in [] if cli_value is None else cli_value if isinstance(cli_value, list) else [cli_value]:
            argv += [f"--{key.replace('_', '-')}", v]
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fsl-med: error: "), lines
    for w in cli_words:
        assert w in lines[0], (w, lines[0])
    assert sorted(tmp_path.iterdir()) == before  # nothing written


def test_the_spelling_is_the_callers_after_a_cli_call(ctx):
    """A CLI run leaves no flag spelling behind: a later Python call names its keyword again."""
    assert main(["segment", "--ckpt", str(ctx.folder), "--support-image", str(ctx.sp), "--support-mask", str(ctx.mp),
                 "--query", str(ctx.qp), "--out", str(ctx.folder / "x.nii.gz")]) == 2
    with pytest.raises(ConfigError) as info:
        Segmenter.from_checkpoint(ctx.ckpt, plan="xyz")
    assert str(info.value) == "plan='xyz': must be one of mri, ct"
    with pytest.raises(ConfigError) as info:
        Segmenter.from_checkpoint(ctx.ckpt, plan=3)
    assert str(info.value) == "plan=3: must be mri, ct or a Plan instance"


# -- accepted forms give the same mask -----------------------------------------------------------------

def test_tensors_single_pairs_generators_and_boolean_masks_give_the_array_result(ctx):
    """A torch tensor (requiring grad, any float dtype) is read as the array it holds; one ``(image, mask)`` pair
    given alone, a generator of pairs and a single 4x4 support affine are the one-element list; a boolean mask of
    the organ is the binary mask; a path pair is the arrays it holds."""
    want = _call(ctx)
    assert want.mask.shape == ctx.q.shape
    q_t = torch.from_numpy(ctx.q.copy()).requires_grad_(True)
    variants = {
        "tensors": dict(query=q_t, supports=[(torch.from_numpy(ctx.s), torch.from_numpy(ctx.m))],
                        query_affine=torch.from_numpy(ctx.qa), support_affines=[torch.from_numpy(ctx.sa)]),
        "float64 tensor": dict(query=torch.from_numpy(ctx.q.astype(np.float64))),
        "single pair": dict(supports=(ctx.s, ctx.m), support_affines=ctx.sa),
        "single pair as a list": dict(supports=[ctx.s, ctx.m], support_affines=[ctx.sa]),
        "generator": dict(supports=((a, b) for a, b in [(ctx.s, ctx.m)]), support_affines=iter([ctx.sa])),
        "boolean mask": dict(supports=[(ctx.s, ctx.m == 1)], label=None),
        "paths": dict(query=ctx.qp, query_affine=None, supports=[(ctx.sp, ctx.mp)], support_affines=None),
        "single path pair": dict(query=str(ctx.qp), query_affine=None, supports=(str(ctx.sp), ctx.mp),
                                 support_affines=None),
        "z_range text and list": dict(z_range="0:7"),
        "read-only flipped view and numpy label": dict(query=_read_only(ctx.q), label=np.int64(1)),
    }
    for name, change in variants.items():
        got = _call(ctx, **change)
        assert np.array_equal(got.mask, want.mask), name
        assert np.allclose(got.probability, want.probability, atol=1e-6), name
        assert got.support_slices == want.support_slices, name
    assert q_t.grad is None and torch.equal(q_t.detach(), torch.from_numpy(ctx.q))
    assert _call(ctx, z_range=[2, 5]).z_range == (2, 5)


def test_prepare_accepts_tensors_and_equals_the_array_form(ctx):
    a = ctx.seg.prepare(ctx.q, ctx.qa, ctx.m)
    b = ctx.seg.prepare(torch.from_numpy(ctx.q), torch.from_numpy(ctx.qa), torch.from_numpy(ctx.m))
    assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label) and np.allclose(a.affine, b.affine)


# -- geometry that cannot be trusted ---------------------------------------------------------------------

def _read_only(a: np.ndarray) -> np.ndarray:
    """``a`` as a read-only view with a negative stride (the same values)."""
    v = a[::-1].copy()[::-1]
    v.flags.writeable = False
    return v


def _scaled_copy(src: Path, dest: Path, spacing: tuple[float, float, float]) -> Path:
    arr, aff, _ = read_nifti(src)
    new = aff.copy()
    new[:3, :3] = aff[:3, :3] / np.linalg.norm(aff[:3, :3], axis=0) * np.asarray(spacing)
    return write_nifti(dest, arr, new)


def _cli(ctx: SimpleNamespace, query: Path, out: Path, *extra: str) -> int:
    return main(["segment", "--ckpt", str(ctx.ckpt), "--support-image", str(ctx.sp), "--support-mask", str(ctx.mp),
                 "--label", "1", "--query", str(query), "--out", str(out), *extra])


def _notes(caplog: pytest.LogCaptureFixture, needle: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and needle in r.getMessage()]


@pytest.mark.parametrize("spacing,words", [
    ((10.0, 10.0, 0.05), ("10 x 10 x 0.05 mm", "inferior-superior axis would be downsampled 154-fold")),
    ((0.05, 0.05, 200.0), ("0.05 x 0.05 x 200 mm", "left-right axis would be downsampled 25-fold")),
])
def test_extreme_voxel_size_is_refused_in_one_line(spacing, words, ctx, tmp_path, capsys):
    q = _scaled_copy(ctx.qp, tmp_path / "odd.nii.gz", spacing)
    out = tmp_path / "pred.nii.gz"
    assert _cli(ctx, q, out) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("fsl-med: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for w in (f"--query {q}", "cannot be resampled sensibly to the mri plan's 1.25 x 1.25 x 7.7 mm grid", *words):
        assert w in lines[0], (w, lines[0])
    assert not out.exists()
    with pytest.raises(DataError) as info:  # the API says the same of the file and of its array, naming the keyword
        ctx.seg.segment(q, [(ctx.sp, ctx.mp)], label=1)
    _one_line(info.value, f"query {q}", *words)
    arr, aff, _ = read_nifti(q)
    with pytest.raises(DataError) as info:
        ctx.seg.segment(arr, [(ctx.sp, ctx.mp)], query_affine=aff, label=1)
    _one_line(info.value, "query (array 0)", *words)


def test_far_voxel_size_is_noted_once_and_segmented(ctx, tmp_path, capsys, caplog):
    q = _scaled_copy(ctx.qp, tmp_path / "coarse.nii.gz", (10.0, 10.0, 5.0))
    out = tmp_path / "pred.nii.gz"
    with caplog.at_level(logging.WARNING):
        assert _cli(ctx, q, out) == 0, capsys.readouterr().err
    notes = _notes(caplog, str(q))
    assert len(notes) == 1, notes
    assert "left-right upsampled 8-fold" in notes[0] and "is far from the mri plan's" in notes[0]
    assert read_nifti(out)[0].shape == ctx.q.shape


def test_ordinary_scans_pass_without_a_note(ctx, tmp_path, capsys, caplog):
    """The phantom segments without any warning; every real CHAOS-T2 volume (if present) reads without a note
    and is far inside the resampling bounds of the MRI plan."""
    from conftest import chaos_root

    with caplog.at_level(logging.WARNING):
        assert _cli(ctx, ctx.qp, tmp_path / "p.nii.gz") == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("fsl_med")], \
        [r.getMessage() for r in caplog.records]
    root = chaos_root()
    paths = sorted(root.glob("image_*.nii.gz")) if root is not None else []
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        for p in paths:
            arr, aff, _ = read_nifti(p)
            assert check_resampling(default_plan("mri"), arr.shape, aff, str(p)) is None
    assert not caplog.records, [r.getMessage() for r in caplog.records]
    # the bounds: raw CHAOS-T2 (1.4-1.9 mm in-plane, 5.5-9 mm slices) and 1 mm isotropic MRI are not refused
    for sp in ((1.9, 1.9, 9.0), (1.36, 1.36, 5.5)):
        assert check_resampling(default_plan("mri"), (256, 256, 30), np.diag([*sp, 1.0]), "x") is None
    assert "7.7-fold" in check_resampling(default_plan("mri"), (256, 256, 200), np.diag([1.0, 1.0, 1.0, 1.0]), "x")
    # CT: a Synapse-like 512 px scan is fine; a pixel 20 times longer one way than the other is refused
    assert check_resampling(default_plan("ct"), (512, 512, 90), np.diag([0.8, 0.8, 2.5, 1.0]), "x") is None
    with pytest.raises(DataError, match="in-plane voxels would be 20 times longer"):
        check_resampling(default_plan("ct"), (512, 512, 90), np.diag([4.0, 0.2, 2.5, 1.0]), "ct.nii.gz")


# -- a header's intensity scaling -------------------------------------------------------------------------

def _with_scaling(src: Path, dest: Path, slope: float, inter: float) -> Path:
    img = nib.load(str(src))
    out = nib.Nifti1Image(np.asarray(img.dataobj).astype(np.float32), img.affine)
    out.header.set_slope_inter(1.0, 0.0)
    out.header["scl_slope"], out.header["scl_inter"] = slope, inter
    nib.save(out, str(dest))
    return dest


@pytest.mark.parametrize("slope,inter,note,factor", [
    (np.inf, 0.0, "scl_slope is inf; read unscaled (slope 1, intercept 0)", 1.0),
    (-np.inf, np.nan, "scl_slope is -inf; read unscaled (slope 1, intercept 0)", 1.0),
    (np.nan, 100.0, "scl_slope is nan (no scaling); scl_inter 100 ignored: read unscaled (slope 1, intercept 0)", 1.0),
    (2.0, np.nan, "scl_inter is nan; read with intercept 0 (scl_slope 2 applied)", 2.0),
    (2.0, np.inf, "scl_inter is inf; read with intercept 0 (scl_slope 2 applied)", 2.0),
])
def test_invalid_scaling_is_read_as_stated_in_one_note(slope, inter, note, factor, ctx, tmp_path, capsys, caplog):
    q = _with_scaling(ctx.qp, tmp_path / "scaled.nii.gz", slope, inter)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        arr, _, _ = read_nifti(q)
    assert np.allclose(arr, ctx.q * factor)
    assert _notes(caplog, str(q)) == [f"{q}: {note}"]
    caplog.clear()
    out = tmp_path / "pred.nii.gz"
    with caplog.at_level(logging.WARNING):
        assert _cli(ctx, q, out) == 0, capsys.readouterr().err
    assert _notes(caplog, str(q)) == [f"{q}: {note}"]  # once, through the CLI
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        res = ctx.seg.segment(q, [(ctx.sp, ctx.mp)], label=1)
    assert _notes(caplog, str(q)) == [f"{q}: {note}"]  # and through the API
    assert np.array_equal(res.mask, read_nifti(out)[0])


@pytest.mark.parametrize("slope,inter", [(np.nan, np.nan), (0.0, 0.0), (np.nan, 0.0), (0.0, np.nan), (1.0, 0.0)])
def test_usual_no_scaling_headers_are_silent(slope, inter, ctx, tmp_path, caplog):
    q = _with_scaling(ctx.qp, tmp_path / "plain.nii.gz", slope, inter)
    with caplog.at_level(logging.WARNING):
        arr, _, _ = read_nifti(q)
    assert np.array_equal(arr, ctx.q) and not caplog.records
