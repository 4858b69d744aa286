"""What identifies a qoq artifact (its quantization method name and format version in config.json's
`quantization_config`) and the tensors stored per quantized linear: `<linear>.<suffix>` for each suffix of
`linear_tensor_shapes`, plus `<linear>.bias` (fp16 [N]) when the model has one."""
from __future__ import annotations

import torch

from qoq.scheme.progressive import is_per_channel, padded_dims

QUANT_METHOD = "qoq"
FORMAT_VERSION = 1

QWEIGHT = "qweight"  # int8 [Np, Kp/2]: two 4-bit codes per byte, kernel layout
S1_SCALES = "s1_scales"  # fp16 [Np]: level-1 per-output-channel scale
S2_SCALES = "s2_scales"  # int8 [Kp/g, Np]: integer level-2 scale (group sizes 32/64/128)
S2_ZEROS = "s2_zeros"  # int8 [Kp/g, Np]: level-2 zero, negated
S1_SZEROS = "s1_szeros"  # fp16 [Np]: per-channel zero times s1
BIAS = "bias"  # fp16 [N], optional


def linear_tensor_shapes(n: int, k: int, group_size: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{suffix: (shape, dtype)} of the tensors every quantized linear [N, K] stores (the bias aside)."""
    np_, kp = padded_dims(n, k, group_size)
    shapes = {QWEIGHT: ((np_, kp // 2), torch.int8), S1_SCALES: ((np_,), torch.float16)}
    if is_per_channel(group_size):
        shapes[S1_SZEROS] = ((np_,), torch.float16)
    else:
        shapes[S2_SCALES] = ((kp // group_size, np_), torch.int8)
        shapes[S2_ZEROS] = ((kp // group_size, np_), torch.int8)
    return shapes
