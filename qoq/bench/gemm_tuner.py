"""Sweeps of the W4A8 kernel's configurations, for choosing `qoq.runtime_kernels.gemm.choose_config`'s defaults
(`python -m qoq.bench.gemm --tune` / `--tune-gemv`; the measured choices are in runtime_kernels/NOTES.md)."""
from __future__ import annotations

import torch

import qoq.runtime_kernels as K
from qoq.bench.kernel_timing import LLAMA3_8B_SHAPES, copies_beyond_l2, quantized_weights, time_calls
from qoq.runtime_kernels import gemm as G
from qoq.scheme import ops
from qoq.scheme.progressive import is_per_channel

GEMV_CANDIDATES = {  # name -> GemvConfig fields besides tb; the cluster and PDL ones need sm_90
    "w16u2": dict(warps=16, u=2), "w8u2": dict(warps=8, u=2), "w32u2": dict(warps=32, u=2),
    "w8u4": dict(warps=8, u=4), "w8u2c2": dict(warps=8, u=2, cluster=2), "w8u4c2": dict(warps=8, u=4, cluster=2),
    "w16u1": dict(warps=16, u=1), "w32u1": dict(warps=32, u=1), "w16u1c2": dict(warps=16, u=1, cluster=2),
    "w16u2-late": dict(warps=16, u=2, early_trigger=False), "w16u2-nopdl": dict(warps=16, u=2, pdl=False)}
INTMM_CHUNKS = (None,)  # output-channel chunks measured slower at 2048-8192 (NOTES.md)


WGMMA_CANDIDATES = [(4, 1), (3, 2)]  # WgmmaConfig(stages, min_blocks)


