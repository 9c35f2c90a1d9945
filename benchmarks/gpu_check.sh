#!/usr/bin/env bash
# The one prepared device call for the GPU path (issue 5): correctness on CUDA, then every timing.
# No GPU session has run it yet. Before calling it, on the development machine, in the repo root:
#   echo /.gpu_data/ >> .git/info/exclude
#   mkdir -p .gpu_data && cp -r ../shared/data/chest_xray .gpu_data/      # 42 MB: fits the 64 MiB tree
# then the device tool: run(command="bash benchmarks/gpu_check.sh", carry=[".gpu_data"], timeout_s=590)
# It installs nothing: the device image has torch, torchvision, scikit-learn, matplotlib, tqdm
# (pydicom is imported only for DICOM files). Logs and JSON land in $OUT.
set -u -o pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
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
