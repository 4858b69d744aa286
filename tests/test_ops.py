"""The reference ops equal simulated quantization (dequantized weights x fake-quantized activations)."""
import pytest
import torch

from qoq.algorithm.progressive import dequantize, quantize_weight
from qoq.formats.artifact import quantized_tensors
from qoq.runtime.ops import QLinear, quantize_act, w4a8_linear


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
