"""The engine's fast (serving) mode, which `qoq bench` measures (Engine(fast=True)): the same integers as the
plain path (fused q|k|v and gate|up GEMMs, row-chunked prefill, host-mirrored lengths), and its FP16 prefill
attention equals the plain path's attention over unquantized K/V."""
from __future__ import annotations

import pytest
import torch

from qoq.bench import synthetic
from qoq.runtime import backend as B
from qoq.scheme import ops
from qoq.runtime.engine import Engine
from qoq.runtime.fast import prefill_attention_fp16

TINY = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=300, rope_theta=10000.0, max_position_embeddings=512,
            rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)
VARIANTS = {"llama-g32": ({}, 32), "qwen2-per-channel": ({"model_type": "qwen2", "use_sliding_window": False}, -1),
            "mha-g64": ({"num_key_value_heads": 4}, 64)}


@pytest.fixture
def shape(monkeypatch, request):
    extra, group = VARIANTS[request.param]
    monkeypatch.setitem(synthetic.SHAPES, "tiny", {**TINY, **extra})
    return group


@pytest.mark.parametrize("shape", list(VARIANTS), indirect=True)
def test_serving_mode_gives_the_same_integers(shape):
    group = shape
    ref = Engine(synthetic.build_synthetic_artifact("tiny", "cpu", group), device="cpu", backend="reference")
    fast = Engine(synthetic.build_synthetic_artifact("tiny", "cpu", group), device="cpu", backend="reference",
                  fast=True)
    fast.prefill_fp16 = False  # attend over KV4 like the default path
    layer = fast.layers[0]
    qkv = layer.qkv
    assert qkv is not None and layer.gate_up is not None
    assert layer.q_proj.qweight.untyped_storage().data_ptr() == qkv.qweight.untyped_storage().data_ptr()
    ids = torch.randint(0, TINY["vocab_size"], (3, 10))
    ref.reset(3, 16)
    fast.reset(3, 16)
    want = ref.prefill(ids)
    got = torch.cat([fast.prefill(ids[:2], rows=slice(0, 2)), fast.prefill(ids[2:], rows=slice(2, 3))])
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    tok = want.argmax(-1)
    for step in range(3):
        want, got = ref.decode_step(tok), fast.decode_step(tok)
        assert torch.equal(got, want), step
        tok = want.argmax(-1)
    assert fast._host_len.tolist() == [13, 13, 13] and fast.lengths.tolist() == [13, 13, 13]
    cache = fast.cache[0].k
    fast.reset(3, 16)  # same shape: the cache is kept, the lengths zeroed
    assert fast.cache[0].k is cache and fast.lengths.tolist() == [0, 0, 0]


def test_fp16_prefill_attention_is_attention_over_unquantized_kv(monkeypatch):
    monkeypatch.setitem(synthetic.SHAPES, "tiny", TINY)
    raw = {}

    def append(cache, k, v, start):
        raw[cache.k.data_ptr()] = (k.clone(), v.clone())
        ops.kv4_append(cache, k, v, start)

    ref_backend = B.reference_backend()
    ref = Engine(synthetic.build_synthetic_artifact("tiny", "cpu", 32), device="cpu",
                 backend=B.Backend("reference", {**ref_backend.fns, "kv4_append": append}))
    ref._prefill_attention = lambda q, cache, start, t, total: prefill_attention_fp16(
        q, *raw[cache.k.data_ptr()], ref.sm_scale, ref.act_dtype)
    fast = Engine(synthetic.build_synthetic_artifact("tiny", "cpu", 32), device="cpu", backend="reference", fast=True)
    ids = torch.randint(0, TINY["vocab_size"], (2, 9))
    ref.reset(2, 12)
    fast.reset(2, 12)
    assert torch.allclose(fast.prefill(ids), ref.prefill(ids), atol=1e-6)


@pytest.mark.gpu
def test_serving_mode_on_gpu():
    """cupy backend: serving mode (fused GEMMs, RoPE+KV4 append kernel, CUDA-graph decode) against the
    default path, and graph decode against eager decode."""
    from qoq.runtime.backend import cupy_available

    if not cupy_available()[0]:
        pytest.skip(cupy_available()[1])
    art = synthetic.build_synthetic_artifact("smollm2-135m", "cuda", 128)
    default = Engine(art, device="cuda", backend="cupy", fast=False)
    fast = Engine(art, device="cuda", backend="cupy", fast=True)
    eager = Engine(art, device="cuda", backend="cupy", fast=True, cuda_graph=False)
    fast.prefill_fp16 = eager.prefill_fp16 = False
    ids = torch.randint(0, 49152, (4, 100), device="cuda")
    for e in (default, fast, eager):
        e.reset(4, 128)
    want = default.prefill(ids)
    got = torch.cat([fast.prefill(ids[:3], rows=slice(0, 3)), fast.prefill(ids[3:], rows=slice(3, 4))])
    got_eager = eager.prefill(ids)

    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max())

    assert rel(got, want) < 2e-2 and rel(got_eager, want) < 2e-2
    tok = want.argmax(-1)
    for _ in range(6):
        w, g, ge = default.decode_step(tok), fast.decode_step(tok), eager.decode_step(tok)
        assert rel(g, w) < 2e-2 and rel(ge, w) < 2e-2 and rel(g, ge) < 1e-2
        tok = w.argmax(-1)
    assert fast.cuda_graph and fast.graph_error is None and len(fast._graphs) == 1
