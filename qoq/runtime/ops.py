"""The runtime's kernel-level operations: the exact semantics every backend implements.

Each function here is the torch *reference twin* of one GPU kernel. A backend (`reference` = these
functions, `cupy` = qoq/runtime_kernels) must give the same integers: int8 activations and int32 GEMM
accumulators bit-for-bit; floating outputs within the rounding of their dtype.

Conventions
- Activations are quantized per token, symmetric INT8: `amax = max|x|` (fp32), `s_a = amax / 127`
  (fp32; 1 when amax == 0), `q = clamp(round_half_even(x / s_a), -127, 127)`. The quantized row is
  zero-padded to the layer's padded K. `qsum[m] = sum_k q[m,k]` (int32) is produced for per-channel
  weights, whose zero point is applied in the epilogue.
- W4A8 GEMM: `acc[m,n] = sum_k qa[m,k] * w8[n,k]` in int32, where for per-group weights
  `w8 = q*s2 - z` (int8, DESIGN.md §3) and for per-channel weights `w8 = q` (0..15). Epilogue in fp32:
      per-group:   y = (acc * s_a[m]) * s1[n]
      per-channel: y = s_a[m] * (acc * s1[n] - szeros[n] * qsum[m])
  then `+ bias[n]`, cast to the output dtype, sliced to the true N.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from qoq.formats.layout import unpack_group_params, unpack_weight

INT8_MAX = 127


@dataclass
class QLinear:
    """One quantized linear on its device, exactly as the artifact stores it (packed, kernel layout)."""

    qweight: torch.Tensor  # int8 [Np, Kp/2]
    s1: torch.Tensor  # fp16 [Np]
    group_size: int  # 32/64/128 or -1
    out_features: int  # N
    in_features: int  # K
    s2_scales: torch.Tensor | None = None  # int8 [Kp/g, Np], interleaved
    s2_zeros: torch.Tensor | None = None  # int8 [Kp/g, Np], interleaved, = -z
    szeros: torch.Tensor | None = None  # fp16 [Np], per-channel only
    bias: torch.Tensor | None = None  # fp16 [N]

    @property
    def padded_in(self) -> int:
        return self.qweight.shape[1] * 2

    @property
    def per_channel(self) -> bool:
        return self.group_size == -1

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], name: str, n: int, k: int, group_size: int,
                     device: torch.device | str = "cpu") -> "QLinear":
        def get(suffix):
            t = tensors.get(f"{name}.{suffix}")
            return None if t is None else t.to(device)
        return cls(qweight=get("qweight"), s1=get("s1_scales"), group_size=group_size, out_features=n,
                   in_features=k, s2_scales=get("s2_scales"), s2_zeros=get("s2_zeros"), szeros=get("s1_szeros"),
                   bias=get("bias"))


@dataclass
class QuantAct:
    """Per-token INT8 activations ready for a W4A8 GEMM."""

    q: torch.Tensor  # int8 [M, Kp]
    scale: torch.Tensor  # fp32 [M]
    qsum: torch.Tensor | None = None  # int32 [M], per-channel weights only


def quantize_act(x: torch.Tensor, padded_in: int, with_qsum: bool = False) -> QuantAct:
    """Per-token symmetric INT8 quantization of x [M, K] (any float dtype), zero-padded to `padded_in`."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
    q = torch.round(xf / scale[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    if padded_in > q.shape[1]:
        q = torch.nn.functional.pad(q, (0, padded_in - q.shape[1]))
    qsum = q.to(torch.int32).sum(dim=1, dtype=torch.int32) if with_qsum else None
    return QuantAct(q=q.contiguous(), scale=scale, qsum=qsum)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF RMSNorm in fp32: x * rsqrt(mean(x^2) + eps) * weight (fp32 result)."""
    xf = x.float()
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()


def rmsnorm_quantize(x: torch.Tensor, weight: torch.Tensor, eps: float, padded_in: int,
                     with_qsum: bool = False) -> QuantAct:
    """Fused RMSNorm + per-token INT8 quantization (one pass over the row in the kernel)."""
    return quantize_act(rmsnorm(x, weight, eps), padded_in, with_qsum)


def silu_mul_quantize(gate: torch.Tensor, up: torch.Tensor, padded_in: int, with_qsum: bool = False) -> QuantAct:
    """SiLU(gate) * up in fp32, then per-token INT8 quantization (the down_proj input)."""
    g = gate.float()
    return quantize_act(g * torch.sigmoid(g) * up.float(), padded_in, with_qsum)


def int8_weight(w: QLinear) -> torch.Tensor:
    """The int8 [Np, Kp] operand the tensor cores see: q*s2 - z (per-group) or q (per-channel)."""
    q = unpack_weight(w.qweight).to(torch.int32)
    if w.per_channel:
        return q.to(torch.int8)
    s2 = unpack_group_params(w.s2_scales).to(torch.int32).repeat_interleave(w.group_size, dim=1)
    neg_z = unpack_group_params(w.s2_zeros).to(torch.int32).repeat_interleave(w.group_size, dim=1)
    return (q * s2 + neg_z).to(torch.int8)


def int_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int32 a[M,K] @ b[N,K]^T for int8 inputs, on any device."""
    if a.is_cuda and a.shape[0] > 16 and a.shape[1] % 8 == 0 and b.shape[0] % 8 == 0:
        return torch._int_mm(a, b.t())
    # float64 holds every partial sum exactly (|acc| < 2^53), and is fast enough for a reference
    return (a.double() @ b.double().t()).to(torch.int32)


def w4a8_epilogue(acc: torch.Tensor, a: QuantAct, w: QLinear, out_dtype: torch.dtype) -> torch.Tensor:
    if w.per_channel:
        y = a.scale[:, None] * (acc.float() * w.s1.float()[None, :]
                                - w.szeros.float()[None, :] * a.qsum.float()[:, None])
    else:
        y = (acc.float() * a.scale[:, None]) * w.s1.float()[None, :]
    y = y[:, : w.out_features]
    if w.bias is not None:
        y = y + w.bias.float()
    return y.to(out_dtype)


def w4a8_linear(a: QuantAct, w: QLinear, out_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """y [M, N] = dequant(W) @ dequant(x) through the exact int32 GEMM."""
    acc = int_matmul(a.q, int8_weight(w))
    return w4a8_epilogue(acc, a, w, out_dtype)
