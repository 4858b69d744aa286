"""The pieces of the engine's fast mode (`Engine(..., fast=True)`, the default on CUDA), kept apart from
the decoder loop in qoq.runtime.engine:

- `fuse_qlinears`: q|k|v and gate|up as one W4A8 GEMM each (same int32 accumulators, same per-column
  epilogue, so the same numbers as separate linears, with fewer launches and one read of the activations);
- `rope_append_op`: the backend's fused RoPE + KV4 append kernel, when it has one;
- `RopeTable`: the cos/sin of every cache position computed once, so a step gathers its rows (one kernel) instead
  of recomputing them (about ten small kernels);
- `prefill_attention_fp16`: a fresh prompt's causal attention in FP16 over its own rotated K/V, before
  they are quantized (QServe's prefill; faster, but not the KV4 path perplexity is measured on);
- `DecodeGraphs`: each decode step replays a CUDA graph captured per (batch, cache) on first use, with
  `HostMirroredLengths`, the lengths bookkeeping it needs of an engine.
"""
from __future__ import annotations

import inspect
from dataclasses import fields

import torch
import torch.nn.functional as F

from qoq.errors import QoqError, one_line
from qoq.scheme import ops


def fuse_qlinears(parts: list[ops.QLinear]) -> ops.QLinear | None:
    """One QLinear whose output is the parts' outputs side by side; the parts become views into it.
    The packed layout tiles N by 32 and interleaves the s2 columns within 32, so linears without N
    padding concatenate along N. None when they cannot be fused (N padding, different K, group size or
    bias presence)."""
    p0 = parts[0]
    if any(p.qweight.shape[0] != p.out_features or p.padded_in != p0.padded_in or p.group_size != p0.group_size
           or p.in_features != p0.in_features for p in parts):
        return None
    biases = [p.bias is not None for p in parts]
    if any(biases) and not all(biases):
        return None

    def cat(name: str, dim: int = 0):
        ts = [getattr(p, name) for p in parts]
        return None if ts[0] is None else torch.cat(ts, dim)

    fused = ops.QLinear(qweight=cat("qweight"), s1=cat("s1"), group_size=p0.group_size,
                        out_features=sum(p.out_features for p in parts), in_features=p0.in_features,
                        s2_scales=cat("s2_scales", 1), s2_zeros=cat("s2_zeros", 1), szeros=cat("szeros"),
                        bias=cat("bias"))
    n0 = 0
    for p in parts:  # views, so fusing costs no memory once the originals are dropped
        sl = slice(n0, n0 + p.out_features)
        p.qweight, p.s1 = fused.qweight[sl], fused.s1[sl]
        if fused.s2_scales is not None:
            p.s2_scales, p.s2_zeros = fused.s2_scales[:, sl], fused.s2_zeros[:, sl]
        if fused.szeros is not None:
            p.szeros = fused.szeros[sl]
        if fused.bias is not None:
            p.bias = fused.bias[sl]
        p.__dict__.pop("_qoq_cache", None)  # a cached dequantized weight would hold the old tensors
        n0 += p.out_features
    return fused


def rows_view(cache: ops.KV4Cache, rows: slice) -> ops.KV4Cache:
    """The cache of sequences `rows` of the batch (views: appends land in the full cache)."""
    return ops.KV4Cache(*(getattr(cache, f.name)[rows] for f in fields(cache)))


def rope_append_op(backend):
    """The backend's fused RoPE + KV4 append (backend.FUSED), or None."""
    return backend.fns.get("rope_kv4_append")


def attention_takes_max_len(backend) -> bool:
    """Whether decode attention accepts `max_len` (a host-side bound that sizes its split over the
    sequence; without it a kernel plans for the whole cache capacity)."""
    try:
        return "max_len" in inspect.signature(backend.fns["decode_attention_kv4"]).parameters
    except (TypeError, ValueError):
        return False


class RopeTable:
    """cos/sin of positions 0..n-1 from the model's own rotary embedding, grown with the cache. The rotary
    embedding is elementwise in the position (position * inv_freq, then cos and sin), so a gathered row has the
    bits a per-step computation gives. Not for RoPE types whose frequencies depend on the positions seen
    (dynamic NTK, LongRoPE): `applies`."""

    def __init__(self, rotary: torch.nn.Module):
        self.rotary = rotary
        self.table: torch.Tensor | None = None  # [n, 2, D]: cos, sin

    @staticmethod
    def applies(rotary: torch.nn.Module) -> bool:
        rope_type = getattr(rotary, "rope_type", "default")
        return isinstance(rope_type, str) and "dynamic" not in rope_type and rope_type != "longrope"

    def lookup(self, positions: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [B, T, D] of positions [B, T] (each < `size`, the cache capacity)."""
        if self.table is None or self.table.shape[0] < size:
            self.table = None  # the old table is freed before the new one is built
            dev = positions.device
            cos, sin = self.rotary(torch.zeros(1, device=dev, dtype=torch.float32),
                                   torch.arange(size, device=dev)[None])
            self.table = torch.stack((cos[0], sin[0]), dim=1)
        rows = self.table[positions]
        return rows[:, :, 0], rows[:, :, 1]


def prefill_attention_fp16(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float,
                           dtype: torch.dtype) -> torch.Tensor:
    """Causal attention of a fresh prompt, q [B, Hq, T, D] over its own rotated k, v [B, Hkv, T, D], in
    `dtype` (SDPA flash where it applies): [B*T, Hq*D]."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b, hq, t, d = q.shape
    rep = hq // k.shape[1]
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=sm_scale)
    return o.transpose(1, 2).reshape(b * t, hq * d)


