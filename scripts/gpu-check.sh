#!/usr/bin/env bash
# `make gpu-check`: run `fsl-med gpu-check` (README: "Checking the GPU path") in one command, here or on a
# borrowed GPU machine.
#  - venv mode (a machine where pip works): install .venv if needed, run the check with it. Without CUDA the
#    check runs its tiny CPU mode and says so in its first line.
#  - bundle mode (a GPU machine without network, with its own Python holding torch, lightning, timm, peft,
#    scikit-image, scipy; no .venv): install the wheels of `make gpu-bundle` into a temporary folder and run
#    the check with that Python on the bundle's data. Chosen when there is no .venv, the bundle exists and
#    the Python imports torch.
# Environment: OUT (report folder, default lightning_logs/gpu-check), GPU_BUNDLE (default gpu_bundle),
# PYTHON (bundle mode's interpreter, default python3), FSL_MED_GPU_CHECK=venv|bundle (force a mode).
# Arguments are passed to `fsl-med gpu-check` (config overrides key=value, --only ROWS, --profile ...).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-lightning_logs/gpu-check}"
bundle="${GPU_BUNDLE:-gpu_bundle}"
py="${PYTHON:-python3}"
mode="${FSL_MED_GPU_CHECK:-}"
if [ -z "$mode" ]; then  # bundle mode where a machine has the bundle, no .venv and a Python with torch
  mode=venv
  if [ ! -x .venv/bin/python ] && [ -f "$bundle/MANIFEST.json" ] && "$py" -c "import torch" 2>/dev/null; then
    mode=bundle
  fi
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
    site="$(mktemp -d "${TMPDIR:-/tmp}/fsl_med_site.XXXXXX")"
    trap 'rm -rf "$site"' EXIT
    "$py" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check --root-user-action=ignore \
      --target "$site" "$bundle"/wheels/*.whl
    export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    # every package fsl_med imports, present after the wheels: otherwise one line naming what is missing
    missing="$("$py" -c 'import importlib.util as u
mods = ("torch", "torchvision", "lightning", "timm", "peft", "safetensors", "monai", "nibabel", "omegaconf", "yaml",
        "skimage", "scipy", "numpy", "PIL", "matplotlib", "tqdm")
print(" ".join(m for m in mods if u.find_spec(m) is None))')"
    if [ -n "$missing" ]; then
      echo "gpu-check: $py lacks: $missing (add their Python 3.12 wheels to $bundle/wheels)" >&2
      exit 2
    fi
    "$py" -m fsl_med gpu-check --out "$out" --bundle "$bundle" "$@"
    ;;
  *)
    echo "gpu-check: FSL_MED_GPU_CHECK=$mode: must be venv or bundle" >&2
    exit 2
    ;;
esac
