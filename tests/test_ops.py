"""The reference ops equal simulated quantization (dequantized weights x fake-quantized activations)."""
import pytest
import torch

from qoq.scheme.progressive import dequantize, quantize_weight
from qoq.formats.artifact import quantized_tensors
from qoq.scheme.ops import (
    KV4Cache, QLinear, decode_attention_kv4, kv4_append, kv4_dequantize, kv4_quantize, quantize_act, w4a8_linear,
)


def fake_quant_act(x):
    s = x.abs().amax(-1, keepdim=True) / 127
    return torch.round(x / s).clamp(-127, 127) * s


@pytest.mark.parametrize("group", [32, 64, 128, -1])
@pytest.mark.parametrize("m,n,k", [(1, 64, 96), (5, 40, 100), (17, 192, 576)])
def test_w4a8_linear_equals_simulated_quantization(group, m, n, k):
    torch.manual_seed(0)
    w = torch.randn(n, k) * 0.05
    x = torch.randn(m, k)
    bias = torch.randn(n)
    qw = quantize_weight(w, group)
    lin = QLinear.from_tensors(quantized_tensors("l", qw, bias), "l", n, k, group)
    a = quantize_act(x, lin.padded_in, with_qsum=lin.per_channel)
    assert a.q.shape == (m, lin.padded_in)
    y = w4a8_linear(a, lin, out_dtype=torch.float32)
    ref = fake_quant_act(x).double() @ dequantize(qw).double().t() + bias.half().double()
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4)


def test_kv4_round_trip_error_is_within_half_a_step():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, 64).half()
    codes, scale, zero = kv4_quantize(x)
    assert codes.shape == (2, 3, 7, 32) and scale.dtype == torch.float16
    err = (kv4_dequantize(codes, scale, zero) - x.float()).abs()
    assert (err <= scale.float()[..., None] * 0.5 + 1e-3).all()


def test_decode_attention_kv4_equals_full_attention_on_dequantized_cache():
    torch.manual_seed(0)
    b, hq, hkv, d, t = 3, 6, 2, 16, 9
    cache = KV4Cache.empty(b, hkv, 16, d)
    k, v = torch.randn(b, hkv, t, d), torch.randn(b, hkv, t, d)
    kv4_append(cache, k, v, torch.zeros(b, dtype=torch.long))
    lengths = torch.tensor([9, 4, 1])
    q = torch.randn(b, hq, d)
    out = decode_attention_kv4(q, cache, lengths, d ** -0.5)
    for i, n in enumerate(lengths.tolist()):
        kh = kv4_dequantize(cache.k[i, :, :n], cache.k_scale[i, :, :n], cache.k_zero[i, :, :n]).repeat_interleave(3, 0)
        vh = kv4_dequantize(cache.v[i, :, :n], cache.v_scale[i, :, :n], cache.v_zero[i, :, :n]).repeat_interleave(3, 0)
        ref = torch.nn.functional.scaled_dot_product_attention(q[i, :, None], kh, vh)[:, 0]
        torch.testing.assert_close(out[i], ref, rtol=1e-5, atol=1e-5)
