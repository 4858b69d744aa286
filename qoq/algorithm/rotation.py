"""Offline Hadamard rotation of a Llama-family model (QuaRot-style, as in the QoQ recipe).

All transforms are exact reparameterisations in real arithmetic (the FP model's logits do not change),
done in float64 and cast back to each parameter's dtype:

1. `fold_norms`: every RMSNorm weight is multiplied into the input columns of the linears that read
   it (input_layernorm -> q/k/v, post_attention_layernorm -> gate/up, final norm -> lm_head) and set
   to ones. Tied embeddings are untied first (lm_head gets its own copy), since the folded lm_head
   no longer equals the embedding.
2. `rotate_residual(Q)`: the residual stream x becomes x Q for an orthogonal Q; RMSNorm (now without
   weight) commutes with Q, so the embedding rows are right-multiplied by Q, the input columns of
   q/k/v/gate/up and lm_head are right-multiplied by Q, and the output rows of o_proj/down_proj (and
   their biases) left-multiplied by Q^T.
3. `rotate_heads(H)`: per attention head, V is rotated by an orthogonal H of size head_dim: v_proj
   rows of each KV head are left-multiplied by H^T and o_proj's input columns of every query head are
   right-multiplied by H. The same H serves all heads, so every query head of a GQA group sees its
   KV head's rotation.

`rotate_model` does the three in order with deterministic Hadamard matrices.
"""
from __future__ import annotations

import torch

from qoq.algorithm.hadamard import hadamard
from qoq.models.arch import decoder_layers, head_dims


@torch.no_grad()
def rotate_model(model, per_head: bool = True) -> dict:
    """Fold norms, rotate the residual stream (and V per head); returns what was done, for the recipe."""
    hidden = model.config.hidden_size
    _, _, head_dim = head_dims(model.config)
    fold_norms(model)
    rotate_residual(model, hadamard(hidden))
    if per_head:
        rotate_heads(model, hadamard(head_dim))
    return {"residual": f"hadamard{hidden}", "per_head": f"hadamard{head_dim}" if per_head else None}


@torch.no_grad()
def untie_lm_head(model) -> None:
    """Give lm_head its own weight if it shares the embedding's, and record that in the config."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head.weight is emb.weight or head.weight.data_ptr() == emb.weight.data_ptr():
        head.weight = torch.nn.Parameter(emb.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else None
    if text is not None and text is not model.config:
        text.tie_word_embeddings = False


@torch.no_grad()
def fold_norms(model) -> None:
    untie_lm_head(model)
    for layer in decoder_layers(model):
        _fold(layer.input_layernorm, [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj])
        _fold(layer.post_attention_layernorm, [layer.mlp.gate_proj, layer.mlp.up_proj])
    _fold(model.model.norm, [model.get_output_embeddings()])


@torch.no_grad()
def rotate_residual(model, q: torch.Tensor) -> None:
    """Residual x -> x Q (Q orthogonal [hidden, hidden]); norms must already be folded (all ones)."""
    for norm in _norms(model):
        if not torch.all(norm.weight == 1):
            raise ValueError("rotate_residual needs folded norms (call fold_norms first)")
    emb = model.get_input_embeddings()
    _set(emb.weight, emb.weight.double() @ q.double().to(emb.weight.device))
    for layer in decoder_layers(model):
        for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                    layer.mlp.gate_proj, layer.mlp.up_proj):
            _rotate_input(lin, q)
        for lin in (layer.self_attn.o_proj, layer.mlp.down_proj):
            _rotate_output(lin, q)
    _rotate_input(model.get_output_embeddings(), q)


@torch.no_grad()
def rotate_heads(model, h: torch.Tensor) -> None:
    """Per-head V rotation: v_proj rows of each KV head H^T @ W, o_proj columns of each query head W @ H."""
    heads, kv_heads, d = head_dims(model.config)
    if h.shape != (d, d):
        raise ValueError(f"per-head rotation must be {d}x{d}, got {tuple(h.shape)}")
    for layer in decoder_layers(model):
        v, o = layer.self_attn.v_proj, layer.self_attn.o_proj
        hd = h.double().to(v.weight.device)
        w = v.weight.double().view(kv_heads, d, -1)
        _set(v.weight, torch.einsum("ji,hjk->hik", hd, w).reshape(v.weight.shape))
        if v.bias is not None:
            _set(v.bias, (v.bias.double().view(kv_heads, d) @ hd).flatten())
        wo = o.weight.double().view(o.weight.shape[0], heads, d)
        _set(o.weight, torch.einsum("nhj,jk->nhk", wo, hd.to(o.weight.device)).reshape(o.weight.shape))


def _norms(model):
    for layer in decoder_layers(model):
        yield layer.input_layernorm
        yield layer.post_attention_layernorm
    yield model.model.norm


def _fold(norm, linears) -> None:
    w = norm.weight.double()
    for lin in linears:
        _set(lin.weight, lin.weight.double() * w.to(lin.weight.device)[None, :])
    norm.weight.data.fill_(1.0)


def _rotate_input(lin, q: torch.Tensor) -> None:
    _set(lin.weight, lin.weight.double() @ q.double().to(lin.weight.device))


def _rotate_output(lin, q: torch.Tensor) -> None:
    qd = q.double().to(lin.weight.device)
    _set(lin.weight, qd.t() @ lin.weight.double())
    if lin.bias is not None:
        _set(lin.bias, lin.bias.double() @ qd)


def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    param.data.copy_(value.to(param.dtype))
