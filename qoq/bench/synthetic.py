"""Synthetic models of published shapes for `qoq bench --shape NAME`.

Speed does not depend on the weights' values, so a synthetic model takes random weights and quantizes
them with qoq's own RTN progressive quantization (no calibration), directly on the benchmark device,
one linear at a time: the whole FP16 model is never materialised on the CPU (nor, at once, on the GPU).
The result is an in-memory `Artifact` (the engine's input, tensors already on the device) plus, on
demand, its FP16 twin (the dequantized weights, for the FP16-engine baseline).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from qoq.scheme.progressive import dequantize, quantize_weight
from qoq.errors import QoqError
from qoq.formats.artifact import Artifact, block_linear_shapes, quantization_config, quantized_tensors
from qoq.models.arch import ARCHITECTURES

QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")  # the linears with a bias in HAS_QKV_BIAS

# Published configs (the models' config.json on the Hugging Face hub).
SHAPES: dict[str, dict] = {
    "llama-3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                       rope_theta=500000.0, max_position_embeddings=8192, rms_norm_eps=1e-5,
                       tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001),
    "llama-2-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, head_dim=128, vocab_size=32000,
                       rope_theta=10000.0, max_position_embeddings=4096, rms_norm_eps=1e-5,
                       tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
    # Mistral-7B-v0.1 shape; its 4096-token sliding window never binds at bench lengths, so it is left off.
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=32000,
                       rope_theta=10000.0, max_position_embeddings=32768, rms_norm_eps=1e-5,
                       tie_word_embeddings=False, sliding_window=None, bos_token_id=1, eos_token_id=2),
    "qwen2-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                     num_attention_heads=28, num_key_value_heads=4, head_dim=128, vocab_size=152064,
                     rope_theta=1000000.0, max_position_embeddings=32768, rms_norm_eps=1e-6,
                     tie_word_embeddings=False, use_sliding_window=False, bos_token_id=151643, eos_token_id=151643),
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
                         rope_theta=100000.0, max_position_embeddings=8192, rms_norm_eps=1e-5,
                         tie_word_embeddings=True, bos_token_id=0, eos_token_id=0),
}
SHAPE_CHOICES = tuple(SHAPES)
HAS_QKV_BIAS = {"qwen2"}


@dataclass(frozen=True)
class ModelDims:
    """The sizes the memory plan and the roofline need."""

    model_type: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @classmethod
    def from_config(cls, cfg: dict) -> "ModelDims":
        heads = cfg["num_attention_heads"]
        return cls(model_type=cfg.get("model_type", "llama"), layers=cfg["num_hidden_layers"],
                   hidden=cfg["hidden_size"], intermediate=cfg["intermediate_size"], heads=heads,
                   kv_heads=cfg.get("num_key_value_heads") or heads,
                   head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads, vocab=cfg["vocab_size"],
                   tied=bool(cfg.get("tie_word_embeddings", False)))

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(N, K) of the seven linears of one block, by their names in the block ("self_attn.q_proj", ...)."""
        return block_linear_shapes(self.hidden, self.intermediate, self.heads, self.kv_heads, self.head_dim)

    @property
    def linear_params(self) -> int:
        """Weights of all quantized linears (all blocks)."""
        return self.layers * sum(n * k for n, k in self.linear_shapes().values())

    def kv_bytes_per_token(self, kv_bits: int) -> int:
        """KV cache bytes per token (all layers): fp16 K and V, or 4-bit codes + fp16 scale and zero."""
        if kv_bits == 16:
            per_head = 2 * self.head_dim
        elif kv_bits == 4:
            per_head = self.head_dim // 2 + 4
        else:
            raise ValueError(kv_bits)
        return self.layers * 2 * self.kv_heads * per_head

    def as_dict(self) -> dict:
        return {"model_type": self.model_type, "layers": self.layers, "hidden": self.hidden,
                "intermediate": self.intermediate, "heads": self.heads, "kv_heads": self.kv_heads,
                "head_dim": self.head_dim, "vocab": self.vocab, "tied_embeddings": self.tied,
                "linear_params": self.linear_params,
                "kv4_bytes_per_token": self.kv_bytes_per_token(4),
                "fp16_kv_bytes_per_token": self.kv_bytes_per_token(16)}


