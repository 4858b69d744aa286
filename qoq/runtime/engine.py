"""The W4A8KV4 decoder engine: runs an artifact through one backend's kernels (qoq.runtime.backend).

Per block:  RMSNorm + per-token INT8 quant -> q/k/v W4A8 linears -> RoPE -> KV4 append
            -> attention over the dequantized KV4 cache -> INT8 quant -> o_proj -> residual
            -> RMSNorm + INT8 quant -> gate/up -> SiLU*up + INT8 quant -> down_proj -> residual.
Embeddings, the final RMSNorm and lm_head run in floating point. Activations are fp32 on CPU and
fp16 on CUDA (`act_dtype`).

Prefill and decode share the cache path: a step appends its T new tokens (post-RoPE K/V, quantized to
4 bits) at each sequence's current length, then attends over the dequantized cache: T == 1 through the
backend's `decode_attention_kv4`, T > 1 causally over `kv4_dequantize` of the cache. Sequence lengths
are mirrored on the host, so the engine itself never waits on the device inside a step;
`prefill(ids, rows=slice)` fills a slice of the batch (chunked prefill).

Two modes with the same integers: plain (one backend call per op, the order qoq.verify's lockstep and
kernel checks rely on; the default on CPU) and fast (the default on CUDA: fused q|k|v and gate|up GEMMs,
each residual add fused into the next RMSNorm + quant kernel, RoPE from a per-position table, the RoPE + KV4
append kernel, CUDA-graph decode, and FP16 prefill attention for fresh prompts unless
`prefill_fp16` is False; qoq.runtime.fast).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Iterator

import torch

from qoq.errors import QoqError, arg, one_line
from qoq.formats.artifact import Artifact, read_artifact
from qoq.models.arch import BLOCK_LINEARS, head_dims
from qoq.runtime import fast as fast_mode
from qoq.scheme import ops
from qoq.scheme.progressive import is_per_channel
from qoq.runtime.backend import Backend, get_backend, resolve_device


@dataclass
class Layer:
    q_proj: ops.QLinear
    k_proj: ops.QLinear
    v_proj: ops.QLinear
    o_proj: ops.QLinear
    gate_proj: ops.QLinear
    up_proj: ops.QLinear
    down_proj: ops.QLinear
    input_layernorm: torch.Tensor
    post_attention_layernorm: torch.Tensor
    qkv: ops.QLinear | None = None  # fast mode: q|k|v fused along N (the three above are views of it)
    gate_up: ops.QLinear | None = None  # fast mode: gate|up fused along N


def hf_config(config: dict):
    """A transformers config object from an artifact's config.json (without quantization_config)."""
    from transformers import AutoConfig

    cfg = {k: v for k, v in config.items() if k not in ("quantization_config", "transformers_version")}
    model_type = cfg.pop("model_type", None)
    if model_type is None:
        raise QoqError("the artifact's config.json has no model_type; re-run qoq quantize")
    try:
        return AutoConfig.for_model(model_type, **cfg)
    except Exception as e:
        raise QoqError(f"cannot build a {model_type} config from the artifact: {type(e).__name__}: "
                       f"{one_line(e, 160)}") from None


def rotary_embedding(config) -> torch.nn.Module:
    """The model family's own HF rotary embedding (rope_theta, Llama-3/YaRN/... scaling from the config)."""
    mt = config.model_type
    try:
        mod = importlib.import_module(f"transformers.models.{mt}.modeling_{mt}")
        cls = next(getattr(mod, n) for n in dir(mod) if n.endswith("RotaryEmbedding") and not n.startswith("_"))
    except (ImportError, StopIteration):
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding as cls
    return cls(config=config)