class HostMirroredLengths:
    """Sequence lengths held twice: `lengths` on the device (kernels and captured decode graphs read and
    advance it in place) and `_host_len`, its host mirror, so that a step never waits on the device."""

    lengths: torch.Tensor
    _host_len: torch.Tensor

    def longest_sequence(self) -> int:
        """Tokens held by the longest sequence (from the host mirror: no device sync); 0 for no sequences."""
        return int(self._host_len.max()) if self._host_len.numel() else 0

    def save_lengths(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The lengths as they are, for `restore_lengths` (a decode graph's warm-up and capture advance them)."""
        return self.lengths.clone(), self._host_len.clone()

    def restore_lengths(self, saved: tuple[torch.Tensor, torch.Tensor]) -> None:
        lengths, host = saved
        self.lengths.copy_(lengths)  # in place: captured graphs read this very tensor
        self._host_len = host.clone()

    def count_replayed_step(self) -> None:
        """A replayed decode graph advanced `lengths` by one token on the device: the host mirror follows."""
        self._host_len += 1


class DecodeGraphs:
    """CUDA graphs of one decode step, one per (batch, cache capacity, cache and lengths tensors).

    A graph reads the token ids from its own input buffer and the positions from `engine.lengths` (which
    the step advances in place), so replaying needs no host work but a copy of the ids; its logits are a
    buffer that the next replay overwrites. What it uses of an engine: the `HostMirroredLengths` methods,
    `hidden_states(ids, graph_len=...)`, `ensure_capacity`, `lm_logits`, `capacity`, `cache`, `device`, and
    the `cuda_graph` / `graph_error` switches it turns off on a failed capture."""

    def __init__(self):
        self._graphs: dict = {}

    def clear(self) -> None:
        """Drop every graph (and its memory pool): the cache they captured is gone or moved."""
        self._graphs.clear()

    def __len__(self) -> int:
        return len(self._graphs)

    def decode(self, engine, tokens: torch.Tensor) -> torch.Tensor:
        """One decode step of `engine` for tokens [B] through its graph (captured on first use); falls back
        to eager decode for good, noting why in `engine.graph_error`, if capture fails."""
        b = tokens.shape[0]
        if b:
            engine.ensure_capacity(engine.longest_sequence() + 1)  # grow eagerly: a graph cannot
        key = (b, engine.capacity, engine.cache[0].k.data_ptr(), engine.lengths.data_ptr())
        entry = self._graphs.get(key)
        if entry is None:
            try:
                entry = self._graphs[key] = self._capture(engine, b)
            except Exception as e:  # noqa: BLE001 - a backend that cannot be captured runs eagerly
                engine.cuda_graph = False
                engine.graph_error = f"{type(e).__name__}: {one_line(e, 160)}"
                torch.cuda.synchronize(engine.device)
                return engine.lm_logits(engine.hidden_states(tokens.reshape(-1, 1))[:, -1])
        ids, logits, graph = entry
        ids.copy_(tokens.reshape(-1, 1))
        graph.replay()
        engine.count_replayed_step()
        return logits

    @staticmethod
    def _capture(engine, b: int):
        ids = torch.zeros(b, 1, dtype=torch.long, device=engine.device)
        saved = engine.save_lengths()
        side = torch.cuda.Stream(engine.device)
        side.wait_stream(torch.cuda.current_stream(engine.device))
        with torch.cuda.stream(side):  # warm-up: loads every kernel and workspace the step uses
            engine.hidden_states(ids, graph_len=engine.capacity)
        torch.cuda.current_stream(engine.device).wait_stream(side)
        engine.restore_lengths(saved)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = engine.lm_logits(engine.hidden_states(ids, graph_len=engine.capacity)[:, -1])
        engine.restore_lengths(saved)  # the warm-up's K/V rows are overwritten by the next real step
        return ids, logits, graph


def check_rows(rows: slice | None, nseq: int, b: int) -> None:
    """`b` sequences given for the batch's `rows` (all of them when None)."""
    n = nseq if rows is None else len(range(*rows.indices(nseq)))
    if n != b:
        where = f"rows {rows.start}:{rows.stop} hold" if rows is not None else "the cache holds"
        raise QoqError(f"{where} {n} sequences but {b} were given; call reset({b})")
