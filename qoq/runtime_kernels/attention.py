"""Launchers of the KV4 cache kernels: quantize/append (optionally fused with RoPE) and decode attention."""
from __future__ import annotations

import math

import torch

from qoq.scheme import ops
from qoq.scheme.ops import KV4Cache

from . import _build as B
from .gemm import _workspace

X_DTYPES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}
ATTN_HEAD_DIMS = (64, 128, 256)
ATTN_MAX_SPLITS = 1024  # attention.cu's combine kernel
# The most warps per CTA (4, 3, 2) with which every CTA of the plan fits on the GPU at once (one wave; the kernel is
# latency-bound, so more resident warps help until a second wave costs more). CTAs per SM by registers: 110 / 162 /
# 255 per thread at D = 64 / 128 / 256, allocated per warp in 256-register units. Measured on H100 (bench
# --tune-attention): B 16 x 4096 44.5 us with 4 warps vs 54.7 with 3 and 56.1 with 2; B 64 x 1024 (512 CTAs, more
# than fit with 4 warps) 41.9 with 3 vs 43.2 with 2 and 45.6 with 4; B 256 x 1024 140.2 with 2 vs 151.2 with 3.
ATTN_REGS = {64: 110, 128: 162, 256: 255}
ATTN_WARP_CHOICES = (4, 3, 2)


