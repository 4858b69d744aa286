"""SmoothAttention (ARCHITECTURE.md, "The integer scheme"): move key outliers into the (unquantized) queries before KV4.

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


# ---- (alpha, beta) search --------------------------------------------------------------------------------

def smooth_attention_grid(step: float = 0.1) -> list[tuple[float, float]]:
    """Candidates (0, 0), (a, 0) and (a, 1 - a) for a = step, 2*step, ..., < 1 (the authors' beta = -2 grid)."""
    n = int(round(1.0 / step))
    grid = [(0.0, 0.0)]
    for i in range(1, n):
        a = round(i * step, 4)
        grid += [(a, 0.0), (a, round(1.0 - a, 4))]
    return grid


def _rope_paired_span(absmax: torch.Tensor, head_dim: int) -> torch.Tensor:
    span = absmax.float().view(-1, 2, head_dim // 2).amax(dim=1)
    return torch.cat((span, span), dim=1).flatten()


def smooth_attention_scales_ab(key_absmax: torch.Tensor, query_absmax: torch.Tensor, alpha: float, beta: float,
                               head_dim: int, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """lambda [Hkv*D] = max|K|^alpha / max|Q|^beta, RoPE pairs sharing one value; the query span of a KV
    channel is the max over the query heads of its GQA group. Zero / non-finite entries give 1.
    With beta = 0 this equals `smooth_attention_scales(key_absmax, alpha, head_dim)`."""
    k = _rope_paired_span(key_absmax, head_dim)
    qspan = query_absmax.float().view(num_kv_heads, num_heads // num_kv_heads, head_dim).amax(dim=1).flatten()
    q = _rope_paired_span(qspan, head_dim)
    lam = k.pow(alpha) / q.pow(beta)
    return torch.where(torch.isfinite(lam) & (lam > 0), lam, torch.ones_like(lam))


@torch.no_grad()
def search_smooth_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_kv_heads: int,
                            query_absmax: torch.Tensor | None = None, key_absmax: torch.Tensor | None = None,
                            grid=None, query_stride: int = 1) -> tuple[float, float, torch.Tensor, dict]:
    """Pick (alpha, beta) minimising the attention output error with K and V in 4 bits (KV4 cache rule).

    q [B, H, T, D], k / v [B, Hkv, T, D]: post-RoPE calibration queries / keys and values (causal
    attention over T). The absmax statistics default to those of q / k. `query_stride` > 1 scores every
    stride-th query position only (each still attends to all its keys), to make the search cheaper.
    Returns (alpha, beta, lambda, {candidate: relative error}).
    """
    from qoq.scheme.fakequant import fake_kv4

    b, h, t, d = q.shape
    rep = num_heads // num_kv_heads
    if query_absmax is None:
        query_absmax = q.abs().amax(dim=(0, 2)).flatten()
    if key_absmax is None:
        key_absmax = k.abs().amax(dim=(0, 2)).flatten()
    qpos = torch.arange(0, t, query_stride, device=q.device)
    qf, kf, vf = q[:, :, qpos].float(), k.float(), v.float()
    mask = torch.arange(t, device=q.device)[None, :] <= qpos[:, None]

    def attend(qq, kk, vv):
        kk = kk.repeat_interleave(rep, dim=1)
        vv = vv.repeat_interleave(rep, dim=1)
        s = (qq @ kk.transpose(-1, -2)) * d ** -0.5
        return s.masked_fill(~mask, float("-inf")).softmax(-1) @ vv

    ref = attend(qf, kf, vf)
    ref_norm = ref.norm().clamp_min(1e-12)
    vq = fake_kv4(vf)
    errors, best = {}, None
    for alpha, beta in (grid or smooth_attention_grid()):
        lam = smooth_attention_scales_ab(key_absmax, query_absmax, alpha, beta, d, num_heads, num_kv_heads)
        lam = lam.to(q.device)
        lam_k = lam.view(1, num_kv_heads, 1, d)
        lam_q = lam_k.repeat_interleave(rep, dim=1)
        out = attend(qf * lam_q, fake_kv4(kf / lam_k), vq)
        e = float((out - ref).norm() / ref_norm)
        errors[f"{alpha:g},{beta:g}"] = e
        if best is None or e < best[0]:
            best = (e, alpha, beta, lam)
    _, alpha, beta, lam = best
    return alpha, beta, lam, errors
