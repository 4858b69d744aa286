"""Progressive group quantization of one weight matrix (ARCHITECTURE.md, "The integer scheme"). Pure tensor math.

Per-group (g = 32/64/128): level 1 is per-output-channel symmetric INT8 inside the protective range
[-119, 119]; level 2 quantizes those real-valued INT8-domain values per group of g input channels to
UINT4 with an *integer* scale s2 and an integer zero z, so the runtime can dequantize INT4 -> INT8
with one packed multiply and one byte-wise add and apply the fp16 scale s1 only in the epilogue:

    W_hat = s1[n] * (q[n,k] * s2[n,k/g] - z[n,k/g])          q*s2 - z is always in int8

Per-channel (g = -1): one level of UINT4 asymmetric with fp16 scale s1 and fp16 s1_szeros = z*s1:

    W_hat = q[n,k] * s1[n] - s1_szeros[n]

The input dimension is zero-padded to a multiple of the group (and of 32, the kernel's k-tile) and
the output dimension to a multiple of 32 (the kernel's n-tile); padding is sliced off in `dequantize`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

PROTECTIVE_RANGE = 119
PER_CHANNEL = -1  # the group size of per-channel weights: one level, no groups
SUPPORTED_GROUP_SIZES = (32, 64, 128, PER_CHANNEL)
TILE = 32  # the kernel layout's tile edge along both N and K


@dataclass
class QuantizedWeight:
    """The integers and scales of one quantized linear, in natural (unpacked) order."""

    q: torch.Tensor  # uint8 [Np, Kp], values 0..15
    s1: torch.Tensor  # fp16 [Np]
    group_size: int  # 32/64/128, or -1 for per-channel
    out_features: int  # N before padding
    in_features: int  # K before padding
    s2: torch.Tensor | None = None  # int8 [Np, Kp/g], values 1..16 (per-group only)
    z: torch.Tensor | None = None  # int8 [Np, Kp/g], level-2 zero in INT8 units (per-group only)
    szeros: torch.Tensor | None = None  # fp16 [Np], z*s1 (per-channel only)

    def int8_weight(self) -> torch.Tensor:
        """Per-group only: the INT8 operand `q*s2 - z` [Np, Kp] that the GEMM's tensor cores see."""
        assert self.group_size > 0
        return int8_operand(self.q, self.s2, self.z, self.group_size)


def int8_operand(q: torch.Tensor, s2: torch.Tensor | None, z: torch.Tensor | None, group_size: int) -> torch.Tensor:
    """The int8 [Np, Kp] operand the tensor cores see, from codes q [Np, Kp] and the level-2 s2, z [Np, Kp/g]:
    `q*s2 - z` per group (in int8 by the protective range), the codes themselves per channel."""
    if is_per_channel(group_size):
        return q.to(torch.int8)
    s2 = s2.to(torch.int32).repeat_interleave(group_size, dim=1)
    z = z.to(torch.int32).repeat_interleave(group_size, dim=1)
    return (q.to(torch.int32) * s2 - z).to(torch.int8)


def padded_dims(out_features: int, in_features: int, group_size: int) -> tuple[int, int]:
    """(Np, Kp): N rounded up to the tile, K rounded up to the group and to the tile."""
    k_multiple = max(group_size, TILE) if group_size > 0 else TILE
    return _round_up(out_features, TILE), _round_up(in_features, k_multiple)


def quantize_weight(weight: torch.Tensor, group_size: int = 128) -> QuantizedWeight:
    """Round-to-nearest progressive quantization of `weight` [N, K]."""
    check_group_size(group_size)
    n, k = weight.shape
    w = pad_weight(weight.detach().float(), group_size)
    if is_per_channel(group_size):
        return _quantize_per_channel(w, n, k)
    s1 = level1_scales(w)
    x = level1_values(w, s1)
    s2, z = level2_params(x, group_size)
    q = level2_quantize(x, s2, z, group_size)
    return QuantizedWeight(q=q, s1=s1, group_size=group_size, out_features=n, in_features=k, s2=s2, z=z)


def dequantize(qw: QuantizedWeight) -> torch.Tensor:
    """W_hat [N, K] in fp32, exactly as the runtime reconstructs it."""
    if is_per_channel(qw.group_size):
        w = qw.q.float() * qw.s1.float()[:, None] - qw.szeros.float()[:, None]
    else:
        w = qw.s1.float()[:, None] * qw.int8_weight().float()
    return w[: qw.out_features, : qw.in_features]


