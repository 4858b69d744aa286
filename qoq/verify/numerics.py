"""Numerics: a simulated-quantization HF model of an artifact, and the kernel-vs-reference check.

`simulated_model(artifact)` is the plain floating-point twin of what the engine computes: an HF model
whose linears hold the dequantized weights W_hat, with fake per-token INT8 quantization of every linear
input and fake KV4 (quantize + dequantize) of the post-RoPE keys and values inside attention. The
reference engine must match it within floating-point rounding.

`check_kernels(...)` runs the reference engine on real token windows; at every kernel call it replays
the same inputs through a candidate backend (the cupy kernels) and records the largest relative error
per op type, so errors never accumulate across layers and each op is judged on its own.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from qoq.scheme.progressive import dequantize
from qoq.formats.artifact import Artifact
from qoq.scheme import ops
from qoq.runtime.backend import KERNELS, Backend

FAKE_KV4_ATTENTION = "qoq_fake_kv4"


# ---- simulated quantization -----------------------------------------------------------------------

def fake_quant_act(x: torch.Tensor) -> torch.Tensor:
    """Per-token symmetric INT8 quantize-dequantize of x [..., K] (ops.quantize_act's integers)."""
    shape = x.shape
    a = ops.quantize_act(x.reshape(-1, shape[-1]), shape[-1])
    return (a.q.float() * a.scale[:, None]).reshape(shape).to(x.dtype)


def fake_kv4(x: torch.Tensor) -> torch.Tensor:
    """Per-token, per-head asymmetric UINT4 quantize-dequantize of x [..., D] (ops.kv4_quantize)."""
    return ops.kv4_dequantize(*ops.kv4_quantize(x)).to(x.dtype)


def _register_fake_kv4_attention() -> None:
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def attention(module, query, key, value, attention_mask, **kwargs):
        hook = getattr(module, "qoq_kv_hook", None)  # (layer_idx, key, value) -> (key, value): for tests
        if hook is not None:
            key, value = hook(module.layer_idx, key, value)
        elif getattr(module, "qoq_kv_quant", True):
            key, value = fake_kv4(key), fake_kv4(value)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(FAKE_KV4_ATTENTION, attention)


def simulated_model(art: Artifact, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                    act_quant: bool = True, kv_quant: bool = True):
    """The HF model with W_hat weights, fake INT8 activations and fake KV4 (see module doc)."""
    from transformers import AutoModelForCausalLM

    from qoq.runtime.engine import hf_config

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
            model.get_submodule(name).register_forward_pre_hook(lambda _m, args: (fake_quant_act(args[0]),))
    return model

# ---- lockstep comparison ------------------------------------------------------------------------------
# Quantizers are discontinuous: two computations that agree to fp32 rounding (1e-7) still put a value on
# different sides of a rounding boundary now and then (an INT8 code or a KV4 code one step apart), and
# in a deep quantized model such a step grows from layer to layer. So `lockstep_compare` runs the engine
# and the simulated-quantization model in *lockstep*: at every quantizer input and every linear output
# the model's value is checked against the engine's (recorded) one and then replaced by it; each stage is
# judged on identical inputs and nothing accumulates.

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
    from qoq.runtime.engine import Engine

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


# ---- kernel check ---------------------------------------------------------------------------------

@dataclass
class OpError:
    calls: int = 0
    max_rel: float = 0.0  # max over calls of max|cand - ref| / max|ref|, over the float outputs
    int_mismatch: int = 0  # integer outputs (int8 codes, KV4 nibbles, qsum) that differ
    int_total: int = 0
    max_int_diff: int = 0

    def as_dict(self) -> dict:
        return {"calls": self.calls, "max_rel_error": self.max_rel, "int_mismatches": self.int_mismatch,
                "int_values": self.int_total, "max_int_diff": self.max_int_diff}


@dataclass
class KernelCheck:
    candidate: str
    ops: dict[str, OpError] = field(default_factory=dict)
    logits_rel_error: float | None = None
    tokens: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"candidate": self.candidate, "tokens": self.tokens, "seconds": self.seconds,
                "logits_rel_error": self.logits_rel_error, "ops": {k: v.as_dict() for k, v in self.ops.items()}}


