"""One kernel case run a few times, for a profiler (`python -m qoq.bench.gemm --one KIND`, e.g. under ncu/nsys)."""
from __future__ import annotations

import torch

import qoq.runtime_kernels as K
from qoq.bench.kernel_timing import quantized_weights
from qoq.scheme import ops
from qoq.scheme.progressive import is_per_channel

CASES = ("gemm", "gemm64", "gemv", "gemv-pc", "gemv16", "attention")


def run_case(kind: str) -> None:
    """Run case `kind` (one of CASES) four times and wait for the GPU."""
    dev = torch.device("cuda")
    if kind == "attention":
        b, hkv, hq, d, t = 64, 8, 32, 128, 1024
        c = ops.KV4Cache.empty(b, hkv, t, d, dev)
        K.kv4_append(c, torch.randn(b, hkv, t, d, device=dev, dtype=torch.float16),
                     torch.randn(b, hkv, t, d, device=dev, dtype=torch.float16),
                     torch.zeros(b, dtype=torch.long, device=dev))
        q = torch.randn(b, hq, d, device=dev, dtype=torch.float16)
        lengths = torch.full((b,), t, device=dev, dtype=torch.long)
        fn = lambda: K.decode_attention_kv4(q, c, lengths, d ** -0.5, max_len=t)  # noqa: E731
    else:
        m = {"gemm": 4096, "gemm64": 64, "gemv16": 16}.get(kind, 1)
        group = -1 if kind == "gemv-pc" else 128
        lin = quantized_weights(4096, 4096, group, 1, dev)[0]
        a = ops.quantize_act(torch.randn(m, 4096, device=dev, dtype=torch.float16), 4096,
                             with_qsum=is_per_channel(group))
        fn = lambda: K.w4a8_linear(a, lin)  # noqa: E731
    for _ in range(4):
        fn()
    torch.cuda.synchronize()
