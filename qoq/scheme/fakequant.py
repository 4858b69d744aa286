"""Simulated ("fake") quantization with exactly the runtime's integer semantics, for searches and tests.

Weights go through the real progressive quantizer and its dequantization; activations through the
per-token INT8 rule of `qoq.scheme.ops.quantize_act`; K/V through `ops.kv4_quantize`.
"""
from __future__ import annotations

import torch

from qoq.scheme.progressive import dequantize, quantize_weight
from qoq.scheme.ops import INT8_MAX


def fake_weight(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """W_hat (fp32, same shape) of round-to-nearest progressive quantization."""
    return dequantize(quantize_weight(weight, group_size))


def fake_act8(x: torch.Tensor) -> torch.Tensor:
    """Per-token (last dim) symmetric INT8, round half to even, as the runtime quantizes linear inputs."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
    return torch.round(xf / scale).clamp(-INT8_MAX, INT8_MAX) * scale


def fake_kv4(x: torch.Tensor) -> torch.Tensor:
    """Per-token, per-head (last dim) asymmetric UINT4 with fp16 scale/zero, as the KV4 cache stores it:
    the same arithmetic as `kv4_dequantize(*kv4_quantize(x))` without packing the nibbles."""
    xf = x.float()
    lo, hi = xf.amin(-1, keepdim=True), xf.amax(-1, keepdim=True)
    scale = torch.where(hi > lo, (hi - lo) / 15, torch.ones_like(hi)).to(torch.float16).float()
    zero = (-lo / scale).to(torch.float16).float()
    q = torch.round(xf / scale + zero).clamp(0, 15)
    return (q - zero) * scale

