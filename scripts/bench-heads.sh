#!/usr/bin/env bash
# Issue 29 §5 (speed), old and new code side by side: the `fsl-med bench` parts that §5 compares, run as `make bench`
# runs them (one child process `python -m fsl_med.bench PART` each: ViT-S/14 random init, 256 px, batch 1, 10 timed
# training steps after 3 warm-up steps, 1 data worker; evaluation: all fold-0 query scans, median of 3 after 1),
# and nothing else (no bf16, torch.compile, kernel-floor comparison, TTT):
#   train_full, eval                      ALPNet's training step and evaluation per query slice (every tree)
#   train_full_<head>, eval_<head>        the same with model.head.name=<head>, for every other registered head
#                                         (trees with fsl_med/models/heads/; a tree without heads runs ALP's only)
#
# Usage: bash scripts/bench-heads.sh [--rounds R] [--steps N] [--encoder NAME] [--parts P,...] [--eval-repeats E]
#                                   [--list] OUT [TREE ...]
#   TREE: fsl_med source trees (default: the tree this script lives in). With several trees the runs alternate
#         part by part (train_full of every tree, then the next part, ...), the tree order (and the head order
#         within a part) reversed every other round, so that drift of the machine hits every tree and head alike;
#         each figure is the median over R rounds
#         (default 3; min and max are reported too).
#   --steps N: timed training steps per run (default 10, as make bench); --list: print the runs, run nothing.
#   --encoder NAME: the encoder of every run (default dinov2_vits14, as make bench; e.g. vit_tiny_patch14).
#   --parts: train_full, eval or both (default both). --eval-repeats E: timed evaluations per eval run after the
#         untimed one (default 3, as make bench; the rounds repeat them too; trees whose bench lacks the option
#         run their default).
#   A head whose evaluation has a test-time refinement (Q-Net) gets a row of its own: the refinement's seconds per
#   query slice (part of its evaluation time).
# Environment: DATA (prepared CHAOS-T2; default $FSL_MED_DATA_MRI, else ../shared/data/CHAOST2/
#   chaos_MR_T2_normalized beside this tree), PYTHON (default this tree's .venv/bin/python; every tree runs on it,
#   its own fsl_med first on PYTHONPATH), FSL_MED_CACHE (superpixel cache, default this tree's .cache/fsl_med),
#   OMP_WAIT_POLICY (default PASSIVE, as fsl-med sets it).
# Writes OUT/runs.jsonl (one line per run, as it finishes), OUT/logs/, OUT/summary.md and OUT/summary.json
# (per tree: median seconds, "vs ALP" within the tree, "vs <first tree>" for the same part), and prints the summary.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
export BENCH_HEADS_HOME="$here"
export PYTHON="${PYTHON:-$here/.venv/bin/python}"
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
exec "$PYTHON" - "$@" <<'PYEOF'
import argparse, json, os, statistics, subprocess, sys, tempfile, time
from pathlib import Path

home = Path(os.environ["BENCH_HEADS_HOME"])
py = os.environ["PYTHON"]
p = argparse.ArgumentParser(prog="bench-heads.sh")
p.add_argument("out")
p.add_argument("trees", nargs="*")
p.add_argument("--rounds", type=int, default=3)
p.add_argument("--steps", type=int, default=10)
p.add_argument("--encoder", default="dinov2_vits14")
p.add_argument("--parts", default="train_full,eval")
p.add_argument("--eval-repeats", type=int, default=3)
p.add_argument("--list", action="store_true")
a = p.parse_args()


def die(msg: str) -> None:
    print(f"bench-heads: {msg}", file=sys.stderr)
    sys.exit(2)


if a.rounds < 1 or a.steps < 1 or a.eval_repeats < 1:
    die(f"--rounds {a.rounds} / --steps {a.steps} / --eval-repeats {a.eval_repeats}: need >= 1")
parts = [x.strip() for x in a.parts.split(",") if x.strip()]
if not parts or any(x not in ("train_full", "eval") for x in parts):
    die(f"--parts {a.parts}: must name train_full, eval or both")
data = Path(os.environ.get("DATA") or os.environ.get("FSL_MED_DATA_MRI")
            or home.parent / "shared/data/CHAOST2/chaos_MR_T2_normalized").resolve()
if not any(data.glob("image_*.nii.gz")):
    die(f"DATA={data}: no prepared CHAOS-T2 volumes (image_<id>.nii.gz); set DATA or FSL_MED_DATA_MRI")
