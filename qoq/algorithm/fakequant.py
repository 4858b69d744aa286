"""Simulated ("fake") quantization with exactly the runtime's integer semantics, for searches and tests.

Weights go through the real progressive quantizer and its dequantization; activations through the
per-token INT8 rule of `qoq.runtime.ops.quantize_act`; K/V through `ops.kv4_quantize`.
"""
from __future__ import annotations

import torch

from qoq.algorithm.progressive import dequantize, quantize_weight
from qoq.runtime.ops import INT8_MAX, kv4_dequantize, kv4_quantize


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
    """Per-token, per-head (last dim) asymmetric UINT4 with fp16 scale/zero, as the KV4 cache stores it."""
    return kv4_dequantize(*kv4_quantize(x))
