#!/usr/bin/env bash
# Whole-model check of the cupy backend against the reference on SmolLM2-135M:
#   1. quantize SmolLM2 with the default (qoq) recipe on the GPU;
#   2. full WikiText-2 test PPL (seq 2048) through the reference backend (with the FP16 baseline) and the cupy
#      backend (with the op-by-op kernel check);
#   3. python -m qoq.verify.compare: teacher-forced logits of both backends on 8 x 2048-token windows
#      (Frobenius / max / per-position relative error, top-1 agreement, KL, NLL);
#   4. qoq generate, greedy, 120 new tokens, 3 prompts, with each backend;
#   5. a short summary.
# Everything lands in $OUT: log.txt, ppl_reference.json, ppl_cupy.json, compare.json, generate.txt, summary.txt.
# On the device machine, after `source .devdata/env.sh` (QOQ_DATA_DIR, QOQ_SMOLLM2_GGUF):
#   bash scripts/gpu_model_check.sh
# CPU smoke test (reference against itself, tiny sizes):
#   DEVICE=cpu CAND=reference MAXW=2 SEQ=128 CMP_WINDOWS=2 GEN_TOKENS=8 \
#     CALIB_ARGS="--recipe rtn --calib-samples 4 --calib-seqlen 128" bash scripts/gpu_model_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export QOQ_CACHE_DIR=${QOQ_CACHE_DIR:-/tmp/qoq-cache}
OUT=${OUT:-/tmp/qoq-model-check-out}
mkdir -p "$OUT"
MODEL=${QOQ_SMOLLM2_GGUF:?stage the model first (device-prep --model, then source .devdata/env.sh)}
DATA=${QOQ_DATA_DIR:?source .devdata/env.sh first}
WIKI=$DATA/wikitext-2-raw-v1
ART=${ART:-/tmp/qoq-model-check/smollm2-qoq-g128}
DEVICE=${DEVICE:-cuda}
CAND=${CAND:-cupy}               # the candidate backend (reference for a CPU smoke test)
SEQ=${SEQ:-2048}
WIN=${MAXW:+--max-windows $MAXW}  # empty: every window of the test set
CMP_WINDOWS=${CMP_WINDOWS:-8}
GEN_TOKENS=${GEN_TOKENS:-120}
CALIB_ARGS=${CALIB_ARGS:-}
LOG=$OUT/log.txt
GEN=$OUT/generate.txt
: >"$LOG"
: >"$GEN"
qoq() { python3 -m qoq.cli "$@"; }
step() { echo "== $(date +%T) $*" | tee -a "$LOG"; }