def _clone(x):
    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, ops.KV4Cache):
        return ops.KV4Cache(*(getattr(x, f).clone() for f in ("k", "k_scale", "k_zero", "v", "v_scale", "v_zero")))
    if isinstance(x, ops.QuantAct):
        return ops.QuantAct(x.q.clone(), x.scale.clone(), None if x.qsum is None else x.qsum.clone())
    return x


def _leaves(x) -> list[torch.Tensor | None]:
    if isinstance(x, ops.QuantAct):
        return [x.q, x.scale, x.qsum]
    if isinstance(x, ops.KV4Cache):
        return [x.k, x.k_scale, x.k_zero, x.v, x.v_scale, x.v_zero]
    if isinstance(x, (tuple, list)):
        return [t for item in x for t in _leaves(item)]
    return [x]


def _compare(err: OpError, ref, cand) -> None:
    err.calls += 1
    for r, c in zip(_leaves(ref), _leaves(cand), strict=True):
        if r is None or c is None:
            continue
        if r.dtype.is_floating_point:
            denom = r.float().abs().max().clamp_min(1e-30)
            err.max_rel = max(err.max_rel, float((c.float() - r.float()).abs().max() / denom) if r.numel() else 0.0)
        else:
            if r.dtype == torch.uint8:  # packed nibbles: compare the 4-bit values
                r = torch.stack((r & 0xF, r >> 4), -1)
                c = torch.stack((c & 0xF, c >> 4), -1)
            d = (c.to(torch.int64) - r.to(torch.int64)).abs()
            err.int_mismatch += int((d > 0).sum())
            err.int_total += d.numel()
            err.max_int_diff = max(err.max_int_diff, int(d.max()) if d.numel() else 0)


def comparing_backend(reference: Backend, candidate: Backend, result: KernelCheck) -> Backend:
    """A backend that computes with `reference` and replays each call through `candidate`."""
    def wrap(name):
        ref_fn, cand_fn = reference.fns[name], candidate.fns[name]

        def fn(*args, **kwargs):
            cargs = [_clone(a) for a in args]
            ckw = {k: _clone(v) for k, v in kwargs.items()}
            out = ref_fn(*args, **kwargs)
            cout = cand_fn(*cargs, **ckw)
            err = result.ops.setdefault(name, OpError())
            if name == "kv4_append":  # in place: compare the caches after the append
                _compare(err, args[0], cargs[0])
            else:
                _compare(err, out, cout)
            return out
        return fn

    fns = dict(reference.fns)
    for name in KERNELS:
        if name not in candidate.fallbacks:
            fns[name] = wrap(name)
    return Backend(f"{reference.name}+check", fns)


@torch.no_grad()
def check_kernels(art: Artifact, windows: torch.Tensor, device: torch.device, candidate: Backend,
                  reference: Backend, decode_tokens: int = 8) -> KernelCheck:
    """Per-op errors of `candidate` against `reference` on `windows` [N, T] (prefill, then decode the last
    `decode_tokens` tokens one by one), plus the relative error of the two engines' final logits."""
    from qoq.runtime.engine import Engine

    t0 = time.perf_counter()
    result = KernelCheck(candidate=candidate.describe())
    checker = Engine(art, device=device, backend=comparing_backend(reference, candidate, result), fast=False)
    fast = Engine(art, device=device, backend=candidate, fast=False)
    worst = 0.0
    for row in windows:
        ids = row[None].to(device)
        split = max(1, ids.shape[1] - decode_tokens)
        for eng in (checker, fast):
            eng.reset(1, ids.shape[1])
        ref_logits = [checker.prefill(ids[:, :split], all_logits=True)]
        cand_logits = [fast.prefill(ids[:, :split], all_logits=True)]
        for j in range(split, ids.shape[1]):
            ref_logits.append(checker.decode_step(ids[:, j])[:, None])
            cand_logits.append(fast.decode_step(ids[:, j])[:, None])
        r, c = torch.cat(ref_logits, 1), torch.cat(cand_logits, 1)
        worst = max(worst, float((c - r).abs().max() / r.abs().max().clamp_min(1e-30)))
        result.tokens += ids.shape[1]
    result.logits_rel_error = worst
    result.seconds = time.perf_counter() - t0
    return result


