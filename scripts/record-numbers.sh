#!/bin/bash
# Record the numbers a refactoring must not change (issue 17's protocol), to compare before/after with
# scripts/compare-numbers.py:  bash scripts/record-numbers.sh OUT [CKPT]
#   - trains a tiny ViT 40 steps on a 6-scan phantom (OUT/runs/tr; or evaluates CKPT, e.g. the "before" checkpoint)
#   - fsl-med eval, all four variants (TTT 2 steps), on the phantom and on real CHAOS-T2 fold 0, 1 process and
#     2 DDP processes (OUT/runs/{ph1,ph2,ch1,ch2}-eval)
#   - fsl-med segment of two CHAOS scans (3D and 2D CCA) and one phantom scan (3D CCA) (OUT/seg_*.nii.gz)
# Run it from the checkout whose code is measured (its .venv), on an idle machine. DATA_MRI: prepared CHAOS-T2.
set -euo pipefail
OUT=$(realpath -m "$1"); CKPT=${2:-}
REPO=$(cd "$(dirname "$0")/.." && pwd); PY=${PY:-$REPO/.venv/bin/python}
CH=${DATA_MRI:-$REPO/../shared/data/CHAOST2/chaos_MR_T2_normalized}
PH=${PHANTOM:-$OUT/../phantom}
mkdir -p "$OUT"; cd "$OUT"; export PYTHONWARNINGS=ignore
[ -d "$PH" ] || $PY -c "from fsl_med.data.phantom import generate_phantom; generate_phantom('$PH', n_scans=6, size=64, depth=10, seed=0)"
COMMON=("$REPO/experiments/demo.yaml" data.image_size=64 data.num_workers=0 data.batch_size=1 "logging.output_dir=$OUT/runs"
        trainer.enable_progress_bar=false "data.cache_dir=$OUT/../sp_cache")
DDP=(trainer.accelerator=cpu trainer.devices=2 trainer.strategy=ddp)
EV=("eval.variants=[plain,cca,ttt,ttt_cca]" ttt.steps=2)
$PY -m fsl_med train "${COMMON[@]}" "data.root=$PH" trainer.max_steps=40 trainer.val_check_interval=20 name=tr > train.out 2>&1
CKPT=${CKPT:-$OUT/runs/tr/version_0/checkpoints/last.ckpt}
$PY -m fsl_med eval "${COMMON[@]}" "data.root=$PH" "ckpt=$CKPT" "${EV[@]}" name=ph1 > ph1.out 2>&1
$PY -m fsl_med eval "${COMMON[@]}" "data.root=$CH" "ckpt=$CKPT" "${EV[@]}" name=ch1 > ch1.out 2>&1
$PY -m fsl_med eval "${COMMON[@]}" "data.root=$PH" "ckpt=$CKPT" "${EV[@]}" "${DDP[@]}" name=ph2 > ph2.out 2>&1
$PY -m fsl_med eval "${COMMON[@]}" "data.root=$CH" "ckpt=$CKPT" "${EV[@]}" "${DDP[@]}" name=ch2 > ch2.out 2>&1
seg() { $PY -m fsl_med segment --ckpt "$CKPT" --support-image "$1/image_$2.nii.gz" --support-mask "$1/label_$2.nii.gz" \
          --label "$3" --query "$1/image_$4.nii.gz" --out "$OUT/$5.nii.gz" "${@:6}" >> seg.out 2>&1; }
seg "$CH" 1 1 2 seg_liver --cca 3d; seg "$CH" 1 1 3 seg_liver2d --cca 2d; seg "$PH" 1 2 2 seg_ph_rk --cca 3d
echo "recorded in $OUT"
