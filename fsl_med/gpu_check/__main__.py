"""``python -m fsl_med.gpu_check --jobs-worker SPEC FD``: one training process of a ``jobs-b<N>`` row
(:func:`fsl_med.gpu_check.workers.jobs_worker`), started by the check itself."""

from __future__ import annotations

import sys

if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "--jobs-worker":
        sys.exit("usage: python -m fsl_med.gpu_check --jobs-worker SPEC FD (started by fsl-med gpu-check)")
    from fsl_med.gpu_check.workers import jobs_worker

    sys.exit(jobs_worker(sys.argv[2], int(sys.argv[3])))
