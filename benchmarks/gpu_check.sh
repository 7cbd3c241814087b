#!/usr/bin/env bash
# GPU check (issue 5): merge and evaluation throughput of one LCSC trial on one GPU, printed as one table.
# Needs only torch, torchmetrics and safetensors; under 5 minutes on one H100/H200.
#   benchmarks/gpu_check.sh                      # TF32, 35.7M-param U-Net at 32x32, K=32, 5k samples per trial
#   benchmarks/gpu_check.sh --channels-last      # also try channels_last; --precision fp32|tf32|bf16
#   benchmarks/gpu_check.sh --quick              # tiny sizes: a smoke test that runs on a CPU
#   benchmarks/gpu_check.sh --size               # issue 24: the size sweep of `make bench-size` on the GPU, from 1e7
#                                                # parameters up to the largest row that fits 5 minutes; stages that
#                                                # need MLflow (logging, import, fetch, register, load) are skipped
#                                                # (not on the GPU image, no network): window files written with
#                                                # safetensors, then the merge stage -> benchmarks/results/size_gpu.json
# PYTHON=/path/to/python picks the interpreter (default: python3).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--size" ]; then
    shift
    exec timeout 300 "${PYTHON:-python3}" benchmarks/bench_size.py --device cuda --no-store --budget 270 "$@"
fi
exec timeout 300 "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
