"""Weight-clip search for per-channel (g = -1) quantization (ARCHITECTURE.md, "The QoQ recipe").

For each output channel n, the quantization range [min, max] of the row is shrunk by a ratio r from
a grid over [0.8, 1.0]; the ratio kept is the one with the smallest output error on the calibration
inputs, ||X (w_n - w_hat_n(r))||^2 = d^T H d with H = X^T X (the linear's input Hessian up to a
constant), so the search never touches the (large) calibration activations themselves.
"""
from __future__ import annotations

import torch

from qoq.scheme.progressive import QuantizedWeight, pad_weight, per_channel_params

DEFAULT_RATIOS = tuple(round(1.0 - 0.01 * i, 2) for i in range(21))  # 1.00, 0.99, ..., 0.80


def quantize_per_channel(weight: torch.Tensor, ratios: torch.Tensor | None = None) -> QuantizedWeight:
    """Round-to-nearest per-channel UINT4 with each row's range [min, max] scaled by ratios[n]."""
    n, k = weight.shape
    w = pad_weight(weight.detach().float(), -1)
    lo, hi = _row_range(w, ratios, n)
    s1, zero, szeros = per_channel_params(lo, hi)
    q = torch.round(w / s1.float()[:, None] + zero[:, None]).clamp(0, 15).to(torch.uint8)
    return QuantizedWeight(q=q, s1=s1, group_size=-1, out_features=n, in_features=k, szeros=szeros)


@torch.no_grad()
def search_clip_ratios(weight: torch.Tensor, hessian: torch.Tensor, ratios=DEFAULT_RATIOS) -> torch.Tensor:
    """Per-row clip ratio [N] (from `ratios`) minimising d^T H d, d = w - dequant(quant(w; r))."""
    n, k = weight.shape
    w = weight.detach().float()
    h = hessian.to(device=w.device, dtype=torch.float32)
    best_err = torch.full((n,), float("inf"), device=w.device)
    best = torch.ones(n, device=w.device)
    for r in ratios:
        rr = torch.full((n,), float(r), device=w.device)
        d = w - _dequant_rows(quantize_per_channel(w, rr))
        err = ((d @ h) * d).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, rr, best)
    return best


def _dequant_rows(qw: QuantizedWeight) -> torch.Tensor:
    w = qw.q.float() * qw.s1.float()[:, None] - qw.szeros.float()[:, None]
    return w[: qw.out_features, : qw.in_features]


def _row_range(w: torch.Tensor, ratios: torch.Tensor | None, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    lo = w.amin(dim=1).clamp(max=0)
    hi = w.amax(dim=1).clamp(min=0)
    if ratios is not None:
        r = torch.ones(w.shape[0], device=w.device)
        r[:n] = ratios.to(device=w.device, dtype=torch.float32)
        lo, hi = lo * r, hi * r
    return lo, hi
