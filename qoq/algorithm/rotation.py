"""Offline Hadamard rotation of a Llama-family model (QuaRot-style, as in the QoQ recipe).

All transforms are exact reparameterisations in real arithmetic (the FP model's logits do not change),
done in float64 and cast back to each parameter's dtype:

1. norm folding (`rotate_embeddings` and `rotate_layer` fold before they rotate): every RMSNorm weight is
   multiplied into the input columns of the linears that read it (input_layernorm -> q/k/v,
   post_attention_layernorm -> gate/up, final norm -> lm_head) and set to ones. Tied embeddings are
   untied first (lm_head gets its own copy), since the folded lm_head no longer equals the embedding.
2. rotation by Q (`rotate_embeddings`, then `rotate_layer` per block): the residual stream x becomes
   x Q for an orthogonal Q; RMSNorm (now without weight) commutes with Q, so the embedding rows are
   right-multiplied by Q, the input columns of q/k/v/gate/up and lm_head are right-multiplied by Q,
   and the output rows of o_proj/down_proj (and their biases) left-multiplied by Q^T.
3. per-head (`rotate_layer` with H): V is rotated by an orthogonal H of size head_dim: v_proj rows
   of each KV head are left-multiplied by H^T and o_proj's input columns of every query head are
   right-multiplied by H. The same H serves all heads, so every query head of a GQA group sees its
   KV head's rotation.

`rotate_model` does the three in order with deterministic Hadamard matrices.
"""
from __future__ import annotations

import torch

from qoq.algorithm.hadamard import hadamard
from qoq.models.arch import decoder_layers, head_dims


@torch.no_grad()
def rotate_model(model, per_head: bool = True, device=None) -> dict:
    """Fold norms, rotate the residual stream (and V per head); returns what was done, for the recipe.

    `device` (default: where the weights are) is where the float64 math runs, a block at a time."""
    q, h = rotation_matrices(model.config, per_head)
    rotate_embeddings(model, q, device)
    for layer in decoder_layers(model):
        rotate_layer(layer, q, h, model.config, device)
    return rotation_record(model.config, per_head)


def rotation_matrices(config, per_head: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(Q [hidden, hidden], H [head_dim, head_dim] or None): the deterministic Hadamard rotations."""
    _, _, head_dim = head_dims(config)
    return hadamard(config.hidden_size), (hadamard(head_dim) if per_head else None)


def rotation_record(config, per_head: bool = True) -> dict:
    _, _, head_dim = head_dims(config)
    return {"residual": f"hadamard{config.hidden_size}", "per_head": f"hadamard{head_dim}" if per_head else None}


@torch.no_grad()
def rotate_embeddings(model, q: torch.Tensor, device=None) -> None:
    """Untie, fold the final norm into lm_head, rotate the embedding rows and lm_head's input columns."""
    untie_lm_head(model)
    rotate_embedding(model.get_input_embeddings(), q, device)
    rotate_lm_head(model.get_output_embeddings(), model.model.norm, q, device)


@torch.no_grad()
def rotate_embedding(embedding, q: torch.Tensor, device=None) -> None:
    """The embedding rows right-multiplied by Q (the residual stream starts rotated)."""
    _set_chunked(embedding.weight, q, device)


@torch.no_grad()
def rotate_lm_head(lm_head, norm, q: torch.Tensor, device=None) -> None:
    """Fold the final norm into lm_head's input columns, then rotate them by Q."""
    _fold(norm, [lm_head])
    _set_chunked(lm_head.weight, q, device)


@torch.no_grad()
def rotate_layer(layer, q: torch.Tensor, h: torch.Tensor | None, config, device=None) -> None:
    """Fold this block's norms into its linears, then rotate its residual-stream sides (and V per head)."""
    _fold(layer.input_layernorm, [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj])
    _fold(layer.post_attention_layernorm, [layer.mlp.gate_proj, layer.mlp.up_proj])
    dev = device if device is not None else layer.self_attn.q_proj.weight.device
    qd = q.to(device=dev, dtype=torch.float64)
    for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                layer.mlp.gate_proj, layer.mlp.up_proj):
        _rotate_input(lin, qd)
    for lin in (layer.self_attn.o_proj, layer.mlp.down_proj):
        _rotate_output(lin, qd)
    if h is not None:
        _rotate_heads(layer, h.to(device=dev, dtype=torch.float64), config)


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


def _rotate_heads(layer, h: torch.Tensor, config) -> None:
    """Per-head V rotation: v_proj rows of each KV head H^T @ W, o_proj columns of each query head W @ H."""
    heads, kv_heads, d = head_dims(config)
    if h.shape != (d, d):
        raise ValueError(f"per-head rotation must be {d}x{d}, got {tuple(h.shape)}")
    v, o = layer.self_attn.v_proj, layer.self_attn.o_proj
    hd = h.to(device=v.weight.device, dtype=torch.float64)
    w = v.weight.double().view(kv_heads, d, -1)
    _set(v.weight, torch.einsum("ji,hjk->hik", hd, w).reshape(v.weight.shape))
    if v.bias is not None:
        _set(v.bias, (v.bias.double().view(kv_heads, d) @ hd).flatten())
    wo = o.weight.double().view(o.weight.shape[0], heads, d)
    _set(o.weight, torch.einsum("nhj,jk->nhk", wo, hd.to(o.weight.device)).reshape(o.weight.shape))


def _set_chunked(weight: torch.Tensor, q: torch.Tensor, device=None, rows: int = 8192) -> None:
    """weight[rows] @ Q in float64 on `device`, a chunk of rows at a time (embedding-sized matrices)."""
    dev = device if device is not None else weight.device
    qd = q.to(device=dev, dtype=torch.float64)
    for i in range(0, weight.shape[0], rows):
        chunk = weight.data[i:i + rows]
        chunk.copy_((chunk.to(dev, torch.float64) @ qd).to(chunk.device, chunk.dtype))


def _fold(norm, linears, rows: int = 8192) -> None:
    """A chunk of rows at a time: a float64 copy of a whole lm_head (and its product) would be 8 GB of host
    memory for an 8B model."""
    w = norm.weight.double()
    for lin in linears:
        wd = w.to(lin.weight.device)[None, :]
        for i in range(0, lin.weight.shape[0], rows):
            chunk = lin.weight.data[i:i + rows]
            chunk.copy_((chunk.double() * wd).to(chunk.dtype))
    norm.weight.data.fill_(1.0)


def _rotate_input(lin, q: torch.Tensor) -> None:
    _set(lin.weight, lin.weight.to(q.device, torch.float64) @ q)


def _rotate_output(lin, q: torch.Tensor) -> None:
    qd = q
    _set(lin.weight, qd.t() @ lin.weight.to(qd.device, torch.float64))
    if lin.bias is not None:
        _set(lin.bias, lin.bias.to(qd.device, torch.float64) @ qd)


def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    param.data.copy_(value.to(param.device, param.dtype))
