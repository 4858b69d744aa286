#!/usr/bin/env bash
# qoq bench on a Hopper GPU (H100 / H200, detected): the Llama-3-8B shape (random weights, RTN-quantized on the
# GPU), input 1024 / output 512, at each engine's max batch plus batches 1/16/64/256: qoq W4A8KV4 against our
# FP16 engine, our FP8 W8A8 engine (both with CUDA-graph decode) and transformers FP16 generate (static cache).
# Writes $OUT/bench.json (schema: qoq/bench/report.py) and prints the table.
#
# From the project root on your machine:   ../shared/tools/device-prep
# Device tool call:  carry [".whl", ".devdata"],  command: bash scripts/bench_hopper.sh [extra qoq bench options]
# Anywhere else with a GPU:                bash scripts/bench_hopper.sh   (writes ./bench-out/bench.json)
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -f .devdata/env.sh ]; then source .devdata/env.sh || true; fi  # (its last tests may return 1)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-bench-out}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,clocks.max.sm,power.draw --format=csv \
  2>&1 | tee "$out/nvidia-smi.txt" || true
python3 -m qoq.cli bench --gpu auto --shape llama-3-8b --input-len 1024 --output-len 512 --batches 1,16,64,256 \
  --json "$out/bench.json" "$@" 2>&1 | tee "$out/bench.log"
