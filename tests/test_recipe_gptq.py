"""GPTQ, clip search and the smoothing searches: valid integers, and less output error than RTN."""
import pytest
import torch

from qoq.algorithm.clip import quantize_per_channel, search_clip_ratios
from qoq.algorithm.gptq import HessianAccumulator, gptq_quantize
from qoq.scheme.progressive import PROTECTIVE_RANGE, dequantize, level1_scales, quantize_weight
from qoq.algorithm.smooth_attention import search_smooth_attention, smooth_attention_grid
from qoq.algorithm.smooth_linear import search_down_smoothing
from recipe_tiny import one_thread

_one_thread = pytest.fixture(autouse=True)(one_thread)


def correlated_inputs(t=512, k=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k ** 0.5 + torch.eye(k)
    x = torch.randn(t, k, generator=g) @ mix
    x[:, :5] *= 8  # a few outlier channels, as in LLM activations
    return x


def out_err(x, w, qw):
    return float((x @ w.t() - x @ dequantize(qw).t()).norm())


@pytest.mark.parametrize("group", [32, 64, 128, -1])
def test_gptq_beats_rtn_on_correlated_inputs(group):
    x = correlated_inputs()
    w = torch.randn(72, 200, generator=torch.Generator().manual_seed(1)) * 0.05
    acc = HessianAccumulator(200)
    for chunk in x.split(100):  # accumulated over batches
        acc.add(chunk)
    exact = 2 / 512 * x.double().t() @ x.double()
    assert float((acc.hessian - exact).abs().max()) < 1e-5 * float(exact.abs().max())
    qw = gptq_quantize(w, acc.hessian, group)
    rtn = quantize_weight(w, group)
    assert qw.q.shape == rtn.q.shape and qw.q.dtype == torch.uint8 and int(qw.q.max()) <= 15
    assert out_err(x, w, qw) < 0.9 * out_err(x, w, rtn)
    if group > 0:
        assert torch.equal(qw.s1, rtn.s1)  # level 1 is fixed from the original weights
        assert torch.equal(qw.s1, level1_scales(torch.nn.functional.pad(w, (0, qw.q.shape[1] - 200, 0, 96 - 72))))
        w8 = qw.int8_weight().to(torch.int32)  # the stored operand stays inside int8
        assert int(w8.min()) >= -128 and int(w8.max()) <= 127
        assert 1 <= int(qw.s2.min()) and int(qw.s2.max()) <= 16
        assert int(qw.z.abs().max()) <= PROTECTIVE_RANGE
    else:
        assert qw.szeros is not None and qw.s2 is None


def test_gptq_handles_dead_inputs_and_padding():
    x = correlated_inputs(k=100)
    x[:, 10] = 0  # a channel that never sees input
    w = torch.randn(40, 100)
    qw = gptq_quantize(w, 2 / 512 * x.t() @ x, 128)
    assert qw.q.shape == (64, 128) and dequantize(qw).shape == (40, 100)  # padded codes, unpadded weight
    assert torch.isfinite(dequantize(qw)).all()
    assert out_err(x, w, qw) < out_err(x, w, quantize_weight(w, 128))


def test_clip_search_beats_no_clipping_per_channel():
    x = correlated_inputs(k=128)
    w = torch.randn(64, 128) * 0.05
    w[:, 3] *= 12  # rows with an outlier weight benefit from clipping
    h = x.t() @ x
    ratios = search_clip_ratios(w, h)
    assert ratios.shape == (64,) and float(ratios.min()) >= 0.8 and float(ratios.max()) <= 1.0
    assert float(ratios.min()) < 1.0
    clipped = quantize_per_channel(w, ratios)
    plain = quantize_per_channel(w)
    assert torch.equal(plain.q, quantize_weight(w, -1).q)  # ratio 1 is the plain per-channel RTN
    assert out_err(x, w, clipped) < out_err(x, w, plain)
    assert out_err(x, w, gptq_quantize(w, h, -1, clip_ratios=ratios)) < out_err(x, w, clipped)


def test_down_smoothing_search_picks_an_alpha_that_helps():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(256, 256, generator=g)
    x[:, :4] *= 40  # outlier input channels hurt per-token INT8
    w = torch.randn(96, 256, generator=g) * 0.05
    choice = search_down_smoothing(x, w, x.abs().amax(dim=0), group_size=128)
    assert "none" in choice.errors and len(choice.errors) == 12
    assert choice.alpha is not None and choice.errors[f"{choice.alpha:g}"] < choice.errors["none"]
    assert choice.scales.shape == (256,)


def test_smooth_attention_search_beats_no_smoothing_with_key_outliers():
    g = torch.Generator().manual_seed(3)
    b, h, hkv, t, d = 2, 6, 2, 64, 16
    q = torch.randn(b, h, t, d, generator=g)
    k = torch.randn(b, hkv, t, d, generator=g)
    k[..., 2] *= 20
    k[..., 2 + d // 2] *= 20
    v = torch.randn(b, hkv, t, d, generator=g)
    alpha, beta, lam, errors = search_smooth_attention(q, k, v, h, hkv)
    assert len(errors) == len(smooth_attention_grid()) == 19
    assert (alpha, beta) != (0.0, 0.0) and errors[f"{alpha:g},{beta:g}"] < 0.7 * errors["0,0"]
    assert lam.shape == (hkv * d,) and torch.equal(lam.view(hkv, 2, d // 2)[:, 0], lam.view(hkv, 2, d // 2)[:, 1])
    a2, b2, _, errors2 = search_smooth_attention(q, k, v, h, hkv, query_stride=4)
    assert len(errors2) == 19 and errors2[f"{a2:g},{b2:g}"] < 0.7 * errors2["0,0"]


@pytest.mark.parametrize("group", [64, -1])
def test_gptq_of_stacked_linears_equals_separate_runs(group):
    """q/k/v (and gate/up) share one Hessian and are quantized in one pass; each result is the same
    QuantizedWeight a separate run gives."""
    from qoq.algorithm.gptq import gptq_quantize_many
    x = correlated_inputs(k=128)
    h = 2 / 512 * x.t() @ x
    ws = [torch.randn(n, 128, generator=torch.Generator().manual_seed(n)) * 0.05 for n in (48, 16, 40)]
    ratios = [None, torch.full((16,), 0.9), None] if group == -1 else None
    many = gptq_quantize_many(ws, h, group, clip_ratios=ratios)
    for i, (w, qw) in enumerate(zip(ws, many, strict=True)):
        one = gptq_quantize(w, h, group, clip_ratios=None if ratios is None else ratios[i])
        assert qw.q.shape == one.q.shape and qw.out_features == w.shape[0]
        assert (qw.q != one.q).float().mean() < 0.01  # identical up to float summation order
        assert torch.equal(qw.s1, one.s1)
        torch.testing.assert_close(dequantize(qw), dequantize(one), rtol=0, atol=1e-2 * float(w.abs().max()))
