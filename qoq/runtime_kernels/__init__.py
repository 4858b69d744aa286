"""CUDA kernels of the qoq runtime (the `cupy` backend): one launcher per op of `qoq.scheme.ops`.

Same names, arguments and integer semantics as the torch reference twins in `qoq.scheme.ops`; tensors are torch
CUDA tensors, kernels run on torch's current stream, nothing synchronises with the host. Kernels are compiled with
NVRTC on first use (once per process and device arch, cached on disk) and loaded through CuPy, which is imported
lazily: this package imports on a machine without CUDA or CuPy, where `available()` is False.

    quantize_act(x, padded_in, with_qsum)                        -> QuantAct
    rmsnorm_quantize(x, weight, eps, padded_in, with_qsum)       -> QuantAct
    silu_mul_quantize(gate, up, padded_in, with_qsum)            -> QuantAct
    w4a8_linear(a, w, out_dtype=torch.float16)                   -> [M, N]   (out_dtype=torch.int32: raw accumulators)
    kv4_append(cache, k, v, start)
    rope_kv4_append(q, k, v, cos, sin, cache, start)             -> (q_rot, k_rot)
    decode_attention_kv4(q, cache, lengths, sm_scale, max_len=None) -> [B, Hq, D]

Every launcher also takes `out=` (a preallocated result) so an engine can run without allocations.
"""
from __future__ import annotations

import torch

from qoq.scheme.ops import KV4Cache, QLinear, QuantAct

__all__ = ["available", "quantize_act", "rmsnorm_quantize", "silu_mul_quantize", "w4a8_linear", "kv4_append",
           "rope_kv4_append", "decode_attention_kv4", "KV4Cache", "QLinear", "QuantAct"]

_available: bool | None = None


def available() -> bool:
    """True when CuPy imports and a CUDA device is present."""
    global _available
    if _available is None:
        try:
            import cupy  # noqa: F401
            from cupy_backends.cuda.libs import nvrtc  # noqa: F401

            _available = bool(torch.cuda.is_available() and cupy.cuda.runtime.getDeviceCount() > 0)
        except Exception:
            _available = False
    return _available


def quantize_act(x: torch.Tensor, padded_in: int, with_qsum: bool = False, out: QuantAct | None = None) -> QuantAct:
    from .quant import MODE_QUANT, rowquant

    return rowquant(MODE_QUANT, x, None, 0.0, padded_in, with_qsum, out)


def rmsnorm_quantize(x: torch.Tensor, weight: torch.Tensor, eps: float, padded_in: int, with_qsum: bool = False,
                     out: QuantAct | None = None) -> QuantAct:
    from .quant import MODE_RMSNORM, rowquant

    return rowquant(MODE_RMSNORM, x, weight, eps, padded_in, with_qsum, out)


def add_rmsnorm_quantize(x: torch.Tensor, res: torch.Tensor, weight: torch.Tensor, eps: float, padded_in: int,
                         with_qsum: bool = False, out: QuantAct | None = None) -> QuantAct:
    from .quant import MODE_ADD_RMSNORM, rowquant

    return rowquant(MODE_ADD_RMSNORM, x, weight, eps, padded_in, with_qsum, out, res=res)


def silu_mul_quantize(gate: torch.Tensor, up: torch.Tensor, padded_in: int, with_qsum: bool = False,
                      out: QuantAct | None = None) -> QuantAct:
    from .quant import MODE_SILU_MUL, rowquant

    return rowquant(MODE_SILU_MUL, gate, up, 0.0, padded_in, with_qsum, out)


def w4a8_linear(a: QuantAct, w: QLinear, out_dtype: torch.dtype = torch.float16, out: torch.Tensor | None = None,
                config=None) -> torch.Tensor:
    from .gemm import w4a8_linear as _impl

    return _impl(a, w, out_dtype, out, config)


def kv4_append(cache: KV4Cache, k: torch.Tensor, v: torch.Tensor, start: torch.Tensor) -> None:
    from .attention import kv4_append as _impl

    _impl(cache, k, v, start)


def rope_kv4_append(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    cache: KV4Cache, start: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from .attention import rope_kv4_append as _impl

    return _impl(q, k, v, cos, sin, cache, start)


def decode_attention_kv4(q: torch.Tensor, cache: KV4Cache, lengths: torch.Tensor, sm_scale: float,
                         max_len: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    from .attention import decode_attention_kv4 as _impl

    return _impl(q, cache, lengths, sm_scale, max_len=max_len, out=out)


def precompile(variants=None, device: int | None = None) -> None:
    """Compile ahead of first use, in parallel (default: every variant the launchers pick by default)."""
    from ._build import precompile as _pre

    _pre(all_variants() if variants is None else variants, device)


def all_variants() -> list:
    """Every kernel variant the launchers use by default (compile checks)."""
    from . import attention, gemm, quant

    return gemm.default_variants() + quant.default_variants() + attention.default_variants()
