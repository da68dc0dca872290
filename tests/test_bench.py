"""``fsl-med bench`` writes BENCHMARKS.md and benchmarks.json with every figure it promises (a quick run with
the tiny ViT on the phantom; the real figures come from ``make bench``, never from timed unit tests)."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import torch.nn.functional as F

from fsl_med.bench import _kernel_floor, run_bench, write_report
from fsl_med.cli import main
from fsl_med.data.phantom import generate_phantom


@pytest.mark.slow
def test_bench_writes_a_complete_report(tmp_path, cache_dir):
    root = generate_phantom(tmp_path / "ph", n_scans=6, size=64, depth=8, seed=0)
    md = run_bench(str(root), tmp_path, parts=("matmul", "train_full", "eval", "ttt"), encoder="vit_tiny_patch14",
                   steps=2, workers=0, cache_dir=str(cache_dir))
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
                   "bf16 autocast"):
        assert needle in text, needle


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
