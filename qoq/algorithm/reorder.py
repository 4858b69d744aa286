"""Activation-aware channel reordering of down_proj's inputs (per-group only; ARCHITECTURE.md, "The QoQ recipe").

Input channels are sorted by their calibration max |X| so that each quantization group of g
consecutive channels holds channels of similar salience. The permutation is folded offline into
down_proj's input columns and into the output rows of gate_proj and up_proj (whose elementwise
product SiLU(gate) * up is down_proj's input), so the model computes exactly the same function.
"""
from __future__ import annotations

import torch


def channel_order(x_absmax: torch.Tensor) -> torch.Tensor:
    """Permutation (int64 [K]) putting channels in descending order of max |X| (stable, deterministic)."""
    return torch.sort(x_absmax.float().cpu(), descending=True, stable=True).indices


@torch.no_grad()
def apply_down_reorder(gate_proj: torch.nn.Linear, up_proj: torch.nn.Linear, down_proj: torch.nn.Linear,
                       perm: torch.Tensor) -> None:
    """New channel c is old channel perm[c]: gate/up rows (and biases) and down columns permuted."""
    for lin in (gate_proj, up_proj):
        p = perm.to(lin.weight.device)
        lin.weight.data.copy_(lin.weight.data[p])
        if lin.bias is not None:
            lin.bias.data.copy_(lin.bias.data[p])
    p = perm.to(down_proj.weight.device)
    down_proj.weight.data.copy_(down_proj.weight.data[:, p])


def permute_hessian(h: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """The input Hessian X^T X of a linear whose input channels were permuted by `perm`."""
    p = perm.to(h.device)
    return h[p][:, p]