def shape_config(shape: str) -> dict:
    """The HF config dict (torch_dtype float16) of a named shape."""
    try:
        cfg = dict(SHAPES[shape])
    except KeyError:
        raise QoqError(f"--shape {shape!r} is not one of {', '.join(SHAPE_CHOICES)}") from None
    cfg.setdefault("torch_dtype", "float16")
    cfg.setdefault("architectures", [ARCHITECTURES[cfg["model_type"]]])
    return cfg


def build_synthetic_artifact(shape: str, device: torch.device | str, group_size: int = 128, seed: int = 0,
                             reporter=None) -> Artifact:
    """Random weights of the named shape, RTN-quantized by `quantize_weight` on `device`, layer by layer."""
    device = torch.device(device)
    cfg = shape_config(shape)
    dims = ModelDims.from_config(cfg)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, tuple[int, int]] = {}
    bias = dims.model_type in HAS_QKV_BIAS

    def randn(*shape_, std):
        return torch.randn(*shape_, generator=gen, device=device, dtype=torch.float32).mul_(std)

    layers = range(dims.layers)
    if reporter is not None:
        layers = reporter.track(layers, f"quantizing synthetic {shape} (RTN, g{group_size}) on {device.type}")
    for i in layers:
        p = f"model.layers.{i}"
        for lname, (n, k) in dims.linear_shapes().items():
            name = f"{p}.{lname}"
            w = randn(n, k, std=k ** -0.5)
            qw = quantize_weight(w, group_size)
            del w
            b = randn(n, std=0.02).half() if bias and lname in QKV else None
            tensors.update(quantized_tensors(name, qw, b))
            modules[name] = (n, k)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"{p}.{norm}.weight"] = (1 + randn(dims.hidden, std=0.02)).half()
    tensors["model.embed_tokens.weight"] = randn(dims.vocab, dims.hidden, std=0.02).half()
    tensors["model.norm.weight"] = torch.ones(dims.hidden, dtype=torch.float16, device=device)
    if not dims.tied:
        tensors["lm_head.weight"] = randn(dims.vocab, dims.hidden, std=dims.hidden ** -0.5).half()
    recipe = {"name": "rtn", "synthetic": True, "seed": seed, "calibration": None, "rotation": False}
    config = {**cfg, "quantization_config": quantization_config(group_size, modules, recipe)}
    report = {"source": {"model": f"synthetic:{shape}", "weights": "random, RTN-quantized on the bench device"}}
    return Artifact(path=Path(f"<synthetic {shape}>"), config=config, tensors=tensors, report=report)


def fp16_twin(artifact: Artifact, device: torch.device | str) -> dict[str, torch.Tensor]:
    """The FP16 weights the artifact represents (dequantized linears, fp16 rest), built on `device` one
    linear at a time: the FP16-engine baseline runs the same model."""
    device = torch.device(device)
    out: dict[str, torch.Tensor] = {}
    modules = artifact.qconfig["modules"]
    owned = {t for name in modules for t in artifact.tensors if t.startswith(name + ".")}
    for name in modules:
        sub = {t: v.to(device) for t, v in artifact.tensors.items() if t.startswith(name + ".")}
        one = Artifact(path=artifact.path, config=artifact.config, tensors=sub)
        out[f"{name}.weight"] = dequantize(one.quantized_weight(name)).to(torch.float16)
        if f"{name}.bias" in sub:
            out[f"{name}.bias"] = sub[f"{name}.bias"].to(torch.float16)
        del sub, one
    for t, v in artifact.tensors.items():
        if t not in owned:
            out[t] = v.to(device=device, dtype=torch.float16)
    return out
