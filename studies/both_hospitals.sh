#!/usr/bin/env bash
# One model for both hospitals: per seed, the recommended source (scratch-robust, 224 px, 20 epochs),
# then the defaults of `cxr adapt --finetune` fitted on all of nih_half, each scored on both sites' sets;
# with KFOLD=1 also the 5-fold comparison inside nih_half (plain, WiSE-FT at 0.5/0.7/0.9, the soup of 3;
# forgetting on the dev-test and official_test_half). Ends with studies/both_hospitals_table.py's table.
#
#   bash studies/both_hospitals.sh [OUT] [SEEDS] [SIZE] [EPOCHS]      e.g. runs/both 0,1,2 224 20
#
# Arguments (all optional, by position): OUT (default runs/both), SEEDS comma-separated (default 0),
# SIZE in pixels (default 224), EPOCHS of the source (default 20).
# Environment: DATA, the folder holding chest_xray, nih_half and official_test_half (default
# ../shared/data); DEVICE (default auto); KFOLD=1 adds the 5-fold comparison (default 0).
# Run from the repository root after the README's install step. On 2 CPU cores (Intel Xeon, no GPU) a
# 224-px, 20-epoch source takes 70-100 min and the fitted fine-tune about 20; the 5-fold comparison is
# hours there, minutes on a GPU. official_test_half and the dev-test are only evaluated: nothing is
# chosen on them. On a GPU machine with no access to ../shared, copy the three folders next to the
# repository (52 MB) and pass DATA=that/folder; the checkpoints (45 MB each) can stay behind, the
# metrics (*.json) and tables (*.md) are what the Results page reads.
set -euo pipefail
case "${1:-}" in -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;; esac
OUT=${1:-runs/both}
SEEDS=${2:-0}
SIZE=${3:-224}
EPOCHS=${4:-20}
DATA=${DATA:-../shared/data}
COMMON=(--device "${DEVICE:-auto}" --cache-dir "$OUT/cache")
for SEED in ${SEEDS//,/ }; do
  SRC="$OUT/src$SEED/scratch-robust"
  [ -f "$SRC/best.pt" ] || cxr train --task scratch-robust --data "$DATA/chest_xray" --image-size "$SIZE" \
      --epochs "$EPOCHS" --seed "$SEED" --out "$OUT/src$SEED" "${COMMON[@]}"
  [ -f "$SRC/metrics.json" ] || cxr evaluate "$SRC" "${COMMON[@]}"   # the dev-test (chest_xray/test)
  for SET in nih_half official_test_half; do
    [ -f "$SRC/metrics_$SET.json" ] || cxr evaluate "$SRC" --name "$SET" --data "$DATA/$SET" "${COMMON[@]}"
  done
  [ -f "$OUT/fit$SEED/best.pt" ] || cxr adapt "$SRC" --data "$DATA/nih_half" --finetune --seed "$SEED" \
      --external "official_test_half=$DATA/official_test_half" --out "$OUT/fit$SEED" --overwrite "${COMMON[@]}"
  if [ "${KFOLD:-0}" = 1 ] && [ ! -f "$OUT/eval$SEED/adapt_evaluation.json" ]; then
    cxr adapt "$SRC" --data "$DATA/nih_half" --evaluate 5 --finetune --replay 0.5 --wise-alpha 0.5,0.7,0.9 \
        --soup 3 --seed "$SEED" --external "official_test_half=$DATA/official_test_half" --out "$OUT/eval$SEED" \
        --overwrite "${COMMON[@]}"
  fi
done
python studies/both_hospitals_table.py "$OUT"
