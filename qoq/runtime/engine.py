"""The W4A8KV4 decoder engine: runs an artifact through one backend's kernels (qoq.runtime.backend).

Per block:  RMSNorm + per-token INT8 quant -> q/k/v W4A8 linears -> RoPE -> KV4 append
            -> attention over the dequantized KV4 cache -> INT8 quant -> o_proj -> residual
            -> RMSNorm + INT8 quant -> gate/up -> SiLU*up + INT8 quant -> down_proj -> residual.
Embeddings, the final RMSNorm and lm_head run in floating point. Activations are fp32 on CPU and
fp16 on CUDA (`act_dtype`).

Prefill and decode share the cache path: a step appends its T new tokens (post-RoPE K/V, quantized to
4 bits) at each sequence's current length, then attends over the dequantized cache: T == 1 through the
backend's `decode_attention_kv4`, T > 1 causally over `kv4_dequantize` of the cache.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Iterator

import torch

from qoq.errors import QoqError
from qoq.formats.artifact import Artifact, read_artifact
from qoq.runtime import ops
from qoq.runtime.backend import Backend, get_backend, resolve_device

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


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
                       f"{' '.join(str(e).split())[:160]}") from None


def rotary_embedding(config) -> torch.nn.Module:
    """The model family's own HF rotary embedding (rope_theta, Llama-3/YaRN/... scaling from the config)."""
    mt = config.model_type
    try:
        mod = importlib.import_module(f"transformers.models.{mt}.modeling_{mt}")
        cls = next(getattr(mod, n) for n in dir(mod) if n.endswith("RotaryEmbedding") and not n.startswith("_"))
    except (ImportError, StopIteration):
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding as cls
    return cls(config=config)


