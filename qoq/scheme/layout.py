"""Kernel layout of packed 4-bit weights and level-2 scales ("qserve-mma-m16n8k32-v1").

The W4A8 GEMM feeds `mma.sync.m16n8k32.row.col.s32.s8.s8.s32` with B fragments loaded straight from
global memory: one 16-byte load per lane per 32x32 (n x k) weight tile. Index decomposition:

    n = 32*nt + 16*a + 8*b + c      a: nibble half, b: n8 sub-tile, c = lane / 4
    k = 32*kt + 16*p + 4*l + r      p: k16 half, l = lane % 4, r: byte within a 32-bit register

Bytes are ordered (nt, kt, c, l, p, b, r) and each byte holds row a=0 in its low nibble and a=1 in
its high nibble, so each tile is 512 contiguous bytes and lane t = 4c + l owns bytes 16t..16t+15.
Level-2 scales/zeros are stored group-major [K/g, N] with the columns of every 32 interleaved so
that position 4c + j holds channel c + 8j: a lane reads its four channels with one 32-bit load.
"""
from __future__ import annotations

import torch

LAYOUT_NAME = "qserve-mma-m16n8k32-v1"

# (nt, a, b, c, kt, p, l, r) -> (nt, kt, c, l, p, b, r, a)
_TO_TILES = (0, 4, 3, 6, 5, 2, 7, 1)
_FROM_TILES = tuple(_TO_TILES.index(i) for i in range(8))


def pack_weight(q: torch.Tensor) -> torch.Tensor:
    """uint8 nibbles [N, K] (N, K multiples of 32) -> int8 [N, K/2] in the kernel's tile order."""
    n, k = _check_tiled(q)
    t = q.to(torch.uint8).reshape(n // 32, 2, 2, 8, k // 32, 2, 4, 4).permute(_TO_TILES)
    packed = t[..., 0] | (t[..., 1] << 4)
    return packed.reshape(n, k // 2).view(torch.int8)


def unpack_weight(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_weight`: int8 [N, K/2] -> uint8 nibbles [N, K]."""
    n, half_k = packed.shape
    k = 2 * half_k
    _check_tiled(torch.empty(n, k, device="meta"))
    b = packed.view(torch.uint8).reshape(n // 32, k // 32, 8, 4, 2, 2, 4)
    t = torch.stack((b & 0xF, b >> 4), dim=-1)
    return t.permute(_FROM_TILES).reshape(n, k)


def pack_group_params(p: torch.Tensor) -> torch.Tensor:
    """Per-group int8 [N, G] (natural) -> [G, N] group-major with the 0,8,16,24,1,9,... interleave."""
    n, g = p.shape
    if n % 32:
        raise ValueError(f"out_features {n} is not a multiple of 32")
    return p.t().reshape(g, n // 32, 4, 8).transpose(-2, -1).reshape(g, n).contiguous()


def unpack_group_params(p: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_group_params`: [G, N] interleaved -> [N, G] natural."""
    g, n = p.shape
    return p.reshape(g, n // 32, 8, 4).transpose(-2, -1).reshape(g, n).t().contiguous()


def _check_tiled(q: torch.Tensor) -> tuple[int, int]:
    n, k = q.shape
    if n % 32 or k % 32:
        raise ValueError(f"weight shape {tuple(q.shape)} is not a multiple of the 32x32 tile")
    return n, k
