"""The W4A8KV4 engine in serving mode, what `qoq bench` measures: `ServingEngine(artifact, ...)` is
qoq.runtime.engine.Engine with the same integer ops (same kernels, same quantizers), arranged for
throughput:

- q|k|v and gate|up run as one W4A8 GEMM each: the packed layout tiles N by 32 and interleaves the s2
  columns within 32, so linears without N padding concatenate along N (the separate linears become views
  of the fused tensors: no extra memory, identical int32 accumulators);
- RoPE + KV4 append is one kernel where the backend has `rope_kv4_append`;
- a fresh prompt's causal attention runs in FP16 (SDPA flash) over its own rotated K/V before they are
  quantized, as QServe's prefill does (the default engine attends over the dequantized KV4 cache, the
  path perplexity is measured on);
- sequence lengths are mirrored on the host (no device sync inside a step), `prefill(ids, rows=slice)`
  fills a slice of the batch (chunked prefill), `reset` keeps a cache of the same shape;
- on CUDA each decode step replays a CUDA graph captured per (batch, cache) on first use (falls back to
  eager decode, and says why in `graph_error`, if a backend cannot be captured).

Op counts per block differ from the default path, so qoq.verify's lockstep and kernel checks keep using
`Engine`. This lives beside the benchmark until the runtime folds it into `Engine(fast=True)`.
"""
from __future__ import annotations

import inspect
from dataclasses import fields

import torch
import torch.nn.functional as F

from qoq.errors import QoqError
from qoq.runtime import ops
from qoq.runtime.engine import Engine


def fuse_qlinears(parts: list[ops.QLinear]) -> ops.QLinear | None:
    """One QLinear whose output is the parts' outputs side by side; the parts become views into it.
    None when they cannot be fused (N padding, different K, group size or bias presence)."""
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
    for p in parts:
        sl = slice(n0, n0 + p.out_features)
        p.qweight, p.s1 = fused.qweight[sl], fused.s1[sl]
        if fused.s2_scales is not None:
            p.s2_scales, p.s2_zeros = fused.s2_scales[:, sl], fused.s2_zeros[:, sl]
        if fused.szeros is not None:
            p.szeros = fused.szeros[sl]
        if fused.bias is not None:
            p.bias = fused.bias[sl]
        p.__dict__.pop("_qoq_cache", None)
        n0 += p.out_features
    return fused


def _rows_view(cache: ops.KV4Cache, rows: slice) -> ops.KV4Cache:
    return ops.KV4Cache(*(getattr(cache, f.name)[rows] for f in fields(cache)))


