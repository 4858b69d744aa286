"""SmoothQuant-style smoothing of down_proj's inputs, folded into up_proj's rows (ARCHITECTURE.md, "The QoQ recipe").

Per input channel c of down_proj:  s_c = max_t |X[t,c]|^alpha / max_n |W[n,c]|^(1-alpha).
down_proj columns are multiplied by s and up_proj rows divided by it: since the down_proj input is
SiLU(gate) * up, dividing up's output channel c by s_c divides X[:, c] by s_c, and the product
X W^T is unchanged. alpha comes from a small grid that minimises the MLP output error with the
down_proj weight quantized (progressive, the artifact's group size) and its inputs quantized to
per-token INT8. up_proj's quantization error is invariant to the row scaling (its level-1 scale is
per output row), so only down_proj is re-quantized per candidate.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from qoq.scheme.fakequant import fake_act8, fake_weight

DEFAULT_ALPHAS = tuple(round(0.05 * i, 2) for i in range(11))  # 0, 0.05, ..., 0.5


@dataclass
class SmoothChoice:
    alpha: float | None  # None: no smoothing won (s = 1)
    scales: torch.Tensor  # [K], ones when alpha is None
    errors: dict = field(default_factory=dict)  # candidate -> relative output error


def smooth_scales(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = max|X|^alpha / max|W|^(1-alpha) per input channel; zero or non-finite entries give 1."""
    x = x_absmax.double().clamp_min(1e-5)
    w = w_absmax.double().clamp_min(1e-5)
    s = x.pow(alpha) / w.pow(1.0 - alpha)
    s = torch.where(torch.isfinite(s) & (s > 0), s, torch.ones_like(s))
    return s.float()


@torch.no_grad()
def search_down_smoothing(x: torch.Tensor, weight: torch.Tensor, x_absmax: torch.Tensor, group_size: int,
                          alphas=DEFAULT_ALPHAS) -> SmoothChoice:
    """Choose alpha for down_proj from sampled inputs x [T, K] (fp) and its weight [N, K].

    `x_absmax` [K] is the per-channel max |input| over the whole calibration set. Candidates are
    `alphas` plus "no smoothing"; the winner has the smallest ||X W^T - Q8(X/s) Q4(W s)^T||.
    """
    x = x.reshape(-1, x.shape[-1]).float()
    w = weight.float()
    ref = x @ w.t()
    ref_norm = ref.norm().clamp_min(1e-12)
    w_absmax = w.abs().amax(dim=0)

    def error(s: torch.Tensor) -> float:
        y = fake_act8(x / s) @ fake_weight(w * s[None, :], group_size).t()
        return float((y - ref).norm() / ref_norm)

    ones = torch.ones(w.shape[1], device=w.device)
    best = SmoothChoice(alpha=None, scales=ones, errors={"none": error(ones)})
    best_err = best.errors["none"]
    for a in alphas:
        s = smooth_scales(x_absmax.to(w.device), w_absmax, a)
        e = error(s)
        best.errors[f"{a:g}"] = e
        if e < best_err:
            best_err, best.alpha, best.scales = e, float(a), s
    return best


@torch.no_grad()
def apply_down_smoothing(up_proj: torch.nn.Linear, down_proj: torch.nn.Linear, s: torch.Tensor) -> None:
    """up_proj rows (and bias) /= s, down_proj columns *= s (exact in real arithmetic)."""
    sd = s.double().to(up_proj.weight.device)
    up_proj.weight.data.copy_((up_proj.weight.double() / sd[:, None]).to(up_proj.weight.dtype))
    if up_proj.bias is not None:
        up_proj.bias.data.copy_((up_proj.bias.double() / sd).to(up_proj.bias.dtype))
    sd = sd.to(down_proj.weight.device)
    down_proj.weight.data.copy_((down_proj.weight.double() * sd[None, :]).to(down_proj.weight.dtype))
