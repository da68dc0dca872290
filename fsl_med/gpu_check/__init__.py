"""``fsl-med gpu-check`` (``make gpu-check``): fsl_med's GPU path, run and measured in one command.

Every CUDA-specific path of fsl_med runs here once, each as one row of a report: bf16 autocast and
``torch.compile`` training, pinned-memory batches, the evaluation's host/device split with CCA and TTT,
``fsl-med segment``, DDP (NCCL), and whether the data pipeline keeps the device busy. A row that fails is
reported with its message (and its traceback in ``gpu-check.log``); the other rows still run.

The ``jobs-b<N>`` rows measure how many training runs share one GPU best (``protocol.jobs_per_gpu``): 1, 2 and 4
concurrent training processes (separate OS processes, the large encoder in bf16-mixed at batch ``N``) each build
their model and warm up, then run a fixed number of steps from a common start; the row gives the total episodes per
second of each count, its speed-up over one process, the peak GPU memory of each process, and names the count with
the most episodes per second. The processes run this module with a hidden worker option (``--jobs-worker``).

Two profiles:

* ``gpu`` (a CUDA device is present): the bundled or given real CHAOS-T2 folder, fold 0; the paper's
  encoder (DINOv2 ViT-L/14, LoRA r=4, 256 px) and ViT-S/14 full fine-tuning, random init.
* ``tiny`` (no CUDA, or ``--profile tiny``): a generated phantom, a 2-block ViT, a few steps. Every row runs
  (on the CPU), so the check cannot rot; what needs CUDA says ``skipped: no CUDA``. Its figures exercise
  the code and are not benchmarks.

Config overrides (``model.head.name=adnet``, ...) apply to every row, and every row names the few-shot head its
model had. Besides, one ``head-<name>`` row per registered head trains the small encoder a few steps in
bf16-mixed with that head and predicts a query volume with it on the device (the heads' float32 arithmetic under
autocast), whatever head the overrides name.

Outputs in ``--out``: ``gpu-check.md`` (the report; its first line says what ran where), ``gpu-check.json``
(every figure) and ``gpu-check.log`` (one line per row, tracebacks of failed rows), rewritten after every
row, so a run cut short still leaves what it measured; and ``cache/``, the superpixel cache, unless
``--cache-dir``, a bundle or ``$FSL_MED_CACHE`` names another. Scratch files (the phantom, runs, checkpoints,
segmentations) live in a temporary folder that is removed at the end; nothing is written elsewhere.

The package: :mod:`~fsl_med.gpu_check.rows` (the table of rows: a row is added there and nowhere else),
:mod:`~fsl_med.gpu_check.measurements` (what each kind of row runs and measures),
:mod:`~fsl_med.gpu_check.runner` (the one runner, the inputs, :func:`run_gpu_check`),
:mod:`~fsl_med.gpu_check.report` (``gpu-check.md`` / ``.json``), :mod:`~fsl_med.gpu_check.profiles` (``gpu``,
``tiny``), :mod:`~fsl_med.gpu_check.state` (what the rows share) and :mod:`~fsl_med.gpu_check.workers` (the
processes of the ``jobs-b<N>`` rows).
"""

from fsl_med.gpu_check.profiles import GPU, PROFILES, TINY, Profile
from fsl_med.gpu_check.report import render_markdown
from fsl_med.gpu_check.rows import RowSpec, help_text, row_keys, row_table, select_rows
from fsl_med.gpu_check.runner import DEFAULT_OUT, GpuCheck, resolve_inputs, run_gpu_check
from fsl_med.gpu_check.state import NO_CUDA, Row, RowTimeout

__all__ = ["DEFAULT_OUT", "GPU", "NO_CUDA", "PROFILES", "TINY", "GpuCheck", "Profile", "Row", "RowSpec", "RowTimeout",
           "help_text", "render_markdown", "resolve_inputs", "row_keys", "row_table", "run_gpu_check", "select_rows"]
