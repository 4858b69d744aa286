#!/usr/bin/env bash
# Full WikiText-2 (seq 2048) perplexity of SmolLM2-135M on the GPU: FP16, and W4A8KV4 g128 and per-channel,
# each with SmoothAttention (alpha 0.5) and without (alpha 0); reference backend; one JSON per artifact
# under $OUT and a short table at the end. Then, if the cupy kernels are there, a kernel check and a short
# PPL through the cupy backend (failures there do not stop the table).
# On the device machine, after `source .devdata/env.sh` (QOQ_DATA_DIR, QOQ_SMOLLM2_GGUF):
#   bash scripts/ppl_table.sh
set -uo pipefail
OUT=${OUT:-/tmp/qoq-ppl-out}
mkdir -p "$OUT"
export QOQ_CACHE_DIR=/tmp/qoq-cache HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
MODEL=${QOQ_SMOLLM2_GGUF:?stage the model first (device-prep --model)}
DATA=$QOQ_DATA_DIR
ART=${ART:-/tmp/qoq-art}
LOG=$OUT/log.txt
# smoke-test knobs (defaults = the real run): DEVICE=cpu MAXW=1 SEQ=256 CALIB_ARGS="--calib-samples 4 --calib-seqlen 256"
DEVICE=${DEVICE:-cuda}
SEQ=${SEQ:-2048}
WIN=${MAXW:+--max-windows $MAXW}
CALIB_ARGS=${CALIB_ARGS:-}
qoq() { python3 -m qoq.cli "$@"; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | tee -a "$LOG"
baseline=()
for g in 128 -1; do
  for a in 0.5 0; do
    name=g${g/-1/chn}_sa${a}
    t0=$(date +%s)
    qoq quantize --model "$MODEL" --calib "$DATA/calibration" --recipe rtn --group "$g" --smooth-attn-alpha "$a" \
      $CALIB_ARGS --device "$DEVICE" --output "$ART/$name" --overwrite >>"$LOG" 2>&1 || { echo "quantize $name failed"; tail -5 "$LOG"; continue; }
    t1=$(date +%s)
    qoq verify "$ART/$name" --ppl wikitext2 --data "$DATA/wikitext-2-raw-v1" --seq-len "$SEQ" $WIN --backend reference \
      --device "$DEVICE" --no-check-kernels --json ${baseline[@]+"${baseline[@]}"} >"$OUT/$name.json" 2>>"$LOG" \
      || { echo "verify $name failed"; tail -5 "$LOG"; continue; }
    t2=$(date +%s)
    echo "$name: quantize $((t1 - t0)) s, verify $((t2 - t1)) s" | tee -a "$LOG"
    baseline=(--no-baseline)  # the FP16 baseline once
  done
done
# the cupy kernels, if present: op-by-op check on 2 x 512 tokens and a short PPL through them
if [ -d "$ART/g128_sa0.5" ] && [ "$DEVICE" = cuda ]; then
  qoq verify "$ART/g128_sa0.5" --ppl wikitext2 --data "$DATA/wikitext-2-raw-v1" --seq-len 2048 --max-windows 16 \
    --backend cupy --device cuda --no-baseline --check-kernels --json >"$OUT/cupy_g128_sa0.5.json" 2>>"$LOG" \
    || echo "cupy backend verify failed (see log)"
  qoq verify "$ART/g128_sa0.5" --ppl wikitext2 --data "$DATA/wikitext-2-raw-v1" --seq-len 2048 --max-windows 16 \
    --backend reference --device cuda --no-baseline --no-check-kernels --json >"$OUT/ref16_g128_sa0.5.json" 2>>"$LOG" || true
fi
python3 - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
rows = []
for name in ("g128_sa0.5", "g128_sa0", "gchn_sa0.5", "gchn_sa0"):
    f = out / f"{name}.json"
    if f.exists() and f.stat().st_size:
        rows.append((name, json.loads(f.read_text())))
fp = next((r for _, r in rows if r.get("ppl_fp16") is not None), None)
lines = []
if fp:
    lines.append(f"FP16 (transformers, {fp['baseline_dtype']})  ppl {fp['ppl_fp16']:.4f}  tokens {fp['tokens']}  "
                 f"{fp['time_fp16_s']:.1f} s  windows {fp['windows']}x{fp['seq_len']}  device {fp['device']}")
for name, r in rows:
    d = "" if not fp else f"  delta {r['ppl_quantized'] - fp['ppl_fp16']:+.4f}"
    rec = r.get("quantization", {}).get("recipe", {})
    lines.append(f"W4A8KV4 {name:<11} ppl {r['ppl_quantized']:.4f}{d}  tokens {r['tokens']}  {r['time_quantized_s']:.1f} s"
                 f"  backend {r['backend']}  recipe {rec.get('name')}")
for tag in ("cupy", "ref16"):
    f = out / f"{tag}_g128_sa0.5.json"
    if f.exists() and f.stat().st_size:
        r = json.loads(f.read_text())
        lines.append(f"{tag} g128_sa0.5 16 windows: ppl {r['ppl_quantized']:.4f} {r['time_quantized_s']:.1f} s backend {r['backend']}")
        kc = r.get("kernel_check")
        if kc:
            lines.append(f"  kernel check ({kc['tokens']} tokens): logits rel {kc['logits_rel_error']:.2e}")
            for op, e in kc["ops"].items():
                lines.append(f"    {op:<22} calls {e['calls']:>4}  max rel {e['max_rel_error']:.2e}  "
                             f"int mismatches {e['int_mismatches']}/{e['int_values']}  max int diff {e['max_int_diff']}")
text = "\n".join(lines)
(out / "table.txt").write_text(text + "\n")
print(text)
PY
