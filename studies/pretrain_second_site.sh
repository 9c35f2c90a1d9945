#!/usr/bin/env bash
# Pretraining at the second site: does pretraining on the shared train plus nih_half's images (labels
# unused) give a better start for fitting at nih_half than the supervised Kermany source? Each source is
# fitted with cxr adapt's defaults (all trains, lr 3e-4, 20 epochs; replay 0 and 0.5 measured) at the
# same 5 folds by patient inside nih_half (seed 0), then the arms are paired on the very same held-out
# images with cxr compare.
#
#   bash studies/pretrain_second_site.sh [OUT] [SEED]      defaults: runs/p 1
#
# Reads ../shared/data/{chest_xray,nih_half,official_test_half}. Run from the repository root after
# the README's install step. On 2 CPU cores (AMD EPYC; 96-px pretraining, 128-px sources and fitting):
# about 2 x 16 min (pretraining) + 3 x 6 min (sources) + 3 x 39 min (k-fold: 2 fits per fold).
#
# OPTIMISTIC BY DESIGN for the arm pretrained with nih_half (eval-ssl-nih): its backbone saw every
# nih_half image unlabelled, and the 5-fold estimate then scores those same images, so every held fold
# was seen in pretraining. One backbone serves all five folds here, so the held fold cannot be left
# out; an honest estimate needs a backbone per fold (pretrained on the shared train plus the other four
# folds, e.g. studies/nih_fold.py's nih_fit) or a site set that pretraining never read (the held-back
# half). The arms pretrained on the shared train alone (eval-ssl-k) and the supervised source
# (eval-sup) never see nih_half before fitting. nih_half's held-back half must never be under --data.
set -euo pipefail
case "${1:-}" in -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;; esac
OUT=${1:-runs/p}
SEED=${2:-1}
D=../shared/data
EXT=(--external "official_half=$D/official_test_half")
SITE=(--data "$D/nih_half" "${EXT[@]}" --evaluate 5 --sizes all --finetune --overwrite)
# the backbones: the shared train alone, and the shared train with nih_half's images
[ -f "$OUT/simclr12/backbone.pt" ] || cxr pretrain --data "$D/chest_xray" --out "$OUT/simclr12" --method simclr \
    --epochs 12 --image-size 96 --keep-every 3
[ -f "$OUT/simclr12nih/backbone.pt" ] || cxr pretrain --data "$D/chest_xray" --data "$D/nih_half" \
    --out "$OUT/simclr12nih" --method simclr --epochs 12 --image-size 96
# the sources, trained on the Kermany labels at --quick settings with the same seed
[ -f "$OUT/sr-s$SEED/scratch-robust/best.pt" ] || cxr run --data "$D/chest_xray" --tasks scratch-robust --quick \
    "${EXT[@]}" --out "$OUT/sr-s$SEED" --seed "$SEED"
[ -f "$OUT/ffr-s$SEED/finetune-full-robust/best.pt" ] || cxr run --data "$D/chest_xray" --tasks finetune-full-robust \
    --quick --weights "$OUT/simclr12/backbone.pt" "${EXT[@]}" --out "$OUT/ffr-s$SEED" --seed "$SEED"
[ -f "$OUT/src-nih/finetune-full-robust/best.pt" ] || cxr train --task finetune-full-robust --data "$D/chest_xray" \
    --quick --weights "$OUT/simclr12nih/backbone.pt" --seed "$SEED" --out "$OUT/src-nih"
# fitting at the site, 5 folds by patient, the same folds for every arm
cxr adapt "$OUT/src-nih/finetune-full-robust" "${SITE[@]}" --out "$OUT/eval-ssl-nih"
cxr adapt "$OUT/sr-s$SEED/scratch-robust" "${SITE[@]}" --out "$OUT/eval-sup"
cxr adapt "$OUT/ffr-s$SEED/finetune-full-robust" "${SITE[@]}" --out "$OUT/eval-ssl-k"
# paired on the same held-out images: the default variant (replay 0.5, the source's operating point)
for arm in eval-ssl-nih eval-ssl-k; do
  cxr compare "$OUT/$arm" "$OUT/eval-sup" --variant finetune-all+replay0.5 --out "$OUT/cmp-$arm"
done
