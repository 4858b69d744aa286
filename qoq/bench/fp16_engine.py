"""The FP16 baseline engine for `qoq bench`: the same decoder loop as qoq.runtime.engine.Engine, with
cuBLAS FP16 GEMMs (F.linear; q/k/v and gate/up fused into one GEMM each, as serving engines do),
an FP16 KV cache preallocated per batch slot, and torch SDPA attention (flash; never cuDNN).

Cache layout [B, T_max, Hkv, D]: a step writes its K/V rows where the linear output already has them,
and `transpose(1, 2)` gives SDPA the [B, Hkv, T, D] view it reads in place. Decode attention for GQA
reads each KV head once: the `rep` query heads of a KV head become that head's `rep` query rows.
All sequences of a batch share one length (the benchmark's protocol), kept on the host: no host
synchronisation inside a step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from qoq.errors import QoqError

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
# cuDNN attention (preferred by torch on Hopper) builds a plan per new key length: every decode step
# would pay it. Flash (then memory-efficient, then math) attention takes any length as it comes.
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
MLP = ("gate_proj", "up_proj", "down_proj")


class FP16Engine:
    def __init__(self, config: dict, weights: dict[str, torch.Tensor], device: torch.device | str,
                 dtype: torch.dtype | None = None):
        from qoq.runtime.engine import hf_config, rotary_embedding

        self.device = torch.device(device)
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        c = self.config = hf_config(config)
        self.heads = c.num_attention_heads
        self.kv_heads = getattr(c, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // self.heads
        self.hidden = c.hidden_size
        self.eps = float(c.rms_norm_eps)
        self.rotary = rotary_embedding(c).to(self.device)
        self.layers: list[dict[str, torch.Tensor]] = []
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
            w = {n: take(f"{p}.self_attn.{n}.weight") for n in ATTN}
            w.update({n: take(f"{p}.mlp.{n}.weight") for n in MLP})
            b = [take(f"{p}.self_attn.{n}.bias", False) for n in ("q_proj", "k_proj", "v_proj")]
            layer = {
                "wqkv": torch.cat([w["q_proj"], w["k_proj"], w["v_proj"]]),
                "bqkv": torch.cat(b) if all(x is not None for x in b) else None,
                "wo": w["o_proj"], "wgu": torch.cat([w["gate_proj"], w["up_proj"]]), "wd": w["down_proj"],
                "ln1": take(f"{p}.input_layernorm.weight", False), "ln2": take(f"{p}.post_attention_layernorm.weight", False),
            }
            del w, b
            self.layers.append(layer)
        self.embed = take("model.embed_tokens.weight")
        self.norm = take("model.norm.weight", False)
        lm = take("lm_head.weight", False)
        self.lm_head = self.embed if lm is None or getattr(c, "tie_word_embeddings", False) else lm
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.length = 0
        self.batch = 0

    # ---- cache ------------------------------------------------------------------------------------
    def reset(self, batch: int, max_len: int) -> None:
        """Empty FP16 cache for `batch` sequences of up to `max_len` tokens (reused when the shape fits)."""
        shape = (batch, max_len, self.kv_heads, self.head_dim)
        if not self.k or tuple(self.k[0].shape) != shape:
            self.k, self.v = [], []  # free the old cache before allocating the new one
            for _ in self.layers:
                self.k.append(torch.empty(shape, dtype=self.dtype, device=self.device))
                self.v.append(torch.empty(shape, dtype=self.dtype, device=self.device))
            pos = torch.arange(max_len, device=self.device)[None]
            cos, sin = self.rotary(torch.zeros(1, device=self.device, dtype=torch.float32), pos)
            self.cos, self.sin = cos[0].to(self.dtype), sin[0].to(self.dtype)  # [T_max, D]
        self.batch, self.length = batch, 0

    def release(self) -> None:
        self.k, self.v = [], []

    @property
    def capacity(self) -> int:
        return self.k[0].shape[1] if self.k else 0

    # ---- forward ----------------------------------------------------------------------------------
    def _rms(self, x: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
        return F.rms_norm(x, (self.hidden,), w, self.eps)

    def _rope(self, x: torch.Tensor, start: int, t: int) -> torch.Tensor:
        """x [b, t, h, D] rotate-half RoPE at positions start..start+t-1."""
        cos = self.cos[start:start + t][None, :, None]
        sin = self.sin[start:start + t][None, :, None]
        half = self.head_dim // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    @torch.no_grad()
    def _forward(self, ids: torch.Tensor, rows: slice) -> torch.Tensor:
        """Run ids [b, t] for cache rows `rows` from position self.length; final-normed last hidden [b, H]."""
        with sdpa_kernel(SDPA_BACKENDS):
            return self._layers(ids, rows)

    def _layers(self, ids: torch.Tensor, rows: slice) -> torch.Tensor:
        b, t = ids.shape
        start = self.length
        if start + t > self.capacity:
            raise QoqError(f"the FP16 cache holds {self.capacity} positions, {start + t} are needed; call reset")
        hq, hkv, d = self.heads, self.kv_heads, self.head_dim
        rep = hq // hkv
        h = self.embed[ids]  # [b, t, H]
        for layer, kc, vc in zip(self.layers, self.k, self.v):
            x = self._rms(h, layer["ln1"])
            qkv = F.linear(x, layer["wqkv"], layer["bqkv"])
            qk = self._rope(qkv[..., :(hq + hkv) * d].view(b, t, hq + hkv, d), start, t)  # q and k in one pass
            q, k = qk[:, :, :hq], qk[:, :, hq:]
            v = qkv[..., (hq + hkv) * d:]
            kc[rows, start:start + t] = k
            vc[rows, start:start + t] = v.view(b, t, hkv, d)
            if t == 1:  # decode: the rep query heads of each KV head are that head's query rows
                keys = kc[rows, :start + 1].transpose(1, 2)  # [b, Hkv, L, D] view
                vals = vc[rows, :start + 1].transpose(1, 2)
                o = F.scaled_dot_product_attention(q.reshape(b, hkv, rep, d), keys, vals)
                o = o.reshape(b, 1, hq * d)
            else:
                if start:
                    raise QoqError("the FP16 engine prefills from position 0 only")
                qh = q.transpose(1, 2)
                kh = k.transpose(1, 2).repeat_interleave(rep, dim=1)
                vh = v.view(b, t, hkv, d).transpose(1, 2).repeat_interleave(rep, dim=1)
                o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True)
                o = o.transpose(1, 2).reshape(b, t, hq * d)
            h = h + F.linear(o, layer["wo"])
            x = self._rms(h, layer["ln2"])
            gate, up = F.linear(x, layer["wgu"]).chunk(2, dim=-1)
            h = h + F.linear(F.silu(gate) * up, layer["wd"])
        return self._rms(h[:, -1], self.norm)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.lm_head)

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, chunk_rows: int | None = None) -> torch.Tensor:
        """Prefill every sequence (ids [B, T], B = reset batch) in chunks of `chunk_rows` sequences;
        the last token's logits [B, V]."""
        bsz, t = ids.shape
        if bsz != self.batch:
            raise QoqError(f"the cache holds {self.batch} sequences but {bsz} were given; call reset({bsz})")
        chunk = chunk_rows or bsz
        out = []
        for s in range(0, bsz, chunk):
            rows = slice(s, min(s + chunk, bsz))
            out.append(self.logits(self._forward(ids[rows], rows)))
        self.length += t
        return torch.cat(out) if len(out) > 1 else out[0]

    @torch.no_grad()
    def decode_step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One token per sequence (tokens [B]); next-token logits [B, V]."""
        logits = self.logits(self._forward(tokens.reshape(-1, 1), slice(0, self.batch)))
        self.length += 1
        return logits
