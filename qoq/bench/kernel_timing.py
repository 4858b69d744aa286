"""Timing kernel calls on the GPU, and the Llama-3-8B workload the kernel benchmarks run.

`time_calls` times callables by CUDA events around CUDA-graph replays of many calls (warm-up first, median
of several replays). Weight copies are rotated so that the working set of every timed graph exceeds the L2
cache (`copies_beyond_l2`): weights stream from HBM, as in a real decode step.
"""
from __future__ import annotations

import math
import statistics
import time

import torch

from qoq.formats.artifact import quantized_tensors
from qoq.scheme.ops import QLinear
from qoq.scheme.progressive import quantize_weight

LLAMA3_8B_SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]  # (N, K): qkv, o, gate_up, down
L2_BYTES = 50 * 2**20
WORKING_SET = 3 * L2_BYTES


def copies_beyond_l2(nbytes: int, cap: int = 64) -> int:
    """How many copies of an operand of `nbytes` make a working set larger than the L2 cache (at most `cap`)."""
    return max(1, min(cap, math.ceil(WORKING_SET / max(1, nbytes))))


def time_calls(fns, min_graph_us: float = 2000.0, replays: int = 7) -> dict:
    """Median µs per call of the callables `fns` (called round-robin), timed over CUDA-graph replays."""
    for f in fns[: min(3, len(fns))]:
        f()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for f in fns:
        f()
    torch.cuda.synchronize()
    est_us = max(1.0, (time.perf_counter() - t0) * 1e6 / len(fns))
    n = max(len(fns), min(2000, math.ceil(min_graph_us / est_us)))
    n = math.ceil(n / len(fns)) * len(fns)
    g = None
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for f in fns[:2]:
                f()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for i in range(n):
                fns[i % len(fns)]()
        run = g.replay
        mode = "graph"
    except Exception:  # some op refuses capture: time eager launches instead
        g = None
        torch.cuda.synchronize()

        def run():
            for i in range(n):
                fns[i % len(fns)]()
        mode = "eager"
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    run()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / n)
    del g
    return {"us": statistics.median(times), "us_min": min(times), "us_max": max(times), "calls": n, "mode": mode}


def quantized_weights(n: int, k: int, group: int, copies: int, device) -> list[QLinear]:
    """`copies` identical W4 linears [n, k] of random weights (RTN, group size `group`), each its own memory."""
    w = torch.randn(n, k, device=device, dtype=torch.float16) * 0.02
    base = QLinear.from_tensors(quantized_tensors("l", quantize_weight(w, group)), "l", n, k, group, device=device)
    out = [base]
    for _ in range(copies - 1):
        out.append(QLinear(qweight=base.qweight.clone(), s1=base.s1.clone(), group_size=group, out_features=n,
                           in_features=k, s2_scales=None if base.s2_scales is None else base.s2_scales.clone(),
                           s2_zeros=None if base.s2_zeros is None else base.s2_zeros.clone(),
                           szeros=None if base.szeros is None else base.szeros.clone()))
    return out
