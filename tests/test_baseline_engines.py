"""The FP16 and FP8 baseline engines of `qoq bench`: the FP8 W8A8 arithmetic, the FP8 engine against the FP16
engine on the same weights, decode attention over a padded cache, and (GPU) CUDA-graph decode, flash decode
and the Triton per-token quantization against their eager / torch twins."""
from __future__ import annotations

import pytest
import torch

from qoq.bench import fp8_engine, synthetic
from qoq.bench.fp16_engine import FLASH_DECODE, FP16Engine, masked_decode_attention
from qoq.bench.fp8_engine import FP8Engine, fp8_linear, quantize_act_fp8_torch, quantize_weight_fp8

TINY = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=300, rope_theta=10000.0, max_position_embeddings=512,
            rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)


@pytest.fixture
def twin(monkeypatch):
    """(config, a function returning a fresh FP16 twin on a device) of a tiny synthetic model."""
    monkeypatch.setitem(synthetic.SHAPES, "tiny", TINY)
    art = synthetic.build_synthetic_artifact("tiny", "cpu", 32)
    cfg = {k: v for k, v in art.config.items() if k != "quantization_config"}
    return cfg, lambda device="cpu": synthetic.fp16_twin(art, device)


def test_fp8_weight_is_per_channel_absmax():
    torch.manual_seed(0)
    w = torch.randn(48, 32) * torch.linspace(0.01, 10, 48)[:, None]
    q = quantize_weight_fp8(w)
    assert q.w.dtype == torch.float8_e4m3fn and q.w.shape == (48, 32) and q.scale.shape == (1, 48)
    assert torch.allclose(q.scale[0], w.abs().amax(1) / 448)
    back = q.w.float() * q.scale.t()
    assert torch.equal(q.w.float().abs().amax(1), torch.full((48,), 448.0))  # the absmax code is exactly 448
    assert torch.allclose(back.abs().amax(1), w.abs().amax(1), rtol=1e-6)
    # e4m3: 3 mantissa bits (half a step: 1/16 relative) in the normal range, steps of 2^-9 codes below it
    assert ((back - w).abs() <= torch.maximum(w.abs() / 16, q.scale.t() * 2.0 ** -10) * (1 + 1e-6)).all()


def test_fp8_activation_quant_is_per_token_and_keeps_zero_rows_finite():
    x = torch.randn(5, 40)
    x[2] = 0
    q, s = quantize_act_fp8_torch(x)
    assert s.shape == (5, 1) and torch.isfinite(s).all() and s[2, 0] > 0
    assert torch.equal(q[2].float(), torch.zeros(40))
    assert torch.equal((q.float().abs().amax(1)), torch.tensor([448.0, 448.0, 0.0, 448.0, 448.0]))


def test_fp8_linear_is_the_product_of_the_dequantized_operands():
    torch.manual_seed(0)
    x, w = torch.randn(3, 7, 32), torch.randn(24, 32)
    wq = quantize_weight_fp8(w)
    xq, sx = quantize_act_fp8_torch(x.reshape(-1, 32))
    want = (xq.float() * sx) @ (wq.w.float() * wq.scale.t()).t()
    got = fp8_linear(x, wq)
    assert got.shape == (3, 7, 24)
    assert torch.allclose(got.reshape(-1, 24), want, rtol=1e-5, atol=1e-5)
    rel = (got - x @ w.t()).norm() / (x @ w.t()).norm()
    assert 0 < rel < 0.1  # FP8 is lossy, but close


def test_masked_decode_attention_reads_only_each_sequences_keys():
    torch.manual_seed(0)
    b, t, hkv, rep, d = 3, 10, 2, 3, 8
    q, k, v = torch.randn(b, hkv * rep, d), torch.randn(b, t, hkv, d), torch.randn(b, t, hkv, d)
    lens = torch.tensor([1, 4, 10], dtype=torch.int32)
    got = masked_decode_attention(q, k, v, lens, d ** -0.5)
    for i, n in enumerate(lens.tolist()):
        kk = k[i, :n].transpose(0, 1).repeat_interleave(rep, 0)  # [Hq, n, D]
        vv = v[i, :n].transpose(0, 1).repeat_interleave(rep, 0)
        p = torch.softmax(q[i][:, None] @ kk.transpose(1, 2) * d ** -0.5, -1)
        assert torch.allclose(got[i], (p @ vv).reshape(-1), atol=1e-5)
    k[0, 1:] = 1e4  # stale rows past a sequence's length must not leak in
    v[0, 1:] = 1e4
    assert torch.allclose(masked_decode_attention(q, k, v, lens, d ** -0.5), got, atol=1e-5)