summary() {
  local rc=$?
  python3 - "$OUT" "$rc" <<'PY' | tee "$OUT/summary.txt" || true
import json, pathlib, sys
out, rc = pathlib.Path(sys.argv[1]), int(sys.argv[2])

def load(name):
    f = out / name
    try:
        return json.loads(f.read_text()) if f.exists() and f.stat().st_size else None
    except ValueError:
        return None

ref, cand, cmp = load("ppl_reference.json"), load("ppl_cupy.json"), load("compare.json")
lines = [f"gpu_model_check: exit status {rc}" + ("" if rc == 0 else " (FAILED: see log.txt)")]
if ref and ref.get("ppl_fp16") is not None:
    lines.append(f"FP16 baseline ({ref['baseline_dtype']})  PPL {ref['ppl_fp16']:.4f}")
for tag, r in (("reference", ref), ("candidate", cand)):
    if r:
        lines.append(f"W4A8KV4 {tag:<9} PPL {r['ppl_quantized']:.4f}  ({r['windows']} x {r['seq_len']} tokens, "
                     f"{r['tokens']} predicted, {r['time_quantized_s']:.1f} s, backend {r['backend']})")
if ref and cand:
    d = cand["ppl_quantized"] / ref["ppl_quantized"] - 1
    lines.append(f"PPL candidate vs reference: {d:+.4%} (target |diff| < 0.5%: {'PASS' if abs(d) < 0.005 else 'FAIL'})")
kc = (cand or {}).get("kernel_check")
if kc:
    lines.append(f"kernel check ({kc['tokens']} tokens), op by op on identical inputs:")
    for op, e in kc["ops"].items():
        ints = f"  int mismatches {e['int_mismatches']}/{e['int_values']} (max diff {e['max_int_diff']})" \
            if e["int_values"] else ""
        lines.append(f"  {op:<22} calls {e['calls']:>5}  max rel {e['max_rel_error']:.2e}{ints}")
if cmp:
    o = cmp["overall"]
    lines.append(f"compare {cmp['candidate']} vs {cmp['reference']}: {o['windows']} x {cmp['seq_len']} tokens, "
                 f"teacher-forced, last {cmp['decode_tokens']} decoded, {cmp['seconds']:.1f} s")
    lines.append(f"  logits rel. error (Frobenius, all windows) {o['frobenius_rel_error']:.3e} "
                 f"(target < 1e-2: {'PASS' if o['frobenius_rel_error'] < 1e-2 else 'FAIL'})")
    lines.append(f"  max|c-r|/max|r| {o['max_rel_error']:.3e}   per-position rel. L2 (mean) "
                 f"{o['position_rel_error_mean']:.3e}")
    lines.append(f"  top-1 agreement {o['top1_agreement']:.5f}   KL(ref||cand) per token {o['kl_mean']:.3e}")
    lines.append(f"  NLL ref {o['nll_reference']:.5f}  cand {o['nll_candidate']:.5f}  -> PPL {o['ppl_reference']:.4f} vs "
                 f"{o['ppl_candidate']:.4f} ({o['ppl_rel_diff']:+.4%})")
    f = cmp.get("floor")
    if f:
        lines.append(f"  floor (reference vs itself, whole-window prefill instead of prefill + decode): Frobenius "
                     f"{f['frobenius_rel_error']:.3e}, pos. rel {f['position_rel_error_mean']:.3e}, top-1 "
                     f"{f['top1_agreement']:.5f}, KL {f['kl_mean']:.3e}, PPL {f['ppl_rel_diff']:+.4%}")
    worst = max(cmp["windows"], key=lambda w: w["frobenius_rel_error"])
    lines.append(f"  worst window Frobenius {worst['frobenius_rel_error']:.3e}, top-1 {worst['top1_agreement']:.4f}")
gen = out / "generate.txt"
if gen.exists():
    texts = {}
    key = None
    for line in gen.read_text().splitlines():
        if line.startswith("@@@ "):
            key = line[4:]
            texts[key] = []
        elif key is not None:
            texts[key].append(line)
    for k in [k for k in texts if k.startswith("reference |")]:
        other = k.replace("reference |", "candidate |", 1)
        if other in texts:
            a, b = "\n".join(texts[k]), "\n".join(texts[other])
            same = a == b
            n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            lines.append(f"generate {k[len('reference | '):][:50]!r}: backends "
                         + ("give identical text" if same else f"diverge at character {n}"))
print("\n".join(lines))
PY
  exit "$rc"
}
trap summary EXIT

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG" || true

step "quantize $MODEL (default recipe) -> $ART"
qoq quantize --model "$MODEL" --calib "$DATA/calibration" --device "$DEVICE" --output "$ART" --overwrite \
  $CALIB_ARGS 2>&1 | tee -a "$LOG"

step "verify: full WikiText-2 PPL, reference backend (+ FP16 baseline)"
qoq verify "$ART" --ppl wikitext2 --data "$WIKI" --seq-len "$SEQ" $WIN --backend reference --device "$DEVICE" \
  --no-check-kernels --json >"$OUT/ppl_reference.json" 2>>"$LOG"
step "verify: full WikiText-2 PPL, $CAND backend (+ op-by-op kernel check)"
check=--check-kernels
[ "$CAND" = cupy ] || check=--no-check-kernels
qoq verify "$ART" --ppl wikitext2 --data "$WIKI" --seq-len "$SEQ" $WIN --backend "$CAND" --device "$DEVICE" \
  --no-baseline $check --json >"$OUT/ppl_cupy.json" 2>>"$LOG"

step "compare: $CMP_WINDOWS windows x $SEQ tokens, reference vs $CAND"
python3 -m qoq.verify.compare "$ART" --windows "$CMP_WINDOWS" --seq-len "$SEQ" --backend-a reference \
  --backend-b "$CAND" --device "$DEVICE" --data "$WIKI" --json "$OUT/compare.json" 2>&1 | tee -a "$LOG"

prompts=("Write a short paragraph about the history of Paris."
         "Explain what a hash table is."
         "Give three tips for writing clear technical documentation.")
for p in "${prompts[@]}"; do
  for side in reference candidate; do
    b=reference
    [ "$side" = candidate ] && b=$CAND
    step "generate ($b): $p"
    echo "@@@ $side | $p" >>"$GEN"
    qoq generate "$ART" -p "$p" -n "$GEN_TOKENS" -t 0 --backend "$b" --device "$DEVICE" >>"$GEN" 2>>"$LOG"
    tail -1 "$LOG"
  done
done
cat "$GEN"
step "done"
