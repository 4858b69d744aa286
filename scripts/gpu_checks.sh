#!/usr/bin/env bash
# The GPU checks a change must pass before it lands, in one call (logs under ${OUT:-gpu-checks}):
#   1. `pytest -m gpu` (kernels against their torch twins, engines, exports);
#   2. the end-to-end decode benchmark on the Llama-3-8B shape against FP16 and FP8 engines;
#   3. the sglang export check on the full Llama-3-8B shape;
#   4. a one-process NCCL smoke run of `torchrun -m qoq quantize` on a tiny synthetic checkpoint.
# Each step has its own time limit; a failing step is reported and the next one still runs.
set -uo pipefail
out=${OUT:-gpu-checks}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
status=0
step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc in $((SECONDS - t0)) s"
  tail -n "${TAIL:-12}" "$out/$name.log"
  [ $rc -eq 0 ] || status=1
}
step gpu-tests "${GPU_TESTS_S:-240}" python3 -m pytest -m gpu -q -x -p no:cacheprovider
step e2e-bench "${BENCH_S:-200}" python3 -m qoq.cli bench --gpu auto --shape llama-3-8b --batches 1,16,64 \
  --max-batch none --skip-kernels --skip-hf --json "$out/bench.json"
step sglang-check "${SGLANG_S:-150}" python3 scripts/sglang_check.py --out "$out/sglang"
tiny=/tmp/qoq-tiny-ckpt
[ -f $tiny/config.json ] || python3 scripts/synthetic_checkpoint.py --shape tiny --out $tiny > /dev/null
rm -rf /tmp/qoq-tiny-art
step nccl-smoke "${NCCL_S:-120}" python3 -m torch.distributed.run --nproc-per-node 1 -m qoq quantize --model $tiny --calib-samples 8 \
  --calib-seqlen 64 --output /tmp/qoq-tiny-art
exit $status
