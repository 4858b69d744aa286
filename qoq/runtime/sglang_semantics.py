"""sglang's conventions for running an artifact, as an option of our runtime (`qoq verify --semantics sglang`).

sglang's `qoq` quantization method (python/sglang/srt/layers/quantization/qoq.py) runs the same integers
as our runtime (per-token symmetric INT8 activations, the same W4 GEMM and scales) with two differences
that move perplexity:

- per-channel weights: its epilogue subtracts `s1_szeros[n] * sum_k x[m, k]` over the *unquantized*
  activations (`per_token_quant_int8(..., cal_sum=True)`), where ours subtracts
  `s1_szeros[n] * s_a[m] * sum_k q[m, k]` over their INT8 codes. Per-group weights are unaffected;
- the KV cache stays FP16 (sglang reads no kv_bits): attention sees the unquantized post-RoPE K/V.

`sglang_backend` wraps a backend so that its per-channel linears use sglang's activation sum (the rest is
the backend's own kernels); the FP16 KV cache is the engine's fresh-prompt attention over each window's own
K/V (`qoq.verify.perplexity.engine_perplexity(..., fp16_kv=True)`). Rounding details that are not modelled:
sglang keeps the activation scale and the sum in fp16 and rounds codes half away from zero.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from qoq.scheme import ops
from qoq.runtime.backend import Backend


@dataclass
class SummedAct(ops.QuantAct):
    """INT8 activations plus the fp32 sum of the unquantized row they were made from (per-channel only)."""

    xsum: torch.Tensor | None = None  # fp32 [M]


def sglang_backend(base: Backend) -> Backend:
    """`base` with sglang's per-channel epilogue: every quantizer also returns sum(x), the linear uses it."""
    fns = dict(base.fns)

    def quantize_act(x, padded_in, with_qsum=False):
        return _summed(base.quantize_act(x, padded_in, with_qsum), x, with_qsum)

    def rmsnorm_quantize(x, weight, eps, padded_in, with_qsum=False):
        a = base.rmsnorm_quantize(x, weight, eps, padded_in, with_qsum)
        return _summed(a, ops.rmsnorm(x, weight, eps) if with_qsum else None, with_qsum)

    def add_rmsnorm_quantize(x, res, weight, eps, padded_in, with_qsum=False):
        a = base.add_rmsnorm_quantize(x, res, weight, eps, padded_in, with_qsum)  # x now holds x + res
        return _summed(a, ops.rmsnorm(x, weight, eps) if with_qsum else None, with_qsum)

    def silu_mul_quantize(gate, up, padded_in, with_qsum=False):
        a = base.silu_mul_quantize(gate, up, padded_in, with_qsum)
        g = gate.float()
        return _summed(a, g * torch.sigmoid(g) * up.float() if with_qsum else None, with_qsum)

    def w4a8_linear(a, w: ops.QLinear, out_dtype=torch.float16):
        if not w.per_channel:
            return base.w4a8_linear(a, w, out_dtype)
        y = base.w4a8_linear(a, w, torch.float32)
        return (y + activation_sum_term(a, w)).to(out_dtype)

    fns.update(quantize_act=quantize_act, rmsnorm_quantize=rmsnorm_quantize, silu_mul_quantize=silu_mul_quantize,
               w4a8_linear=w4a8_linear)
    if "add_rmsnorm_quantize" in fns:  # the engine's fast mode uses it when the backend has it
        fns["add_rmsnorm_quantize"] = add_rmsnorm_quantize
    return Backend(base.name, fns, base.fallbacks)


def activation_sum_term(a: SummedAct, w: ops.QLinear) -> torch.Tensor:
    """sglang's per-channel output minus ours, [M, N]: s1_szeros * (s_a * sum(q) - sum(x))."""
    codes_sum = a.scale * a.qsum.float()
    return w.szeros.float()[None, : w.out_features] * (codes_sum - a.xsum)[:, None]


def _summed(a: ops.QuantAct, x: torch.Tensor | None, with_qsum: bool) -> SummedAct:
    xsum = x.float().sum(dim=-1) if with_qsum else None
    return SummedAct(q=a.q, scale=a.scale, qsum=a.qsum, xsum=xsum)
