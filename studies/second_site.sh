#!/usr/bin/env bash
# The second-site study (Results: Another hospital): a Kermany model at NIH's adult images, before and
# after fitting it there.
#
#   bash studies/second_site.sh [OUT] [IMAGE_SIZE] [SOURCE_EPOCHS]      defaults: runs/nih 128 5
#
# Reads ../shared/data/{chest_xray,nih_half,official_test_half}; runs on the CPU. Run from the
# repository root after the README's install step. Every setting is compared on folds of nih_half by
# patient (so the chosen one's estimate is optimistic by that choice); official_test_half and the
# source test split are only measured. On 2 CPU cores at 128 px: about 6 min (source) + 46 min
# (steps 1-3) + 28 min (step 4) + 4 min (step 5).
set -euo pipefail
case "${1:-}" in -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;; esac
OUT=${1:-runs/nih}
SIZE=${2:-128}
DATA=../shared/data
COMMON=(--device cpu --cache-dir "$OUT/cache")
SITE=(--data "$DATA/nih_half" --external "official_half=$DATA/official_test_half")
SRC="$OUT/src/scratch-robust"
[ -f "$SRC/best.pt" ] || cxr train --task scratch-robust --data "$DATA/chest_xray" --image-size "$SIZE" \
    --epochs "${3:-5}" --out "$OUT/src" "${COMMON[@]}"
# 1. the model as trained, on both sites
cxr evaluate "$SRC" --name nih_half --data "$DATA/nih_half" "${COMMON[@]}"
cxr evaluate "$SRC" --name official_half --data "$DATA/official_test_half" "${COMMON[@]}"
# 2. k-fold (5 folds by patient) inside nih_half: every variant, the learning curve, forgetting
#    (the first fine-tuning settings tried: lr 1e-4, 10 epochs)
cxr adapt "$SRC" "${SITE[@]}" --evaluate 5 --sizes 25,50,100,all --finetune --train all --replay 0.5 \
    --lr 1e-4 --epochs 10 --out "$OUT/eval-all" --overwrite "${COMMON[@]}"
# 3. what trains: the head, the last block (all images; with and without replay)
cxr adapt "$SRC" "${SITE[@]}" --evaluate 5 --sizes all --finetune --train fc,last --replay 0.5 \
    --lr 1e-4 --epochs 10 --out "$OUT/eval-train" --overwrite "${COMMON[@]}"
# 4. learning rate and epochs (all trains; with and without replay)
for lr in 1e-3 3e-4; do
  cxr adapt "$SRC" "${SITE[@]}" --evaluate 5 --sizes all --finetune --train all --replay 0.5 \
      --lr "$lr" --epochs 20 --out "$OUT/eval-lr$lr-e20" --overwrite "${COMMON[@]}"
done
# 5. the model to use: the defaults (all, replay 0.5, lr 3e-4, 20 epochs) fitted on all of nih_half, its
#    own validation patients inside, the k-fold estimate of the same settings attached
cxr adapt "$SRC" "${SITE[@]}" --finetune --estimate-from "$OUT/eval-lr3e-4-e20" --out "$OUT/fitted-default" \
    --overwrite "${COMMON[@]}"
