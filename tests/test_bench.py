"""``fsl-med bench`` writes BENCHMARKS.md and benchmarks.json with every figure it promises (a quick run with
the tiny ViT on the phantom; the real figures come from ``make bench``, never from timed unit tests)."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import torch.nn.functional as F

from fsl_med.bench import PARTS, _kernel_floor, plan_runs, run_bench, write_report
from fsl_med.bench import main as bench_child
from fsl_med.cli import main
from fsl_med.data.phantom import generate_phantom
from fsl_med.errors import ConfigError


@pytest.mark.slow
def test_bench_writes_a_complete_report(tmp_path, cache_dir):
    root = generate_phantom(tmp_path / "ph", n_scans=6, size=64, depth=8, seed=0)
    md = run_bench(str(root), tmp_path, parts=("matmul", "train_full", "eval", "heads", "ttt"),
                   encoder="vit_tiny_patch14", steps=2, workers=0, cache_dir=str(cache_dir), heads=["adnet"])
    res = json.loads((tmp_path / "benchmarks.json").read_text())
    p = res["parts"]
    assert p["matmul"]["gflops"] > 0
    assert p["train_full"]["seconds_per_step"] > 0 and p["train_full"]["gflop_per_step"] > 0
    assert p["eval"]["seconds_per_slice"] > 0 and p["eval"]["slices"] > 0 and p["eval"]["volumes"] == 4
    assert p["ttt"]["paper_seconds_per_slice"] > p["ttt"]["fast_seconds_per_slice"] > 0
    assert all(part["peak_rss_mb"] > 0 for part in p.values())
    # the kernel floor leaves out everything but the matmul/conv/attention kernels: below the measured step
    tf = p["train_full"]
    assert 0 < tf["floor_seconds_per_step"] < tf["seconds_per_step"] and tf["floor_kernel_calls"] >= tf["floor_kernels"]
    # the optional speed-ups are measured: torch.compile and bf16 autocast of the same training step
    assert p["train_full_compile"]["overrides"] == ["model.compile=default"]
    assert p["train_full_compile"]["seconds_per_step"] > 0 and p["train_full_bf16"]["seconds_per_step"] > 0
    text = md.read_text()
    for needle in ("Machine:", "GFLOP/s", "training step, full fine-tuning", "evaluation, per query slice",
                   "TTT, paper", "TTT, fast", "of FLOP bound", "peak RSS", "kernel floor", "torch.compile",
                   "bf16 autocast", "few-shot head `alp`", "vs ALP"):
        assert needle in text, needle
    # the heads part: ALP's rows are train_full and eval; adnet's were measured on a model with ADNet's head
    assert res["heads"] == ["adnet"] and p["train_full"]["head"] == p["eval"]["head"] == "alp"
    for label in ("train_full_adnet", "eval_adnet"):
        assert p[label]["head"] == "adnet" and p[label]["head_parameters"] == ["threshold"], label
        assert p[label]["overrides"] == ["model.head.name=adnet"] and p[label]["mask_pooling"] == "adjoint"
    assert p["eval_adnet"]["head_values"] == {"T": -10.0}  # an untrained ADNet head: T at its initial value
    assert p["train_full_adnet"]["gflop_per_step"] != p["train_full"]["gflop_per_step"]  # another head, measured
    rows = {(r["head"], r["label"]): r for r in res["head_rows"]}
    assert sorted(rows) == [("adnet", "eval_adnet"), ("adnet", "train_full_adnet"), ("alp", "eval"),
                            ("alp", "train_full")]
    tr = rows[("adnet", "train_full_adnet")]
    assert tr["seconds"] == p["train_full_adnet"]["seconds_per_step"]
    assert tr["vs_alp"] == pytest.approx(100 * (tr["seconds"] / p["train_full"]["seconds_per_step"] - 1))
    assert rows[("alp", "train_full")]["vs_alp"] is None
    assert f"| adnet | training step, full fine-tuning (s) | {tr['seconds']:.3f} | {tr['vs_alp']:+.1f} % |" in text
    assert "| adnet | evaluation, per query slice incl. CCA (s) |" in text


@pytest.mark.slow
def test_bench_measures_oversubscription(tmp_path, cache_dir):
    """Four runs of the demo's tiny ViT: OpenMP's default wait policy and PASSIVE, idle and beside a busy process."""
    root = generate_phantom(tmp_path / "ph", n_scans=6, size=64, depth=8, seed=0)
    md = run_bench(str(root), tmp_path, parts=("matmul", "oversubscription"), steps=1, workers=0,
                   cache_dir=str(cache_dir))
    p = json.loads((tmp_path / "benchmarks.json").read_text())["parts"]
    labels = [f"oversub_{pol}_{load}" for pol in ("default", "PASSIVE") for load in ("idle", "busy")]
    assert sorted(k for k in p if k.startswith("oversub_")) == sorted(labels)
    assert all(p[k]["wall_seconds_per_step"] > 0 and p[k]["overrides"] == ["model.encoder.name=vit_tiny_patch14"]
               for k in labels)
    text = md.read_text()
    assert "| unset (libgomp default) |" in text and "| PASSIVE |" in text and "CPU oversubscription" in text


def test_kernel_floor_replays_each_flop_kernel_once_per_signature():
    a, b, c = torch.randn(64, 32), torch.randn(32, 48), torch.randn(48, 16)
    q, k, v = (torch.randn(1, 2, 20, 8, requires_grad=True) for _ in range(3))

    def fn() -> None:
        for _ in range(3):
            (a @ b).relu()  # three calls, one signature; relu is not a FLOP kernel
        (a @ b) @ c  # a fourth call of the first signature, and a second signature
        F.scaled_dot_product_attention(q, k, v).sum().backward()  # CPU flash attention forward and backward

    floor = _kernel_floor(fn, repeats=2)
    assert floor["kernels"] == 4 and floor["calls"] == 7  # a@b 4x, (a@b)@c, attention forward, backward
    assert floor["seconds"] > 0
    assert q.grad is not None  # fn itself ran normally under the capture


def test_plan_puts_every_head_right_after_alp():
    """``heads`` measures train_full and eval per head; ALP's rows are train_full and eval themselves (added where
    ``heads`` stands when not run otherwise), another head's follow ALP's; overrides lead every run's own."""
    runs = plan_runs(("heads",), ("alp", "panet", "adnet"))
    assert [(r[0], r[1], r[3]) for r in runs] == [
        ("train_full", "train_full", []), ("train_full_panet", "train_full", ["model.head.name=panet"]),
        ("train_full_adnet", "train_full", ["model.head.name=adnet"]), ("eval", "eval", []),
        ("eval_panet", "eval", ["model.head.name=panet"]), ("eval_adnet", "eval", ["model.head.name=adnet"])]
    assert all(r[2] == "32-true" for r in runs)  # no bf16/compile extras: those belong to the train_full part
    labels = [r[0] for r in plan_runs(PARTS, ("alp", "panet", "adnet"))]
    assert labels[:8] == ["matmul", "train_full", "train_full_panet", "train_full_adnet", "train_lora", "eval",
                          "eval_panet", "eval_adnet"]
    assert len(labels) == len(set(labels)) and "heads" not in labels
    assert [r[0] for r in plan_runs(("train_full", "eval"), ("alp", "panet"))] == [
        "train_full", "eval", "train_full_bf16", "train_full_compile"]  # no heads part: ALP only, as before
    over = plan_runs(PARTS, ("panet",), overrides=["model.head.panet.cos_eps=1e-6"])
    assert all(r[3][0] == "model.head.panet.cos_eps=1e-6" for r in over)
    assert dict((r[0], r[3]) for r in over)["train_full_panet"] == ["model.head.panet.cos_eps=1e-6",
                                                                    "model.head.name=panet"]


