"""SmoothAttention (DESIGN.md §3): move key outliers into the (unquantized) queries before KV4.

lambda_i = max_t |K[t, i]|^alpha over post-RoPE calibration keys, with RoPE pairs (i, i + D/2) sharing
one value so the scaling commutes with rotate-half RoPE; q_proj rows are multiplied by lambda (repeated
over the query heads of each KV head under GQA) and k_proj rows divided by it. Logits are unchanged.
"""
from __future__ import annotations

import torch


def smooth_attention_scales(key_absmax: torch.Tensor, alpha: float, head_dim: int) -> torch.Tensor:
    """lambda [Hkv*D] from per-channel post-RoPE max|K| [Hkv*D]; zeros and non-finite values give 1."""
    span = key_absmax.float().view(-1, 2, head_dim // 2).amax(dim=1)  # RoPE pairs share one value
    span = torch.cat((span, span), dim=1).flatten()
    lam = span.pow(alpha)
    return torch.where(torch.isfinite(lam) & (lam > 0), lam, torch.ones_like(lam))


@torch.no_grad()
def fuse_smooth_attention(q_proj: torch.nn.Linear, k_proj: torch.nn.Linear, lam: torch.Tensor,
                          num_heads: int, num_kv_heads: int) -> None:
    """q rows *= lambda (repeated per query head of each KV head), k rows /= lambda; biases too."""
    head_dim = lam.numel() // num_kv_heads
    lam_q = lam.view(num_kv_heads, 1, head_dim).expand(num_kv_heads, num_heads // num_kv_heads, head_dim).flatten()
    _scale_rows(q_proj, lam_q)
    _scale_rows(k_proj, 1.0 / lam)


def _scale_rows(linear: torch.nn.Linear, s: torch.Tensor) -> None:
    s = s.to(linear.weight.device)
    linear.weight.mul_(s.to(linear.weight.dtype)[:, None])
    if linear.bias is not None:
        linear.bias.mul_(s.to(linear.bias.dtype))
