"""Tiny in-memory Llama / Mistral / Qwen2 models with GQA for the recipe tests (not saved to disk)."""
from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from qoq.models.arch import decoder_layers

VOCAB = 211
ARCHS = ("llama", "mistral", "qwen2")


def tiny_model(arch: str, hidden: int = 96, seed: int = 0):
    """2 layers, 6 heads / 2 KV heads, head_dim 16; random norms and a few outlier channels.
    Llama and Mistral have tied embeddings, Qwen2 has q/k/v biases and an untied lm_head."""
    torch.manual_seed(seed)
    kw = dict(hidden_size=hidden, intermediate_size=160, num_hidden_layers=2, num_attention_heads=6,
              num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, max_position_embeddings=256, rms_norm_eps=1e-6)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(tie_word_embeddings=True, **kw))
    elif arch == "mistral":
        model = MistralForCausalLM(MistralConfig(tie_word_embeddings=True, sliding_window=None, **kw))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=False, **kw))
    else:
        raise ValueError(arch)
    model.eval()
    with torch.no_grad():
        for p in model.parameters():  # HF's init is tiny (std 0.02): make the function non-trivial
            if p.dim() == 2:
                p.normal_(0, 0.08)
        for layer in decoder_layers(model):
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight.uniform_(0.5, 1.5)
            layer.self_attn.k_proj.weight[3] *= 8
            layer.mlp.up_proj.weight[5] *= 6
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                if lin.bias is not None:
                    lin.bias.normal_(0, 0.1)
        model.model.norm.weight.uniform_(0.5, 1.5)
        model.model.embed_tokens.weight[:, 7] *= 10
    return model


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.double()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def one_thread():
    """Generator for an autouse fixture: tiny tensors run faster (and far more predictably on a busy
    machine) on one intra-op thread; the previous setting is restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
