"""The runtime's kernel-level operations: the exact semantics every backend implements.

Each function here is the torch *reference twin* of one GPU kernel. A backend (`reference` = these
functions, `cupy` = qoq/runtime_kernels) must give the same integers: int8 activations and int32 GEMM
accumulators bit-for-bit; floating outputs within the rounding of their dtype.

Conventions
- Activations are quantized per token, symmetric INT8: `amax = max|x|` (fp32), `s_a = amax / 127`
  (fp32, computed as `amax * (1/127)`: torch on CUDA divides by a scalar that way, so CPU, CUDA and
  the kernels agree; 1 when amax == 0), `q = clamp(round_half_even(x / s_a), -127, 127)`. The quantized row is
  zero-padded to the layer's padded K. `qsum[m] = sum_k q[m,k]` (int32) is produced for per-channel
  weights, whose zero point is applied in the epilogue.
- W4A8 GEMM: `acc[m,n] = sum_k qa[m,k] * w8[n,k]` in int32, where for per-group weights
  `w8 = q*s2 - z` (int8; ARCHITECTURE.md, "The integer scheme") and for per-channel weights `w8 = q` (0..15).
  Epilogue in fp32:
      per-group:   y = (acc * s_a[m]) * s1[n]
      per-channel: y = s_a[m] * (acc * s1[n] - szeros[n] * qsum[m])
  then `+ bias[n]`, cast to the output dtype, sliced to the true N.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from qoq.scheme.layout import unpack_group_params, unpack_weight
from qoq.scheme import schema
from qoq.scheme.progressive import int8_operand, is_per_channel

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
        return is_per_channel(self.group_size)

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], name: str, n: int, k: int, group_size: int,
                     device: torch.device | str = "cpu") -> "QLinear":
        def get(suffix):
            t = tensors.get(f"{name}.{suffix}")
            return None if t is None else t.to(device)
        return cls(qweight=get(schema.QWEIGHT), s1=get(schema.S1_SCALES), group_size=group_size, out_features=n,
                   in_features=k, s2_scales=get(schema.S2_SCALES), s2_zeros=get(schema.S2_ZEROS),
                   szeros=get(schema.S1_SZEROS), bias=get(schema.BIAS))


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
    scale = torch.where(amax > 0, amax * (1.0 / INT8_MAX), torch.ones_like(amax))
    q = torch.round(xf / scale[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    if padded_in > q.shape[1]:
        q = torch.nn.functional.pad(q, (0, padded_in - q.shape[1]))
    qsum = q.to(torch.int32).sum(dim=1, dtype=torch.int32) if with_qsum else None
    return QuantAct(q=q.contiguous(), scale=scale, qsum=qsum)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF RMSNorm in fp32: x / sqrt(mean(x^2) + eps) * weight (fp32 result). The mean of squares is summed in
    fp64 and rounded once to fp32, and sqrt / division are IEEE (not an approximate rsqrt), so any summation
    order gives the same bits: the kernel twin matches exactly. The INT8 quantizer that follows is
    discontinuous, and a one-ulp difference here flips a code that grows through the layers (a 1-ulp nudge
    moves whole-model logits by ~17 % relative on SmolLM2; scripts/logits_sensitivity.py)."""
    xf = x.float()
    ms = (xf.double().square().sum(-1, keepdim=True) / x.shape[-1]).float()
    return xf * (1.0 / torch.sqrt(ms + eps)) * weight.float()


def rmsnorm_quantize(x: torch.Tensor, weight: torch.Tensor, eps: float, padded_in: int,
                     with_qsum: bool = False) -> QuantAct:
    """Fused RMSNorm + per-token INT8 quantization (one pass over the row in the kernel)."""
    return quantize_act(rmsnorm(x, weight, eps), padded_in, with_qsum)


def add_rmsnorm_quantize(x: torch.Tensor, res: torch.Tensor, weight: torch.Tensor, eps: float, padded_in: int,
                         with_qsum: bool = False) -> QuantAct:
    """The residual add x += res (in place, in x's dtype) fused with rmsnorm_quantize of the sum."""
    x.add_(res)
    return rmsnorm_quantize(x, weight, eps, padded_in, with_qsum)


def silu_mul_quantize(gate: torch.Tensor, up: torch.Tensor, padded_in: int, with_qsum: bool = False) -> QuantAct:
    """SiLU(gate) * up in fp32, then per-token INT8 quantization (the down_proj input)."""
    g = gate.float()
    return quantize_act(g * torch.sigmoid(g) * up.float(), padded_in, with_qsum)


