"""The simulated-quantization HF twin of an artifact: the plain floating-point model of what the engine computes.

`simulated_model(artifact)` is an HF model whose linears hold the dequantized weights W_hat, with fake per-token
INT8 quantization of every linear input and fake KV4 (quantize + dequantize) of the post-RoPE keys and values
inside attention. The reference engine must match it within floating-point rounding (see qoq.verify.lockstep).
"""
from __future__ import annotations

import torch

from qoq.formats.artifact import Artifact
from qoq.runtime.engine import hf_config
from qoq.scheme.fakequant import fake_act8, fake_kv4
from qoq.scheme.progressive import dequantize

FAKE_KV4_ATTENTION = "qoq_fake_kv4"


def _register_fake_kv4_attention() -> None:
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def attention(module, query, key, value, attention_mask, **kwargs):
        hook = getattr(module, "qoq_kv_hook", None)  # (layer_idx, key, value) -> (key, value): for tests
        if hook is not None:
            key, value = hook(module.layer_idx, key, value)
        elif getattr(module, "qoq_kv_quant", True):
            key, value = fake_kv4(key).to(key.dtype), fake_kv4(value).to(value.dtype)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(FAKE_KV4_ATTENTION, attention)


def simulated_model(art: Artifact, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                    act_quant: bool = True, kv_quant: bool = True):
    """The HF model with W_hat weights, fake INT8 activations and fake KV4 (see module doc)."""
    from transformers import AutoModelForCausalLM

    cfg = hf_config(art.config)
    if "lm_head.weight" in art.tensors:
        cfg.tie_word_embeddings = False
    _register_fake_kv4_attention()
    cfg._attn_implementation = FAKE_KV4_ATTENTION
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    state = {}
    for name in art.linear_names:
        state[f"{name}.weight"] = dequantize(art.quantized_weight(name))
        if f"{name}.bias" in art.tensors:
            state[f"{name}.bias"] = art.tensors[f"{name}.bias"]
    for name, t in art.tensors.items():
        if name.endswith(("layernorm.weight", "norm.weight", "embed_tokens.weight")) or name == "lm_head.weight":
            state[name] = t
    state = {k: v.to(dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.tie_weights()
    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    if leftover:
        raise ValueError(f"simulated model: parameters missing from the artifact: {leftover[:4]}")
    # non-persistent buffers (rotary inv_freq) were created on meta: rebuild them
    for mod in model.modules():
        if type(mod).__name__.endswith("RotaryEmbedding"):
            fresh = type(mod)(config=cfg)
            for bname, buf in fresh.named_buffers(recurse=False):
                setattr(mod, bname, buf)
    model = model.to(device).eval().requires_grad_(False)
    for mod in model.modules():
        if hasattr(mod, "layer_idx") and hasattr(mod, "o_proj"):
            mod.qoq_kv_quant = kv_quant
    if act_quant:
        for name in art.linear_names:
            model.get_submodule(name).register_forward_pre_hook(
                lambda _m, args: (fake_act8(args[0]).to(args[0].dtype),))
    return model