# ---- whole-model comparison of two backends --------------------------------------------------------
# Two independent engines (no lockstep: each runs on its own from the token ids up) see the same windows,
# teacher-forced: one prefill of the first T - decode_tokens tokens, then the last tokens decoded one by one
# (as check_kernels splits them). Since a quantizer boundary flip now and then changes one value a lot, the
# worst single logit (max_rel) says little on its own; the Frobenius, per-position, top-1, KL and NLL figures
# say how close the two models are as a whole.

def _plain_engine(art: Artifact, device, backend):
    """An engine without the fast paths (fast=False where this Engine has that argument)."""
    import inspect

    from qoq.runtime.engine import Engine

    extra = {"fast": False} if "fast" in inspect.signature(Engine).parameters else {}
    return Engine(art, device=device, backend=backend, **extra)


def _teacher_forced_logits(engine, ids: torch.Tensor, split: int) -> torch.Tensor:
    """Logits [T, V] (fp32) of one window ids [1, T]: prefill ids[:, :split], then decode the rest."""
    engine.reset(1, ids.shape[1])
    out = [engine.prefill(ids[:, :split], all_logits=True)[0]]
    out += [engine.decode_step(ids[:, j]) for j in range(split, ids.shape[1])]
    return torch.cat(out, 0).float()


def logits_metrics(r: torch.Tensor, c: torch.Tensor, ids: torch.Tensor) -> dict:
    """Metrics of candidate logits c against reference logits r ([T, V]) of the window ids [T]. Sums are kept
    (`*_sum`, `positions`, `tokens`) so that windows aggregate exactly."""
    r, c = r.float(), c.float()
    d = c - r
    diff_sq = float(torch.linalg.vector_norm(d, dtype=torch.float64) ** 2)
    ref_sq = float(torch.linalg.vector_norm(r, dtype=torch.float64) ** 2)
    pos_rel = torch.linalg.vector_norm(d, dim=-1) / torch.linalg.vector_norm(r, dim=-1).clamp_min(1e-30)
    log_r, log_c = torch.log_softmax(r, -1), torch.log_softmax(c, -1)
    kl = (log_r.exp() * (log_r - log_c)).sum(-1).clamp_min(0)  # KL(softmax(r) || softmax(c)) per position
    targets = ids[1:].to(r.device)
    nll_r = float(-log_r[:-1].gather(-1, targets[:, None]).sum())
    nll_c = float(-log_c[:-1].gather(-1, targets[:, None]).sum())
    return {
        "frobenius_rel_error": (diff_sq / max(ref_sq, 1e-300)) ** 0.5,
        "max_rel_error": float(d.abs().max() / r.abs().max().clamp_min(1e-30)),
        "position_rel_error_mean": float(pos_rel.mean()),
        "top1_agreement": float((r.argmax(-1) == c.argmax(-1)).float().mean()),
        "kl_mean": float(kl.mean()),
        "nll_reference": nll_r / targets.numel(), "nll_candidate": nll_c / targets.numel(),
        "diff_sq_sum": diff_sq, "ref_sq_sum": ref_sq, "position_rel_error_sum": float(pos_rel.sum()),
        "top1_agree_count": int((r.argmax(-1) == c.argmax(-1)).sum()), "kl_sum": float(kl.sum()),
        "nll_reference_sum": nll_r, "nll_candidate_sum": nll_c,
        "positions": int(r.shape[0]), "tokens": int(targets.numel()),
    }