def int8_weight(w: QLinear) -> torch.Tensor:
    """The int8 [Np, Kp] operand the tensor cores see: q*s2 - z (per-group) or q (per-channel)."""
    q = unpack_weight(w.qweight)
    if w.per_channel:
        return int8_operand(q, None, None, w.group_size)
    return int8_operand(q, unpack_group_params(w.s2_scales), -unpack_group_params(w.s2_zeros).to(torch.int32),
                        w.group_size)


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


# ---- KV4 cache ----------------------------------------------------------------------------------------
# Per token, per KV head, asymmetric UINT4 after RoPE (ARCHITECTURE.md, "The integer scheme"), scale and zero
# stored in fp16:
#   scale = (max - min) * (1/15) (1 when max == min), zero = -min / scale, both rounded to fp16;
#   q = clamp(round_half_even(x / scale16 + zero16), 0, 15);  x_hat = (q - zero16) * scale16.
# Two values per byte: element 2i in the low nibble, 2i+1 in the high nibble.
# The cache is preallocated per batch slot: codes uint8 [B, Hkv, T_max, D/2], scale/zero fp16 [B, Hkv, T_max].

@dataclass
class KV4Cache:
    k: torch.Tensor  # uint8 [B, Hkv, T_max, D/2]
    k_scale: torch.Tensor  # fp16 [B, Hkv, T_max]
    k_zero: torch.Tensor  # fp16 [B, Hkv, T_max]
    v: torch.Tensor
    v_scale: torch.Tensor
    v_zero: torch.Tensor

    @classmethod
    def empty(cls, batch: int, kv_heads: int, max_len: int, head_dim: int, device="cpu") -> "KV4Cache":
        codes = lambda: torch.zeros(batch, kv_heads, max_len, head_dim // 2, dtype=torch.uint8, device=device)
        halves = lambda: torch.zeros(batch, kv_heads, max_len, dtype=torch.float16, device=device)
        return cls(codes(), halves(), halves(), codes(), halves(), halves())


def kv4_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [..., D] -> (codes uint8 [..., D/2], scale fp16 [...], zero fp16 [...])."""
    xf = x.float()
    lo, hi = xf.amin(-1), xf.amax(-1)
    scale = torch.where(hi > lo, (hi - lo) * (1.0 / 15), torch.ones_like(hi)).to(torch.float16)
    zero = (-lo / scale.float()).to(torch.float16)
    q = torch.round(xf / scale.float()[..., None] + zero.float()[..., None]).clamp(0, 15).to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4), scale, zero


def kv4_dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Inverse of `kv4_quantize` up to rounding: fp32 [..., D]."""
    q = torch.stack((codes & 0xF, codes >> 4), dim=-1).flatten(-2).float()
    return (q - zero.float()[..., None]) * scale.float()[..., None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (HF Llama convention) on x [B, H, T, D] with cos/sin [B, T, D]; fp32 math."""
    xf = x.float()
    half = xf.shape[-1] // 2
    rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    return (xf * cos[:, None].float() + rotated * sin[:, None].float()).to(x.dtype)


def kv4_append(cache: KV4Cache, k: torch.Tensor, v: torch.Tensor, start: torch.Tensor) -> None:
    """Quantize post-RoPE k, v [B, Hkv, T, D] into cache positions start[b] .. start[b]+T-1."""
    kq, ks, kz = kv4_quantize(k)
    vq, vs, vz = kv4_quantize(v)
    t = k.shape[2]
    for b, s in enumerate(start.tolist()):
        sl = slice(s, s + t)
        cache.k[b, :, sl], cache.k_scale[b, :, sl], cache.k_zero[b, :, sl] = kq[b], ks[b], kz[b]
        cache.v[b, :, sl], cache.v_scale[b, :, sl], cache.v_zero[b, :, sl] = vq[b], vs[b], vz[b]


def decode_attention_kv4(q: torch.Tensor, cache: KV4Cache, lengths: torch.Tensor, sm_scale: float) -> torch.Tensor:
    """One new query per sequence, q [B, Hq, D], over the first lengths[b] cached tokens (GQA): [B, Hq, D]."""
    b, hq, d = q.shape
    hkv = cache.k.shape[1]
    t_max = int(lengths.max())
    k = kv4_dequantize(cache.k[:, :, :t_max], cache.k_scale[:, :, :t_max], cache.k_zero[:, :, :t_max])
    v = kv4_dequantize(cache.v[:, :, :t_max], cache.v_scale[:, :, :t_max], cache.v_zero[:, :, :t_max])
    k = k.repeat_interleave(hq // hkv, dim=1)
    v = v.repeat_interleave(hq // hkv, dim=1)
    scores = torch.einsum("bhd,bhtd->bht", q.float(), k) * sm_scale
    valid = torch.arange(t_max, device=q.device)[None, :] < lengths[:, None].to(q.device)
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    return torch.einsum("bht,bhtd->bhd", scores.softmax(-1), v).to(q.dtype)