def is_per_channel(group_size: int) -> bool:
    return group_size == PER_CHANNEL


def group_label(group_size: int) -> str:
    """'g128', or 'gchn' for per-channel: how names and tables show a group size."""
    return "gchn" if is_per_channel(group_size) else f"g{group_size}"


def group_size_problem(group_size) -> str | None:
    """What is wrong with `group_size` ("is not one of ..."), or None when the scheme supports it."""
    if isinstance(group_size, bool) or group_size not in SUPPORTED_GROUP_SIZES:
        return "is not one of 32, 64, 128 or -1 (per-channel)"
    return None


def check_group_size(group_size: int) -> None:
    problem = group_size_problem(group_size)
    if problem:
        raise ValueError(f"group size {group_size!r} {problem}")


def pad_weight(w: torch.Tensor, group_size: int) -> torch.Tensor:
    n, k = w.shape
    np_, kp = padded_dims(n, k, group_size)
    if (np_, kp) == (n, k):
        return w
    return torch.nn.functional.pad(w, (0, kp - k, 0, np_ - n))


# ---- level 1: per-channel symmetric INT8 inside the protective range -------------------------------

def level1_scales(w: torch.Tensor) -> torch.Tensor:
    """s1[n] = max_k |W[n,k]| / 119 in fp16; all-zero rows get the smallest normal fp16 scale."""
    s1 = (w.abs().amax(dim=1) / PROTECTIVE_RANGE).to(torch.float16)
    return torch.where(s1 > 0, s1, torch.tensor(torch.finfo(torch.float16).tiny, dtype=torch.float16))


def level1_values(w: torch.Tensor, s1: torch.Tensor) -> torch.Tensor:
    """Real-valued INT8-domain weights x = clamp(W / s1, -119, 119); not rounded (level 2 rounds)."""
    return (w / s1.float()[:, None]).clamp(-PROTECTIVE_RANGE, PROTECTIVE_RANGE)


# ---- level 2: per-group UINT4 with integer scale and zero ------------------------------------------

def level2_params(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer s2 = max(1, round(span/15)) and z = round(-min) per group, as int8 [N, K/g]."""
    groups = x.reshape(x.shape[0], -1, group_size)
    lo, hi = groups.amin(dim=2), groups.amax(dim=2)
    return level2_params_from_range(lo, hi)


def level2_params_from_range(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s2 = torch.round((hi - lo) / 15).clamp(min=1)
    z = torch.round(-lo)
    return s2.to(torch.int8), z.to(torch.int8)


def level2_quantize(x: torch.Tensor, s2: torch.Tensor, z: torch.Tensor, group_size: int) -> torch.Tensor:
    """q = clamp(round((x + z) / s2), 0, 15) as uint8, same shape as x."""
    s2f = s2.float().repeat_interleave(group_size, dim=1)
    zf = z.float().repeat_interleave(group_size, dim=1)
    return torch.round((x + zf) / s2f).clamp(0, 15).to(torch.uint8)


# ---- per-channel: single-level UINT4 asymmetric ------------------------------------------------------

def per_channel_params(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(s1 fp16, integer zero as float, s1_szeros fp16) for rows whose range is [lo, hi] (lo <= 0 <= hi)."""
    s1 = ((hi - lo) / 15).to(torch.float16)
    s1 = torch.where(s1 > 0, s1, torch.tensor(torch.finfo(torch.float16).tiny, dtype=torch.float16))
    zero = torch.round(-lo / s1.float()).clamp(0, 15)
    return s1, zero, (zero * s1.float()).to(torch.float16)


def _quantize_per_channel(w: torch.Tensor, n: int, k: int) -> QuantizedWeight:
    lo = w.amin(dim=1).clamp(max=0)
    hi = w.amax(dim=1).clamp(min=0)
    s1, zero, szeros = per_channel_params(lo, hi)
    q = torch.round(w / s1.float()[:, None] + zero[:, None]).clamp(0, 15).to(torch.uint8)
    return QuantizedWeight(q=q, s1=s1, group_size=-1, out_features=n, in_features=k, szeros=szeros)


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m
