"""Launchers of the per-token INT8 activation quantization kernels (plain, fused RMSNorm, fused residual add +
RMSNorm, fused SiLU*up)."""
from __future__ import annotations

import torch

from qoq.scheme.ops import QuantAct

from . import _build as B

IN_DTYPES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}
MODE_QUANT, MODE_RMSNORM, MODE_SILU_MUL, MODE_ADD_RMSNORM = 0, 1, 2, 3


def _rows(x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 2:
        x = x.reshape(-1, x.shape[-1])
    if x.stride(-1) != 1:
        x = x.contiguous()
    if x.dtype not in IN_DTYPES:
        raise ValueError(f"unsupported activation dtype {x.dtype}")
    return x


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def launch_shape(padded_in: int, cluster: int = 1) -> tuple[int, int]:
    """(threads, chunks of 8 per thread) of each of the `cluster` CTAs that share a row of `padded_in` elements."""
    nchunk = -(-padded_in // 8 // cluster)
    threads = min(512, max(32, _next_pow2(nchunk)))
    return threads, _next_pow2(-(-nchunk // threads))


ROW_CLUSTER_MIN_CHUNKS = 64  # chunks of 8 elements per CTA below which a row is not split further
ROW_CLUSTER_MIN_WIDTH = 8192  # narrower rows are faster on one CTA (NOTES.md: the cluster barriers cost more)


def row_cluster(m: int, padded_in: int, sms: int, cc: int) -> int:
    """CTAs per row: on sm_90 a row of at least ROW_CLUSTER_MIN_WIDTH elements is split over a cluster of up to
    8 CTAs while the rows alone would fill fewer than half the SMs, keeping at least ROW_CLUSTER_MIN_CHUNKS
    chunks per CTA. Measured on H100: a 14336-wide SiLU·up row takes 7.4 µs on one CTA (compute-bound on one SM)
    and 5.0 µs on a cluster of 8; a 4096-wide add + RMSNorm row 3.7 µs on one CTA and 5.0 µs on 8 (the up to
    four cluster barriers cost more than the split saves)."""
    if cc < 90 or padded_in < ROW_CLUSTER_MIN_WIDTH:
        return 1
    cluster = 1
    while cluster < 8 and 2 * m * cluster <= sms and padded_in // 8 // (2 * cluster) >= ROW_CLUSTER_MIN_CHUNKS:
        cluster *= 2
    return cluster


def _vec_ok(x: torch.Tensor) -> bool:
    per16 = 16 // x.element_size()
    return x.data_ptr() % 16 == 0 and (x.shape[0] <= 1 or x.stride(0) % per16 == 0)


def _companion_rows(t: torch.Tensor, x: torch.Tensor, what: str) -> tuple[torch.Tensor, int, bool]:
    """A second row tensor read beside x: (its rows, row stride, whether 16-byte loads suit it)."""
    t = _rows(t)
    if t.shape != x.shape or t.dtype != x.dtype:
        raise ValueError(f"{what} must have the same shape and dtype")
    return t, t.stride(0), _vec_ok(t)


def rowquant(mode: int, x: torch.Tensor, x2: torch.Tensor | None, eps: float, padded_in: int, with_qsum: bool,
             out: QuantAct | None = None, res: torch.Tensor | None = None, cluster: int | None = None) -> QuantAct:
    """Quantize the rows of x (after `mode`'s fused op). MODE_ADD_RMSNORM adds `res` to x in place first.
    `cluster`: CTAs per row (default: `row_cluster`)."""
    if mode == MODE_ADD_RMSNORM and (x.dim() != 2 or x.stride(-1) != 1):
        raise ValueError("the residual stream must be a 2-D tensor with contiguous rows (it is updated in place)")
    x = _rows(x)
    m, k = x.shape
    if padded_in < k or padded_in % 8:
        raise ValueError(f"padded_in {padded_in} must be >= K ({k}) and a multiple of 8")
    dev = x.device
    dt2 = 0
    ld2 = 0
    vec = _vec_ok(x)
    if mode == MODE_SILU_MUL:
        x2, ld2, vec2 = _companion_rows(x2, x, "gate and up")
        vec = vec and vec2
    elif mode in (MODE_RMSNORM, MODE_ADD_RMSNORM):
        x2 = x2.contiguous()
        if x2.numel() != k or x2.dtype not in IN_DTYPES:
            raise ValueError("RMSNorm weight must be [K] of a float dtype")
        dt2 = IN_DTYPES[x2.dtype]
    ldres = 0
    if mode == MODE_ADD_RMSNORM:
        res, ldres, vec_res = _companion_rows(res, x, "the residual and its update")
        vec = vec and vec_res
    else:
        res = None
    if out is None:
        out = QuantAct(q=torch.empty(m, padded_in, dtype=torch.int8, device=dev),
                       scale=torch.empty(m, dtype=torch.float32, device=dev),
                       qsum=torch.empty(m, dtype=torch.int32, device=dev) if with_qsum else None)
    else:
        if out.q.shape != (m, padded_in) or not out.q.is_contiguous() or out.scale.shape[0] != m:
            raise ValueError("preallocated QuantAct does not match the input")
        if with_qsum and out.qsum is None:
            raise ValueError("preallocated QuantAct lacks qsum")
    if out.q.data_ptr() % 8:
        raise ValueError("q must be 8-byte aligned")
    if m == 0:
        return out
    device = dev.index if dev.index is not None else torch.cuda.current_device()
    info = B.device_info(device)
    if cluster is None:
        cluster = row_cluster(m, padded_in, info["sms"], info["cc"])
    threads, ch = launch_shape(padded_in, cluster)
    variant = B.rowquant_variant(IN_DTYPES[x.dtype], mode, ch, threads, cluster)
    qsum = out.qsum if with_qsum else None
    args = (B.ptr(x), B.ptr(x2), B.i32(dt2), B.f32(eps), B.ptr(out.q), B.ptr(out.scale), B.ptr(qsum),
            B.i32(k), B.i32(padded_in), B.i64(x.stride(0)), B.i64(ld2), B.i32(int(vec)),
            B.ptr(res), B.i64(ldres), B.ptr(x if res is not None else None))
    B.launch(variant, device, (m * cluster, 1, 1), (threads, 1, 1), args)
    if not with_qsum and out.qsum is not None:
        out = QuantAct(q=out.q, scale=out.scale, qsum=None)
    return out


def default_variants() -> list:
    """One CTA per row for every dtype and mode at the Llama/SmolLM2 widths, plus the clusters `row_cluster`
    picks for fp16/bf16 rows at 1-64 tokens on a 132-SM sm_90 GPU."""
    out = []
    for dt in IN_DTYPES.values():
        for mode in (MODE_QUANT, MODE_RMSNORM, MODE_SILU_MUL, MODE_ADD_RMSNORM):
            for kp in (576, 1536, 4096, 14336):
                clusters = {1} | ({row_cluster(m, kp, 132, 90) for m in (1, 16, 64)} if dt != 2 else set())
                for cl in sorted(clusters):
                    threads, ch = launch_shape(kp, cl)
                    v = B.rowquant_variant(dt, mode, ch, threads, cl)
                    if v not in out:
                        out.append(v)
    return out
