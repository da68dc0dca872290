"""``fsl-med bench`` writes BENCHMARKS.md and benchmarks.json with every figure it promises (a quick run with
the tiny ViT on the phantom; the real figures come from ``make bench``, never from timed unit tests)."""

from __future__ import annotations

import json

import pytest

from fsl_med.bench import run_bench
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
    text = md.read_text()
    for needle in ("Machine:", "GFLOP/s", "training step, full fine-tuning", "evaluation, per query slice",
                   "TTT, paper", "TTT, fast", "of FLOP bound", "peak RSS"):
        assert needle in text, needle


def test_bench_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["bench", "--data", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    assert "folder not found" in capsys.readouterr().err
    assert main(["bench", "--data", str(tmp_path), "--parts", "train,eval"]) == 2
    assert "unknown part" in capsys.readouterr().err
    assert not (tmp_path / "BENCHMARKS.md").exists()
