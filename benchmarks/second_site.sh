#!/usr/bin/env bash
# The second-site study (README: "A second hospital"): a Kermany model at NIH's adult images, before
# and after fitting it there. Run from the repository root after the README's install step:
#   bash benchmarks/second_site.sh [OUT] [IMAGE_SIZE] [EPOCHS_SOURCE]
# Every number is chosen on folds of nih_half by patient or on validation splits; official_test_half
# and the source test split are only measured.
set -euo pipefail
OUT=${1:-runs/nih}
SIZE=${2:-128}
DATA=../shared/data
COMMON=(--device cpu --cache-dir "$OUT/cache")
SRC="$OUT/src/scratch-robust"
[ -f "$SRC/best.pt" ] || cxr train --task scratch-robust --data "$DATA/chest_xray" --image-size "$SIZE" \
    --epochs "${3:-5}" --out "$OUT/src" "${COMMON[@]}"
# 1. the model as trained, on both sites
cxr evaluate "$SRC" --name nih_half --data "$DATA/nih_half" "${COMMON[@]}"
cxr evaluate "$SRC" --name official_half --data "$DATA/official_test_half" "${COMMON[@]}"
# 2. k-fold (5 folds by patient) inside nih_half: every variant, the learning curve, forgetting
cxr adapt "$SRC" --data "$DATA/nih_half" --evaluate 5 --sizes 25,50,100,all --finetune --train all \
    --replay 0.5 --external "official_half=$DATA/official_test_half" --out "$OUT/eval-all" --overwrite "${COMMON[@]}"
# 3. what trains: the head, the last block, everything (all images, with replay)
cxr adapt "$SRC" --data "$DATA/nih_half" --evaluate 5 --sizes all --finetune --train fc,last \
    --replay 0.5 --external "official_half=$DATA/official_test_half" --out "$OUT/eval-train" --overwrite "${COMMON[@]}"
# 4. the model to use: fitted on all of nih_half (its validation patients inside), the k-fold estimate attached
cxr adapt "$SRC" --data "$DATA/nih_half" --finetune --train all --replay 0.5 --estimate-from "$OUT/eval-all" \
    --external "official_half=$DATA/official_test_half" --out "$OUT/fitted" --overwrite "${COMMON[@]}"