def test_head_override_reaches_the_measured_model(tmp_path, cache_dir, capsys):
    """The child measures the model its overrides describe (evaluation included: its overrides were ignored)."""
    root = generate_phantom(tmp_path / "ph", n_scans=6, size=64, depth=8, seed=0)
    common = ["--data", str(root), "--encoder", "vit_tiny_patch14", "--work", str(tmp_path / "w"), "--cache-dir",
              str(cache_dir), "--workers", "0"]
    assert bench_child(["eval", *common, "--set", "model.head.name=adnet", "model.head.adnet.threshold_init=-5",
                        "data.image_size=64"]) == 0
    ev = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ev["head"] == "adnet" and ev["head_parameters"] == ["threshold"] and ev["head_values"] == {"T": -5.0}
    assert ev["seconds_per_slice"] > 0
    assert bench_child(["train_full", *common, "--steps", "1", "--warmup", "1", "--set", "model.head.name=panet",
                        "model.mask_pooling=bilinear", "data.image_size=64"]) == 0
    tr = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert tr["head"] == "panet" and tr["mask_pooling"] == "bilinear" and tr["seconds_per_step"] > 0
    assert "floor_seconds_per_step" not in tr  # the kernel floor is the plain train_full run's


def test_qnet_refinement_and_rpt_are_measured(tmp_path, cache_dir, capsys):
    """The heads that take the encoder's bundle run through the bench children; Q-Net's evaluation also gives its
    test-time refinement's seconds per query slice (reset per run, part of its evaluation time), and the report
    shows it on a row of its own right after its evaluation row."""
    root = generate_phantom(tmp_path / "ph", n_scans=6, size=64, depth=8, seed=0)
    common = ["--data", str(root), "--encoder", "vit_tiny_patch14", "--work", str(tmp_path / "w"), "--cache-dir",
              str(cache_dir), "--workers", "0"]
    small = ["data.image_size=64", "model.feature_size=16"]  # Q-Net's finer map 32x32: a quick refinement
    assert bench_child(["eval", *common, "--eval-repeats", "1", "--set", "model.head.name=qnet",
                        "model.head.qnet.refine_iters=2", *small]) == 0
    ev = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ev["head"] == "qnet" and ev["head_parameters"][0] == "tau.0.weight"
    assert ev["refined_slices"] == ev["slices"] > 0  # each scored (organ, slice) refined once per run, not 4x
    assert 0 < ev["refine_seconds_per_slice"] < ev["seconds_per_slice"]
    assert bench_child(["train_full", *common, "--steps", "1", "--warmup", "1", "--set", "model.head.name=rpt",
                        *small]) == 0
    tr = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert tr["head"] == "rpt" and tr["seconds_per_step"] > 0 and tr["gflop_per_step"] > 0
    assert any(n.startswith("bat.") for n in tr["head_parameters"]) and "refine_seconds_per_slice" not in tr

    machine = {"cpu": "test cpu", "cores": 2, "torch_threads": 2, "cuda": None, "torch": torch.__version__,
               "python": "3.11", "fsl_med": "0"}
    alp = {"seconds_per_slice": 0.01, "head": "alp", "peak_rss_mb": 100.0}
    res = {"date": "2026-12-01", "encoder": "vit_tiny_patch14", "data": "phantom", "machine": machine,
           "heads": ["alp", "qnet", "rpt"], "parts": {"eval": alp, "eval_qnet": ev, "train_full_rpt": tr}}
    md = write_report(res, tmp_path).read_text()
    rows = json.loads((tmp_path / "benchmarks.json").read_text())["head_rows"]
    assert [(r["head"], r["label"], r["figure"]) for r in rows] == [
        ("rpt", "train_full_rpt", "seconds_per_step"), ("alp", "eval", "seconds_per_slice"),
        ("qnet", "eval_qnet", "seconds_per_slice"), ("qnet", "eval_qnet", "refine_seconds_per_slice")]
    assert rows[-1]["seconds"] == ev["refine_seconds_per_slice"] and rows[-1]["vs_alp"] is None
    lines = md.splitlines()
    i = lines.index(next(x for x in lines if x.startswith("| qnet | evaluation, per query slice incl. CCA (s) |")))
    assert lines[i + 1].startswith(f"| qnet |   of which the head's test-time refinement, per query slice (s) | "
                                   f"{ev['refine_seconds_per_slice']:.3f} | – |")
    assert "`qnet`'s test-time refinement" in md and f"({ev['slices']} query slices refined per evaluation" in md
    assert "| alp | evaluation, per query slice incl. CCA (s) | 0.010 | – |" in md  # ALP's row as before
    assert sum("test-time refinement, per query slice" in x for x in lines) == 1  # not in the main table (ALP's)
    # a model.head.name=qnet override of every part: the main table's evaluation is Q-Net's, with its refinement
    md = write_report({**res, "heads": [], "parts": {"eval": ev}}, tmp_path).read_text()
    assert (f"|   of which the head's test-time refinement, per query slice (s) | "
            f"{ev['refine_seconds_per_slice']:.3f} |") in md and "few-shot head `qnet`" in md


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"heads": ["alp", "adnt"]}, "--heads: unknown head(s) adnt (registered: alp, panet, adnet, qnet, rpt)"),
    ({"heads": []}, "--heads: names no head"),
    ({"overrides": ["model.head.name=foo"]}, "config key 'model.head.name': unknown head 'foo'"),
    ({"overrides": ["model.head.adnet.threshold_weight=-1"]}, "model.head.adnet.threshold_weight"),
])
def test_bad_heads_or_overrides_are_refused_before_anything_runs(tmp_path, kwargs, message):
    root = generate_phantom(tmp_path / "ph", n_scans=6, size=64, depth=8, seed=0)
    with pytest.raises(ConfigError) as e:
        run_bench(str(root), tmp_path / "out", parts=("heads",), encoder="vit_tiny_patch14", **kwargs)
    assert message in str(e.value) and len(str(e.value).splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_bench_child_error_is_one_line(tmp_path, capsys):
    root = generate_phantom(tmp_path / "ph", n_scans=6, size=64, depth=8, seed=0)
    assert bench_child(["eval", "--data", str(root), "--work", str(tmp_path / "w"), "--set",
                        "model.head.name=foo"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fsl_med.bench: error: ") and "unknown head 'foo'" in err[0]


def test_head_rows_of_the_report(tmp_path):
    """One training and one evaluation row per head with its time relative to ALP's; a head override that leaves
    no ALP row gives no relative figure."""
    def fig(head: str, secs: float, key: str) -> dict:
        return {key: secs, "head": head, "peak_rss_mb": 100.0}

    machine = {"cpu": "test cpu", "cores": 2, "torch_threads": 2, "cuda": None, "torch": torch.__version__,
               "python": "3.11", "fsl_med": "0"}
    parts = {"train_full": fig("alp", 0.5, "seconds_per_step"), "train_full_panet": fig("panet", 0.51, "seconds_per_step"),
             "train_full_adnet": fig("adnet", 0.49, "seconds_per_step"), "eval": fig("alp", 0.05, "seconds_per_slice"),
             "eval_panet": fig("panet", 0.06, "seconds_per_slice"), "eval_adnet": fig("adnet", 0.05, "seconds_per_slice")}
    res = {"date": "2026-12-01", "encoder": "dinov2_vits14", "data": "chaos", "machine": machine,
           "heads": ["alp", "panet", "adnet"], "parts": parts}
    md = write_report(res, tmp_path).read_text()
    for line in ("| alp | training step, full fine-tuning (s) | 0.500 | – |", "| panet | training step, full "
                 "fine-tuning (s) | 0.510 | +2.0 % |", "| adnet | training step, full fine-tuning (s) | 0.490 | -2.0 % |",
                 "| panet | evaluation, per query slice incl. CCA (s) | 0.060 | +20.0 % |"):
        assert line in md, line
    rows = json.loads((tmp_path / "benchmarks.json").read_text())["head_rows"]
    assert [(r["head"], r["label"]) for r in rows] == [("alp", "train_full"), ("panet", "train_full_panet"),
                                                       ("adnet", "train_full_adnet"), ("alp", "eval"),
                                                       ("panet", "eval_panet"), ("adnet", "eval_adnet")]
    parts["train_full"]["head"] = parts["eval"]["head"] = "panet"  # a model.head.name=panet override of every part
    md = write_report(res, tmp_path).read_text()
    assert "| panet | training step, full fine-tuning (s) | 0.500 | – |" in md and "few-shot head `panet`" in md
    assert "| adnet | training step, full fine-tuning (s) | 0.490 | – |" in md  # no ALP row to compare with
    assert "Few-shot heads" not in write_report({**res, "heads": []}, tmp_path).read_text()


def test_bench_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["bench", "--data", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    assert "folder not found" in capsys.readouterr().err
    assert main(["bench", "--data", str(tmp_path), "--parts", "train,eval"]) == 2
    assert "unknown part" in capsys.readouterr().err
    assert not (tmp_path / "BENCHMARKS.md").exists()


def test_bench_report_without_the_matmul_part(tmp_path):
    """``fsl-med bench --parts eval`` writes its report (no FLOP-bound fractions, no scaling) instead of failing;
    the main table also goes to ``benchmarks.csv``."""
    res = {"date": "2026-12-01", "encoder": "vit_tiny_patch14", "data": "phantom",
           "machine": {"cpu": "test cpu", "cores": 2, "torch_threads": 2, "cuda": None, "torch": torch.__version__,
                       "python": "3.11", "fsl_med": "0"},
           "parts": {"eval": {"seconds_per_slice": 0.0521, "seconds_per_volume": 0.8406, "slices": 258, "volumes": 16,
                              "query_scans": 4, "encoded_slices": 116, "peak_rss_mb": 1351.4}}}
    md = write_report(res, tmp_path).read_text()
    assert "Matmul throughput not measured" in md
    assert "| evaluation, per query slice incl. CCA (s) | 0.052 |" in md
    rows = {r["measurement"]: r for r in csv.DictReader((tmp_path / "benchmarks.csv").open())}
    assert rows["evaluation, per query volume and organ (s)"]["fsl_med"] == "0.8406"
    assert rows["training step, full fine-tuning (s)"]["fsl_med"] == ""  # not measured: empty, not "–"
    assert json.loads((tmp_path / "benchmarks.json").read_text())["parts"]["eval"]["volumes"] == 16
