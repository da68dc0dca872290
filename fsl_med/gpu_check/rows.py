"""The rows of the check, as data: one :class:`RowSpec` per row, in the order they run.

A row is added here and nowhere else: the runner (:mod:`fsl_med.gpu_check.runner`) runs the table in order, the
report puts each row in its section's table, ``--only`` accepts prefixes of the table's keys (:func:`select_rows`)
and ``fsl-med gpu-check --help`` lists them (:func:`help_text`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fsl_med.errors import ConfigError
from fsl_med.gpu_check import measurements as m
from fsl_med.gpu_check.profiles import GPU, Profile
from fsl_med.gpu_check.state import CheckState, Row


@dataclass(frozen=True)
class RowSpec:
    """One row of the check.

    Attributes:
        key: its key in the report, ``gpu-check.json`` and ``--only`` (which takes prefixes of keys).
        section: the report table it goes in, which fixes its columns: ``env`` (the environment table) or a
            key of :data:`fsl_med.gpu_check.report.SECTION_TABLES`.
        title: its first cell in the report.
        run: what it runs and measures: ``run(state, row)`` fills ``row.figures``; an exception fails the row.
        needs_ckpt: it loads the evaluation checkpoint: skipped without one, and ``--only`` brings the row that
            makes it.
        makes_ckpt: it trains the evaluation checkpoint.
        always: it runs whatever ``--only`` and the time budget say (the environment row).
        timeout_s: its time limit; ``None``: the profile's ``row_timeout_s``.
        shown: how ``--help`` names it (one name for a family of rows: ``head-<name>``); ``None``: its key.
        note: what ``--help`` says of it after its name (once per shown name).
    """

    key: str
    section: str
    title: str
    run: Callable[[CheckState, Row], None]
    needs_ckpt: bool = False
    makes_ckpt: bool = False
    always: bool = False
    timeout_s: int | None = None
    shown: str | None = None
    note: str = ""


def _train(p: Profile, key: str, encoder: str, precision: str, compile_mode: str, batch: int,
           shown: str | None = None) -> RowSpec:
    """A training row (:func:`~fsl_med.gpu_check.measurements.row_train`)."""
    title = (f"{p.large_title if encoder == 'large' else p.small_title}, {precision}"
             f"{' + torch.compile' if compile_mode != 'off' else ''}, batch {batch}")

    def run(st: CheckState, row: Row) -> None:
        m.row_train(st, row, encoder, precision, compile_mode, batch)

    return RowSpec(key, "train", title, run, shown=shown)


def _head(p: Profile, head: str, device: str) -> RowSpec:
    """The row of one few-shot head (:func:`~fsl_med.gpu_check.measurements.row_head`)."""
    return RowSpec(f"head-{head}", "heads", f"head `{head}`: {p.small_title}, bf16-mixed, batch {p.batch_sizes[0]}: "
                   f"training steps, then the prediction of a query volume on {device}",
                   lambda st, row: m.row_head(st, row, head), shown="head-<name>",
                   note="one per registered head: training in bf16-mixed and a prediction with that head")


def _jobs(p: Profile, batch: int, device: str) -> RowSpec:
    """A concurrent-training row (:func:`~fsl_med.gpu_check.measurements.row_jobs`)."""
    counts = ", ".join(map(str, sorted(set(p.jobs))))
    where = "one GPU" if device == "cuda" else "the CPU"
    return RowSpec(f"jobs-b{batch}", "jobs", f"{p.large_title}, bf16-mixed, batch {batch}: {counts} concurrent "
                   f"training processes on {where}", lambda st, row: m.row_jobs(st, row, batch), shown="jobs-b<N>",
                   note=f"{counts} concurrent training processes of ViT-L/14 LoRA bf16 at batch "
                   f"{' and '.join(map(str, p.batch_sizes[:2]))}: total episodes/s and the suggested "
                   "protocol.jobs_per_gpu")


def row_table(profile: Profile, device: str, heads: Sequence[str] | None = None) -> list[RowSpec]:
    """Every row of ``profile`` on ``device`` (``cuda`` or ``cpu``), in the order the rows run.

    The eager training rows run first; the compiled ones last (compiling a ViT-L takes the longest and is the
    first thing the time budget drops); the per-head and concurrent-training rows just before them.

    Args:
        heads: the few-shot heads of the ``head-<name>`` rows; ``None``: every registered head, in registration
            order.
    """
    if heads is None:
        from fsl_med.models.heads import list_heads

        heads = list_heads()
    p, b1 = profile, profile.batch_sizes[0]
    backend = "NCCL" if device == "cuda" else "gloo"
    return [
        RowSpec("env", "env", "environment and matmul throughput", m.row_env, always=True),
        _train(p, "train-large-fp32", "large", "32-true", "off", b1),
        _train(p, "train-large-bf16", "large", "bf16-mixed", "off", b1),
        _train(p, "train-small-fp32", "small", "32-true", "off", b1),
        _train(p, "train-small-bf16", "small", "bf16-mixed", "off", b1),
        *(_train(p, f"train-large-bf16-b{b}", "large", "bf16-mixed", "off", b, shown="train-large-bf16-b<N>")
          for b in p.batch_sizes[1:]),
        RowSpec("ckpt", "eval", f"checkpoint: `fsl-med train` {p.ckpt_steps} steps + validation, {p.large_title}, fp32",
                m.row_ckpt, makes_ckpt=True),
        RowSpec("eval", "eval", f"`fsl-med eval` fold 0 on {device}: plain, +CCA, +TTT, +TTT+CCA (TTT per volume, "
                f"{p.ttt_steps} steps)", m.row_eval, needs_ckpt=True),
        RowSpec("ttt-paper", "eval", f"TTT as in the paper: per slice, {p.ttt_steps} steps, {p.paper_ttt_slices} "
                "slices", m.row_ttt_paper, needs_ckpt=True),
        RowSpec("eval-vs-cpu", "eval", f"evaluation of one query scan on {device} vs CPU (fp32, plain and +CCA)",
                m.row_eval_vs_cpu, needs_ckpt=True),
        RowSpec("segment-vs-cpu", "segment", f"`fsl-med segment` of one volume on {device} vs CPU",
                m.row_segment_vs_cpu, needs_ckpt=True),
        RowSpec("ddp", "ddp", f"DDP ({backend}), 1 process: train 2 steps, evaluate", m.row_ddp),
        *(_head(p, h, device) for h in heads),
        *(_jobs(p, b, device) for b in p.batch_sizes[:2]),
        _train(p, "train-small-bf16-compile", "small", "bf16-mixed", "default", b1),
        _train(p, "train-large-bf16-compile", "large", "bf16-mixed", "default", b1),
    ]


def row_keys(profile: Profile, device: str = "cpu") -> list[str]:
    """Every row key of ``profile`` in the order the rows run (``--only`` takes prefixes of them)."""
    return [r.key for r in row_table(profile, device)]


def select_rows(only: list[str] | None, table: Sequence[RowSpec]) -> set[str]:
    """The keys of the rows ``--only`` selects: those starting with one of its prefixes, the rows that always run,
    and the checkpoint row when a selected row needs it. ``None``: every row.

    Raises:
        ConfigError: ``only`` is empty, or one of its prefixes starts no row's key (the message lists them).
    """
    keys = [r.key for r in table]
    if only is None:
        return set(keys)
    if not only:
        raise ConfigError(f"--only: names no row (rows: {', '.join(keys)})")
    for o in only:
        if not any(k.startswith(o) for k in keys):
            raise ConfigError(f"--only {o}: matches no row (rows: {', '.join(keys)})")
    chosen = [r for r in table if r.always or any(r.key.startswith(o) for o in only)]
    if any(r.needs_ckpt for r in chosen):
        chosen += [r for r in table if r.makes_ckpt]
    return {r.key for r in chosen}


def help_text(profile: Profile = GPU) -> str:
    """The row keys for ``--help``: every row of the table (a family of rows by its shown name), with its note."""
    seen: dict[str, str] = {}
    for r in row_table(profile, "cuda", heads=("<name>",)):  # head-<name>: the registry is not needed here
        name = r.shown or r.key
        if name not in seen:
            seen[name] = f"{name} ({r.note})" if r.note else name
    return ", ".join(seen.values())