def attn_ctas_per_sm(d: int, warps: int) -> int:
    regs_per_warp = -(-ATTN_REGS[d] * 32 // 256) * 256
    return 65536 // (regs_per_warp * warps)


def attn_stages(d: int) -> int:
    return 4 if d <= 128 else 3


def _check_cache(cache: KV4Cache) -> tuple[int, int, int, int]:
    b, hkv, tmax, half = cache.k.shape
    for t in (cache.k, cache.v, cache.k_scale, cache.k_zero, cache.v_scale, cache.v_zero):
        if not t.is_contiguous():
            raise ValueError("KV4Cache tensors must be contiguous")
    if cache.k.dtype != torch.uint8 or cache.k_scale.dtype != torch.float16:
        raise ValueError("KV4Cache must hold uint8 codes and fp16 scales/zeros")
    return b, hkv, tmax, 2 * half


def _last_contig(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _device(t: torch.Tensor) -> int:
    return t.device.index if t.device.index is not None else torch.cuda.current_device()


def _append(cache: KV4Cache, k, v, start, q=None, cos=None, sin=None):
    bsz, hkv, tmax, d = _check_cache(cache)
    if k.dim() != 4 or k.shape != v.shape or k.shape[0] != bsz or k.shape[1] != hkv or k.shape[3] != d:
        raise ValueError(f"k/v must be [B={bsz}, Hkv={hkv}, T, D={d}], got {tuple(k.shape)} / {tuple(v.shape)}")
    if k.dtype != v.dtype or k.dtype not in X_DTYPES or d % 4 or d > 256:
        raise ValueError("k and v must share a float dtype; head_dim must be a multiple of 4 and <= 256")
    k, v = _last_contig(k), _last_contig(v)
    t = k.shape[2]
    dev = k.device
    start = start.to(device=dev, dtype=torch.int64, non_blocking=True).contiguous()
    rope = q is not None
    q_out = k_out = None
    hq = 0
    cs_dt, csb, cst = 0, 0, 0
    if rope:
        if q.dim() != 4 or q.shape[0] != bsz or q.shape[2] != t or q.shape[3] != d or q.dtype != k.dtype:
            raise ValueError("q must be [B, Hq, T, D] of k's dtype")
        q = _last_contig(q)
        hq = q.shape[1]
        if cos.shape != sin.shape or cos.dim() != 3 or cos.shape[-1] != d or cos.dtype != sin.dtype:
            raise ValueError("cos/sin must be [B, T, D] of one dtype")
        cos = _last_contig(cos.expand(bsz, t, d))
        sin = _last_contig(sin.expand(bsz, t, d))
        if cos.stride() != sin.stride():
            cos, sin = cos.contiguous(), sin.contiguous()
        cs_dt, csb, cst = X_DTYPES[cos.dtype], cos.stride(0), cos.stride(1)
        q_out = torch.empty(bsz, hq, t, d, dtype=q.dtype, device=dev)
        k_out = torch.empty(bsz, hkv, t, d, dtype=k.dtype, device=dev)
    items = (bsz * hq * t if rope else 0) + 2 * bsz * hkv * t
    if items == 0:
        return q_out, k_out
    qs = q.stride() if rope else (0, 0, 0, 1)
    args = (B.ptr(q), B.ptr(k), B.ptr(v), B.i32(X_DTYPES[k.dtype]),
            B.i64(qs[0]), B.i64(qs[1]), B.i64(qs[2]),
            B.i64(k.stride(0)), B.i64(k.stride(1)), B.i64(k.stride(2)),
            B.i64(v.stride(0)), B.i64(v.stride(1)), B.i64(v.stride(2)),
            B.ptr(cos), B.ptr(sin), B.i32(cs_dt), B.i64(csb), B.i64(cst),
            B.ptr(q_out), B.ptr(k_out),
            B.ptr(cache.k), B.ptr(cache.k_scale), B.ptr(cache.k_zero),
            B.ptr(cache.v), B.ptr(cache.v_scale), B.ptr(cache.v_zero), B.ptr(start),
            B.i32(bsz), B.i32(hq), B.i32(hkv), B.i32(t), B.i32(d), B.i32(tmax), B.i32(int(rope)))
    warps = 8
    B.launch(B.KV4_APPEND, _device(k), (math.ceil(items / warps), 1, 1), (32 * warps, 1, 1), args)
    return q_out, k_out


def kv4_append(cache: KV4Cache, k: torch.Tensor, v: torch.Tensor, start: torch.Tensor) -> None:
    """ops.kv4_append: quantize post-RoPE k, v [B, Hkv, T, D] into positions start[b] .. start[b]+T-1."""
    _append(cache, k, v, start)


def rope_kv4_append(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    cache: KV4Cache, start: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """apply_rope to q and k, kv4_append(rotated k, v); returns (rotated q, rotated k) as new contiguous tensors."""
    return _append(cache, k, v, start, q=q, cos=cos, sin=sin)


def choose_warps(bsz: int, hkv: int, t_eff: int, sms: int, d: int) -> int:
    """The most warps per CTA (4, 3, 2) whose plan's CTAs all fit on the GPU at once, else 2."""
    for warps in ATTN_WARP_CHOICES:
        splits, _ = plan_splits(bsz, hkv, t_eff, sms, warps)
        if bsz * hkv * splits <= attn_ctas_per_sm(d, warps) * sms:
            return warps
    return 2


def plan_splits(bsz: int, hkv: int, t_eff: int, sms: int, warps: int) -> tuple[int, int]:
    """(splits, chunk tokens) so that B*Hkv*splits CTAs cover the SMs about twice."""
    ctas = bsz * hkv
    max_splits = max(1, math.ceil(t_eff / (warps * 16)))
    s0 = max(1, min(math.ceil(2 * sms / ctas), max_splits))
    chunk = math.ceil(math.ceil(t_eff / s0) / 16) * 16
    return max(1, math.ceil(t_eff / chunk)), chunk


def decode_attention_kv4(q: torch.Tensor, cache: KV4Cache, lengths: torch.Tensor, sm_scale: float,
                         max_len: int | None = None, out: torch.Tensor | None = None,
                         splits: int | None = None, warps: int | None = None, min_blocks: int = 1) -> torch.Tensor:
    """ops.decode_attention_kv4: q [B, Hq, D] over the first lengths[b] cached tokens (GQA) -> [B, Hq, D].

    `max_len` (an upper bound of lengths known on the host, else the cache capacity) only sizes the split over the
    sequence; no host synchronisation happens. Queries enter the tensor cores as fp16.
    """
    bsz, hkv, tmax, d = _check_cache(cache)
    if q.dim() != 3 or q.shape[0] != bsz or q.shape[2] != d or q.shape[1] % hkv:
        raise ValueError(f"q must be [B={bsz}, Hq (multiple of {hkv}), D={d}], got {tuple(q.shape)}")
    hq = q.shape[1]
    if d not in ATTN_HEAD_DIMS or hq // hkv > 16 or q.dtype not in X_DTYPES:
        return ops.decode_attention_kv4(q, cache, lengths, sm_scale)  # unsupported shape: reference path
    dev = q.device
    if out is None:
        out = torch.empty(bsz, hq, d, dtype=q.dtype, device=dev)
    q16 = q.to(torch.float16).contiguous()
    lengths = lengths.to(device=dev, dtype=torch.int64, non_blocking=True).contiguous()
    device = _device(q)
    sms = B.device_info(device)["sms"]
    t_eff = min(tmax, max_len) if max_len is not None else tmax
    if warps is None:
        warps = choose_warps(bsz, hkv, t_eff, sms, d)
    if splits is None:
        nsplit, chunk = plan_splits(bsz, hkv, t_eff, sms, warps)
    else:
        chunk = math.ceil(math.ceil(t_eff / splits) / 16) * 16
        nsplit = max(1, math.ceil(t_eff / chunk))
    if nsplit == 1:
        chunk = max(tmax, 16)
    if nsplit > ATTN_MAX_SPLITS:
        raise ValueError(f"at most {ATTN_MAX_SPLITS} splits, got {nsplit}")
    part_o = part_ml = None
    if nsplit > 1:
        part_o = _workspace(device, "attn_o", bsz * hq * nsplit * d, torch.float32)
        part_ml = _workspace(device, "attn_ml", bsz * hq * nsplit * 2, torch.float32)
    out_dt = X_DTYPES[out.dtype]
    args = (B.ptr(q16), B.ptr(cache.k), B.ptr(cache.k_scale), B.ptr(cache.k_zero), B.ptr(cache.v),
            B.ptr(cache.v_scale), B.ptr(cache.v_zero), B.ptr(lengths), B.f32(sm_scale * math.log2(math.e)),
            B.i32(hq), B.i32(hkv), B.i32(tmax), B.i32(nsplit), B.i32(chunk), B.ptr(out), B.i32(out_dt),
            B.ptr(part_o), B.ptr(part_ml))
    stages = attn_stages(d)
    B.launch(B.attn_variant(d, warps, stages, min_blocks), device, (hkv, bsz, nsplit), (32 * warps, 1, 1), args,
             B.attn_smem_bytes(d, warps, stages))
    if nsplit > 1:
        B.launch(B.ATTN_COMBINE, device, (bsz * hq, 1, 1), (min(256, d), 1, 1),
                 (B.ptr(part_o), B.ptr(part_ml), B.i32(nsplit), B.i32(d), B.ptr(out), B.i32(out_dt)))
    return out


def default_variants() -> list:
    return [B.KV4_APPEND, B.ATTN_COMBINE] + [B.attn_variant(d, w, attn_stages(d)) for d in ATTN_HEAD_DIMS
                                             for w in ATTN_WARP_CHOICES]
