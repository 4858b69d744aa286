"""GPTQ on the 4-bit level of progressive quantization (ARCHITECTURE.md, "The QoQ recipe"), pure tensor math.

Per-group (g = 32/64/128): level 1 is fixed first from the original weights, s1[n] = max|W[n]| / 119
(exactly as round-to-nearest). GPTQ then runs on the level-1 values x = W / s1 (a per-row scaling,
so the Hessian and the error feedback are unchanged): columns are quantized left to right; when a
group starts, its integer s2 / z come from min / max of the group's *current* (error-updated)
level-1 values clamped to [-119, 119], exactly the RTN rule; each column's rounding error is spread
over the not-yet-quantized columns through the Cholesky factor of H^-1 (block 128, lazy batch
updates). The result is the same `QuantizedWeight` RTN returns, so q*s2 - z stays inside int8.

Per-channel (g = -1): scale / zero come from the (optionally clipped) min / max of each row first,
then GPTQ quantizes with them fixed.

H = 2/n sum_t x_t x_t^T over the linear's calibration inputs (`HessianAccumulator`), damped with
0.01 * mean(diag H); channels that never see input are dropped (weight set to 0).
"""
from __future__ import annotations

import torch

from qoq.scheme.progressive import (
    PROTECTIVE_RANGE,
    TILE,
    QuantizedWeight,
    check_group_size,
    is_per_channel,
    level1_scales,
    level2_params_from_range,
    pad_weight,
    per_channel_params,
)

BLOCK = 128
DAMP = 0.01