class Engine:
    """A loaded artifact ready to run: `logits`, `prefill`/`decode_step`, `reset`, `generate`."""

    def __init__(self, artifact: Artifact | str, device: str | torch.device = "auto", backend: str | Backend = "auto",
                 act_dtype: torch.dtype | None = None):
        art = artifact if isinstance(artifact, Artifact) else read_artifact(artifact)
        self.artifact = art
        self.device = resolve_device(device)
        self.backend = backend if isinstance(backend, Backend) else get_backend(backend, self.device)
        self.act_dtype = act_dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self.config = hf_config(art.config)
        c = self.config
        self.heads = c.num_attention_heads
        self.kv_heads = getattr(c, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // self.heads
        self.hidden = c.hidden_size
        self.eps = float(c.rms_norm_eps)
        self.sm_scale = self.head_dim ** -0.5
        self.group_size = art.group_size
        self.per_channel = self.group_size == -1
        self.vocab = c.vocab_size
        self.rotary = rotary_embedding(c).to(self.device)
        self._load_weights(art)
        self.cache: list[ops.KV4Cache] = []
        self.lengths = torch.zeros(0, dtype=torch.long)
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
            lin = {n: linear(f"{p}.self_attn.{n}") for n in ATTN}
            lin.update({n: linear(f"{p}.mlp.{n}") for n in MLP})
            self.layers.append(Layer(**lin, input_layernorm=norm(f"{p}.input_layernorm.weight"),
                                     post_attention_layernorm=norm(f"{p}.post_attention_layernorm.weight")))
        embed = tensor("model.embed_tokens.weight")
        self.embed = embed.to(self.act_dtype)
        self.norm = norm("model.norm.weight")
        # an untied (e.g. rotated, norm-folded) lm_head is stored; a tied one is the embedding
        self.lm_head = tensor("lm_head.weight").to(self.act_dtype) if "lm_head.weight" in t else self.embed

    # ---- cache --------------------------------------------------------------------------------------
    def reset(self, batch: int = 1, max_len: int = 0) -> None:
        """Empty the KV4 cache for `batch` sequences, preallocating `max_len` positions."""
        self.lengths = torch.zeros(batch, dtype=torch.long, device=self.device)
        self._alloc(batch, max(max_len, 16))

    def _alloc(self, batch: int, max_len: int) -> None:
        self.cache = [ops.KV4Cache.empty(batch, self.kv_heads, max_len, self.head_dim, device=self.device)
                      for _ in self.layers]

    @property
    def capacity(self) -> int:
        return self.cache[0].k.shape[2]

    def _ensure_capacity(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        old, new_len = self.cache, max(needed, 2 * self.capacity)
        self._alloc(old[0].k.shape[0], new_len)
        for o, n in zip(old, self.cache):
            t = o.k.shape[2]
            for f in ("k", "k_scale", "k_zero", "v", "v_scale", "v_zero"):
                getattr(n, f)[:, :, :t] = getattr(o, f)

    # ---- forward ------------------------------------------------------------------------------------
    @torch.no_grad()
    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Append `input_ids` [B, T] to the cache; the final-normed hidden states [B, T, H] (fp32)."""
        be = self.backend
        input_ids = input_ids.to(self.device)
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        b, t = input_ids.shape
        if b != self.lengths.shape[0]:
            raise QoqError(f"the cache holds {self.lengths.shape[0]} sequences but {b} were given; call reset({b})")
        start = self.lengths.clone()
        self._ensure_capacity(int(start.max()) + t)
        positions = start[:, None] + torch.arange(t, device=self.device)[None]
        cos, sin = self.rotary(torch.zeros(1, device=self.device, dtype=torch.float32), positions)
        h = self.embed[input_ids].reshape(b * t, self.hidden)
        qsum = self.per_channel
        dt = self.act_dtype
        for layer, cache in zip(self.layers, self.cache):
            a = be.rmsnorm_quantize(h, layer.input_layernorm, self.eps, layer.q_proj.padded_in, qsum)
            q = be.w4a8_linear(a, layer.q_proj, dt).view(b, t, self.heads, self.head_dim).transpose(1, 2)
            k = be.w4a8_linear(a, layer.k_proj, dt).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
            v = be.w4a8_linear(a, layer.v_proj, dt).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
            q = be.apply_rope(q, cos, sin)
            k = be.apply_rope(k, cos, sin)
            be.kv4_append(cache, k.contiguous(), v.contiguous(), start)
            if t == 1:
                o = be.decode_attention_kv4(q[:, :, 0].contiguous(), cache, start + 1, self.sm_scale)
                o = o.reshape(b, self.heads * self.head_dim)
            else:
                o = self._prefill_attention(q, cache, start, t)
            a = be.quantize_act(o.reshape(b * t, -1), layer.o_proj.padded_in, qsum)
            h = h + be.w4a8_linear(a, layer.o_proj, dt)
            a = be.rmsnorm_quantize(h, layer.post_attention_layernorm, self.eps, layer.gate_proj.padded_in, qsum)
            gate = be.w4a8_linear(a, layer.gate_proj, dt)
            up = be.w4a8_linear(a, layer.up_proj, dt)
            a = be.silu_mul_quantize(gate, up, layer.down_proj.padded_in, qsum)
            h = h + be.w4a8_linear(a, layer.down_proj, dt)
        self.lengths = start + t
        return be.rmsnorm(h, self.norm, self.eps).view(b, t, self.hidden)

    def _prefill_attention(self, q: torch.Tensor, cache: ops.KV4Cache, start: torch.Tensor, t: int) -> torch.Tensor:
        """Causal attention of q [B, Hq, T, D] (positions start..start+T-1) over the dequantized cache."""
        be = self.backend
        total = int(start.max()) + t
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
    def prefill(self, input_ids: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        """Append a prompt to the cache: logits of its last token [B, V] (or of every token [B, T, V])."""
        h = self.hidden_states(input_ids)
        return self.lm_logits(h if all_logits else h[:, -1])

    @torch.no_grad()
    def decode_step(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Append one token per sequence (token_ids [B]); the next-token logits [B, V]."""
        return self.lm_logits(self.hidden_states(token_ids.reshape(-1, 1))[:, -1])

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Full prefill of fresh sequences [B, T] (or [T]): logits [B, T, V] fp32. Resets the cache."""
        ids = input_ids[None] if input_ids.dim() == 1 else input_ids
        self.reset(ids.shape[0], ids.shape[1])
        return self.prefill(ids, all_logits=True)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 128, temperature: float = 0.0,
                 top_p: float = 0.9, eos_token_ids: set[int] | None = None,
                 generator: torch.Generator | None = None) -> Iterator[int]:
        """Yield new token ids for one prompt [T] as they are produced; stops at EOS (not yielded)."""
        ids = input_ids.reshape(1, -1)
        self.reset(1, ids.shape[1] + max_new_tokens)
        logits = self.prefill(ids)
        eos = eos_token_ids or set()
        for _ in range(max_new_tokens):
            tok = sample(logits[0], temperature, top_p, generator)
            if tok in eos:
                return
            yield tok
            logits = self.decode_step(torch.tensor([tok], device=self.device))


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
                  write=None) -> dict:
    """Tokenize `prompt` (through the chat template when the tokenizer has one), generate, and `write` the
    text as it is produced; returns counts and timings."""
    import time

    from transformers import AutoTokenizer

    if max_new_tokens < 1:
        raise QoqError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise QoqError("--temperature must be >= 0 and --top-p in (0, 1]")
    art = read_artifact(artifact)
    try:
        tok = AutoTokenizer.from_pretrained(str(art.path))
    except Exception as e:
        raise QoqError(f"{art.path} has no usable tokenizer ({type(e).__name__}); re-run qoq quantize") from None
    engine = Engine(art, device=device, backend=backend)
    if chat_template and getattr(tok, "chat_template", None):
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    else:
        ids = tok(prompt, return_tensors="pt").input_ids[0]
    if ids.numel() == 0:
        raise QoqError("the prompt is empty after tokenization; pass some text with -p")
    eos = set()
    for src in (tok.eos_token_id, art.config.get("eos_token_id")):
        eos.update(src if isinstance(src, (list, tuple)) else ([] if src is None else [src]))
    gen = None
    if seed is not None:
        gen = torch.Generator().manual_seed(seed)
    elif temperature > 0:
        gen = torch.Generator().manual_seed(int(time.time_ns() % 2**31))
    write = write or (lambda s: None)
    out: list[int] = []
    shown = ""
    t0 = time.perf_counter()
    for token in engine.generate(ids, max_new_tokens, temperature, top_p, eos, gen):
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
            "tokens_per_s": len(out) / seconds if seconds > 0 else 0.0, "backend": engine.backend.describe(),
            "device": str(engine.device), "text": text}