class Engine(fast_mode.HostMirroredLengths):
    """A loaded artifact ready to run: `logits`, `prefill`/`decode_step`, `reset`, `generate`.

    `fast` (default: on CUDA) fuses q|k|v and gate|up, uses the backend's RoPE + KV4 append kernel and,
    with `cuda_graph` (default: on CUDA), replays a CUDA graph per decode step; the plain mode runs one
    backend call per op in the order qoq.verify's lockstep and kernel checks expect. Both give the same
    integers. `prefill_fp16` (default: `fast`) lets a fresh prompt attend over its FP16 K/V; set it False
    to attend over the KV4 cache, as perplexity must."""

    def __init__(self, artifact: Artifact | str, device: str | torch.device = "auto", backend: str | Backend = "auto",
                 act_dtype: torch.dtype | None = None, fast: bool | None = None, cuda_graph: bool | None = None):
        art = artifact if isinstance(artifact, Artifact) else read_artifact(artifact)
        self.artifact = art
        self.device = resolve_device(device)
        self.backend = backend if isinstance(backend, Backend) else get_backend(backend, self.device)
        self.act_dtype = act_dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self.config = hf_config(art.config)
        c = self.config
        self.heads, self.kv_heads, self.head_dim = head_dims(c)
        self.hidden = c.hidden_size
        self.eps = float(c.rms_norm_eps)
        self.sm_scale = self.head_dim ** -0.5
        self.group_size = art.group_size
        self.per_channel = is_per_channel(self.group_size)
        self.vocab = c.vocab_size
        self.rotary = rotary_embedding(c).to(self.device)
        self._load_weights(art)
        on_cuda = self.device.type == "cuda"
        self.fast = on_cuda if fast is None else bool(fast)
        self.cuda_graph = self.fast and on_cuda and cuda_graph is not False
        self.graph_error: str | None = None  # why decode graphs were turned off, if they were
        self.prefill_fp16 = self.fast
        self._graphs = fast_mode.DecodeGraphs()
        # resolved once: qoq.verify swaps `backend` after construction, but only on plain engines
        self._rope_append = fast_mode.rope_append_op(self.backend) if self.fast else None
        self._add_norm = self.backend.fns.get("add_rmsnorm_quantize") if self.fast else None
        self._rope_table = (fast_mode.RopeTable(self.rotary)
                            if self.fast and fast_mode.RopeTable.applies(self.rotary) else None)
        self._attn_max_len = self.fast and fast_mode.attention_takes_max_len(self.backend)
        if self.fast:
            for layer in self.layers:
                layer.qkv = fast_mode.fuse_qlinears([layer.q_proj, layer.k_proj, layer.v_proj])
                layer.gate_up = fast_mode.fuse_qlinears([layer.gate_proj, layer.up_proj])
        self.cache: list[ops.KV4Cache] = []
        self.lengths = torch.zeros(0, dtype=torch.long)
        self._host_len = torch.zeros(0, dtype=torch.long)  # host mirror of `lengths`: no device sync per step
        self.reset(1, 0)

    # ---- weights ------------------------------------------------------------------------------------
    def _load_weights(self, art: Artifact) -> None:
        t, modules, dev = art.tensors, art.qconfig["modules"], self.device
        n_layers = self.config.num_hidden_layers

        def tensor(name: str, default=None) -> torch.Tensor:
            x = t.get(name)
            if x is None:
                if default is None:
                    raise QoqError(f"{art.path} is corrupt: tensor {name} is missing; re-run qoq quantize")
                return default
            return x.to(dev)

        def linear(name: str) -> ops.QLinear:
            if name not in modules:
                raise QoqError(f"{art.path} is corrupt: {name} is not among the quantized modules; re-run qoq quantize")
            n, k = modules[name]
            return ops.QLinear.from_tensors(t, name, n, k, self.group_size, dev)

        ones = torch.ones(self.hidden, dtype=torch.float16, device=dev)
        folded = bool(art.qconfig.get("norms_folded", False))

        def norm(name: str) -> torch.Tensor:
            # folded norms were multiplied into the next linears: the stored ones must be exactly ones
            w = tensor(name, ones if folded else None)
            if folded and not torch.equal(w, ones.to(w.dtype)):
                raise QoqError(f"{art.path} is inconsistent: norms_folded is true but {name} is not all ones; "
                               "re-run qoq quantize")
            return w

        self.layers = []
        for i in range(n_layers):
            p = f"model.layers.{i}"
            lin = {name.rsplit(".", 1)[1]: linear(f"{p}.{name}") for name in BLOCK_LINEARS}
            self.layers.append(Layer(**lin, input_layernorm=norm(f"{p}.input_layernorm.weight"),
                                     post_attention_layernorm=norm(f"{p}.post_attention_layernorm.weight")))
        embed = tensor("model.embed_tokens.weight")
        self.embed = embed.to(self.act_dtype)
        self.norm = norm("model.norm.weight")
        # an untied (e.g. rotated, norm-folded) lm_head is stored; a tied one is the embedding
        self.lm_head = tensor("lm_head.weight").to(self.act_dtype) if "lm_head.weight" in t else self.embed

    # ---- cache --------------------------------------------------------------------------------------
    def reset(self, batch: int = 1, max_len: int = 0) -> None:
        """Empty the KV4 cache for `batch` sequences, preallocating `max_len` positions. A cache of the same
        shape is kept (its contents are dead once the lengths are zero, and decode graphs stay valid);
        otherwise the old one is freed before the new one is allocated, so the peak holds one cache."""
        max_len = max(max_len, 16)
        self._host_len = torch.zeros(batch, dtype=torch.long)
        if self.cache and self.cache[0].k.shape[0] == batch and self.capacity == max_len:
            self.lengths.zero_()
            return
        self.release()
        self.lengths = torch.zeros(batch, dtype=torch.long, device=self.device)
        self._alloc(batch, max_len)

    def release(self) -> None:
        """Free the KV cache and the decode graphs that use it."""
        self._graphs.clear()
        self.cache = []

    def _alloc(self, batch: int, max_len: int) -> None:
        self.cache = [ops.KV4Cache.empty(batch, self.kv_heads, max_len, self.head_dim, device=self.device)
                      for _ in self.layers]

    @property
    def capacity(self) -> int:
        return self.cache[0].k.shape[2]

    def ensure_capacity(self, needed: int) -> None:
        """Grow the cache (doubling at least) until it holds `needed` positions; decode graphs are dropped."""
        if needed <= self.capacity:
            return
        self._graphs.clear()  # they captured the old cache
        old, new_len = self.cache, max(needed, 2 * self.capacity)
        self._alloc(old[0].k.shape[0], new_len)
        for o, n in zip(old, self.cache, strict=True):
            t = o.k.shape[2]
            for f in ("k", "k_scale", "k_zero", "v", "v_scale", "v_zero"):
                getattr(n, f)[:, :, :t] = getattr(o, f)

    # ---- forward ------------------------------------------------------------------------------------
    @torch.no_grad()
    def hidden_states(self, input_ids: torch.Tensor, rows: slice | None = None,
                      graph_len: int | None = None) -> torch.Tensor:
        """Append `input_ids` [B, T] to the cache (to sequences `rows` of the batch only: chunked prefill);
        the final-normed hidden states [B, T, H]. `graph_len`: capturing a decode graph (see `_forward`)."""
        input_ids = input_ids.to(self.device)
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        return self._forward(input_ids, rows, graph_len)

    def _forward(self, input_ids: torch.Tensor, rows: slice | None = None,
                 graph_len: int | None = None) -> torch.Tensor:
        """The decoder over input_ids [B, T]. `graph_len`: capturing a CUDA graph, which cannot grow the
        cache; decode attention is sized for that many positions."""
        be = self.backend
        b, t = input_ids.shape
        full = rows is None
        fast_mode.check_rows(rows, self.lengths.shape[0], b)
        host = self._host_len if full else self._host_len[rows]  # a view: advanced in place below
        top = int(host.max()) if b else 0  # from the host mirror: no device sync
        if top + t > self.capacity:
            if graph_len is not None or not full:
                raise QoqError(f"the cache holds {self.capacity} positions, {top + t} are needed; reset with more")
            self.ensure_capacity(top + t)
        caches = self.cache if full else [fast_mode.rows_view(c, rows) for c in self.cache]
        # no copy: the lengths are advanced only after every kernel that reads `start` was enqueued
        start = self.lengths if full else self.lengths[rows]
        fresh = graph_len is None and self.prefill_fp16 and top == 0  # every row starts at position 0
        positions = start[:, None] + torch.arange(t, device=self.device)[None] if t > 1 else start[:, None]
        if self._rope_table is not None:
            cos, sin = self._rope_table.lookup(positions, self.capacity)
        else:
            cos, sin = self.rotary(torch.zeros(1, device=self.device, dtype=torch.float32), positions)
        h = self.embed[input_ids].reshape(b * t, self.hidden)
        qsum = self.per_channel
        dt = self.act_dtype
        attn_len = {"max_len": graph_len or top + 1} if self._attn_max_len else {}
        end = start + t
        delta = None  # the pending residual update, added by the next norm (`_norm_quantize`)
        for layer, cache in zip(self.layers, caches, strict=True):
            a, h = self._norm_quantize(h, delta, layer.input_layernorm, layer.q_proj.padded_in)
            q, k, v = self._qkv(layer, a, b, t)
            q, k = self._rope_append_kv(q, k, v, cos, sin, cache, start)
            if t == 1:
                o = be.decode_attention_kv4(q[:, :, 0].contiguous(), cache, end, self.sm_scale, **attn_len)
                o = o.reshape(b, self.heads * self.head_dim)
            elif fresh:
                o = fast_mode.prefill_attention_fp16(q, k, v, self.sm_scale, dt)
            else:
                o = self._prefill_attention(q, cache, start, t, top + t)
            a = be.quantize_act(o.reshape(b * t, -1), layer.o_proj.padded_in, qsum)
            delta = be.w4a8_linear(a, layer.o_proj, dt)
            a, h = self._norm_quantize(h, delta, layer.post_attention_layernorm, layer.gate_proj.padded_in)
            gate, up = self._gate_up(layer, a)
            a = be.silu_mul_quantize(gate, up, layer.down_proj.padded_in, qsum)
            delta = be.w4a8_linear(a, layer.down_proj, dt)
        if delta is not None:
            h = h + delta
        if full:
            self.lengths.copy_(end)  # in place: a captured decode graph reads and advances this tensor
        else:
            self.lengths[rows] = end
        host += t
        return be.rmsnorm(h, self.norm, self.eps).view(b, t, self.hidden)

    def _norm_quantize(self, h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, padded_in: int):
        """(INT8 RMSNorm(h + delta), h + delta); without a pending add, RMSNorm alone. Fast mode fuses the add
        into the norm kernel, which updates h in place (h is the step's own tensor)."""
        be = self.backend
        if delta is None:
            return be.rmsnorm_quantize(h, weight, self.eps, padded_in, self.per_channel), h
        if self._add_norm is not None:
            return self._add_norm(h, delta, weight, self.eps, padded_in, self.per_channel), h
        h = h + delta
        return be.rmsnorm_quantize(h, weight, self.eps, padded_in, self.per_channel), h

    def _qkv(self, layer: Layer, a, b: int, t: int):
        """q [B, Hq, T, D], k and v [B, Hkv, T, D] (one fused GEMM when the layer has one)."""
        be, dt, d = self.backend, self.act_dtype, self.head_dim
        hq, hkv = self.heads, self.kv_heads
        if layer.qkv is not None:
            q, k, v = be.w4a8_linear(a, layer.qkv, dt).split((hq * d, hkv * d, hkv * d), dim=1)
        else:
            q, k, v = (be.w4a8_linear(a, lin, dt) for lin in (layer.q_proj, layer.k_proj, layer.v_proj))
        return (q.view(b, t, hq, d).transpose(1, 2), k.view(b, t, hkv, d).transpose(1, 2),
                v.view(b, t, hkv, d).transpose(1, 2))

    def _rope_append_kv(self, q, k, v, cos, sin, cache: ops.KV4Cache, start: torch.Tensor):
        """RoPE on q and k, append k and v to the KV4 cache at `start`; the rotated (q, k)."""
        if self._rope_append is not None:
            return self._rope_append(q, k, v, cos, sin, cache, start)
        be = self.backend
        q = be.apply_rope(q, cos, sin)
        k = be.apply_rope(k, cos, sin)
        be.kv4_append(cache, k.contiguous(), v.contiguous(), start)
        return q, k

    def _gate_up(self, layer: Layer, a):
        be, dt = self.backend, self.act_dtype
        if layer.gate_up is not None:
            return be.w4a8_linear(a, layer.gate_up, dt).split(layer.gate_proj.out_features, dim=1)
        return be.w4a8_linear(a, layer.gate_proj, dt), be.w4a8_linear(a, layer.up_proj, dt)

    def _prefill_attention(self, q: torch.Tensor, cache: ops.KV4Cache, start: torch.Tensor, t: int,
                           total: int) -> torch.Tensor:
        """Causal attention of q [B, Hq, T, D] (positions start..start+T-1) over the dequantized cache;
        `total` bounds the positions in use (known on the host)."""
        be = self.backend
        k = be.kv4_dequantize(cache.k[:, :, :total], cache.k_scale[:, :, :total], cache.k_zero[:, :, :total])
        v = be.kv4_dequantize(cache.v[:, :, :total], cache.v_scale[:, :, :total], cache.v_zero[:, :, :total])
        rep = self.heads // self.kv_heads
        k = k.float().repeat_interleave(rep, dim=1)
        v = v.float().repeat_interleave(rep, dim=1)
        qpos = start[:, None] + torch.arange(t, device=q.device)[None]  # [B, T]
        kpos = torch.arange(total, device=q.device)
        mask = kpos[None, None, :] <= qpos[:, :, None]  # [B, T, L]
        o = torch.nn.functional.scaled_dot_product_attention(q.float(), k, v, attn_mask=mask[:, None],
                                                             scale=self.sm_scale)
        return o.transpose(1, 2).reshape(q.shape[0] * t, -1).to(self.act_dtype)

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits (fp32) from final-normed hidden states [..., H]."""
        return (hidden.to(self.lm_head.dtype) @ self.lm_head.t()).float()

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, all_logits: bool = False, rows: slice | None = None) -> torch.Tensor:
        """Append prompts (to sequences `rows` of the batch): logits of the last token [B, V] (or of every
        token [B, T, V])."""
        h = self.hidden_states(input_ids, rows)
        return self.lm_logits(h if all_logits else h[:, -1])

    @torch.no_grad()
    def decode_step(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Append one token per sequence (token_ids [B]); the next-token logits [B, V]. With CUDA graphs
        this is a buffer that the next step overwrites: read (or copy) it first."""
        tokens = token_ids.to(self.device).reshape(-1)
        if self.cuda_graph and self.device.type == "cuda":
            return self._graphs.decode(self, tokens)
        return self.lm_logits(self._forward(tokens.reshape(-1, 1))[:, -1])

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Full prefill of fresh sequences [B, T] (or [T]): logits [B, T, V] fp32. Resets the cache."""
        ids = input_ids[None] if input_ids.dim() == 1 else input_ids
        self.reset(ids.shape[0], ids.shape[1])
        return self.prefill(ids, all_logits=True)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 128, temperature: float = 0.0,
                 top_p: float = 0.9, eos_token_ids: set[int] | None = None,
                 generator: torch.Generator | None = None, timings: dict | None = None) -> Iterator[int]:
        """Yield new token ids for one prompt [T] as they are produced; stops at EOS (not yielded).

        `timings`, when given, gets prefill_s (prompt -> first token), decode_s and decode_steps: the
        engine's own time, not the caller's between tokens."""
        import time

        timings = {} if timings is None else timings
        timings.update(prefill_s=0.0, decode_s=0.0, decode_steps=0)
        t0 = time.perf_counter()
        ids = input_ids.reshape(1, -1)
        self.reset(1, ids.shape[1] + max_new_tokens)
        logits = self.prefill(ids)
        eos = eos_token_ids or set()
        tok = sample(logits[0], temperature, top_p, generator)  # before the next step reuses the buffer
        timings["prefill_s"] = time.perf_counter() - t0
        for step in range(max_new_tokens):
            if tok in eos:
                return
            yield tok
            if step == max_new_tokens - 1:
                return
            t0 = time.perf_counter()
            logits = self.decode_step(torch.tensor([tok], device=self.device))
            tok = sample(logits[0], temperature, top_p, generator)
            timings["decode_s"] += time.perf_counter() - t0
            timings["decode_steps"] += 1


def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> int:
    """Greedy at temperature 0, else nucleus sampling with `top_p` at `temperature`."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
    if 0 < top_p < 1:
        sorted_p, idx = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p  # always keeps the most likely token
        probs = torch.zeros_like(probs).scatter(0, idx[keep], sorted_p[keep])
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


