"""End-to-end serving throughput for `qoq bench`: the protocol, its clock and one measured row.

Protocol (QServe's, `qserve_benchmark.py`): every sequence of a batch gets `input_len` random prompt
tokens and generates exactly `output_len` tokens greedily (no EOS), no in-flight batching.

- tokens/s = batch * output_len / total time, total time from the start of the prefill to the last
  decode step (prefill included; the first output token comes from the prefill).
- TTFT = time until every sequence of the batch has its first token (the whole batch's prefill).
- decode ms/token = (total - TTFT) / (output_len - 1): one decode step of the whole batch.
- peak memory = torch.cuda.max_memory_allocated over the run; weights and KV cache are the bytes of
  the tensors each engine holds (KV cache for input_len + output_len tokens per sequence).

The engines are in qoq.bench.runners, the max-batch plan in qoq.bench.capacity, the roofline in
qoq.bench.roofline.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from qoq.bench.capacity import free_memory, is_oom
from qoq.bench.profiles import GpuProfile
from qoq.bench.roofline import roofline_seconds

if TYPE_CHECKING:
    from qoq.bench.runners import Runner

ENGINES = ("qoq-w4a8kv4", "fp16-engine", "fp8-engine", "hf-fp16")
TOKENS_PER_S_DEFINITION = ("batch * output_len / (prefill + all decode steps) in seconds; TTFT = prefill of the "
                           "whole batch; decode_ms_per_token = one decode step of the whole batch")
DEFAULT_PREFILL_CHUNK_TOKENS = 16384


class Clock:
    """CUDA events on a GPU (no host sync until `seconds`), perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def seconds(self, a, b) -> float:
        if self.cuda:
            b.synchronize()
            return a.elapsed_time(b) / 1e3
        return b - a

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


@dataclass
class Timing:
    ttft_s: float
    total_s: float


def measure(runner: Runner, batch: int, input_len: int, output_len: int, profile: GpuProfile,
            clock: Clock, warmup: bool = True, seed: int = 0) -> dict:
    """One e2e row: run `batch` sequences of input_len -> output_len tokens and time it."""
    row = {"engine": runner.engine, "batch": batch, "input_len": input_len, "output_len": output_len}
    gen = torch.Generator(device=runner.device)
    gen.manual_seed(seed + batch)
    try:
        if warmup:
            runner.warmup(batch, input_len, output_len)
        ids = torch.randint(0, runner.dims.vocab, (batch, input_len), device=runner.device, generator=gen)
        if runner.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(runner.device)
        t = runner.timed(ids, output_len, clock)
        peak = torch.cuda.max_memory_allocated(runner.device) if runner.device.type == "cuda" else None
    except Exception as e:  # noqa: BLE001
        if not is_oom(e):
            raise
        runner.release()
        free_memory()
        return {**row, "error": "out of memory"}
    roof = roofline_seconds(runner.dims, runner.weights_kind, runner.kv_bits, batch, input_len, output_len, profile)
    decode_s = t.total_s - t.ttft_s
    return {**row,
            "tokens_per_s": batch * output_len / t.total_s,
            "ttft_ms": 1e3 * t.ttft_s,
            "decode_ms_per_token": 1e3 * decode_s / max(output_len - 1, 1),
            "total_s": t.total_s,
            "peak_mem_gb": None if peak is None else peak / 1e9,
            "weights_gb": runner.weights_bytes() / 1e9,
            "kv_cache_gb": runner.kv_cache_bytes(batch, input_len + output_len) / 1e9,
            "roofline_fraction": roof / t.total_s}
