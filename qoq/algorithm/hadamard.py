"""Deterministic normalized Hadamard matrices (pure tensor math).

`hadamard(n)` returns an orthogonal matrix H / sqrt(n) for every n = 2^a * m where a Hadamard matrix
of order m can be built here:

- m = 1 (Sylvester: powers of two),
- Paley I: m = p + 1 for a prime p = 3 (mod 4)
  (12, 20, 24, 32, 44, 48, 60, 68, 72, 80, 84, 104, 108, 128, 132, 140, ...),
- Paley II: m = 2 (p + 1) for a prime p = 1 (mod 4)  (12, 28, 36, 60, 76, 108, 148, 196, ...),
- Williamson: m = 4 w for the few orders w whose Williamson-type base sequences are stored below
  (13 -> 52, 39 -> 156, 43 -> 172; first rows as published in M. Hall, Combinatorial Theory (1983)
  and in the Longyear/Holzmann-Kharaghani-Tayfeh-Rezaie tables).

The construction is Kronecker: H_n = H_{2^a} (x) H_m with the smallest such m. Everything is built
exactly in integers and cached; the result is float64 (callers cast). Sizes this cannot build raise
a ValueError that names the size and what is supported.

Common model sizes: 576 = 36 * 16, 960 = 60 * 16, 1536 = 12 * 128, 3584 = 28 * 128, 5120 = 20 * 256,
8960 = 140 * 64, 11008 = 172 * 64, 14336 = 28 * 512, 18944 = 148 * 128, head_dim 64/80/96/128.
"""
from __future__ import annotations

from functools import lru_cache

import torch

# Williamson-type base sequences (first rows of four circulant matrices A, B, C, D with
# A A^T + B B^T + C C^T + D D^T = 4 w I); the Hadamard matrix is the Williamson array below.
_WILLIAMSON = {
    13: ("++++-+--+-+++", "+---+-++-+---", "++---+--+---+", "++---+--+---+"),
    39: ("+++--+-+-----+--++----++--+-----+-+--++", "+++--++-+---+-+--+----+--+-+---+-++--++",
         "++++---+--++----+-+--+-+----++--+---+++", "+---++-+-+-----+++-++-+++-----+-+-++---"),
    43: ("++---++++-+--+--++--------++--+--+-++++---+", "+++-+-++--+-+-++++-+----+-++++-+-+--++-+-++",
         "++-++++++----+-+--++-++-++--+-+----++++++-+", "+---++--++++-+-+++-++--++-+++-+-++++--++---"),
}


def hadamard(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The normalized (orthogonal) deterministic Hadamard matrix of order n, as `dtype` [n, n]."""
    return (_hadamard_int(n).to(torch.float64) / float(n) ** 0.5).to(dtype)


@lru_cache(maxsize=64)
def _hadamard_int(n: int) -> torch.Tensor:
    pow2, m = _decompose(n)
    h = _base(m)
    s = torch.ones(1, 1, dtype=torch.int64)
    h2 = torch.tensor([[1, 1], [1, -1]], dtype=torch.int64)
    while s.shape[0] < pow2:
        s = torch.kron(s, h2)
    return torch.kron(s, h)


def _decompose(n: int) -> tuple[int, int]:
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"Hadamard size must be a positive integer, got {n!r}")
    if n in (1, 2):
        return n, 1
    if n % 4:
        raise ValueError(f"no Hadamard matrix of order {n} exists (orders above 2 are multiples of 4)")
    pow2 = n & -n
    # try the smallest factor first: m = n / 2^a with a as large as possible
    while pow2 >= 1:
        m = n // pow2
        if _constructible(m):
            return pow2, m
        pow2 //= 2
    raise ValueError(
        f"cannot build a Hadamard matrix of order {n}: it must be 2^a * m with m = 1, p+1 (p prime = 3 mod 4), "
        f"2(p+1) (p prime = 1 mod 4) or 4w for w in {sorted(_WILLIAMSON)}")


def _constructible(m: int) -> bool:
    if m == 1:
        return True
    if m % 4:
        return False
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
        return True
    if m % 2 == 0 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return True
    return m // 4 in _WILLIAMSON


def _base(m: int) -> torch.Tensor:
    if m == 1:
        return torch.ones(1, 1, dtype=torch.int64)
    p = m - 1
    if _is_prime(p) and p % 4 == 3:
        return _paley1(p)
    p = m // 2 - 1
    if _is_prime(p) and p % 4 == 1:
        return _paley2(p)
    return _williamson(m // 4)


def _jacobsthal(p: int) -> torch.Tensor:
    """Q[a, b] = chi(a - b) for the quadratic character chi of GF(p), p prime."""
    squares = torch.zeros(p, dtype=torch.bool)
    squares[(torch.arange(1, p) ** 2) % p] = True
    chi = torch.where(squares, 1, -1).to(torch.int64)
    chi[0] = 0
    idx = (torch.arange(p)[:, None] - torch.arange(p)[None, :]) % p
    return chi[idx]


def _paley1(p: int) -> torch.Tensor:
    """Order p + 1, p prime = 3 mod 4: H = I + S with S = [[0, 1^T], [-1, Q]] skew-symmetric."""
    q = _jacobsthal(p)
    s = torch.zeros(p + 1, p + 1, dtype=torch.int64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = q
    return s + torch.eye(p + 1, dtype=torch.int64)


def _paley2(p: int) -> torch.Tensor:
    """Order 2(p + 1), p prime = 1 mod 4: C = [[0, 1^T], [1, Q]] symmetric conference matrix,
    H = C (x) [[1, 1], [1, -1]] + I (x) [[1, -1], [-1, -1]]."""
    q = _jacobsthal(p)
    c = torch.zeros(p + 1, p + 1, dtype=torch.int64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = q
    a = torch.tensor([[1, 1], [1, -1]], dtype=torch.int64)
    b = torch.tensor([[1, -1], [-1, -1]], dtype=torch.int64)
    return torch.kron(c, a) + torch.kron(torch.eye(p + 1, dtype=torch.int64), b)


def _williamson(w: int) -> torch.Tensor:
    """Order 4w from four circulant matrices through the Williamson array."""
    a, b, c, d = (_circulant(torch.tensor([1 if ch == "+" else -1 for ch in row], dtype=torch.int64))
                  for row in _WILLIAMSON[w])
    return torch.cat([
        torch.cat([a, b, c, d], dim=1),
        torch.cat([-b, a, -d, c], dim=1),
        torch.cat([-c, d, a, -b], dim=1),
        torch.cat([-d, -c, b, a], dim=1),
    ], dim=0)


def _circulant(row: torch.Tensor) -> torch.Tensor:
    n = row.numel()
    idx = (torch.arange(n)[None, :] - torch.arange(n)[:, None]) % n
    return row[idx]


def _is_prime(x: int) -> bool:
    if x < 2:
        return False
    i = 2
    while i * i <= x:
        if x % i == 0:
            return False
        i += 1
    return True