def generate_text(artifact, prompt: str, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 0.9,
                  seed: int | None = None, chat_template: bool = True, backend: str = "auto", device: str = "auto",
                  write=None, fast: bool | None = None) -> dict:
    """Tokenize `prompt` (through the chat template when the tokenizer has one), generate, and `write` the
    text as it is produced; returns counts and timings. `fast`: the engine's mode (default: fast on CUDA)."""
    import time

    from transformers import AutoTokenizer

    if max_new_tokens < 1:
        raise QoqError(f"{arg('max_new_tokens')} must be >= 1, got {max_new_tokens}")
    if not 0 <= temperature < float("inf") or not 0 < top_p <= 1:  # NaN fails both
        raise QoqError(f"{arg('temperature')} must be >= 0 and {arg('top_p')} in (0, 1]")
    if seed is not None and not 0 <= seed < 2**64:  # torch.Generator's range
        raise QoqError(f"{arg('seed')} must be in [0, 2**64), got {seed}")
    t_load = time.perf_counter()
    art = read_artifact(artifact)
    try:
        tok = AutoTokenizer.from_pretrained(str(art.path))
    except Exception as e:
        raise QoqError(f"{art.path} has no usable tokenizer ({type(e).__name__}); re-run qoq quantize") from None
    engine = Engine(art, device=device, backend=backend, fast=fast)
    if chat_template and getattr(tok, "chat_template", None):
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    else:
        ids = tok(prompt, return_tensors="pt").input_ids[0]
    if ids.numel() == 0:
        raise QoqError(f"the prompt is empty after tokenization; pass some text as {arg('prompt')}")
    context = art.config.get("max_position_embeddings")
    if type(context) is int and ids.numel() + max_new_tokens > context:
        raise QoqError(f"the prompt's {ids.numel()} tokens plus {arg('max_new_tokens')} {max_new_tokens} exceed the "
                       f"model's context of {context} tokens (max_position_embeddings); shorten the prompt or lower "
                       f"{arg('max_new_tokens')}")
    eos = set()
    for src in (tok.eos_token_id, art.config.get("eos_token_id")):
        eos.update(src if isinstance(src, (list, tuple)) else ([] if src is None else [src]))
    if engine.device.type == "cuda":  # kernel compilation and graph capture count as load, not as prefill/decode
        list(engine.generate(ids, 2, temperature=0.0))
        torch.cuda.synchronize(engine.device)
    load_s = time.perf_counter() - t_load
    gen = None
    if seed is not None:
        gen = torch.Generator().manual_seed(seed)
    elif temperature > 0:
        gen = torch.Generator().manual_seed(int(time.time_ns() % 2**31))
    write = write or (lambda s: None)
    out: list[int] = []
    shown = ""
    timings: dict = {}
    t0 = time.perf_counter()
    for token in engine.generate(ids, max_new_tokens, temperature, top_p, eos, gen, timings=timings):
        out.append(token)
        text = tok.decode(out, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            continue
        if text.startswith(shown):
            write(text[len(shown):])
        shown = text
    text = tok.decode(out, skip_special_tokens=True)
    if text != shown and text.startswith(shown):
        write(text[len(shown):])
    seconds = time.perf_counter() - t0
    return {"prompt_tokens": int(ids.numel()), "new_tokens": len(out), "seconds": seconds,
            "tokens_per_s": len(out) / seconds if seconds > 0 else 0.0, "load_s": load_s, **timings,
            "prefill_tokens_per_s": ids.numel() / timings["prefill_s"] if timings["prefill_s"] > 0 else 0.0,
            "decode_tokens_per_s": (timings["decode_steps"] / timings["decode_s"] if timings["decode_s"] > 0
                                    else 0.0),
            "backend": engine.backend.describe(),
            "device": str(engine.device), "text": text}
