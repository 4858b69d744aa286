"""W4A8 GEMM and KV4 decode-attention micro-benchmark against cuBLAS / SDPA, in one process on one GPU.

    python -m qoq.bench.gemm [--quick] [--json PATH]

Times (CUDA events around CUDA-graph replays of many calls, warm-up first, median of several replays):
- our W4A8 GEMM, per-group g128 and per-channel (pre-quantized activations, fp16 out),
- cuBLAS FP16 `torch.matmul`, cuBLAS INT8 `torch._int_mm` (M > 16), FP8 `torch._scaled_mm` where supported,
on Llama-3-8B linear shapes (N x K) for M in 1..4096; weight copies are rotated so that the working set of every
timed graph exceeds the L2 cache (weights stream from HBM, as in a real decode step);
- KV4 decode attention vs torch SDPA on fp16 K/V (GQA), batch 64 x context 1024, Llama-3-8B heads;
- the decode step's row kernels, one CTA per row vs split over a thread-block cluster.
`run()` returns the rows as dicts (reused by `qoq bench --json`); `main()` prints a compact table, or runs the
configuration sweeps (`--tune`, `--tune-gemv`, `--tune-swap`, `--tune-large`: qoq.bench.gemm_tuner) or one case
for a profiler (`--one`, qoq.bench.profile_case).
Timing and the workload: qoq.bench.kernel_timing.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace

import torch

import qoq.runtime_kernels as K
from qoq.bench.gemm_tuner import tune, tune_large, tune_swap
from qoq.bench.kernel_timing import LLAMA3_8B_SHAPES, copies_beyond_l2, quantized_weights, time_calls
from qoq.bench.profile_case import CASES, run_case
from qoq.runtime_kernels.attention import decode_attention_kv4 as attention_with_cta_shape
from qoq.runtime_kernels.gemm import (GemmConfig, GemvConfig, IntMMConfig, SwapConfig, TmaConfig, WgmmaConfig,
                                      choose_config, choose_tma)
from qoq.scheme import ops
from qoq.scheme.progressive import is_per_channel

MS = [1, 4, 16, 32, 64, 256, 512, 1024, 2048, 4096]


def bench_gemm(shapes=LLAMA3_8B_SHAPES, ms=MS, groups=(128, -1), fp8: bool = True, log=print) -> list[dict]:
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    sms, cc = props.multi_processor_count, 10 * props.major + props.minor
    rows = []
    for n, k in shapes:
        w16 = torch.randn(n, k, device=dev, dtype=torch.float16) * 0.02
        c16 = copies_beyond_l2(n * k * 2)
        w16s = [w16] + [w16.clone() for _ in range(c16 - 1)]
        w8 = torch.randint(-127, 128, (n, k), device=dev, dtype=torch.int8)
        c8 = copies_beyond_l2(n * k)
        w8s = [w8] + [w8.clone() for _ in range(c8 - 1)]
        have_fp8 = fp8 and torch.cuda.get_device_capability() >= (8, 9)
        wf8s = [w.to(torch.float8_e4m3fn) for w in w16s[: c8]] if have_fp8 else []
        q4 = {g: quantized_weights(n, k, g, copies_beyond_l2(n * k // 2 + n * 8), dev) for g in groups}
        np_, kp = q4[groups[0]][0].qweight.shape[0], q4[groups[0]][0].padded_in
        one = torch.ones((), device=dev)
        for m in ms:
            x = torch.randn(m, k, device=dev, dtype=torch.float16)
            res = {}
            res["fp16"] = time_calls([lambda w=w, x=x: torch.matmul(x, w.t()) for w in w16s])
            if m > 16:
                xq = torch.randint(-127, 128, (m, k), device=dev, dtype=torch.int8)
                res["int8"] = time_calls([lambda w=w, xq=xq: torch._int_mm(xq, w.t()) for w in w8s])
            if wf8s:
                try:
                    xf8 = x.to(torch.float8_e4m3fn)
                    torch._scaled_mm(xf8, wf8s[0].t(), scale_a=one, scale_b=one, out_dtype=torch.float16)
                    res["fp8"] = time_calls([lambda w=w, xf8=xf8, one=one: torch._scaled_mm(
                        xf8, w.t(), scale_a=one, scale_b=one, out_dtype=torch.float16) for w in wf8s])
                except Exception:
                    pass
            for g, lins in q4.items():
                a = ops.quantize_act(x, lins[0].padded_in, with_qsum=is_per_channel(g))
                name = "w4a8_g128" if g == 128 else ("w4a8_pc" if is_per_channel(g) else f"w4a8_g{g}")
                # every large-M path (tiled mma.sync kernel; dequant + _int_mm + epilogue; sm_90a wgmma kernel);
                # the plain row is the one choose_config dispatches to
                paths = {}
                if m >= 256:
                    paths["_tiled"] = choose_config(m, np_, kp, sms, intmm=False)
                    paths["_intmm"] = IntMMConfig()
                if cc == 90 and m > 16:
                    paths["_wgmma"] = WgmmaConfig()
                if cc == 90 and m >= 256:
                    paths["_tma"] = choose_tma(m, kp)
                picked_cfg = choose_config(m, np_, kp, sms, cc=cc, grouped=not is_per_channel(g))
                if cc >= 90 and isinstance(picked_cfg, GemvConfig) and picked_cfg.pdl:  # the GEMV without PDL
                    paths["_nopdl"] = replace(picked_cfg, pdl=False)
                if isinstance(picked_cfg, SwapConfig) and m <= 16:  # and the GEMV it displaced
                    paths["_gemv"] = choose_config(m, np_, kp, sms, intmm=False, cc=cc)
                if isinstance(picked_cfg, SwapConfig):  # the swapped-operand kernel with the other pipeline
                    paths["_swapalt"] = (replace(picked_cfg, tma=False) if picked_cfg.tma
                                          else replace(picked_cfg, overlap=not picked_cfg.overlap))
                for suffix, cfg in paths.items():
                    res[name + suffix] = time_calls([lambda w=w, cfg=cfg, a=a: K.w4a8_linear(a, w, config=cfg)
                                                     for w in lins])
                picked = {GemmConfig: "_tiled", IntMMConfig: "_intmm", WgmmaConfig: "_wgmma",
                          TmaConfig: "_tma"}.get(type(picked_cfg))
                if picked and name + picked in res:
                    res[name] = res[name + picked]
                else:
                    res[name] = time_calls([lambda w=w, a=a: K.w4a8_linear(a, w) for w in lins])
            flops = 2.0 * m * n * k
            base16, base8, basef8 = res["fp16"]["us"], res.get("int8", {}).get("us"), res.get("fp8", {}).get("us")
            for impl, r in res.items():
                row = {"bench": "gemm", "n": n, "k": k, "m": m, "impl": impl, "us": round(r["us"], 2),
                       "us_min": round(r["us_min"], 2), "us_max": round(r["us_max"], 2),
                       "tops": round(flops / r["us"] / 1e6, 1),
                       "vs_fp16": round(base16 / r["us"], 2), "vs_int8": round(base8 / r["us"], 2) if base8 else None,
                       "vs_fp8": round(basef8 / r["us"], 2) if basef8 else None, "timing": r["mode"]}
                if impl.startswith("w4a8"):
                    row["weight_gbps"] = round((n * k / 2) / r["us"] / 1e3, 1)
                rows.append(row)
            log(_gemm_line(n, k, m, res))
        del w16s, w8s, wf8s, q4
        torch.cuda.empty_cache()
    return rows


def _gemm_line(n, k, m, res):
    def f(name):
        r = res.get(name)
        return f"{r['us']:9.1f}" if r else "        -"

    def ratio(base, name):
        b = res.get(base, {}).get("us")
        return f"{b / res[name]['us']:4.2f}x" if b else "   - "

    ratios = ["/".join(ratio(b, name) for b in ("fp8", "fp16", "int8")) for name in ("w4a8_g128", "w4a8_pc")
              if name in res]
    paths = [p for p in ("tiled", "intmm", "wgmma", "tma", "nopdl", "gemv", "swapalt") if f"w4a8_g128_{p}" in res]
    extra = ""
    if paths:
        extra = (f"   [{'/'.join(paths)}: g128 " + " ".join(f(f"w4a8_g128_{p}") for p in paths)
                 + " pc " + " ".join(f(f"w4a8_pc_{p}") for p in paths) + "]")
    return (f"{n:6d}x{k:<6d} M={m:<5d} fp16 {f('fp16')} int8 {f('int8')} fp8 {f('fp8')} "
            f"g128 {f('w4a8_g128')} pc {f('w4a8_pc')}   vs fp8/fp16/int8: {'  '.join(ratios)}{extra}")


def bench_attention(batch: int = 64, ctx: int = 1024, hq: int = 32, hkv: int = 8, d: int = 128, log=print,
                    tune: bool = False) -> list[dict]:
    dev = torch.device("cuda")
    lengths = torch.full((batch,), ctx, device=dev, dtype=torch.long)
    q = torch.randn(batch, hq, d, device=dev, dtype=torch.float16)
    kv_bytes4 = batch * hkv * ctx * (d + 8)
    caches = []
    for _ in range(copies_beyond_l2(kv_bytes4, cap=8)):
        c = ops.KV4Cache.empty(batch, hkv, ctx, d, dev)
        K.kv4_append(c, torch.randn(batch, hkv, ctx, d, device=dev, dtype=torch.float16),
                     torch.randn(batch, hkv, ctx, d, device=dev, dtype=torch.float16),
                     torch.zeros(batch, dtype=torch.long, device=dev))
        caches.append(c)
    sm = d ** -0.5
    res = {"kv4": time_calls([lambda c=c: K.decode_attention_kv4(q, c, lengths, sm, max_len=ctx) for c in caches])}
    if tune:  # alternative CTA shapes of the same kernel
        from qoq.runtime_kernels.attention import choose_warps, plan_splits

        sms = torch.cuda.get_device_properties(dev).multi_processor_count
        planned = plan_splits(batch, hkv, ctx, sms, choose_warps(batch, hkv, ctx, sms, d))[0]
        cta_shapes = {"kv4_w2": dict(warps=2), "kv4_w3": dict(warps=3), "kv4_w4": dict(warps=4),
                      "kv4_w1": dict(warps=1), "kv4_w2b6": dict(warps=2, min_blocks=6),
                      f"kv4_s{2 * planned}": dict(splits=2 * planned), f"kv4_s{4 * planned}": dict(splits=4 * planned),
                      f"kv4_w4s{2 * planned}": dict(warps=4, splits=2 * planned)}
        for name, kw in cta_shapes.items():
            res[name] = time_calls([lambda c=c, kw=kw: attention_with_cta_shape(q, c, lengths, sm, max_len=ctx, **kw)
                                    for c in caches])
    k16 = torch.randn(batch, hkv, ctx, d, device=dev, dtype=torch.float16)
    v16 = torch.randn_like(k16)
    q4 = q[:, :, None]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    try:
        res["sdpa_gqa"] = time_calls([lambda: sdpa(q4, k16, v16, enable_gqa=True)])
    except Exception:
        pass
    res["sdpa_expanded"] = _time_sdpa_expanded(sdpa, q4, k16, v16, hq // hkv)
    base_name = min((n for n in res if n.startswith("sdpa")), key=lambda n: res[n]["us"])
    base = res[base_name]["us"]
    rows = []
    for impl, r in res.items():
        expansion = hq // hkv if impl == "sdpa_expanded" else 1
        nbytes = kv_bytes4 if impl.startswith("kv4") else batch * hkv * ctx * d * 4 * expansion
        rows.append({"bench": "attention", "batch": batch, "ctx": ctx, "hq": hq, "hkv": hkv, "d": d, "impl": impl,
                     "us": round(r["us"], 2), "gbps": round(nbytes / r["us"] / 1e3, 1),
                     "vs_sdpa": round(base / r["us"], 2), "sdpa_baseline": base_name, "timing": r["mode"]})
    log(f"decode attention B={batch} ctx={ctx} Hq={hq} Hkv={hkv} D={d}: " +
        "  ".join(f"{n} {r['us']:.1f}us" for n, r in res.items()) + f"   kv4 vs best SDPA ({base_name}): "
        f"{base / res['kv4']['us']:.2f}x")
    return rows


def bench_rows(ms=(1, 16, 64), log=print) -> list[dict]:
    """The decode step's row kernels (SiLU·up + quant at 14336, add + RMSNorm + quant at 4096) with one CTA per
    row against the cluster split the dispatch picks (`quant.row_cluster`; 1 below sm_90)."""
    from qoq.runtime_kernels.quant import MODE_ADD_RMSNORM, MODE_SILU_MUL, rowquant, row_cluster

    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    cc = 10 * props.major + props.minor
    rows = []
    for mode, name, k in ((MODE_SILU_MUL, "silu_mul_quant", 14336), (MODE_ADD_RMSNORM, "add_rmsnorm_quant", 4096)):
        for m in ms:
            x = torch.randn(m, k, device=dev, dtype=torch.float16)
            res = torch.randn(m, k, device=dev, dtype=torch.float16) * 1e-3 if mode == MODE_ADD_RMSNORM else None
            x2 = torch.ones(k, device=dev, dtype=torch.float16) if mode == MODE_ADD_RMSNORM else torch.randn_like(x)
            auto = row_cluster(m, k, props.multi_processor_count, cc)
            args = (mode, x, x2, 1e-5, k, True)
            times = {cl: time_calls([lambda cl=cl, a=args, r=res: rowquant(*a, res=r, cluster=cl)])["us"]
                     for cl in sorted({1, auto})}
            rows.append({"bench": "rows", "kernel": name, "m": m, "k": k, "cluster": auto,
                         "us_one_cta": round(times[1], 2), "us": round(times[auto], 2),
                         "vs_one_cta": round(times[1] / times[auto], 2)})
            log(f"{name} M={m} K={k}: one CTA/row {times[1]:.2f}us, cluster {auto} {times[auto]:.2f}us")
    return rows


def _time_sdpa_expanded(sdpa, q4, k16, v16, repeats: int) -> dict:
    """SDPA on K/V repeated up to the query heads; the expanded copies are freed on return."""
    kx, vx = k16.repeat_interleave(repeats, 1), v16.repeat_interleave(repeats, 1)
    return time_calls([lambda: sdpa(q4, kx, vx)])


def run(quick: bool = False, log=print, tune_attention: bool = False) -> list[dict]:
    if not torch.cuda.is_available():
        raise RuntimeError("the GEMM benchmark needs a CUDA GPU")
    if not K.available():
        raise RuntimeError("qoq.runtime_kernels is unavailable (cupy missing?)")
    props = torch.cuda.get_device_properties(0)
    log(f"device: {props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}")
    t0 = time.perf_counter()
    K.precompile()
    log(f"kernels compiled/loaded in {time.perf_counter() - t0:.1f}s")
    ms = [1, 16, 1024] if quick else MS
    shapes = LLAMA3_8B_SHAPES[:2] if quick else LLAMA3_8B_SHAPES
    rows = bench_gemm(shapes, ms, log=log)
    rows += bench_attention(log=log, tune=tune_attention)
    rows += bench_attention(batch=16, ctx=4096, log=log, tune=tune_attention)
    rows += bench_rows(log=log)
    for r in rows:
        r["device"] = props.name
    return rows


# (M range, target): FP8 W8A8 is the baseline users compare with on Hopper
FP8_TARGETS = (((1, 16), 1.5), ((32, 256), 1.3), ((1024, 1 << 30), 0.85))


def summary(rows: list[dict]) -> str:
    """The kernel targets: >=3x cuBLAS FP16 at M<=16, >=0.8x _int_mm at M>=1024, KV4 attention >=2x SDPA; where FP8
    `_scaled_mm` was measured (Hopper), also >=1.5x FP8 at M<=16, >=1.3x at M=32-256, >=0.85x at M>=1024."""
    out = []
    for impl in ("w4a8_g128", "w4a8_pc"):
        mine = [r for r in rows if r.get("impl") == impl and r["bench"] == "gemm"]
        small = [r["vs_fp16"] for r in mine if r["m"] <= 16]
        big = [r["vs_int8"] for r in mine if r["m"] >= 1024 and r.get("vs_int8") is not None]
        if small:
            out.append(f"{impl}: M<=16 min {min(small):.2f}x cuBLAS FP16 (target 3x)")
        if big:
            out.append(f"{impl}: M>=1024 min {min(big):.2f}x _int_mm (target 0.8x)")
        for (lo, hi), target in FP8_TARGETS:
            vs = [r["vs_fp8"] for r in mine if lo <= r["m"] <= hi and r.get("vs_fp8") is not None]
            if vs:
                span = f"M>={lo}" if hi >= 1 << 30 else f"M={lo}-{hi}" if lo > 1 else f"M<={hi}"
                out.append(f"{impl}: {span} min {min(vs):.2f}x FP8 _scaled_mm (target {target}x)")
    att = [r["vs_sdpa"] for r in rows if r["bench"] == "attention" and r["impl"] == "kv4"]
    if att:
        out.append(f"kv4 decode attention: {att[0]:.2f}x SDPA fp16 (target 2x)")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="two shapes, M in {1, 16, 1024}")
    p.add_argument("--json", help="write the rows to this file")
    p.add_argument("--tune", action="store_true", help="sweep the W4A8 kernel configurations instead")
    p.add_argument("--tune-gemv", action="store_true", help="sweep the small-M (GEMV) configurations only")
    p.add_argument("--tune-swap", action="store_true",
                   help="sweep the swapped-operand Hopper kernel's shapes against the dispatch and FP8")
    p.add_argument("--tune-attention", action="store_true", help="also time alternative attention CTA shapes")
    p.add_argument("--tune-large", action="store_true",
                   help="time the two large-M Hopper kernels against the dispatch and FP8 up to M = 16384")
    p.add_argument("--rows", action="store_true", help="only the row kernels (one CTA per row vs a cluster)")
    p.add_argument("--one", choices=CASES,
                   help="run one case a few times (for a profiler)")
    args = p.parse_args(argv)
    if args.one:
        run_case(args.one)
        return 0
    if args.rows:
        rows = bench_rows()
    elif args.tune_large:
        rows = tune_large()
    elif args.tune_swap:
        rows = tune_swap()
    elif args.tune or args.tune_gemv:
        rows = tune(large_ms=() if args.tune_gemv else (1024, 2048, 4096))
    else:
        rows = run(quick=args.quick, tune_attention=args.tune_attention)
        print(summary(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
