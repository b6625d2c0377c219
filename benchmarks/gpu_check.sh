#!/usr/bin/env bash
# The GPU column of docs/results.md, "Latency and training cost", in under 5 minutes on one CUDA device:
#   1. the inference benchmark (tests/test_bench_inference.py), every defense at batch 1 and 256, CPU and CUDA in
#      one run, so the ratios compare alike;
#   2. the InI training step on CUDA against a plain step: benchmarks/bench_ini_step.py (plain, reference and
#      production steps, interleaved rounds, peak device memory), then two MNIST epochs of `train` and of
#      `train-ini` on the device, the second epoch's seconds of each (steady state) and their ratio.
# Needs MNIST and FashionMNIST: $INI_DATA_ROOT in torchvision layout (<root>/MNIST/raw/*.gz) offline, or a network.
#
#     bash benchmarks/gpu_check.sh [OUT]        # OUT: artifacts/gpu-check by default
# DEVICE=cpu runs the same steps on the CPU (a check of the script itself); PYTHON names the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-artifacts/gpu-check}
python=${PYTHON:-python}
device=${DEVICE:-cuda}
mkdir -p "$out"
DEVICE=$device "$python" - <<'EOF' | tee "$out/device.txt"
import os, platform, sys, torch
if os.environ["DEVICE"] != "cpu" and not torch.cuda.is_available():
    sys.exit("error: no CUDA device (torch.cuda.is_available() is False)")
name = "cpu" if os.environ["DEVICE"] == "cpu" else torch.cuda.get_device_name(0)
print(f"{name}; torch {torch.__version__}, CUDA {torch.version.cuda}; "
      f"Python {platform.python_version()}")
EOF

echo "1/2 inference latency, CPU and CUDA" >&2
timeout 150 "$python" -m pytest tests/test_bench_inference.py --benchmark-enable \
    --benchmark-json="$out/inference.json" 2>&1 | tee "$out/inference.txt" | grep -A40 "^inference latency" >&2

echo "2/2 the InI step on $device: the step benchmark, then two MNIST epochs of train and train-ini" >&2
data=$("$python" cli.py prepare --dataset mnist --out "$out/mnist.h5" 2>>"$out/log.txt")
ood=$("$python" cli.py prepare --dataset fashionmnist --out "$out/fashionmnist.h5" 2>>"$out/log.txt")
mkdir -p artifacts/data && cp -n "$data" artifacts/data/mnist.h5 && cp -n "$ood" artifacts/data/fashionmnist.h5 || true
timeout 90 "$python" benchmarks/bench_ini_step.py --device "$device" --rounds 7 2>>"$out/log.txt" | tee "$out/step.txt"
timeout 60 "$python" cli.py train --dataset "$data" --epochs 2 --device "$device" --out "$out/train.h5" \
    >/dev/null 2>>"$out/log.txt"
timeout 120 "$python" cli.py train-ini --dataset "$data" --ood "$ood" --epochs 2 --device "$device" --compile off \
    --diagnostic-images 0 --out "$out/train-ini.h5" >/dev/null 2>>"$out/log.txt"
"$python" - "$out" <<'EOF' | tee -a "$out/step.txt"
import sys
import h5py
out = sys.argv[1]
seconds = {}
for run in ("train", "train-ini"):
    with h5py.File(f"{out}/{run}.h5", "r") as f:
        seconds[run] = float(f["history/epoch_seconds"][1])
print(f"MNIST epoch (the second of two): train {seconds['train']:.1f} s, train-ini "
      f"{seconds['train-ini']:.1f} s, x plain {seconds['train-ini'] / seconds['train']:.2f}")
EOF
echo "$out" # the results folder, on stdout
