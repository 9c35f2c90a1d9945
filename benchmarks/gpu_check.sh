#!/usr/bin/env bash
# The prepared device check for the GPU path: correctness on CUDA (benchmarks/gpu_check.py), then every
# timing of benchmarks/bench.py on the card (training variants, inference, frozen fine-tune, the bf16
# peak and the whole `cxr run`).
#
#   bash benchmarks/gpu_check.sh
#
# Environment: DATA, a data folder in the usual layout (default .gpu_data/chest_xray: copy
# ../shared/data/chest_xray there first, 42 MB, when the GPU machine cannot reach ../shared); OUT, where
# logs and JSON go (default /tmp/gpu_check). Installs nothing: it needs torch, torchvision,
# scikit-learn, matplotlib and tqdm on the machine. About 9 minutes.
set -u -o pipefail
case "${1:-}" in -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;; esac
export PYTHONPATH=src PYTHONUNBUFFERED=1  # cxr from this tree: the GPU machine need not install it
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
DATA=${DATA:-.gpu_data/chest_xray}
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
timeout 150 python3 benchmarks/gpu_check.py --data "$DATA" 2>&1 | tee "$OUT/check.log"
# Training variants (memory format x precision, + torch.compile), inference, frozen fine-tune,
# the card's bf16 peak, and the whole `cxr run` (both tasks, 10 epochs, 224 px, cache build included).
timeout 380 python3 benchmarks/bench.py --device cuda --compile --data "$DATA" --workers "$(nproc)" \
    --steps 40 --sections train,inference,frozen_finetune,peak,full_run --json "$OUT/bench_cuda.json" \
    2>&1 | grep -v Warning | tee "$OUT/bench.log"
