"""Simulated ("fake") quantization with exactly the runtime's integer semantics, for searches and tests.

Weights go through the real progressive quantizer and its dequantization; activations through the
per-token INT8 rule of `qoq.scheme.ops.quantize_act`; K/V through `ops.kv4_quantize`.
"""
from __future__ import annotations

import torch

from qoq.scheme.progressive import dequantize, quantize_weight
from qoq.scheme import ops


def fake_weight(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """W_hat (fp32, same shape) of round-to-nearest progressive quantization."""
    return dequantize(quantize_weight(weight, group_size))


def fake_act8(x: torch.Tensor) -> torch.Tensor:
    """Per-token (last dim) symmetric INT8 quantize-dequantize of x [..., K], fp32: the integers and scale
    of `ops.quantize_act`, as the runtime quantizes linear inputs."""
    shape = x.shape
    a = ops.quantize_act(x.reshape(-1, shape[-1]), shape[-1])
    return (a.q.float() * a.scale[:, None]).reshape(shape)


def fake_kv4(x: torch.Tensor) -> torch.Tensor:
    """Per-token, per-head (last dim) asymmetric UINT4 quantize-dequantize of x [..., D], fp32: the KV4
    cache's `kv4_dequantize(*kv4_quantize(x))`."""
    return ops.kv4_dequantize(*ops.kv4_quantize(x))