def tune(log=print, shapes=LLAMA3_8B_SHAPES, gemv_ms=(1, 4, 16), large_ms=(1024, 2048, 4096)) -> list[dict]:
    """Sweep the W4A8 kernel's configurations (for choosing `choose_config`'s defaults): GEMV shapes at small M;
    at large M the output-channel chunk of the dequant + `_int_mm` path, with each stage timed alone."""
    dev = torch.device("cuda")
    hopper = torch.cuda.get_device_capability() >= (9, 0)
    cands = {k: v for k, v in GEMV_CANDIDATES.items() if hopper or v.get("cluster", 1) == 1}
    variants = [G.variant_for(G.GemvConfig(tb, **kw), grouped)[0] for grouped in (True, False)
                for tb in (1, 2) for kw in cands.values()]
    hopper_a = torch.cuda.get_device_capability() == (9, 0)
    wgmmas = [G.WgmmaConfig(*c) for c in WGMMA_CANDIDATES] if hopper_a else []
    variants += [G.variant_for(cfg, grouped)[0] for grouped in (True, False) for cfg in wgmmas]
    K.precompile(variants + [G.DEQUANT_G, G.DEQUANT_C, G.EPILOGUE])
    rows = []

    def note(n, k, m, g, res):
        for name, us in res.items():
            rows.append({"bench": "tune", "n": n, "k": k, "m": m, "group": g, "config": name, "us": us})
        log(f"tune {n}x{k} g={g:<4d} M={m:<5d} " + "  ".join(f"{nm} {us:.1f}" for nm, us in res.items()))

    for n, k in shapes:
        for g in (128, -1):
            lins = quantized_weights(n, k, g, copies_beyond_l2(n * k // 2), dev)
            for m in gemv_ms:
                a = ops.quantize_act(torch.randn(m, k, device=dev, dtype=torch.float16), lins[0].padded_in,
                                     with_qsum=is_per_channel(g))
                res = {}
                for name, kw in cands.items():
                    cfg = G.GemvConfig((m + 7) // 8, **kw)
                    res[name] = time_calls([lambda lin=lin, cfg=cfg, a=a: K.w4a8_linear(a, lin, config=cfg)
                                            for lin in lins])["us"]
                note(n, k, m, g, res)
            for m in large_ms:
                a = ops.quantize_act(torch.randn(m, k, device=dev, dtype=torch.float16), lins[0].padded_in,
                                     with_qsum=is_per_channel(g))
                res = {}
                for ch in INTMM_CHUNKS:
                    cfg = G.IntMMConfig(n_chunk=ch)
                    res[f"chunk{ch or 'all'}"] = time_calls(
                        [lambda lin=lin, cfg=cfg, a=a: K.w4a8_linear(a, lin, config=cfg) for lin in lins])["us"]
                for cfg in wgmmas:
                    res[f"wgmma_s{cfg.stages}b{cfg.min_blocks}"] = time_calls(
                        [lambda lin=lin, cfg=cfg, a=a: K.w4a8_linear(a, lin, config=cfg) for lin in lins])["us"]
                np_, kp = lins[0].qweight.shape[0], lins[0].padded_in
                w8s = [torch.empty(np_, kp, dtype=torch.int8, device=dev) for _ in range(copies_beyond_l2(np_ * kp))]
                # one weight per int8 buffer; the repeated pool `lins * 8` is the longer, zip stops at `w8s`
                res["stage_dequant"] = time_calls([lambda lin=lin, w8=w8, g=g, kp=kp: G._dequant(
                    lin.qweight, lin.s2_scales, lin.s2_zeros, 7, not is_per_channel(g), w8, kp, 0)
                    for lin, w8 in zip(lins * 8, w8s, strict=False)])["us"]
                res["stage_int_mm"] = time_calls([lambda w8=w8, a=a: torch._int_mm(a.q, w8.t()) for w8 in w8s])["us"]
                del w8s
                note(n, k, m, g, res)
            del lins
            torch.cuda.empty_cache()
    return rows


SWAP_MS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


def swap_candidates(m: int, np_: int, kt: int, sms: int) -> list:
    """SwapConfig shapes worth timing at M: the smallest token tile that holds M (and 128 above it), every
    cluster split-K from 1 to 8 that leaves each CTA at least 8 k-tiles and no more than 6 CTAs per SM, with and
    without overlapping the next stage's dequant with this one's wgmmas (weights 2 stages ahead: 4 measured no
    faster); up to M = 128 also the smaller token tiles (more CTAs, each weight tile read once per token tile),
    without the overlap."""
    bt_fit = min(128, max(16, -(-m // 16) * 16))
    bts = sorted({bt_fit, 64, 128} if m > 64 else {bt_fit})
    smaller = [bt for bt in (32, 64) if bt < bt_fit] if m <= 128 else []
    out = []
    for bt in bts + smaller:
        tiles = -(-np_ // 128) * -(-m // bt)
        for cl in (1, 2, 4, 8):
            if cl > 1 and (kt // cl < 8 or tiles * cl > 6 * sms):
                continue
            overlaps = (False,) if bt in smaller else (False, True)
            out += [G.SwapConfig(bt, stages=4, pf=2, cluster=cl, overlap=ov) for ov in overlaps]
            out += [G.SwapConfig(bt, stages=4, pf=pf, cluster=cl, tma=True) for pf in (2, 4)]
    return out


def _fp8_and_dispatch(wf8s, xf8, lins, a) -> dict:
    """µs of FP8 `_scaled_mm` (unit scales, fp16 out) and of our dispatched W4A8 GEMM, over rotated weight copies."""
    one = torch.ones((), device=xf8.device)
    return {"fp8": time_calls([lambda w=w: torch._scaled_mm(xf8, w.t(), scale_a=one, scale_b=one,
                                                          out_dtype=torch.float16) for w in wf8s])["us"],
            "dispatch": time_calls([lambda lin=lin: K.w4a8_linear(a, lin) for lin in lins])["us"]}


def _swap_name(cfg) -> str:
    return f"swap_t{cfg.bt}_p{cfg.pf}_c{cfg.cluster}" + ("_ov" if cfg.overlap else "") + ("_tma" if cfg.tma else "")


def tune_swap(log=print, shapes=LLAMA3_8B_SHAPES, ms=SWAP_MS, group: int = 128) -> list[dict]:
    """Sweep the swapped-operand kernel's shapes (sm_90a) against the current dispatch and FP8 `_scaled_mm`,
    timed in the same process (g128 by default)."""
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    plans = {(n, k, m): swap_candidates(m, -(-n // 32) * 32, k // 32, sms) for n, k in shapes for m in ms}
    variants = {G.variant_for(cfg, not is_per_channel(group))[0] for cfgs in plans.values() for cfg in cfgs}
    K.precompile(sorted(variants, key=lambda v: v.name))
    rows = []
    for n, k in shapes:
        lins = quantized_weights(n, k, group, copies_beyond_l2(n * k // 2), dev)
        w16 = torch.randn(n, k, device=dev, dtype=torch.float16) * 0.02
        wf8s = [w16.to(torch.float8_e4m3fn) for _ in range(copies_beyond_l2(n * k))]
        for m in ms:
            x = torch.randn(m, k, device=dev, dtype=torch.float16)
            a = ops.quantize_act(x, lins[0].padded_in, with_qsum=is_per_channel(group))
            xf8 = x.to(torch.float8_e4m3fn)
            res = _fp8_and_dispatch(wf8s, xf8, lins, a)
            for cfg in plans[(n, k, m)]:
                res[_swap_name(cfg)] = time_calls([lambda lin=lin, cfg=cfg, a=a: K.w4a8_linear(a, lin, config=cfg)
                                                   for lin in lins])["us"]
            best = min((nm for nm in res if nm.startswith("swap")), key=res.get, default=None)
            for name, us in res.items():
                rows.append({"bench": "tune_swap", "n": n, "k": k, "m": m, "group": group, "config": name, "us": us})
            log(f"swap {n}x{k} M={m:<5d} fp8 {res['fp8']:.1f} dispatch {res['dispatch']:.1f} best "
                + (f"{best} {res[best]:.1f} ({res['fp8'] / res[best]:.2f}x fp8)" if best else "-")
                + "  | " + " ".join(f"{nm[5:]} {us:.1f}" for nm, us in res.items() if nm.startswith("swap")))
        del lins, wf8s
        torch.cuda.empty_cache()
    return rows


LARGE_MS = (1024, 4096, 16384)  # 16384: the engines' prefill chunk


def tune_large(log=print, shapes=LLAMA3_8B_SHAPES, ms=LARGE_MS, groups=(128, -1)) -> list[dict]:
    """The Hopper (sm_90a) large-M kernels (the 128 x 128 wgmma kernel, the swapped-operand kernel with 128-token
    tiles, the two-pass TMA path's tile, ring and multicast-cluster configs) against the current dispatch and FP8
    `_scaled_mm`, timed in the same process."""
    dev = torch.device("cuda")
    cfgs = {"wgmma": G.WgmmaConfig(), "swap128": G.SwapConfig(128), "tma256": G.TmaConfig(256, 4),
            "tma128": G.TmaConfig(128, 3, 2), "tma256c2": G.TmaConfig(256, 4, cluster=2),
            "tma256s3c2": G.TmaConfig(256, 3, cluster=2), "tma128c2": G.TmaConfig(128, 3, 2, cluster=2),
            "tma128s6c2": G.TmaConfig(128, 6, cluster=2)}
    K.precompile(sorted({G.variant_for(cfg, g != -1)[0] for cfg in cfgs.values() for g in groups},
                        key=lambda v: v.name))
    rows = []
    for n, k in shapes:
        w16 = torch.randn(n, k, device=dev, dtype=torch.float16) * 0.02
        wf8s = [w16.to(torch.float8_e4m3fn) for _ in range(copies_beyond_l2(n * k))]
        for g in groups:
            lins = quantized_weights(n, k, g, copies_beyond_l2(n * k // 2), dev)
            for m in ms:
                x = torch.randn(m, k, device=dev, dtype=torch.float16)
                a = ops.quantize_act(x, lins[0].padded_in, with_qsum=is_per_channel(g))
                xf8 = x.to(torch.float8_e4m3fn)
                res = _fp8_and_dispatch(wf8s, xf8, lins, a)
                for name, cfg in cfgs.items():
                    res[name] = time_calls([lambda lin=lin, cfg=cfg, a=a: K.w4a8_linear(a, lin, config=cfg)
                                            for lin in lins])["us"]
                for name, us in res.items():
                    rows.append({"bench": "tune_large", "n": n, "k": k, "m": m, "group": g, "config": name, "us": us})
                log(f"large {n}x{k} g={g:<4d} M={m:<5d} " + " ".join(f"{nm} {us:.1f}" for nm, us in res.items())
                    + f"  dispatch {res['fp8'] / res['dispatch']:.2f}x fp8")
                del a, x, xf8
            del lins
            torch.cuda.empty_cache()
        del wf8s
    return rows
