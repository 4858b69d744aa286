"""The engine against its simulated-quantization twin (qoq.verify.simulated), in lockstep.

Quantizers are discontinuous: two computations that agree to fp32 rounding (1e-7) still put a value on
different sides of a rounding boundary now and then (an INT8 code or a KV4 code one step apart), and
in a deep quantized model such a step grows from layer to layer. So `lockstep_compare` runs the engine
and the simulated-quantization model in *lockstep*: at every quantizer input and every linear output
the model's value is checked against the engine's (recorded) one and then replaced by it; each stage is
judged on identical inputs and nothing accumulates.
"""
from __future__ import annotations

import torch

from qoq.formats.artifact import Artifact
from qoq.runtime.backend import Backend
from qoq.runtime.engine import Engine
from qoq.scheme import ops
from qoq.scheme.fakequant import fake_kv4
from qoq.verify.simulated import simulated_model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))


LINEAR_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
QUANT_OF_LINEAR = {"q_proj": 0, "k_proj": 0, "v_proj": 0, "o_proj": 1, "gate_proj": 2, "up_proj": 2, "down_proj": 3}


class Recording:
    """Per layer: the quantizers' raw inputs and dequantized outputs, linear outputs, post-RoPE k/v."""

    def __init__(self, engine):
        self.n_layers = len(engine.layers)
        self.raw = {}  # (layer, j) -> tuple of raw input tensors; j: 0 qkv, 1 o, 2 gate/up, 3 down
        self.pre = {}  # (layer, j) -> fp32 quantizer input [M, K]
        self.deq = {}  # (layer, j) -> dequantized INT8 activation [M, K]
        self.linear = {}  # (layer, i) -> output [M, N]
        self.kv = {}  # layer -> (k, v) post-RoPE [B, Hkv, T, D]
        self.counts = dict.fromkeys(("rmsnorm_quantize", "quantize_act", "silu_mul_quantize", "w4a8_linear",
                                     "kv4_append"), 0)

    def slot(self, name: str):
        n = self.counts[name]
        self.counts[name] += 1
        if name == "rmsnorm_quantize":
            return n // 2 % self.n_layers, 0 if n % 2 == 0 else 2
        if name == "quantize_act":
            return n % self.n_layers, 1
        if name == "silu_mul_quantize":
            return n % self.n_layers, 3
        if name == "w4a8_linear":
            return n // 7 % self.n_layers, n % 7
        return n % self.n_layers, None


def pre_quant(name: str, args) -> torch.Tensor:
    """The fp32 tensor a fused quantize op rounds, from its arguments."""
    if name == "rmsnorm_quantize":
        return ops.rmsnorm(args[0], args[1], args[2])
    if name == "silu_mul_quantize":
        g = args[0].float()
        return g * torch.sigmoid(g) * args[1].float()
    return args[0].float()


def record_engine(engine) -> Recording:
    """Wrap `engine`'s backend so that its next run is recorded (one prefill)."""
    rec = Recording(engine)
    fns = engine.backend.fns

    def wrap(name):
        fn = fns[name]

        def call(*args, **kwargs):
            out = fn(*args, **kwargs)
            layer, j = rec.slot(name)
            if name == "w4a8_linear":
                rec.linear[(layer, j)] = out.clone()
            elif name == "kv4_append":
                rec.kv[layer] = (args[1].clone(), args[2].clone())
            else:
                n = args[0].shape[-1]
                rec.raw[(layer, j)] = tuple(a.clone() for a in args[:2] if isinstance(a, torch.Tensor) and a.dim() == 2)
                rec.pre[(layer, j)] = pre_quant(name, args)
                rec.deq[(layer, j)] = out.q[:, :n].float() * out.scale[:, None]
            return out
        return call

    engine.backend = Backend(engine.backend.name, {**fns, **{n: wrap(n) for n in rec.counts}})
    return rec


@torch.no_grad()
def lockstep_compare(art: Artifact, ids: torch.Tensor, device: str | torch.device = "cpu",
                     sim=None) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
    """Engine prefill of ids [B, T] vs the simulated-quantization model in lockstep: the largest relative
    error per check (quantizer inputs, linear outputs, post-RoPE k/v, logits), and both logits.
    `sim`: a `simulated_model(art)` to reuse; its hooks are replaced (do not use it afterwards)."""
    engine = Engine(art, device=device, backend="reference", fast=False)
    rec = record_engine(engine)
    got = engine.logits(ids)
    ids = ids.to(device)
    errs = {"quantizer inputs": 0.0, "linear outputs": 0.0, "post-RoPE k/v": 0.0}

    def note(key, a, ref):
        errs[key] = max(errs[key], rel_err(a, ref))

    sim = sim if sim is not None else simulated_model(art, device=device)
    for i, layer in enumerate(sim.model.layers):
        for name in LINEAR_ORDER:
            mod = layer.get_submodule(("self_attn." if name in LINEAR_ORDER[:4] else "mlp.") + name)
            mod._forward_pre_hooks.clear()  # the simulated model's own fake quantization is replaced

            def pre(_m, args, i=i, j=QUANT_OF_LINEAR[name]):
                x = args[0]
                note("quantizer inputs", x, rec.pre[(i, j)].view_as(x))
                return (rec.deq[(i, j)].view_as(x).to(x.dtype),)

            def post(_m, _args, y, i=i, k=LINEAR_ORDER.index(name)):
                ref = rec.linear[(i, k)].view_as(y)
                note("linear outputs", y, ref)
                return ref.to(y.dtype)

            mod.register_forward_pre_hook(pre)
            mod.register_forward_hook(post)

        def kv_hook(layer_idx, key, value):
            k_ref, v_ref = rec.kv[layer_idx]
            note("post-RoPE k/v", key, k_ref)
            note("post-RoPE k/v", value, v_ref)
            return fake_kv4(k_ref).to(key.dtype), fake_kv4(v_ref).to(value.dtype)

        layer.self_attn.qoq_kv_hook = kv_hook
    want = sim(ids).logits
    errs["logits"] = rel_err(got, want)
    return errs, got, want