cache = Path(os.environ.get("FSL_MED_CACHE") or home / ".cache/fsl_med").resolve()
SECONDS = {"train_full": "seconds_per_step", "eval": "seconds_per_slice"}
REFINE = "refine_seconds_per_slice"  # an eval figure of a head with a test-time refinement (Q-Net), part of SECONDS


def tree_info(path: str, i: int) -> dict:
    root = Path(path).resolve()
    if not (root / "fsl_med" / "bench.py").is_file():
        die(f"{root}: not an fsl_med tree (no fsl_med/bench.py)")
    env = {**os.environ, "PYTHONPATH": str(root)}
    probe = subprocess.run([py, "-c", "import fsl_med, pathlib; print(pathlib.Path(fsl_med.__file__).resolve())"],
                           cwd=root, env=env, capture_output=True, text=True)
    if probe.returncode or not probe.stdout.strip().startswith(str(root / "fsl_med")):
        die(f"{root}: {py} imports fsl_med from {probe.stdout.strip() or probe.stderr.strip()[-200:]}, not this tree")
    heads = ["alp"]
    if (root / "fsl_med" / "models" / "heads" / "__init__.py").is_file():
        q = subprocess.run([py, "-c", "from fsl_med.models.heads import list_heads; print(' '.join(list_heads()))"],
                           cwd=root, env=env, capture_output=True, text=True)
        if q.returncode:
            die(f"{root}: cannot list its heads: {(q.stderr.strip().splitlines() or ['?'])[-1]}")
        heads = q.stdout.split()
    git = subprocess.run(["git", "-C", str(root), "log", "-1", "--format=%h %s"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    commit = git.stdout.strip()[:70] + (" (+ uncommitted changes)" if dirty else "") if git.returncode == 0 else "?"
    runs = []
    for part in parts:
        runs.append((part, part, []))
        runs += [(f"{part}_{h}", part, [f"model.head.name={h}"]) for h in heads if h != "alp"]
    repeats = "--eval-repeats" in (root / "fsl_med" / "bench.py").read_text()
    return {"name": f"{i + 1}-{root.name}", "root": root, "env": env, "heads": heads, "commit": commit, "runs": runs,
            "repeats": repeats}


trees = [tree_info(t, i) for i, t in enumerate(a.trees or [str(home)])]
slots = {part: list(dict.fromkeys(label for t in trees for label, q, _ in t["runs"] if q == part)) for part in parts}
plan = []  # (round, tree, label, part, overrides)
for r in range(a.rounds):  # every other round the trees, and the heads within a part, in reverse order
    order = trees if r % 2 == 0 else trees[::-1]
    for part in parts:
        for label in slots[part] if r % 2 == 0 else slots[part][::-1]:
            plan += [(r, t, *run) for t in order for run in t["runs"] if run[0] == label]
if a.list:
    for t in trees:
        print(f"{t['name']}: {t['root']} ({t['commit']}); heads {', '.join(t['heads'])}")
    for r, t, label, part, ov in plan:
        print(f"round {r + 1}: {t['name']}: {label} = {part}{' --set ' + ' '.join(ov) if ov else ''}")
    sys.exit(0)

out = Path(a.out).resolve()
(out / "logs").mkdir(parents=True, exist_ok=True)
jsonl = out / "runs.jsonl"
jsonl.write_text("")
t_all = time.perf_counter()
for i, (r, t, label, part, ov) in enumerate(plan):
    with tempfile.TemporaryDirectory(prefix="fsl_med_bench_heads_") as work:
        cmd = [py, "-m", "fsl_med.bench", part, "--data", str(data), "--encoder", a.encoder, "--steps",
               str(a.steps), "--warmup", "3", "--workers", "1", "--cache-dir", str(cache), "--work", work,
               "--precision", "32-true",
               *(["--eval-repeats", str(a.eval_repeats)] if t["repeats"] and a.eval_repeats != 3 else []),
               "--set", *ov]
        print(f"bench-heads: [{i + 1}/{len(plan)}] round {r + 1}, {t['name']}: {label} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        res = subprocess.run(cmd, cwd=t["root"], env=t["env"], capture_output=True, text=True)
        log = out / "logs" / f"{t['name']}-{label}-r{r + 1}.log"
        log.write_text(" ".join(cmd) + "\n" + res.stderr + f"\nexit status {res.returncode}\n")
        if res.returncode:  # a negative status: killed by that signal (e.g. -9, the kernel's OOM killer)
            print(f"bench-heads: {t['name']} {label} failed (exit status {res.returncode}): "
                  f"{(res.stderr.strip().splitlines() or ['?'])[-1]} (log: {log})", file=sys.stderr)
            sys.exit(1)
        fig = json.loads(res.stdout.strip().splitlines()[-1])
        with jsonl.open("a") as f:
            f.write(json.dumps({"tree": t["name"], "root": str(t["root"]), "commit": t["commit"], "round": r + 1,
                                "label": label, "part": part, "overrides": ov, "figures": fig}) + "\n")
        refine = f" (refinement {fig[REFINE]:.4f} s)" if fig.get(REFINE) is not None else ""
        print(f"bench-heads: {t['name']} {label}: {fig[SECONDS[part]]:.4f} s{refine} ({time.perf_counter() - t0:.0f} s)",
              file=sys.stderr, flush=True)

# the summary: medians over the rounds
recs = [json.loads(x) for x in jsonl.read_text().splitlines()]
rows = []
for t in trees:
    for label, part, ov in t["runs"]:
        got = [x["figures"] for x in recs if x["tree"] == t["name"] and x["label"] == label]
        v = [g[SECONDS[part]] for g in got]
        rows.append({"tree": t["name"], "label": label, "part": part, "head": got[0].get("head", "alp"),
                     "median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v),
                     "gflop": statistics.median(g.get("gflop_per_step", g.get("gflop_per_slice", 0)) for g in got)})
        r = [g[REFINE] for g in got if g.get(REFINE) is not None]
        if r:  # the refinement's seconds per query slice, part of the row above
            rows.append({"tree": t["name"], "label": f"{label} refinement", "part": part, "head": rows[-1]["head"],
                         "median": statistics.median(r), "min": min(r), "max": max(r), "n": len(r), "gflop": 0.0,
                         "refine": True})
for row in rows:
    alp = next(x for x in rows if x["tree"] == row["tree"] and x["label"] == row["part"])
    first = next((x for x in rows if x["tree"] == trees[0]["name"] and x["label"] == row["label"]), None)
    row["vs_alp"] = None if row["label"] == row["part"] or row.get("refine") else \
        100 * (row["median"] / alp["median"] - 1)
    row["vs_first"] = None if first is None or row["tree"] == trees[0]["name"] else \
        100 * (row["median"] / first["median"] - 1)
cpu = subprocess.run(["sh", "-c", "lscpu | grep 'Model name' | sed 's/.*: *//'"], capture_output=True, text=True)
pct = lambda v: "–" if v is None else f"{v:+.1f} %"  # noqa: E731
md = ["# bench-heads (issue 29 §5)", "",
      f"CPU {cpu.stdout.strip() or '?'}, {os.cpu_count()} cores; data `{data}`; encoder `{a.encoder}` (random init); "
      f"{a.rounds} round(s), {a.steps} timed training steps per run, {a.eval_repeats} timed evaluation(s) per eval "
      f"run; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; "
      f"{(time.perf_counter() - t_all) / 60:.1f} min.", ""]
md += [f"- `{t['name']}`: {t['root']} at {t['commit']}; heads {', '.join(t['heads'])}" for t in trees]
md += ["", f"| tree | run | head | median s | min–max s | GFLOP | vs ALP | vs {trees[0]['name']} |",
       "|---|---|---|---:|---:|---:|---:|---:|"]
for row in rows:
    unit = "s/step" if row["part"] == "train_full" else "s/slice"
    md.append(f"| {row['tree']} | {row['label']} ({unit}) | {row['head']} | {row['median']:.4f} | {row['min']:.4f}–"
              f"{row['max']:.4f} | {row['gflop']:.2f} | {pct(row['vs_alp'])} | {pct(row['vs_first'])} |")
(out / "summary.md").write_text("\n".join(md) + "\n")
(out / "summary.json").write_text(json.dumps({"data": str(data), "encoder": a.encoder, "rounds": a.rounds,
                                              "steps": a.steps, "eval_repeats": a.eval_repeats,
                                              "trees": [{k: str(v) for k, v in t.items() if k in ("name", "root", "commit")}
                                                        for t in trees], "rows": rows}, indent=1) + "\n")
print("\n".join(md))
print(out / "summary.md")
PYEOF