class ServingEngine(Engine):
    """`Engine` for throughput (module docstring). Same constructor, plus `cuda_graph` (default: on CUDA)."""

    def __init__(self, artifact, device="auto", backend="auto", act_dtype: torch.dtype | None = None,
                 cuda_graph: bool | None = None):
        self._graphs: dict = {}
        self._host_len = torch.zeros(0, dtype=torch.long)  # host mirror of self.lengths
        self.cache: list[ops.KV4Cache] = []
        super().__init__(artifact, device=device, backend=backend, act_dtype=act_dtype)
        self.cuda_graph = self.device.type == "cuda" if cuda_graph is None else bool(cuda_graph)
        self.graph_error: str | None = None  # why decode graphs were turned off, if they were
        self.prefill_fp16 = True  # a fresh prompt attends over its FP16 K/V (False: over the KV4 cache)
        self.fused = {"qkv": [], "gate_up": []}
        for layer in self.layers:
            self.fused["qkv"].append(fuse_qlinears([layer.q_proj, layer.k_proj, layer.v_proj]))
            self.fused["gate_up"].append(fuse_qlinears([layer.gate_proj, layer.up_proj]))
        fns = self.backend.fns
        self._rope_append = fns.get("rope_kv4_append")
        try:
            self._attn_max_len = "max_len" in inspect.signature(fns["decode_attention_kv4"]).parameters
        except (TypeError, ValueError):
            self._attn_max_len = False

    # ---- cache --------------------------------------------------------------------------------------
    def reset(self, batch: int = 1, max_len: int = 0) -> None:
        """Empty cache for `batch` sequences of `max_len` positions; one of the same shape is kept."""
        max_len = max(max_len, 16)
        self._host_len = torch.zeros(batch, dtype=torch.long)
        if self.cache and self.cache[0].k.shape[0] == batch and self.capacity == max_len:
            self.lengths.zero_()
            return
        self.release()  # free the old cache before allocating the new one
        self.lengths = torch.zeros(batch, dtype=torch.long, device=self.device)
        self._alloc(batch, max_len)

    def release(self) -> None:
        """Free the KV cache and the decode graphs that use it."""
        self._graphs.clear()
        self.cache = []

    def _ensure_capacity(self, needed: int) -> None:
        if needed > self.capacity:
            self._graphs.clear()
        super()._ensure_capacity(needed)

    # ---- forward ------------------------------------------------------------------------------------
    @torch.no_grad()
    def hidden_states(self, input_ids: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        """Append input_ids [B, T] (to sequences `rows` of the batch); final-normed hidden states [B, T, H]."""
        input_ids = input_ids.to(self.device)
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        return self._forward(input_ids, rows)

    def _forward(self, input_ids: torch.Tensor, rows: slice | None, graph_len: int | None = None) -> torch.Tensor:
        """`graph_len`: capturing a CUDA graph; decode attention sized for that many positions."""
        be = self.backend
        b, t = input_ids.shape
        full = rows is None
        nseq = self.lengths.shape[0]
        if (nseq if full else len(range(*rows.indices(nseq)))) != b:
            raise QoqError(f"the cache holds {nseq} sequences but {b} were given; call reset({b})")
        caches = self.cache if full else [_rows_view(c, rows) for c in self.cache]
        host = self._host_len if full else self._host_len[rows]
        start = self.lengths.clone() if full else self.lengths[rows].clone()
        top = int(host.max()) if b else 0  # host mirror: no device sync
        if top + t > self.capacity:
            if graph_len is not None or not full:
                raise QoqError(f"the cache holds {self.capacity} positions, {top + t} are needed; reset with more")
            self._ensure_capacity(top + t)
            caches = self.cache
        fresh = graph_len is None and self.prefill_fp16 and top == 0  # every row starts at position 0
        positions = start[:, None] + torch.arange(t, device=self.device)[None]
        cos, sin = self.rotary(torch.zeros(1, device=self.device, dtype=torch.float32), positions)
        h = self.embed[input_ids].reshape(b * t, self.hidden)
        qsum = self.per_channel
        dt = self.act_dtype
        hq, hkv, d = self.heads, self.kv_heads, self.head_dim
        attn_len = {"max_len": graph_len or top + 1} if self._attn_max_len else {}
        for i, (layer, cache) in enumerate(zip(self.layers, caches)):
            qkv_w, gate_up_w = self.fused["qkv"][i], self.fused["gate_up"][i]
            a = be.rmsnorm_quantize(h, layer.input_layernorm, self.eps, layer.q_proj.padded_in, qsum)
            if qkv_w is not None:
                q, k, v = be.w4a8_linear(a, qkv_w, dt).split((hq * d, hkv * d, hkv * d), dim=1)
            else:
                q, k, v = (be.w4a8_linear(a, lin, dt) for lin in (layer.q_proj, layer.k_proj, layer.v_proj))
            q = q.view(b, t, hq, d).transpose(1, 2)
            k = k.view(b, t, hkv, d).transpose(1, 2)
            v = v.view(b, t, hkv, d).transpose(1, 2)
            if self._rope_append is not None:
                q, k = self._rope_append(q, k, v, cos, sin, cache, start)
            else:
                q, k = be.apply_rope(q, cos, sin), be.apply_rope(k, cos, sin)
                be.kv4_append(cache, k.contiguous(), v.contiguous(), start)
            if t == 1:
                o = be.decode_attention_kv4(q[:, :, 0].contiguous(), cache, start + 1, self.sm_scale, **attn_len)
                o = o.reshape(b, hq * d)
            elif fresh:
                o = self._prefill_attention_fp16(q, k, v)
            else:
                o = self._prefill_attention(q, cache, start, t)
            a = be.quantize_act(o.reshape(b * t, -1), layer.o_proj.padded_in, qsum)
            h = h + be.w4a8_linear(a, layer.o_proj, dt)
            a = be.rmsnorm_quantize(h, layer.post_attention_layernorm, self.eps, layer.gate_proj.padded_in, qsum)
            if gate_up_w is not None:
                gate, up = be.w4a8_linear(a, gate_up_w, dt).split(layer.gate_proj.out_features, dim=1)
            else:
                gate, up = be.w4a8_linear(a, layer.gate_proj, dt), be.w4a8_linear(a, layer.up_proj, dt)
            a = be.silu_mul_quantize(gate, up, layer.down_proj.padded_in, qsum)
            h = h + be.w4a8_linear(a, layer.down_proj, dt)
        if full:
            self.lengths.copy_(start + t)  # in place: a captured decode graph reads and advances this tensor
        else:
            self.lengths[rows] = start + t
        host += t  # a view of the host mirror when rows is a slice
        return be.rmsnorm(h, self.norm, self.eps).view(b, t, self.hidden)

    def _prefill_attention_fp16(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention of a fresh prompt over its own rotated K/V in the activation dtype (flash)."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        b, hq, t, d = q.shape
        rep = hq // self.kv_heads
        dt = self.act_dtype
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.sm_scale)
        return o.transpose(1, 2).reshape(b * t, hq * d)

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, all_logits: bool = False, rows: slice | None = None) -> torch.Tensor:
        """Append prompts (to sequences `rows`): logits of the last token [B, V] (or all [B, T, V])."""
        h = self.hidden_states(input_ids, rows)
        return self.lm_logits(h if all_logits else h[:, -1])

    @torch.no_grad()
    def decode_step(self, token_ids: torch.Tensor) -> torch.Tensor:
        """One token per sequence (token_ids [B]); next-token logits [B, V] (with CUDA graphs: a buffer
        that the next step overwrites)."""
        tokens = token_ids.to(self.device).reshape(-1)
        if self.cuda_graph and self.device.type == "cuda":
            return self._graph_decode(tokens)
        return self.lm_logits(self._forward(tokens.reshape(-1, 1), None)[:, -1])

    # ---- decode graphs ------------------------------------------------------------------------------
    def _graph_decode(self, tokens: torch.Tensor) -> torch.Tensor:
        b = tokens.shape[0]
        if int(self._host_len.max()) + 1 > self.capacity:
            raise QoqError(f"the cache holds {self.capacity} positions; reset with more")
        key = (b, self.capacity, self.cache[0].k.data_ptr(), self.lengths.data_ptr())
        entry = self._graphs.get(key)
        if entry is None:
            try:
                entry = self._graphs[key] = self._capture(b)
            except Exception as e:  # noqa: BLE001 - a backend that cannot be captured runs eagerly
                self.cuda_graph = False
                self.graph_error = f"{type(e).__name__}: {' '.join(str(e).split())[:160]}"
                torch.cuda.synchronize(self.device)
                return self.lm_logits(self._forward(tokens.reshape(-1, 1), None)[:, -1])
        ids, logits, graph = entry
        ids.copy_(tokens.reshape(-1, 1))
        graph.replay()
        self._host_len += 1
        return logits

    def _capture(self, b: int):
        ids = torch.zeros(b, 1, dtype=torch.long, device=self.device)
        saved, saved_host = self.lengths.clone(), self._host_len.clone()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up: loads every kernel and workspace the step uses
            self._forward(ids, None, graph_len=self.capacity)
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.lengths.copy_(saved)
        self._host_len = saved_host.clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self.lm_logits(self._forward(ids, None, graph_len=self.capacity)[:, -1])
        self.lengths.copy_(saved)  # the warm-up step's K/V rows are overwritten by the next real step
        self._host_len = saved_host
        return ids, logits, graph
