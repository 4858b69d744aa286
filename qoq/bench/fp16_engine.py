"""The FP16 baseline engine for `qoq bench`: the same decoder loop as qoq.runtime.engine.Engine, with
cuBLAS FP16 GEMMs (F.linear; q/k/v and gate/up fused into one GEMM each, as serving engines do),
an FP16 KV cache preallocated per batch slot, torch SDPA prefill attention (flash; never cuDNN) and,
on CUDA, one CUDA graph per decode step (the qoq engine's `DecodeGraphs`), so both engines pay the same
(near zero) host cost per step.

Cache layout [B, T_max, Hkv, D]: prefill writes its K/V rows where the linear output already has them;
a decode step writes row `length` of every sequence with one `index_copy_` and advances the lengths on the
device, so a captured step replays unchanged. Decode attention reads exactly `length + 1` keys per
sequence: flash attention's variable-length entry point with `seqused_k` (native GQA, one kernel); where
that is unavailable (CPU, an old torch), SDPA over the whole cache with a length mask (`decode_attention`
says which one runs).

`linear` is the one hook a subclass changes to swap the GEMMs (qoq.bench.fp8_engine).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from qoq.errors import QoqError
from qoq.models.arch import BLOCK_LINEARS, head_dims
from qoq.runtime.fast import DecodeGraphs, HostMirroredLengths

# cuDNN attention (preferred by torch on Hopper) builds a plan per new key length: every prefill length
# would pay it. Flash (then memory-efficient, then math) attention takes any length as it comes.
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
FLASH_DECODE = "flash attention (variable length, seqused_k)"
MASKED_DECODE = "SDPA over the whole cache with a length mask"


@dataclass
class KVPair:
    k: torch.Tensor  # [B, T_max, Hkv, D]
    v: torch.Tensor


def masked_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: torch.Tensor,
                            scale: float) -> torch.Tensor:
    """q [B, Hq, D] over the first seq_lens[b] rows of k, v [B, T, Hkv, D]; [B, Hq * D]. The `rep` query
    heads of a KV head become that head's query rows, so each KV head is read once."""
    b, hq, d = q.shape
    hkv = k.shape[2]
    mask = torch.arange(k.shape[1], device=q.device)[None] < seq_lens[:, None].to(torch.long)  # [B, T]
    with sdpa_kernel(SDPA_BACKENDS):
        o = F.scaled_dot_product_attention(q.view(b, hkv, hq // hkv, d), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=mask[:, None, None], scale=scale)
    return o.reshape(b, hq * d)


def flash_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: torch.Tensor,
                           scale: float, cu_q: torch.Tensor, cu_k: torch.Tensor) -> torch.Tensor:
    """The same as `masked_decode_attention` through flash attention's varlen kernel: sequence b is
    packed rows [b * T, b * T + seq_lens[b]) of the cache viewed as [B * T, Hkv, D]."""
    b, hq, d = q.shape
    t, hkv = k.shape[1], k.shape[2]
    out = torch.ops.aten._flash_attention_forward(
        q.contiguous(), k.view(b * t, hkv, d), v.view(b * t, hkv, d), cu_q, cu_k, 1, t, 0.0, False, False,
        scale=scale, seqused_k=seq_lens)[0]
    return out.reshape(b, hq * d)


class FP16Engine(HostMirroredLengths):
    def __init__(self, config: dict, weights: dict[str, torch.Tensor], device: torch.device | str,
                 dtype: torch.dtype | None = None, cuda_graph: bool | None = None):
        from qoq.runtime.engine import hf_config, rotary_embedding

        self.device = torch.device(device)
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        c = self.config = hf_config(config)
        self.heads, self.kv_heads, self.head_dim = head_dims(c)
        self.hidden = c.hidden_size
        self.eps = float(c.rms_norm_eps)
        self.sm_scale = self.head_dim ** -0.5
        self.rotary = rotary_embedding(c).to(self.device)
        self.layers: list[dict] = []
        dt, dev = self.dtype, self.device

        def take(name: str, required: bool = True):
            t = weights.pop(name, None)
            if t is None:
                if required:
                    raise QoqError(f"the FP16 twin lacks {name}")
                return None
            return t.to(device=dev, dtype=dt)

        for i in range(c.num_hidden_layers):
            p = f"model.layers.{i}"
            w = {name.rsplit(".", 1)[1]: take(f"{p}.{name}.weight") for name in BLOCK_LINEARS}
            b = [take(f"{p}.self_attn.{n}.bias", False) for n in ("q_proj", "k_proj", "v_proj")]
            layer = {
                "wqkv": self.prepare_weight(torch.cat([w["q_proj"], w["k_proj"], w["v_proj"]])),
                "bqkv": torch.cat(b) if all(x is not None for x in b) else None,
                "wo": self.prepare_weight(w["o_proj"]),
                "wgu": self.prepare_weight(torch.cat([w["gate_proj"], w["up_proj"]])),
                "wd": self.prepare_weight(w["down_proj"]),
                "ln1": take(f"{p}.input_layernorm.weight", False),
                "ln2": take(f"{p}.post_attention_layernorm.weight", False),
            }
            del w, b
            self.layers.append(layer)
        self.embed = take("model.embed_tokens.weight")
        self.norm = take("model.norm.weight", False)
        lm = take("lm_head.weight", False)
        self.lm_head = self.embed if lm is None or getattr(c, "tie_word_embeddings", False) else lm
        self.cache: list[KVPair] = []
        self.cuda_graph = self.device.type == "cuda" and cuda_graph is not False
        self.graph_error: str | None = None
        self._graphs = DecodeGraphs()
        self.decode_attention = FLASH_DECODE if self.device.type == "cuda" else MASKED_DECODE

    def prepare_weight(self, w: torch.Tensor):
        """The operand `linear` multiplies by (here the FP16 weight itself)."""
        return w

    def linear(self, x: torch.Tensor, w, bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(x, w, bias)

    def gemm_description(self) -> str:
        return f"cuBLAS {str(self.dtype).removeprefix('torch.')} GEMMs"

    def describe(self) -> str:
        graphs = "CUDA-graph decode" if self.cuda_graph else (
            f"eager decode (graph capture failed: {self.graph_error})" if self.graph_error else "eager decode")
        return f"{self.gemm_description()}, SDPA prefill, {graphs}, decode attention: {self.decode_attention}"

    # ---- cache ------------------------------------------------------------------------------------
    def reset(self, batch: int, max_len: int) -> None:
        """Empty FP16 cache for `batch` sequences of up to `max_len` tokens (kept when the shape is the
        same: its contents are dead once the lengths are zero, and decode graphs stay valid)."""
        shape = (batch, max_len, self.kv_heads, self.head_dim)
        self._host_len = torch.zeros(batch, dtype=torch.long)
        if self.cache and tuple(self.cache[0].k.shape) == shape:
            self.lengths.zero_()
            return
        self.release()  # free the old cache before allocating the new one
        dev = self.device
        # zeros, not empty: the masked decode path multiplies unused rows by zero weights (NaN * 0 = NaN)
        self.cache = [KVPair(torch.zeros(shape, dtype=self.dtype, device=dev),
                             torch.zeros(shape, dtype=self.dtype, device=dev)) for _ in self.layers]
        self.lengths = torch.zeros(batch, dtype=torch.int32, device=dev)
        self._row_base = torch.arange(batch, device=dev) * max_len
        self._cu_q = torch.arange(batch + 1, dtype=torch.int32, device=dev)
        self._cu_k = self._cu_q * max_len
        pos = torch.arange(max_len, device=dev)[None]
        cos, sin = self.rotary(torch.zeros(1, device=dev, dtype=torch.float32), pos)
        self.cos, self.sin = cos[0].to(self.dtype), sin[0].to(self.dtype)  # [T_max, D]

    def release(self) -> None:
        self._graphs.clear()
        self.cache = []

    @property
    def batch(self) -> int:
        return self.cache[0].k.shape[0] if self.cache else 0

    @property
    def capacity(self) -> int:
        return self.cache[0].k.shape[1] if self.cache else 0

    def ensure_capacity(self, needed: int) -> None:
        """The cache never grows: too few positions is an error."""
        if needed > self.capacity:
            raise QoqError(f"the FP16 cache holds {self.capacity} positions, {needed} are needed; reset with more")

    # ---- forward ----------------------------------------------------------------------------------
    def _rms(self, x: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
        return F.rms_norm(x, (self.hidden,), w, self.eps)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [b, t, h, D] rotate-half RoPE with cos/sin [b, t, 1, D]."""
        half = self.head_dim // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def _attend_decode(self, q: torch.Tensor, kv: KVPair, seq_lens: torch.Tensor) -> torch.Tensor:
        if self.decode_attention == FLASH_DECODE:
            try:
                return flash_decode_attention(q, kv.k, kv.v, seq_lens, self.sm_scale, self._cu_q, self._cu_k)
            except (RuntimeError, TypeError, AttributeError) as e:  # no flash varlen / seqused_k in this torch
                if torch.cuda.is_current_stream_capturing():
                    raise
                self.decode_attention = f"{MASKED_DECODE} (flash varlen failed: {type(e).__name__})"
        return masked_decode_attention(q, kv.k, kv.v, seq_lens, self.sm_scale)

    @torch.no_grad()
    def hidden_states(self, ids: torch.Tensor, rows: slice | None = None, graph_len: int | None = None) -> torch.Tensor:
        """Append ids [b, t] to cache rows `rows` (all when None); final-normed hidden states [b, t, H].
        A prompt (t > 1) starts at position 0; a decode step (t == 1) runs the whole batch.
        `graph_len` is the qoq engine's capture argument: the cache never grows here, so it is unused."""
        b, t = ids.shape
        rows = rows or slice(0, self.batch)
        host = self._host_len[rows]  # a view: advanced in place below
        if b != len(host):
            raise QoqError(f"{len(host)} sequences in the rows given but {b} token rows; call reset({b})")
        decode = t == 1 and b == self.batch and rows == slice(0, self.batch)
        if not decode and int(host.max()) != 0:
            raise QoqError("the FP16 engine prefills from position 0 only, and decodes the whole batch")
        self.ensure_capacity(int(host.max()) + t)
        hq, hkv, d = self.heads, self.kv_heads, self.head_dim
        start = self.lengths[rows].long()
        positions = start[:, None] + torch.arange(t, device=self.device)[None]  # [b, t]
        cos, sin = self.cos[positions][:, :, None], self.sin[positions][:, :, None]
        slots = self._row_base + start if decode else None  # flat cache rows each step writes
        h = self.embed[ids]  # [b, t, H]
        for layer, kv in zip(self.layers, self.cache, strict=True):
            x = self._rms(h, layer["ln1"])
            qkv = self.linear(x, layer["wqkv"], layer["bqkv"])
            qk = self._rope(qkv[..., :(hq + hkv) * d].view(b, t, hq + hkv, d), cos, sin)  # q and k in one pass
            q, k = qk[:, :, :hq], qk[:, :, hq:]
            v = qkv[..., (hq + hkv) * d:].reshape(b, t, hkv, d)
            if decode:
                kv.k.view(-1, hkv, d).index_copy_(0, slots, k.reshape(b, hkv, d))
                kv.v.view(-1, hkv, d).index_copy_(0, slots, v.reshape(b, hkv, d))
                o = self._attend_decode(q.reshape(b, hq, d), kv, self.lengths + 1).reshape(b, 1, hq * d)
            else:
                kv.k[rows, :t] = k
                kv.v[rows, :t] = v
                rep = hq // hkv
                with sdpa_kernel(SDPA_BACKENDS):
                    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(rep, 1),
                                                       v.transpose(1, 2).repeat_interleave(rep, 1), is_causal=True,
                                                       scale=self.sm_scale)
                o = o.transpose(1, 2).reshape(b, t, hq * d)
            h = h + self.linear(o, layer["wo"])
            x = self._rms(h, layer["ln2"])
            gate, up = self.linear(x, layer["wgu"]).chunk(2, dim=-1)
            h = h + self.linear(F.silu(gate) * up, layer["wd"])
        if decode:
            self.lengths.add_(1)  # in place: a captured decode graph advances this tensor
        else:
            self.lengths[rows] = t
        host += t
        return self._rms(h, self.norm)

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.lm_head)

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, chunk_rows: int | None = None, rows: slice | None = None) -> torch.Tensor:
        """Prefill sequences `rows` (all when None) with ids [b, T] in chunks of `chunk_rows` sequences;
        the last token's logits [b, V]."""
        rows = rows or slice(0, self.batch)
        first = rows.start or 0
        bsz = ids.shape[0]
        chunk = chunk_rows or bsz
        out = [self.lm_logits(self.hidden_states(ids[s:s + chunk], slice(first + s, first + min(s + chunk, bsz)))
                              [:, -1]) for s in range(0, bsz, chunk)]
        return torch.cat(out) if len(out) > 1 else out[0]

    @torch.no_grad()
    def decode_step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One token per sequence (tokens [B]); next-token logits [B, V] (with CUDA graphs, a buffer the
        next step overwrites)."""
        tokens = tokens.to(self.device).reshape(-1)
        if self.cuda_graph:
            return self._graphs.decode(self, tokens)
        return self.lm_logits(self.hidden_states(tokens.reshape(-1, 1))[:, -1])