def aggregate_metrics(rows: list[dict]) -> dict:
    """The metrics of `logits_metrics` over every position of every window (max_rel: the worst window)."""
    import math

    s = {k: sum(row[k] for row in rows) for k in ("diff_sq_sum", "ref_sq_sum", "position_rel_error_sum",
                                                  "top1_agree_count", "kl_sum", "nll_reference_sum",
                                                  "nll_candidate_sum", "positions", "tokens")}
    n, t = max(s["positions"], 1), max(s["tokens"], 1)
    ppl_r, ppl_c = math.exp(s["nll_reference_sum"] / t), math.exp(s["nll_candidate_sum"] / t)
    return {
        "frobenius_rel_error": (s["diff_sq_sum"] / max(s["ref_sq_sum"], 1e-300)) ** 0.5,
        "max_rel_error": max((row["max_rel_error"] for row in rows), default=0.0),
        "position_rel_error_mean": s["position_rel_error_sum"] / n,
        "top1_agreement": s["top1_agree_count"] / n,
        "kl_mean": s["kl_sum"] / n,
        "nll_reference": s["nll_reference_sum"] / t, "nll_candidate": s["nll_candidate_sum"] / t,
        "ppl_reference": ppl_r, "ppl_candidate": ppl_c, "ppl_rel_diff": ppl_c / ppl_r - 1,
        "positions": s["positions"], "tokens": s["tokens"], "windows": len(rows),
    }


@torch.no_grad()
def compare_backends(art: Artifact, windows: torch.Tensor, device, candidate: str | Backend,
                     reference: str | Backend, decode_tokens: int = 8, floor: bool = True) -> dict:
    """Whole-model logits of `candidate` against `reference` on `windows` [N, T], teacher-forced (see above):
    {"reference", "candidate", "decode_tokens", "seconds", "windows": [per-window metrics], "overall": {...}}.
    NLLs are per predicted token (tokens 1..T-1 of each window), so PPL = exp(nll).
    `floor`: also "floor" / "floor_windows": the reference against itself run another valid way (one prefill of
    the whole window, no decode). Rounding-level differences (other GEMM shapes, decode vs prefill attention)
    flip quantizer codes there too, so this is the noise floor the candidate's figures are to be read against."""
    t0 = time.perf_counter()
    ref_engine = _plain_engine(art, device, reference)
    cand_engine = _plain_engine(art, device, candidate)
    keep = ("frobenius_rel_error", "max_rel_error", "position_rel_error_mean", "top1_agreement", "kl_mean",
            "nll_reference", "nll_candidate", "positions", "tokens")
    rows, floor_rows = [], []
    for row in windows:
        ids = row[None].to(ref_engine.device)
        split = max(1, ids.shape[1] - decode_tokens)
        r = _teacher_forced_logits(ref_engine, ids, split)
        c = _teacher_forced_logits(cand_engine, ids, split)
        rows.append(logits_metrics(r, c, ids[0]))
        del c
        if floor:
            floor_rows.append(logits_metrics(r, _teacher_forced_logits(ref_engine, ids, ids.shape[1]), ids[0]))
        del r
    report = {
        "reference": ref_engine.backend.describe(), "candidate": cand_engine.backend.describe(),
        "device": str(ref_engine.device), "decode_tokens": decode_tokens, "seq_len": int(windows.shape[1]),
        "windows": [{k: row[k] for k in keep} for row in rows],
        "overall": aggregate_metrics(rows),
    }
    if floor:
        report["floor_windows"] = [{k: row[k] for k in keep} for row in floor_rows]
        report["floor"] = aggregate_metrics(floor_rows)
    report["seconds"] = time.perf_counter() - t0
    return report
