"""The ``fsl-med`` command line: parse, load the config, call one verb each.

Errors caused by input (config, data, weights) print one line ``fsl-med: error: ...`` and exit 2;
other failures print one line and exit 1. ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fsl_med import __version__
from fsl_med.errors import ConfigError, DataError, FslMedError, spelled_as

log = logging.getLogger("fsl_med")


def _config_path(name: str | None, default: str | None = None) -> Path | None:
    """A config file by path, or by name in ``experiments/`` (``mri`` -> ``experiments/mri.yaml``)."""
    name = name or default
    if name is None:
        return None
    p = Path(name)
    if p.is_file():
        return p
    if p.is_dir():
        raise ConfigError(f"config file {name}: is a folder, not a YAML file")
    repo_experiments = Path(__file__).resolve().parents[1] / "experiments"  # a source checkout
    for folder in (Path("experiments"), repo_experiments):
        for cand in (folder / name, folder / f"{name}.yaml"):
            if cand.is_file():
                return cand
    raise ConfigError(f"config file not found: {name} (give a YAML path or a name in experiments/)")


def _split_config_arg(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """The first positional is the config unless it looks like an override (``key=value``)."""
    rest = list(args.rest)
    if rest and "=" not in rest[0]:
        return rest[0], rest[1:]
    return None, rest


def _required_config(args: argparse.Namespace, usage: str) -> Any:
    """The config named by the first positional argument with the ``key=value`` overrides applied."""
    from fsl_med.run_config import load_run_config

    name, overrides = _split_config_arg(args)
    if name is None:
        raise ConfigError(f"{args.command} needs a config: fsl-med {args.command} {usage}")
    return load_run_config(_config_path(name), overrides)


MRI_DATA_HELP = ("prepared CHAOS-T2 folder (default $FSL_MED_DATA_MRI, else data/CHAOST2/chaos_MR_T2_normalized, "
                 "what make prepare-mri writes)")
"""``--data`` of the verbs that read CHAOS-T2 (the default: :func:`fsl_med.prepare.datasets.default_mri_root`)."""


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    """A verb without arguments of its own."""


@dataclass(frozen=True)
class Verb:
    """One verb of ``fsl-med``, declared beside its handler; :func:`build_parser` adds each verb of :data:`VERBS`.

    Attributes:
        name: the verb (``fsl-med NAME``).
        help: its line in ``fsl-med --help``.
        run: the handler: the parsed arguments -> the exit code.
        add_arguments: declares the verb's arguments on its own parser.
        description: the text atop ``fsl-med NAME --help`` (``None``: none), or a function that returns it when the
            parser is built (text made from a registry, e.g. gpu-check's rows).
    """

    name: str
    help: str
    run: Callable[[argparse.Namespace], int]
    add_arguments: Callable[[argparse.ArgumentParser], None] = _no_arguments
    description: str | Callable[[], str] | None = None

    def description_text(self) -> str | None:
        """The description as ``--help`` shows it (a function's text is made now)."""
        return self.description() if callable(self.description) else self.description


def _config_arguments(parser: argparse.ArgumentParser) -> None:
    """``CONFIG [key=value ...]``: a config and its overrides (told apart by :func:`_split_config_arg`)."""
    parser.add_argument("rest", nargs="*", metavar="CONFIG|key=value")


def _config_verb(name: str, help: str, run: Callable[[argparse.Namespace], int],
                 add_arguments: Callable[[argparse.ArgumentParser], None] = _config_arguments) -> Verb:
    """A verb of a config and its overrides; its help line is also the description atop its ``--help``."""
    return Verb(name, help, run, add_arguments, description=help)


def cmd_train(args: argparse.Namespace) -> int:
    from fsl_med.train import train

    cfg = _required_config(args, "CONFIG [key=value ...]")
    res = train(cfg, explicit=_split_config_arg(args)[1])
    sps = f"{res.seconds_per_step:.3f}" if res.seconds_per_step else "n/a"
    val = f"{res.val_dice:.2f}" if res.val_dice is not None else "n/a"
    print(f"trained {res.steps} steps ({sps} s/step median), val/dice {val}; run folder {res.run_dir}")
    if res.best_ckpt:
        print(f"best checkpoint: {res.best_ckpt}")
    print(res.last_ckpt)
    return 0


TRAIN = _config_verb("train", "train on self-supervised episodes: train CONFIG [key=value ...]", cmd_train)


def cmd_eval(args: argparse.Namespace) -> int:
    from fsl_med.evaluate import evaluate
    from fsl_med.evaluation.report import VARIANT_TITLES, metric_table

    if args.skip_bad:
        args.rest = [*args.rest, "eval.skip_bad=true"]
    cfg = _required_config(args, "CONFIG ckpt=PATH [key=value ...]")
    results, path, _ = evaluate(cfg, explicit=_split_config_arg(args)[1])
    organs = list(results["config"]["data"]["test_organs"])  # the checkpoint's, unless given explicitly
    cols = {f"Dice % {VARIANT_TITLES.get(v, v)} (fold {results['fold']})": summ
            for v, summ in (results.get("variants") or {"plain": results}).items()}
    if results.get("in_sample"):
        print(results["in_sample"])
    print(metric_table(cols, organs))
    if results.get("seconds_per_volume") is not None:
        print(f"seconds per query volume: {results['seconds_per_volume']:.2f}")
    print(path)
    return 0


def _eval_arguments(parser: argparse.ArgumentParser) -> None:
    _config_arguments(parser)
    parser.add_argument("--skip-bad", action="store_true",
                        help="skip (and list in the report) query volumes that cannot be read, instead of failing")


EVAL = _config_verb("eval", "EP1 evaluation: eval CONFIG ckpt=PATH|latest [key=value ...]", cmd_eval,
                    _eval_arguments)


def cmd_run(args: argparse.Namespace) -> int:
    from fsl_med.evaluate import evaluate
    from fsl_med.evaluation.report import VARIANT_TITLES, metric_table
    from fsl_med.train import train

    cfg = _required_config(args, "CONFIG [key=value ...]")
    from fsl_med.callbacks import refinements

    refinements(cfg)  # a bad eval.refinements entry fails before training, not after it
    # resuming (ckpt=...) continues the checkpoint's fold, setting and organs: evaluate with the config trained with
    res = train(cfg, explicit=_split_config_arg(args)[1])
    assert res.config is not None and res.module is not None
    results, path, _ = evaluate(res.config, module=res.module, global_step=res.steps)
    cols = {f"Dice % {VARIANT_TITLES.get(v, v)}": summ for v, summ in results["variants"].items()}
    if results.get("in_sample"):
        print(results["in_sample"])
    print(metric_table(cols, list(cfg.data.test_organs)))
    print(path)
    return 0


RUN = _config_verb("run", "train, then evaluate the trained model (one W&B run; what sweeps call): "
                  "run CONFIG [key=value ...]", cmd_run)


def _report_verb(args: argparse.Namespace, runner: Any, report: str) -> int:
    """Run a grid verb (``runner(cfg, no_wait) -> (report, json path)``), print its Markdown report, then the JSON
    path (with ``--no-wait``: the job table's path; the runner printed the job ids and the command to rerun)."""
    cfg = _required_config(args, "CONFIG [key=value ...]")
    doc, path = runner(cfg, no_wait=args.no_wait)
    if doc is not None:
        print(path.with_name(report).read_text(encoding="utf-8"))
    print(path)
    return 0


def _grid_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of a grid verb (protocol, ablate, compare): the config, its overrides and ``--no-wait``."""
    _config_arguments(parser)
    parser.add_argument("--no-wait", action="store_true",
                        help="protocol.launcher=slurm: submit the jobs, print their ids and the command that "
                        "waits for them and writes the report, and return")


def cmd_protocol(args: argparse.Namespace) -> int:
    from fsl_med.protocol_run import run_protocol

    return _report_verb(args, run_protocol, "protocol.md")


PROTOCOL = _config_verb("protocol", "benchmark protocol (folds x settings x seeds; plain/+CCA/+TTT/+TTT+CCA) "
                       "with one report: protocol CONFIG [key=value ...]", cmd_protocol, _grid_arguments)


def cmd_ablate(args: argparse.Namespace) -> int:
    from fsl_med.ablate import run_ablation

    return _report_verb(args, run_ablation, "ablation.md")


ABLATE = _config_verb("ablate", "ablation grid (encoder, fine-tuning, adapter, 3-slice input, k-shot; plain/+CCA/"
                     "+TTT/+TTT+CCA) with one report: ablate CONFIG [key=value ...]", cmd_ablate, _grid_arguments)


def cmd_compare(args: argparse.Namespace) -> int:
    from fsl_med.compare import run_compare

    name, overrides = _split_config_arg(args)
    if name is None:
        raise ConfigError("compare needs a config: fsl-med compare CONFIG [key=value ...]")
    # the path, not a loaded config: each head x encoder row is loaded from it, so head defaults follow each head
    doc, path = run_compare(_config_path(name), overrides, no_wait=args.no_wait)
    if doc is not None:
        print(path.with_name("compare.md").read_text(encoding="utf-8"))
    print(path)
    return 0


COMPARE = _config_verb("compare", "few-shot heads x encoders through the protocol (same folds, settings, seeds, "
                      "episodes; plain/+CCA/+TTT/+TTT+CCA) with one report: compare CONFIG [key=value ...]",
                      cmd_compare, _grid_arguments)


def cmd_bench(args: argparse.Namespace) -> int:
    from fsl_med.bench import PARTS, run_bench

    parts = tuple(args.parts.split(",")) if args.parts else PARTS
    bad = [p for p in parts if p not in PARTS]
    if bad:
        raise ConfigError(f"--parts: unknown part(s) {bad}; valid: {', '.join(PARTS)}")
    from fsl_med.prepare.datasets import mri_data_folder

    data = str(mri_data_folder(args.data))
    from fsl_med.atomic import refuse_nested

    refuse_nested(args.out, data, "--out", "the --data folder", may_contain=True)
    from fsl_med.atomic import ensure_writable_dir

    ensure_writable_dir(args.out, "--out")  # before the benchmark runs, not after
    if args.steps < 1 or args.workers < 0 or args.tiny_steps < 1:
        raise ConfigError(f"--steps {args.steps} / --workers {args.workers} / --tiny-steps {args.tiny_steps}: need "
                          "--steps >= 1, --workers >= 0, --tiny-steps >= 1")
    heads = None if args.heads is None else [h.strip() for h in args.heads.split(",") if h.strip()]
    md = run_bench(data, args.out, parts, encoder=args.encoder, steps=args.steps, workers=args.workers,
                   tiny_steps=args.tiny_steps, heads=heads, overrides=list(args.rest))
    print(md.read_text(encoding="utf-8"))
    print(md)
    return 0


def _bench_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--data", default=None, help=MRI_DATA_HELP)
    sp.add_argument("--out", default=".", help="folder for BENCHMARKS.md and benchmarks.json (default: here)")
    sp.add_argument("rest", nargs="*", metavar="key=value", help="config overrides of every part (model.head.* ...)")
    sp.add_argument("--parts", default=None, help="comma-separated subset of: matmul,train_full,train_lora,eval,heads,"
                    "ttt,ttt_dice,oversubscription")
    sp.add_argument("--heads", default=None, help="comma-separated few-shot heads of the heads part (default: every "
                    "registered head; ALP's rows are always measured)")
    sp.add_argument("--encoder", default="dinov2_vits14")
    sp.add_argument("--steps", type=int, default=10, help="timed training steps (after 3 warm-up steps)")
    sp.add_argument("--workers", type=int, default=1, help="data-loader workers for the training parts")
    sp.add_argument("--tiny-steps", type=int, default=300, help="training steps of the tiny model of ttt_dice")


BENCH = Verb("bench", "speed/memory/FLOP-bound benchmark; writes BENCHMARKS.md and benchmarks.json", cmd_bench,
             _bench_arguments)


def cmd_sweep(args: argparse.Namespace) -> int:
    from fsl_med.sweep import run_sweep

    if args.count is not None and args.count < 1:
        raise ConfigError(f"--count {args.count}: must be >= 1")
    sweep_id = run_sweep(args.file, count=args.count, create_only=args.create_only)
    print(sweep_id)
    return 0


def _sweep_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("file", help="sweep file, e.g. experiments/sweeps/mri.yaml")
    sp.add_argument("--count", type=int, default=None, help="runs for this agent (default: until the sweep ends)")
    sp.add_argument("--create-only", action="store_true", help="create the sweep and print its id; start no agent")


SWEEP = Verb("sweep", "create a W&B sweep from a sweep file and run an agent (needs wandb login)", cmd_sweep,
             _sweep_arguments,
             description="Create a W&B sweep from a sweep file (experiments/sweeps/*.yaml) and run an agent "
             "here; more agents elsewhere: wandb agent <sweep id>. Needs W&B credentials (wandb login).")


def cmd_gpu_check(args: argparse.Namespace) -> int:
    from fsl_med.gpu_check import run_gpu_check

    only = None if args.only is None else [o.strip() for o in args.only.split(",") if o.strip()]
    md, failed = run_gpu_check(args.out, args.profile, data=args.data, bundle=args.bundle, cache_dir=args.cache_dir,
                               overrides=list(args.rest), only=only, budget_s=args.budget_s)
    print(md.read_text(encoding="utf-8"))
    print(md)
    if failed:
        print(f"fsl-med: gpu-check: {failed} row(s) failed (messages above; tracebacks in {md.with_suffix('.log')})",
              file=sys.stderr)
        return 1
    return 0


def _gpu_check_description() -> str:
    from fsl_med.gpu_check.rows import help_text as gpu_check_rows

    return (
        "Runs every CUDA-specific path of fsl_med once, one report row each (a failing row is reported and "
        "the others still run; exit 1 if any failed): training of DINOv2 ViT-L/14 LoRA r=4 and ViT-S/14 full in fp32, "
        "bf16-mixed and bf16-mixed + torch.compile, ViT-L at batch 1/8/32, with FLOP-bound fractions, peak GPU memory "
        "and the data pipeline's rate; fsl-med train/eval with CCA and TTT; GPU vs CPU Dice; fsl-med segment GPU vs "
        "CPU; DDP. Without CUDA: the same rows in a tiny mode (phantom data, tiny ViT) on the CPU. Row keys (for "
        f"--only): {gpu_check_rows()}.")


def _gpu_check_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("rest", nargs="*", metavar="key=value", help="config overrides of every row")
    sp.add_argument("--out", default="lightning_logs/gpu-check", help="report folder (default lightning_logs/gpu-check)")
    sp.add_argument("--profile", choices=("auto", "gpu", "tiny"), default="auto",
                    help="gpu (CUDA, real data, ViT-L/ViT-S) or tiny (phantom, tiny ViT); auto: gpu when CUDA is present")
    sp.add_argument("--data", default=None, help="prepared CHAOS-T2 folder (gpu profile default: $FSL_MED_DATA_MRI, "
                    "data/CHAOST2/chaos_MR_T2_normalized, gpu_bundle/chaos; the tiny profile generates a phantom unless "
                    "--data/--bundle)")
    sp.add_argument("--bundle", default=None, help="a folder written by fsl-med gpu-bundle: its data and superpixel cache")
    sp.add_argument("--cache-dir", default=None, help="superpixel cache (default: the bundle's, $FSL_MED_CACHE, else cache/ in --out)")
    sp.add_argument("--only", default=None, metavar="ROWS",
                    help="comma-separated row-key prefixes to run, e.g. train-large,segment (env always runs; the "
                    "evaluation rows bring the checkpoint row)")
    sp.add_argument("--budget-s", type=float, default=None,
                    help="rows not started within this many seconds are skipped, env excepted (default: gpu 330, tiny 270)")


GPU_CHECK = Verb(
    "gpu-check", "run and measure the GPU path (train bf16/compile, eval, TTT, segment, DDP) in one command; "
    "a tiny CPU mode without CUDA; writes gpu-check.md/.json/.log", cmd_gpu_check, _gpu_check_arguments,
    description=_gpu_check_description)


def cmd_gpu_bundle(args: argparse.Namespace) -> int:
    from fsl_med.gpu_bundle import build_bundle

    scans = [s for s in (args.scans or "").split(",") if s] or None
    bundle = build_bundle(args.out, args.data, scans, wheels_from=args.wheels_from)
    print(bundle.summary())
    print(bundle.path)
    return 0


def _gpu_bundle_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--out", default="gpu_bundle", help="bundle folder (default gpu_bundle, git-ignored)")
    sp.add_argument("--data", default=None, help=MRI_DATA_HELP)
    sp.add_argument("--scans", default=None, help="comma-separated scan ids (default 1,2,3,5,8,10,13,15,19,20)")
    sp.add_argument("--wheels-from", default=None, metavar="DIR", help="take the wheels from this folder (offline)")


GPU_BUNDLE = Verb(
    "gpu-bundle", "wheels (Python 3.12) + a CHAOS-T2 subset and its superpixels for a GPU machine without "
    "network: gpu-bundle [--out gpu_bundle] [--data DIR] [--scans 1,2,...]", cmd_gpu_bundle, _gpu_bundle_arguments,
    description="Writes what `make gpu-check` needs on a GPU machine that has no network and lacks monai, nibabel, "
    "omegaconf and pydicom: their wheels for CPython 3.12 (downloaded by pip, so this needs a package registry, "
    "or --wheels-from), a subset of the prepared CHAOS-T2 scans, the superpixels of the subset's fold-0 training "
    "scans and MANIFEST.json; under the 64 MiB the device tool carries with the repository (~34 MiB by default). "
    "An existing bundle is replaced only when the new one is complete; a folder that is not a bundle is refused.")


def cmd_demo(args: argparse.Namespace) -> int:
    from fsl_med.demo import run_demo

    name, overrides = _split_config_arg(args)
    cfg_path = _config_path(name, "demo")
    print(run_demo(cfg_path, overrides))
    return 0


DEMO = _config_verb("demo", "phantom data, train briefly, evaluate before/after: demo [CONFIG] [key=value ...]",
                    cmd_demo)


def cmd_phantom(args: argparse.Namespace) -> int:
    if args.format == "prepared":
        from fsl_med.data.phantom import generate_phantom

        out = generate_phantom(args.out, n_scans=args.n_scans, size=args.size, depth=args.depth, seed=args.seed)
    else:
        from fsl_med.data.phantom_raw import write_raw_chaos, write_raw_sabs

        if args.format == "sabs-raw":
            out = write_raw_sabs(args.out, n_scans=args.n_scans, size=args.size, depth=args.depth, seed=args.seed)
        else:
            out = write_raw_chaos(args.out, n_patients=args.n_scans, size=args.size, depth=args.depth, seed=args.seed,
                                  as_zip=args.format == "chaos-zip")
    print(out)
    return 0


def _phantom_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--out", required=True)
    sp.add_argument("--format", choices=("prepared", "chaos-raw", "chaos-zip", "sabs-raw"), default="prepared",
                    help="prepared CHAOS layout (default), CHAOS DICOM+PNG folder or zip, or Synapse RawData/Training")
    sp.add_argument("--n-scans", type=int, default=10)
    sp.add_argument("--size", type=int, default=256)
    sp.add_argument("--depth", type=int, default=24)
    sp.add_argument("--seed", type=int, default=0)


PHANTOM = Verb("phantom", "generate a phantom dataset: prepared layout or an official raw format", cmd_phantom,
               _phantom_arguments)


def _cache_dir(args: argparse.Namespace) -> str | None:
    if args.no_superpixels:
        return None
    return args.cache_dir or os.environ.get("FSL_MED_CACHE") or ".cache/fsl_med"


def cmd_prepare(args: argparse.Namespace) -> int:
    progress = not args.no_progress
    cache = _cache_dir(args)
    if cache is not None and Path(args.src).is_dir():  # the superpixel cache is never written into the source
        from fsl_med.atomic import refuse_nested

        refuse_nested(cache, args.src, "--cache-dir", "the source folder --src", may_contain=True)
    if args.kind == "import":
        from fsl_med.prepare.importer import import_prepared

        rep = import_prepared(args.src, args.dataset, check_only=args.check_only)
        for note in rep.notes:
            print(f"note: {note}")
        for problem in rep.problems:
            print(f"problem: {problem}")
        if not rep.ok:
            raise DataError(f"{rep.folder}: {len(rep.problems)} problem(s) found (listed above); nothing was written")
        if cache is not None and not args.check_only:
            _cache_superpixels(rep.folder, list(rep.scans), args.dataset, cache, progress)
            rep.written.append(f"superpixels in {cache}")
        written = f"; wrote {', '.join(rep.written)}" if rep.written else ""
        print(f"{rep.folder}: {len(rep.scans)} scans of {rep.dataset} are valid{written}")
        return 0
    from fsl_med.prepare.plan import default_plan

    if args.kind == "chaos":
        from fsl_med.prepare.chaos import prepare_chaos

        rep = prepare_chaos(args.src, args.out, default_plan("mri", args.compat, label_interp=args.label_interp),
                            force=args.force, overwrite=args.overwrite, progress=progress)
    else:
        from fsl_med.prepare.sabs import prepare_sabs

        plan = default_plan("ct", args.compat, label_interp=args.label_interp, grid=args.grid)
        rep = prepare_sabs(args.src, args.out, plan, force=args.force, overwrite=args.overwrite, progress=progress)
    if cache is not None:
        ids = rep.prepared + rep.skipped
        rep.superpixel_seconds = _cache_superpixels(rep.out_dir, ids, "chaos_t2" if args.kind == "chaos" else "sabs",
                                                    cache, progress)
    print(rep.summary())
    return 0


def _cache_superpixels(root: Path, scan_ids: list[str], dataset: str, cache: str, progress: bool) -> float:
    from fsl_med.data.superpixels import cache_superpixels
    from fsl_med.prepare.datasets import get_dataset_info

    return cache_superpixels(root, scan_ids, get_dataset_info(dataset), cache, progress)


def _prepare_arguments(sp: argparse.ArgumentParser) -> None:
    """``prepare chaos|sabs|import``: one sub-verb per kind of source, each with its own arguments."""
    from fsl_med.config import COMPATS
    from fsl_med.prepare.geometry import LABEL_RULES
    from fsl_med.prepare.plan import CT_GRIDS

    psub = sp.add_subparsers(dest="kind", required=True)
    for kind, helptext in (("chaos", "CHAOS_Train_Sets.zip or its folder (MR T2-SPIR DICOM + PNG masks)"),
                           ("sabs", "Synapse/BTCV RawData/Training folder or zip (HU NIfTI, 13 organs)"),
                           ("import", "check a folder prepared elsewhere and add classmap, manifest, superpixels")):
        pp = psub.add_parser(kind, help=helptext, description=helptext)
        pp.add_argument("--src", required=True, help="source zip or folder" if kind != "import" else "prepared folder")
        if kind == "import":
            pp.add_argument("--dataset", required=True, choices=("chaos", "chaos_t2", "sabs"))
            pp.add_argument("--check-only", action="store_true", help="only report problems; write nothing")
        else:
            pp.add_argument("--out", required=True, help="output folder (prepared layout + manifest.json)")
            pp.add_argument("--compat", choices=COMPATS, default="fsl_med",
                            help="reference: prepare as the reference notebooks do (labels per_class_rint"
                            + ("; CT grid reference: 257 x 257" if kind == "sabs" else "") + "); README 'Deviations'")
            pp.add_argument("--label-interp", choices=LABEL_RULES, default=None,
                            help="label resampling: per_class (fsl_med: linear per class, highest membership wins), "
                            "per_class_rint (reference: rounded per class, higher ids overwrite) or nearest "
                            "(default: --compat's)")
            if kind == "sabs":
                pp.add_argument("--grid", choices=CT_GRIDS, default=None,
                                help="in-plane grid: exact (fsl_med: 256 x 256) or reference (the notebook's spacing "
                                "rule, 257 x 257 for 512 px scans; the loader resizes; default: --compat's)")
            pp.add_argument("--force", action="store_true", help="re-prepare scans that are up to date")
            pp.add_argument("--overwrite", action="store_true",
                            help="replace the prepared data --out holds (another dataset, source or plan); the old "
                            "content stays intact until the new preparation is complete")
        pp.add_argument("--cache-dir", default=None, help="superpixel cache (default $FSL_MED_CACHE or .cache/fsl_med)")
        pp.add_argument("--no-superpixels", action="store_true", help="do not precompute superpixel pseudolabels")
        pp.add_argument("--no-progress", action="store_true", help="no progress bars")


PREPARE = Verb("prepare", "official download -> prepared layout: prepare chaos|sabs --src PATH --out DIR; "
               "prepare import --src DIR --dataset chaos|sabs", cmd_prepare, _prepare_arguments)


def cmd_download(args: argparse.Namespace) -> int:
    from fsl_med.download import download_archive

    path = download_archive(args.name, args.out, url=args.url, sha256=args.sha256, progress=not args.no_progress)
    print(path)
    return 0


def _download_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("name", help="archive name (chaos)")
    sp.add_argument("--out", required=True, help="output folder")
    sp.add_argument("--url", default=None, help="download from this URL instead (then only --sha256 is checked)")
    sp.add_argument("--sha256", default=None, metavar="HEX", help="expected SHA-256 of the file")
    sp.add_argument("--no-progress", action="store_true", help="no progress bar")


DOWNLOAD = Verb("download", "download a dataset archive (resumable, SHA-256 checked): download chaos --out DIR",
                cmd_download, _download_arguments)


def cmd_encoders(args: argparse.Namespace) -> int:
    from fsl_med.models.encoder_registry import get_encoder_spec, list_encoders

    for n in list_encoders():
        s = get_encoder_spec(n)
        arch = f"timm={s.timm_name}" if s.family == "vit" else "torchvision deeplabv3_resnet101 + 1x1 2048->256"
        print(f"{n:24s} {arch:48s} dim={s.embed_dim:5d} weights: none|{s.hub_tag or '-'}|FILE")
    print("timm:<architecture>[.<tag>]  any timm ViT with patch tokens, e.g. timm:vit_small_patch16_224.dino")
    return 0


ENCODERS = Verb("encoders", "list registered encoders", cmd_encoders)


def cmd_segment(args: argparse.Namespace) -> int:
    from fsl_med.segment import segment

    res = segment(args.ckpt, args.support_image, args.support_mask, args.query, args.out, label=args.label,
                  z_range=args.z_range, shots_per_part=args.shots_per_part, cca=args.cca,
                  batch_size=args.batch_size, device=args.device, plan=args.plan)
    a, b = res.z_range
    print(f"segmented {res.voxels} voxels ({res.volume_ml:.1f} ml) in query slices {a}..{b} of {args.query}; "
          f"support slices per part {res.support_slices}")
    print(res.path)
    return 0


def _segment_arguments(sp: argparse.ArgumentParser) -> None:
    from fsl_med.config import CCA_MODES, DEFAULT_CCA_MODE

    sp.add_argument("--ckpt", required=True, help="checkpoint written by fsl-med train")
    sp.add_argument("--support-image", required=True, action="append",
                    help="support volume (NIfTI, any orientation/spacing); repeat with --support-mask for k supports")
    sp.add_argument("--support-mask", required=True, action="append",
                    help="support mask of the support image's shape (one per --support-image, in order)")
    sp.add_argument("--query", required=True, help="volume to segment (3D NIfTI)")
    sp.add_argument("--out", required=True, help="output .nii.gz: uint8 mask on the query's grid (1 = organ)")
    sp.add_argument("--label", type=int, default=None, help="organ label in a multi-label support mask")
    sp.add_argument("--z-range", default=None, metavar="A:B",
                    help="segment only query slices A..B (inclusive, the query's third array axis); support parts "
                    "follow the relative position in this range, so the organ's extent works best")
    sp.add_argument("--shots-per-part", type=int, default=1, metavar="K", help="support slices per part (default 1)")
    sp.add_argument("--cca", choices=(*CCA_MODES, "none"), default=DEFAULT_CCA_MODE,
                    help="keep the largest component per slice (2d, default, as eval), per volume (3d), or none")
    sp.add_argument("--batch-size", type=int, default=8, help="query slices per encoder call")
    sp.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    sp.add_argument("--plan", choices=("mri", "ct"), default=None,
                    help="preprocessing plan for a checkpoint trained on data prepared outside fsl-med prepare "
                    "(otherwise read from the checkpoint)")


SEGMENT = Verb("segment", "segment an organ in your own volume: segment --ckpt C --support-image S "
               "--support-mask M --query Q --out P.nii.gz", cmd_segment, _segment_arguments)


VERBS: tuple[Verb, ...] = (TRAIN, EVAL, DEMO, RUN, ABLATE, PROTOCOL, COMPARE, SWEEP, PHANTOM, DOWNLOAD, PREPARE,
                           SEGMENT, BENCH, GPU_CHECK, GPU_BUNDLE, ENCODERS)
"""Every verb, in the order ``fsl-med --help`` lists them."""


_INTERRUPTED = {
    "segment": "before its output was written; nothing was written",
    "prepare chaos": "with the scans finished so far kept; rerun the same command to continue",
    "prepare sabs": "with the scans finished so far kept; rerun the same command to continue",
    "prepare import": "with every file written so far complete; rerun the same command to continue",
    "phantom": "with its phantom.json marked incomplete; rerun the same command to finish it",
    "download": "with the partial download kept as a .part file; rerun the same command to continue it",
}
"""What an interrupted verb leaves behind, when the verb itself says nothing more (train and eval do)."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``fsl-med``: one sub-parser per verb of :data:`VERBS`, with the arguments it declares."""
    p = argparse.ArgumentParser(prog="fsl-med", description="Few-shot medical image segmentation (DINOv2 + ALPNet).")
    p.add_argument("--version", action="version", version=f"fsl_med {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    sub = p.add_subparsers(dest="command", required=True)
    for verb in VERBS:
        if verb.name in sub.choices:
            raise ValueError(f"two fsl-med verbs are named {verb.name!r}")
        sp = sub.add_parser(verb.name, help=verb.help, description=verb.description_text())
        verb.add_arguments(sp)
        sp.set_defaults(func=verb.run, flags=_flags(sp))
    return p


def _flags(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Keyword -> flag of a verb's options (``plan`` -> ``--plan``): errors of the Python API name the keyword the
    caller used; run by the CLI (:func:`fsl_med.errors.spelled_as`) they name the flag."""
    flags: dict[str, str] = {}
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):  # prepare chaos|sabs|import: their options too
            for sub in a.choices.values():
                flags.update(_flags(sub))
        elif a.option_strings and a.dest != "help":
            flags[a.dest] = a.option_strings[-1]
    return flags


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fsl-med``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # OpenMP threads sleep instead of spinning while they wait for work: read when torch loads its OpenMP runtime
    # (below, in the verb), so before any torch import. With another busy process on the cores, spinning threads
    # steal each other's time slices (BENCHMARKS.md, "CPU oversubscription"); set OMP_WAIT_POLICY to override.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    debug = "--debug" in argv
    if debug:
        argv.remove("--debug")
    from fsl_med.ranks import is_rank_zero

    if is_rank_zero():
        logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format="[%(name)s] %(message)s")
    else:  # other processes of a distributed job: warnings and errors only, no results or paths on stdout
        rank = os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or os.environ.get("LOCAL_RANK", "?")
        logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                            format=f"[rank {rank}] [%(name)s] %(message)s")
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).propagate = False  # Lightning has its own handler: no duplicate lines
    # the encoder also logs this warning; show it once
    warnings.filterwarnings("ignore", message=".*RANDOMLY INITIALISED.*")
    if not debug:
        logging.getLogger("huggingface_hub").setLevel(logging.ERROR)  # offline retries: one error line instead
        os.environ.setdefault("HF_HUB_VERBOSITY", "error")  # the hub sets its own level when first imported
        for noisy in ("lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero",
                      "lightning.fabric.utilities.rank_zero"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
    args = build_parser().parse_args(argv)
    from fsl_med import interrupts

    verb = args.command if args.command != "prepare" else f"prepare {args.kind}"
    try:
        # SIGINT -> 130, SIGTERM -> 143, one line saying what was saved; messages name the verb's flags
        with interrupts.installed(), spelled_as(args.flags):
            return int(args.func(args) or 0)
    except interrupts.Interrupted as e:
        detail = e.detail or _INTERRUPTED.get(verb, "")
        if is_rank_zero():  # one line per job
            print(f"fsl-med: {verb} interrupted by {e.name}{' ' + detail if detail else ''}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # SIGINT where the handler could not be installed (not the main thread)
        print(f"fsl-med: {verb} interrupted by SIGINT", file=sys.stderr)
        return 130
    except FslMedError as e:
        if debug:
            raise
        print(f"fsl-med: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a filesystem fault: the path and the OS's reason
        if debug:
            raise
        if e.errno == errno.ENOENT and "No usable temporary directory" in str(e):  # tempfile: every candidate failed
            print(f"fsl-med: error: {e.strerror} (each is full, not writable or over a file-size limit); set TMPDIR "
                  "to a writable folder with free space", file=sys.stderr)
            return 2
        where = f"{e.filename}: " if e.filename else ""
        print(f"fsl-med: error: {where}{e.strerror or e} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - one line without --debug
        if debug:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"fsl-med: error: {type(e).__name__}: {msg} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
