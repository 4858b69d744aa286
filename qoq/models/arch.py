"""What the pipeline needs to know about a Llama-family decoder (Llama, Mistral, Qwen2 share it)."""
from __future__ import annotations

import torch

# The decoders qoq runs: HF model_type (also llama.cpp's GGUF `general.architecture`) -> transformers class
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}

ATTENTION_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP_LINEARS = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
BLOCK_LINEARS = ATTENTION_LINEARS + MLP_LINEARS


def decoder_layers(model) -> torch.nn.ModuleList:
    return model.model.layers


def head_dims(config) -> tuple[int, int, int]:
    """(num_heads, num_kv_heads, head_dim)."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv_heads, head_dim


def block_linears(layer) -> dict[str, torch.nn.Linear]:
    return {name: layer.get_submodule(name) for name in BLOCK_LINEARS}


def rotary_cos_sin(model, seq_len: int, device, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [1, T, D] for positions 0..T-1 from the model's own rotary embedding (handles rope scaling)."""
    positions = torch.arange(seq_len, device=device)[None]
    rotary = model.model.rotary_emb.to(device)
    cos, sin = rotary(torch.zeros(1, dtype=dtype, device=device), positions)
    return cos.to(dtype), sin.to(dtype)
