#!/usr/bin/env bash
# Time and memory of `qoq quantize` on big checkpoints, streamed from disk (random weights: time and memory
# do not depend on the values). Writes a synthetic checkpoint, quantizes it with the default recipe, and
# prints the wall time, peak host RSS and peak GPU memory from the artifact's qoq_report.json.
#
#   scripts/big_model_check.sh SHAPE LAYERS WORKDIR [extra qoq quantize options]
#   scripts/big_model_check.sh llama-3-8b 32 /tmp/big               # the whole 8B
#   scripts/big_model_check.sh llama-3-70b 4 /tmp/big               # 4 blocks of the 70B shape
#   scripts/big_model_check.sh llama-3-8b 32 /tmp/big --gpus 2      # data-parallel on 2 GPUs
#
# A run cut short (Ctrl-C, or QUANTIZE_TIMEOUT seconds: SIGTERM) keeps its resume point; the same command
# continues it (--resume).
set -euo pipefail
shape=${1:?shape}; layers=${2:?layers}; work=${3:?workdir}; shift 3
here=$(cd "$(dirname "$0")/.." && pwd)
ckpt="$work/$shape-$layers"
art="$work/$shape-$layers-qoq"
mkdir -p "$work"
if [ ! -f "$ckpt/config.json" ]; then
  python3 "$here/scripts/synthetic_checkpoint.py" --shape "$shape" --layers "$layers" --out "$ckpt"
fi
start=$(date +%s)
resume=--resume
case " $* " in *" --gpus "*) resume= ;; esac  # data-parallel runs take no resume points
rc=0
timeout -s TERM "${QUANTIZE_TIMEOUT:-0}" python3 -m qoq.cli quantize --model "$ckpt" --group 128 --output "$art" \
  --overwrite $resume "$@" || rc=$?
end=$(date +%s)
if [ $rc -ne 0 ]; then
  echo "quantize stopped (exit $rc) after $((end - start)) s; run the same command again to resume"
  exit $rc
fi
python3 - "$art/qoq_report.json" "$((end - start))" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
mem, layers = r["memory"], r["layers"]
gib = lambda b: f"{b / 2**30:.2f} GiB" if b else "-"
secs = [l["seconds"] for l in layers]
print(f"blocks {len(layers)} (resumed at {r['resumed_at_block']}), this call {sys.argv[2]} s, "
      f"block loop {r['timings']['quantize_s']:.0f} s, per block median {sorted(secs)[len(secs) // 2]:.1f} s, "
      f"peak host RSS {gib(mem['peak_host_rss_bytes'])}, peak GPU {gib(mem['peak_gpu_bytes'])}, "
      f"calibration {r['calibration']['description']}")
steps = {k: sorted(l["step_seconds"][k] for l in layers)[len(layers) // 2] for k in layers[0]["step_seconds"]}
print("median step seconds per block:", {k: round(v, 2) for k, v in steps.items()})
EOF