class HessianAccumulator:
    """Running H = 2/n X^T X over batches of a linear's inputs [..., K] (float64 sums)."""

    def __init__(self, in_features: int, device=None):
        self.h = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        xf = x.float()
        self.h += (xf.t() @ xf).double()
        self.n += x.shape[0]

    @property
    def hessian(self) -> torch.Tensor:
        return self.h * (2.0 / max(self.n, 1))


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, group_size: int = 128, damp: float = DAMP,
                  block: int = BLOCK, clip_ratios: torch.Tensor | None = None) -> QuantizedWeight:
    """GPTQ-quantize `weight` [N, K] given its input Hessian [K, K]; returns a QuantizedWeight."""
    check_group_size(group_size)
    if group_size > 0 and block % group_size:
        raise ValueError(f"GPTQ block {block} must be a multiple of the group size {group_size}")
    n, k = weight.shape
    if hessian.shape != (k, k):
        raise ValueError(f"Hessian must be [{k}, {k}], got {tuple(hessian.shape)}")
    dev = weight.device
    w = pad_weight(weight.detach().float(), group_size)
    np_, kp = w.shape
    h = torch.zeros(kp, kp, dtype=torch.float64, device=dev)
    h[:k, :k] = hessian.to(device=dev, dtype=torch.float64)
    dead = torch.diag(h) <= 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    if group_size > 0:
        s1 = level1_scales(w)
        x = w / s1.float()[:, None]  # GPTQ on the level-1 (INT8-domain) values
        zero_pc = None
    else:
        lo = w.amin(dim=1).clamp(max=0)
        hi = w.amax(dim=1).clamp(min=0)
        if clip_ratios is not None:
            r = torch.ones(np_, device=dev)
            r[:n] = clip_ratios.to(device=dev, dtype=torch.float32)
            lo, hi = lo * r, hi * r
        s1, zero_pc, szeros = per_channel_params(lo, hi)
        x = w

    hinv = _inverse_cholesky(h, damp)
    q = torch.zeros(np_, kp, dtype=torch.uint8, device=dev)
    ng = kp // group_size if group_size > 0 else 0
    s2 = torch.zeros(np_, ng, dtype=torch.int8, device=dev)
    z = torch.zeros(np_, ng, dtype=torch.int8, device=dev)
    s1f = s1.float()
    szf = szeros.float() if is_per_channel(group_size) else None

    for i1 in range(0, kp, block):
        i2 = min(i1 + block, kp)
        x1 = x[:, i1:i2].clone()
        err1 = torch.zeros_like(x1)
        hinv1 = hinv[i1:i2, i1:i2]
        s2f = zf = None
        for j in range(i2 - i1):
            col = i1 + j
            xj = x1[:, j]
            if group_size > 0:
                if col % group_size == 0:
                    grp = x1[:, j:j + group_size].clamp(-PROTECTIVE_RANGE, PROTECTIVE_RANGE)
                    gs, gz = level2_params_from_range(grp.amin(dim=1), grp.amax(dim=1))
                    s2[:, col // group_size], z[:, col // group_size] = gs, gz
                    s2f, zf = gs.float(), gz.float()
                qj = torch.round((xj + zf) / s2f).clamp(0, 15)
                xhat = qj * s2f - zf
            else:
                qj = torch.round(xj / s1f + zero_pc).clamp(0, 15)
                xhat = qj * s1f - szf
            q[:, col] = qj.to(torch.uint8)
            e = (xj - xhat) / hinv1[j, j]
            x1[:, j:] -= e[:, None] * hinv1[j, j:][None, :]
            err1[:, j] = e
        x[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    if group_size > 0:
        return QuantizedWeight(q=q, s1=s1, group_size=group_size, out_features=n, in_features=k, s2=s2, z=z)
    return QuantizedWeight(q=q, s1=s1, group_size=-1, out_features=n, in_features=k, szeros=szeros)


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp*mean(diag H) I)^-1 as float32, with escalating damping."""
    diag_mean = torch.diag(h).mean()
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for factor in (1.0, 10.0, 100.0, 1000.0):
        l, info = torch.linalg.cholesky_ex(h + eye * (damp * factor * diag_mean))
        if int(info) == 0:
            hinv = torch.cholesky_inverse(l)
            u, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0:
                return u.float()
    raise ValueError("GPTQ: the Hessian is not positive definite even with heavy damping")


@torch.no_grad()
def gptq_quantize_many(weights: list[torch.Tensor], hessian: torch.Tensor, group_size: int = 128,
                       clip_ratios: list[torch.Tensor | None] | None = None, **kw) -> list[QuantizedWeight]:
    """GPTQ of several linears that read the same input (q/k/v, gate/up) in one pass: their rows are
    stacked (rows are independent given H), quantized together and split back, each padded on its own."""
    if len(weights) == 1:
        return [gptq_quantize(weights[0], hessian, group_size,
                              clip_ratios=None if clip_ratios is None else clip_ratios[0], **kw)]
    ratios = None
    if clip_ratios is not None and any(r is not None for r in clip_ratios):
        ratios = torch.cat([torch.ones(w.shape[0], device=w.device) if r is None else r.to(w.device).float()
                            for w, r in zip(weights, clip_ratios, strict=True)])
    stacked = gptq_quantize(torch.cat([w.detach() for w in weights]), hessian, group_size, clip_ratios=ratios, **kw)
    out, start = [], 0
    for w in weights:
        out.append(_rows(stacked, start, w.shape[0]))
        start += w.shape[0]
    return out


def _rows(qw: QuantizedWeight, start: int, n: int) -> QuantizedWeight:
    """Rows start..start+n of a QuantizedWeight, re-padded to the tile like a standalone quantization
    (padded rows: q 0, s1 the tiny fp16 scale, s2 1, z 0, szeros 0)."""
    np_ = -(-n // TILE) * TILE
    pad = np_ - n

    def take(t, fill):
        if t is None:
            return None
        part = t[start:start + n]
        if pad:
            part = torch.cat([part, torch.full((pad, *part.shape[1:]), fill, dtype=t.dtype, device=t.device)])
        return part.contiguous()

    tiny = torch.finfo(torch.float16).tiny
    return QuantizedWeight(q=take(qw.q, 0), s1=take(qw.s1, tiny), group_size=qw.group_size, out_features=n,
                           in_features=qw.in_features, s2=take(qw.s2, 1), z=take(qw.z, 0), szeros=take(qw.szeros, 0))
