#!/usr/bin/env bash
# `make gpu-check`: run `fsl-med gpu-check` (README: "Checking the GPU path") in one command, here or on a
# borrowed GPU machine.
#  - venv mode (a machine where pip works): install .venv if needed, run the check with it. Without CUDA the
#    check runs its tiny CPU mode and says so in its first line.
#  - bundle mode (a GPU machine without network, with its own Python holding torch, lightning, timm, peft,
#    scikit-image, scipy; no .venv): install the wheels of `make gpu-bundle` into a temporary folder and run
#    the check with that Python on the bundle's data. Chosen when there is no .venv and the bundle exists.
# Environment: OUT (report folder, default lightning_logs/gpu-check), GPU_BUNDLE (default gpu_bundle),
# PYTHON (bundle mode's interpreter, default python3), FSL_MED_GPU_CHECK=venv|bundle (force a mode).
# Arguments are passed to `fsl-med gpu-check` (config overrides key=value, --only ROWS, --profile ...).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-lightning_logs/gpu-check}"
bundle="${GPU_BUNDLE:-gpu_bundle}"
mode="${FSL_MED_GPU_CHECK:-}"
if [ -z "$mode" ]; then
  if [ ! -x .venv/bin/python ] && [ -f "$bundle/MANIFEST.json" ]; then mode=bundle; else mode=venv; fi
fi
case "$mode" in
  venv)
    make -s install
    exec .venv/bin/fsl-med gpu-check --out "$out" "$@"
    ;;
  bundle)
    if [ ! -f "$bundle/MANIFEST.json" ]; then
      echo "gpu-check: no bundle at $bundle (run 'make gpu-bundle' on a machine where pip works)" >&2
      exit 2
    fi
    py="${PYTHON:-python3}"
    site="$(mktemp -d "${TMPDIR:-/tmp}/fsl_med_site.XXXXXX")"
    trap 'rm -rf "$site"' EXIT
    "$py" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
      --target "$site" "$bundle"/wheels/*.whl
    PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}" "$py" -m fsl_med gpu-check --out "$out" --bundle "$bundle" "$@"
    ;;
  *)
    echo "gpu-check: FSL_MED_GPU_CHECK=$mode: must be venv or bundle" >&2
    exit 2
    ;;
esac
