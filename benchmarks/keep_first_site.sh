#!/usr/bin/env bash
# Fine-tuning that keeps the first site (issue 36): today's replay against WiSE-FT, L2-SP and LP-FT,
# at the same 5 folds by patient inside nih_half, every choice (epoch, WiSE coefficient) read on the
# site's validation patients and the source run's validation split; forgetting measured on the source
# test split and official_test_half. Run from the repository root after the README's install step:
#   bash benchmarks/keep_first_site.sh [OUT] [IMAGE_SIZE] [SOURCE_EPOCHS]
# The source is benchmarks/second_site.sh's (scratch-robust, seed 0); an existing one is reused.
set -euo pipefail
OUT=${1:-runs/nih}
SIZE=${2:-128}
DATA=../shared/data
COMMON=(--device cpu --cache-dir "$OUT/cache")
SITE=(--data "$DATA/nih_half" --external "official_half=$DATA/official_test_half")
SRC="$OUT/src/scratch-robust"
[ -f "$SRC/best.pt" ] || cxr train --task scratch-robust --data "$DATA/chest_xray" --image-size "$SIZE" \
    --epochs "${3:-5}" --out "$OUT/src" "${COMMON[@]}"
cxr adapt "$SRC" "${SITE[@]}" --evaluate 5 --sizes all --finetune --train all --replay 0.5 --lr 3e-4 --epochs 20 \
    --wise --l2sp 0.01 --lp-epochs 5 --out "$OUT/eval-keep" --overwrite "${COMMON[@]}"
