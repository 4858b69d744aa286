"""The roofline `qoq bench` reports fractions of: a lower bound on an end-to-end run's time from the GPU
profile's datasheet peaks (math) and bandwidth (bytes), per phase."""
from __future__ import annotations

from qoq.bench.profiles import GpuProfile
from qoq.bench.synthetic import ModelDims
from qoq.scheme.progressive import is_per_channel


def weight_bytes_streamed(dims: ModelDims, weights_kind: str, group_size: int = 128) -> float:
    """Bytes a forward pass must read for the weights: quantized linears + the fp16 lm_head."""
    lin = dims.linear_params
    if weights_kind == "w4a8":
        per_group = 0 if is_per_channel(group_size) else 2 / group_size  # int8 s2 + int8 zero per group
        lin_bytes = lin * (0.5 + per_group)
    elif weights_kind == "fp8":
        lin_bytes = lin
    else:
        lin_bytes = 2 * lin
    return lin_bytes + 2 * dims.vocab * dims.hidden


def roofline_seconds(dims: ModelDims, weights_kind: str, kv_bits: int, batch: int, input_len: int, output_len: int,
                     profile: GpuProfile, group_size: int = 128) -> float:
    """Lower bound on the run's time on `profile`: per phase max(math / peak, bytes / bandwidth).

    GEMMs run at the INT8 peak for W4A8, the FP8 peak for FP8 and the FP16 peak otherwise; attention and
    lm_head at the FP16 peak. Bytes: the weights once per forward pass, the KV cache read (decode) and written."""
    peak_gemm = {"w4a8": profile.int8_tops, "fp8": profile.fp8_tflops or profile.fp16_tflops}.get(
        weights_kind, profile.fp16_tflops) * 1e12
    peak_fp16 = profile.fp16_tflops * 1e12
    bw = profile.mem_bw_gbs * 1e9
    lin, lm = dims.linear_params, dims.vocab * dims.hidden
    w_bytes = weight_bytes_streamed(dims, weights_kind, group_size)
    kv_tok = dims.kv_bytes_per_token(kv_bits)
    attn_unit = 2 * dims.layers * dims.heads * dims.head_dim  # flops per (query, key) pair for QK^T and PV
    b, tin = batch, input_len
    math_s = 2 * lin * b * tin / peak_gemm + (attn_unit * b * tin * (tin + 1) / 2 + 2 * lm * b) / peak_fp16
    total = max(math_s, (w_bytes + b * tin * kv_tok) / bw)
    for step in range(1, output_len):
        ctx = tin + step  # keys attended by the step's query (its own included)
        math_s = 2 * lin * b / peak_gemm + (attn_unit * b * ctx + 2 * lm * b) / peak_fp16
        total += max(math_s, (w_bytes + b * ctx * kv_tok) / bw)
    return total

