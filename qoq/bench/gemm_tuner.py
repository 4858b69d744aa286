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
