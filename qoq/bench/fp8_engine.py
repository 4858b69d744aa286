"""The FP8 W8A8 baseline engine for `qoq bench`: what vLLM and TensorRT-LLM users deploy on Hopper.

Weights FP8 e4m3 with one scale per output channel (absmax / 448), activations FP8 e4m3 with one scale
per token computed on the fly (dynamic), GEMMs through `torch._scaled_mm` with row-wise scales and fast
accumulation (cuBLASLt/CUTLASS FP8), bfloat16 activations (row-wise scaled FP8 GEMMs emit bfloat16),
a 16-bit KV cache, and everything else (prefill attention, decode attention, CUDA-graph decode, fused
q|k|v and gate|up) exactly as the FP16 engine it subclasses. The per-token quantization is one Triton
kernel per GEMM on CUDA (as serving engines fuse it), a torch twin elsewhere.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from qoq.bench.fp16_engine import FP16Engine

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
MIN_SCALE = 1e-12  # an all-zero row keeps a finite scale

try:  # Triton ships with CUDA builds of torch; CPU builds run the torch twin
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the torch build
    triton = None

if triton is not None:
    @triton.jit
    def _per_token_fp8_kernel(x_ptr, q_ptr, s_ptr, n_cols, x_stride, q_stride, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        x_row = x_ptr + row * x_stride
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for c in range(0, n_cols, BLOCK):
            cols = c + tl.arange(0, BLOCK)
            x = tl.load(x_row + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        scale = tl.maximum(tl.max(amax, axis=0) / 448.0, 1e-12)
        for c in range(0, n_cols, BLOCK):
            cols = c + tl.arange(0, BLOCK)
            x = tl.load(x_row + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
            q = tl.minimum(tl.maximum(x / scale, -448.0), 448.0)
            tl.store(q_ptr + row * q_stride + cols, q.to(tl.float8e4nv), mask=cols < n_cols)
        tl.store(s_ptr + row, scale)


@dataclass
class FP8Weight:
    w: torch.Tensor  # [N, K] float8_e4m3fn, row-major (its .t() is the column-major operand _scaled_mm wants)
    scale: torch.Tensor  # [1, N] float32

    @property
    def out_features(self) -> int:
        return self.w.shape[0]


def quantize_weight_fp8(w: torch.Tensor) -> FP8Weight:
    """Per-output-channel absmax scaling of w [N, K] to FP8 e4m3."""
    w = w.float()
    scale = (w.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=MIN_SCALE)  # [N, 1]
    q = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return FP8Weight(q.contiguous(), scale.t().contiguous())


def quantize_act_fp8_torch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (FP8 codes [M, K], per-token scales [M, 1] fp32): the Triton kernel's twin."""
    xf = x.float()
    scale = (xf.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=MIN_SCALE)
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def quantize_act_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token FP8 quantization of x [M, K]: one Triton kernel on CUDA, else the torch twin."""
    if triton is None or not x.is_cuda:
        return quantize_act_fp8_torch(x)
    m, k = x.shape
    q = torch.empty((m, k), dtype=FP8, device=x.device)
    s = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m:
        _per_token_fp8_kernel[(m,)](x, q, s, k, x.stride(0), q.stride(0), BLOCK=1024, num_warps=4)
    return q, s


def fp8_linear(x: torch.Tensor, w: FP8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ w.T in W8A8 FP8 (per-token x per-channel scales), in x's dtype."""
    lead, k = x.shape[:-1], x.shape[-1]
    xq, sx = quantize_act_fp8(x.reshape(-1, k))
    if x.is_cuda:
        y = torch._scaled_mm(xq, w.w.t(), scale_a=sx, scale_b=w.scale, out_dtype=x.dtype, use_fast_accum=True)
    else:  # the same products and scales, unfused: CPU builds have no row-wise FP8 GEMM
        y = ((xq.float() @ w.w.float().t()) * sx * w.scale).to(x.dtype)
    if bias is not None:
        y = y + bias
    return y.reshape(*lead, w.out_features)


class FP8Engine(FP16Engine):
    """FP16Engine with W8A8 FP8 GEMMs (the lm_head stays 16-bit, as in vLLM's FP8 checkpoints)."""

    def __init__(self, config: dict, weights: dict[str, torch.Tensor], device: torch.device | str,
                 dtype: torch.dtype | None = None, cuda_graph: bool | None = None):
        dev = torch.device(device)
        super().__init__(config, weights, dev, dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32),
                         cuda_graph)

    def prepare_weight(self, w: torch.Tensor) -> FP8Weight:
        return quantize_weight_fp8(w)

    def linear(self, x: torch.Tensor, w: FP8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
        return fp8_linear(x, w, bias)

    def gemm_description(self) -> str:
        quant = "Triton" if triton is not None and self.device.type == "cuda" else "torch"
        return f"FP8 W8A8 GEMMs (torch._scaled_mm row-wise, fast accumulation; {quant} per-token quantization)"
