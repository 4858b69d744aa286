"""The reference runtime: engine logits vs a simulated-quantization model, prefill/decode consistency,
backend selection, the cached W4A8 linear, the kernel check, generation."""
from __future__ import annotations

import pytest
import torch

from qoq.scheme.progressive import quantize_weight
from qoq.errors import QoqError
from qoq.formats.artifact import quantization_config, quantized_tensors, read_artifact, write_artifact
from qoq.models.arch import BLOCK_LINEARS
from qoq.scheme import ops
from qoq.runtime.backend import Backend, cached_w4a8_linear, get_backend, reference_backend
from qoq.runtime.engine import Engine, sample
from qoq.verify.kernel_check import check_kernels
from qoq.verify.lockstep import Recording, lockstep_compare, record_engine, rel_err
from qoq.verify.simulated import simulated_model

VOCAB = 211


def tiny_hf_model(arch: str, seed: int = 0):
    """2 layers, 6 heads / 2 KV heads (GQA), head_dim 16, hidden 96 (not a multiple of 128: K padding),
    intermediate 160. llama: tied embeddings + Llama-3 rope scaling; qwen2: q/k/v bias, untied lm_head."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    kw = dict(hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=6,
              num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, rms_norm_eps=1e-6)
    if arch == "llama":
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
        model = LlamaForCausalLM(LlamaConfig(tie_word_embeddings=True, max_position_embeddings=256,
                                             rope_parameters=rope, **kw))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=False, max_position_embeddings=256, **kw))
    model.eval().requires_grad_(False)
    with torch.no_grad():  # HF's init (std 0.02) is nearly linear: make the function non-trivial
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight.uniform_(0.5, 1.5)
            layer.self_attn.k_proj.weight[3] *= 6
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                if lin.bias is not None:
                    lin.bias.normal_(0, 0.1)
        model.model.norm.weight.uniform_(0.5, 1.5)
    return model


def write_tiny_artifact(model, group_size: int, path) -> str:
    """RTN-quantize every block linear of `model` into an artifact at `path` (the artifact format API)."""
    tensors = {"model.embed_tokens.weight": model.model.embed_tokens.weight.half(),
               "model.norm.weight": model.model.norm.weight.half()}
    modules = {}
    for i, layer in enumerate(model.model.layers):
        for name in BLOCK_LINEARS:
            lin = layer.get_submodule(name)
            full = f"model.layers.{i}.{name}"
            tensors.update(quantized_tensors(full, quantize_weight(lin.weight, group_size), lin.bias))
            modules[full] = tuple(lin.weight.shape)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"model.layers.{i}.{norm}.weight"] = layer.get_submodule(norm).weight.half()
    if not model.config.tie_word_embeddings:
        tensors["lm_head.weight"] = model.lm_head.weight.half()
    config = model.config.to_dict()
    config["quantization_config"] = quantization_config(group_size, modules, {"name": "rtn"})
    return str(write_artifact(path, config, {k: v.contiguous() for k, v in tensors.items()}, {}))


@pytest.fixture(scope="module")
def tiny_artifacts(tmp_path_factory):
    built = {}

    def make(arch: str, group_size: int):
        key = (arch, group_size)
        if key not in built:
            path = tmp_path_factory.mktemp(f"art-{arch}-{group_size}") / "a"
            built[key] = read_artifact(write_tiny_artifact(tiny_hf_model(arch), group_size, path))
        return built[key]
    return make


TIGHT = 2e-5  # fp32 rounding, relative to the largest element


def rel_fro(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


CASES = [("llama", 128), ("llama", 32), ("llama", -1), ("qwen2", 128), ("qwen2", 32), ("qwen2", -1)]


@pytest.mark.parametrize("arch,group", CASES)
def test_engine_matches_simulated_quantization(tiny_artifacts, arch, group):
    art = tiny_artifacts(arch, group)
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 40))
    errs, got, want = lockstep_compare(art, ids)
    assert got.shape == (2, 40, VOCAB)
    assert all(e < TIGHT for e in errs.values()), errs
    # free-running (no lockstep), the two agree up to a few quantizer boundary flips ...
    sim = simulated_model(art)
    with torch.no_grad():
        free = sim(ids).logits
        unquantized = simulated_model(art, act_quant=False, kv_quant=False)(ids).logits
    assert rel_fro(got, free) < 1e-2
    # ... and the quantization they simulate is a much larger effect than that
    assert rel_fro(unquantized, free) > 0.05


def lockstep_replay(engine: Engine, rec: Recording) -> dict[str, float]:
    """Make `engine` check each quantizer input and K/V against `rec` (a full prefill of the same
    sequences) at the positions being run, then use the recorded values. Returns the error dict."""
    errs = {"quantizer inputs": 0.0, "post-RoPE k/v": 0.0}
    fns = engine.backend.fns
    counts = Recording(engine)

    def wrap(name):
        fn = fns[name]

        def call(*args, **kwargs):
            layer, j = counts.slot(name)
            if name == "kv4_append":
                cache, k, v, start = args
                s, t = int(start[0]), k.shape[2]
                k_ref, v_ref = (x[:, :, s:s + t] for x in rec.kv[layer])
                errs["post-RoPE k/v"] = max(errs["post-RoPE k/v"], rel_err(k, k_ref), rel_err(v, v_ref))
                return fn(cache, k_ref.clone(), v_ref.clone(), start)
            b = engine.lengths.shape[0]
            s = int(engine.lengths[0])
            raw = list(args)
            for idx, ref in enumerate(rec.raw[(layer, j)]):
                full = ref.view(b, -1, ref.shape[-1])
                t = args[idx].shape[0] // b
                piece = full[:, s:s + t].reshape(b * t, -1)
                errs["quantizer inputs"] = max(errs["quantizer inputs"], rel_err(args[idx], piece))
                raw[idx] = piece.clone()
            return fn(*raw, **kwargs)
        return call

    names = ("rmsnorm_quantize", "quantize_act", "silu_mul_quantize", "kv4_append")
    engine.backend = Backend(engine.backend.name, {**fns, **{n: wrap(n) for n in names}})
    return errs


@pytest.mark.parametrize("arch,group", [("llama", 128), ("qwen2", -1)])
def test_prefill_then_decode_equals_full_prefill(tiny_artifacts, arch, group):
    art = tiny_artifacts(arch, group)
    torch.manual_seed(2)
    ids = torch.randint(0, VOCAB, (2, 40))
    ref_engine = Engine(art, device="cpu", backend="reference")
    rec = record_engine(ref_engine)
    full = ref_engine.logits(ids)

    engine = Engine(art, device="cpu", backend="reference")
    errs = lockstep_replay(engine, rec)
    engine.reset(2, 8)  # small on purpose: the cache grows
    parts = [engine.prefill(ids[:, :30], all_logits=True)]
    parts.append(engine.prefill(ids[:, 30:33], all_logits=True))  # chunked prefill continues the cache
    for j in range(33, 40):
        parts.append(engine.decode_step(ids[:, j])[:, None])
    assert engine.lengths.tolist() == [40, 40]
    assert all(e < TIGHT for e in errs.values()), errs
    assert rel_err(torch.cat(parts, 1), full) < TIGHT

    # free-running: the same up to quantizer boundary flips; a batch equals its sequences one by one
    plain = Engine(art, device="cpu", backend="reference")
    plain.reset(2, 40)
    free = torch.cat([plain.prefill(ids[:, :33], all_logits=True)]
                     + [plain.decode_step(ids[:, j])[:, None] for j in range(33, 40)], 1)
    assert rel_fro(free, full) < 1e-2
    assert rel_err(plain.logits(ids[1:])[0], full[1]) < TIGHT


def test_generate_greedy_follows_logits(tiny_artifacts):
    engine = Engine(tiny_artifacts("llama", 128), device="cpu", backend="reference")
    prompt = torch.randint(0, VOCAB, (12,), generator=torch.Generator().manual_seed(3))
    out = list(engine.generate(prompt, max_new_tokens=6))
    assert len(out) == 6
    logits = engine.logits(torch.cat([prompt, torch.tensor(out[:-1])]))[0, prompt.numel() - 1:]
    for pos, tok in enumerate(out):
        assert logits[pos, tok] >= logits[pos].max() - 1e-4
    eos = {out[2]}
    assert list(engine.generate(prompt, max_new_tokens=6, eos_token_ids=eos)) == out[:2]
    g = torch.Generator().manual_seed(0)
    assert 0 <= sample(logits[0], temperature=0.8, top_p=0.9, generator=g) < VOCAB


def test_sample_top_p_keeps_the_nucleus():
    logits = torch.tensor([5.0, 4.0, -10.0, -10.0])
    g = torch.Generator().manual_seed(0)
    draws = {sample(logits, temperature=1.0, top_p=0.5, generator=g) for _ in range(50)}
    assert draws == {0}
    draws = {sample(logits, temperature=1.0, top_p=0.99, generator=g) for _ in range(200)}
    assert draws == {0, 1}


@pytest.mark.parametrize("group", [128, -1])
def test_cached_linear_is_exact(group):
    torch.manual_seed(4)
    w = torch.randn(96, 2304) * 0.05  # K > 1024: the chunked fp32 path
    w[:, 7] *= 30
    qw = quantize_weight(w, group)
    ql = ops.QLinear.from_tensors(quantized_tensors("x", qw), "x", 96, 2304, group)
    a = ops.quantize_act(torch.randn(5, 2304) * 3, ql.padded_in, with_qsum=group == -1)
    a.q[0] = 127  # worst case: every product at its bound
    a.q[1] = -127
    want = ops.w4a8_linear(a, ql, torch.float32)
    assert torch.equal(cached_w4a8_linear(a, ql, torch.float32), want)
    assert torch.equal(cached_w4a8_linear(a, ql, torch.float32), want)  # second call: cached operand
    acc_exact = ops.int_matmul(a.q, ops.int8_weight(ql))
    from qoq.runtime.backend import _exact_f32_matmul
    assert torch.equal(_exact_f32_matmul(a.q, {}, ops.int8_weight(ql)), acc_exact)


def test_backend_selection():
    cpu = torch.device("cpu")
    assert get_backend("auto", cpu).name == "reference"
    assert get_backend("reference", cpu).name == "reference"
    with pytest.raises(QoqError, match="cupy"):
        get_backend("cupy", cpu)
    with pytest.raises(QoqError, match="not one of"):
        get_backend("fast", cpu)
    be = reference_backend()
    for name in ("quantize_act", "rmsnorm_quantize", "silu_mul_quantize", "w4a8_linear", "kv4_append",
                 "decode_attention_kv4", "apply_rope", "kv4_quantize", "kv4_dequantize"):
        assert callable(getattr(be, name))


def test_kernel_check_reports_per_op_errors(tiny_artifacts):
    art = tiny_artifacts("qwen2", 128)
    windows = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(5))
    same = check_kernels(art, windows, torch.device("cpu"), reference_backend(), reference_backend(), decode_tokens=4)
    assert set(same.ops) >= {"rmsnorm_quantize", "w4a8_linear", "kv4_append", "decode_attention_kv4",
                             "silu_mul_quantize", "quantize_act", "apply_rope"}
    assert all(e.max_rel == 0 and e.int_mismatch == 0 for e in same.ops.values())
    assert same.logits_rel_error == 0
    # a candidate whose GEMM epilogue is off by 1% and whose KV4 append is off by one code
    ref = reference_backend()

    def bad_linear(a, w, out_dtype=torch.float16):
        return ref.w4a8_linear(a, w, out_dtype) * 1.01

    def bad_append(cache, k, v, start):
        ref.kv4_append(cache, k, v, start)
        cache.k[..., 0] ^= 1

    bad = Backend("bad", {**ref.fns, "w4a8_linear": bad_linear, "kv4_append": bad_append})
    res = check_kernels(art, windows, torch.device("cpu"), bad, reference_backend(), decode_tokens=4)
    assert 0.009 < res.ops["w4a8_linear"].max_rel < 0.011
    assert res.ops["kv4_append"].int_mismatch > 0 and res.ops["kv4_append"].max_int_diff == 1
    assert res.ops["rmsnorm_quantize"].max_rel == 0
    assert res.logits_rel_error > 1e-3


def test_engine_refuses_folded_norms_that_are_not_ones(tiny_artifacts):
    import copy
    art = copy.copy(tiny_artifacts("llama", 128))
    art.config = copy.deepcopy(art.config)
    art.config["quantization_config"]["norms_folded"] = True
    art.tensors = {k: (torch.ones_like(v) if "norm" in k else v) for k, v in art.tensors.items()}
    Engine(art, device="cpu", backend="reference")  # folded norms, all ones: accepted
    art.tensors["model.layers.1.input_layernorm.weight"] = art.tensors["model.layers.1.input_layernorm.weight"] * 2
    with pytest.raises(QoqError, match="norms_folded"):
        Engine(art, device="cpu", backend="reference")