def test_fp8_engine_tracks_the_fp16_engine(twin):
    cfg, make = twin
    fp16 = FP16Engine(cfg, make(), "cpu")
    fp8 = FP8Engine(cfg, make(), "cpu")
    assert "FP8" in fp8.describe() and "cuBLAS" in fp16.describe()
    torch.manual_seed(0)
    ids = torch.randint(0, TINY["vocab_size"], (2, 9))
    for eng in (fp16, fp8):
        eng.reset(2, 16)
    a, b = fp16.prefill(ids), fp8.prefill(ids)
    tok = a.argmax(-1)
    for _ in range(3):  # decode steps: per-sequence device lengths advance together
        a2, b2 = fp16.decode_step(tok), fp8.decode_step(tok)
        tok = a2.argmax(-1)
    assert fp8.lengths.tolist() == [12, 12] and fp8._host_len.tolist() == [12, 12]
    for x, y in ((a, b), (a2, b2)):
        rel = (x - y).norm() / x.norm()
        assert 0 < rel < 0.25, rel  # random weights amplify FP8's ~2^-4 relative steps through the layers


def test_fp16_engine_chunked_prefill_then_decode_equals_whole_batch(twin):
    cfg, make = twin
    eng = FP16Engine(cfg, make(), "cpu")
    ids = torch.randint(0, TINY["vocab_size"], (3, 6))
    eng.reset(3, 12)
    whole = eng.prefill(ids)
    step = eng.decode_step(whole.argmax(-1))
    eng.reset(3, 12)
    chunked = eng.prefill(ids, chunk_rows=2)
    assert torch.allclose(chunked, whole, atol=1e-5)
    assert torch.allclose(eng.decode_step(whole.argmax(-1)), step, atol=1e-5)
    eng.reset(3, 12)
    with pytest.raises(Exception, match="position 0"):
        eng.prefill(ids)
        eng.prefill(ids)


# ---- GPU -------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("engine_cls", [FP16Engine, FP8Engine])
def test_cuda_graph_decode_equals_eager_and_flash_decode_equals_masked(twin, engine_cls):
    cfg, make = twin
    graph = engine_cls(cfg, make("cuda"), "cuda")
    eager = engine_cls(cfg, make("cuda"), "cuda", cuda_graph=False)
    masked = engine_cls(cfg, make("cuda"), "cuda", cuda_graph=False)
    masked.decode_attention = "masked"
    ids = torch.randint(0, TINY["vocab_size"], (5, 33), device="cuda")
    # the same fed tokens for every engine: an argmax loop lets a near-tie send two engines down different paths
    fed = torch.randint(0, TINY["vocab_size"], (20, 5), device="cuda")
    outs = {}
    for name, eng in (("graph", graph), ("eager", eager), ("masked", masked)):
        eng.reset(5, 64)
        logits = [eng.prefill(ids, chunk_rows=2).float()]
        for tok in fed:
            logits.append(eng.decode_step(tok).float().clone())
        outs[name] = torch.stack(logits)
    assert graph.cuda_graph and graph.graph_error is None and graph.decode_attention == FLASH_DECODE
    assert len(graph._graphs) == 1
    assert torch.equal(outs["graph"], outs["eager"])
    assert torch.allclose(outs["eager"], outs["masked"], rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 64), (7, 4096), (33, 14336), (256, 1000)])
def test_triton_per_token_fp8_quant_matches_the_torch_twin(shape):
    if fp8_engine.triton is None:
        pytest.skip("no triton")
    x = (torch.randn(shape, device="cuda") * torch.rand(shape[0], 1, device="cuda") * 30).to(torch.bfloat16)
    x[0, :] = 0
    q, s = fp8_engine.quantize_act_fp8(x)
    q_ref, s_ref = quantize_act_fp8_torch(x)
    assert torch.allclose(s, s_ref, rtol=1e-6, atol=0)
    diff = (q.float() - q_ref.float()) != 0
    assert diff.float().mean() < 1e-3  # division rounding may move a code across a rounding boundary


@pytest.mark.gpu
def test_scaled_mm_fp8_linear_matches_the_unfused_product():
    x = torch.randn(37, 4096, device="cuda", dtype=torch.bfloat16)
    w = quantize_weight_fp8(torch.randn(1024, 4096, device="cuda"))
    got = fp8_linear(x, w).float()
    xq, sx = quantize_act_fp8_torch(x)
    want = (xq.float() * sx) @ (w.w.float() * w.scale.t()).t()
    assert (got - want).norm() / want.norm() < 1e-2
