"""End-to-end serving throughput for `qoq bench`: runners, the max-batch plan and the roofline.

Protocol (QServe's, `qserve_benchmark.py`): every sequence of a batch gets `input_len` random prompt
tokens and generates exactly `output_len` tokens greedily (no EOS), no in-flight batching.

- tokens/s = batch * output_len / total time, total time from the start of the prefill to the last
  decode step (prefill included; the first output token comes from the prefill).
- TTFT = time until every sequence of the batch has its first token (the whole batch's prefill).
- decode ms/token = (total - TTFT) / (output_len - 1): one decode step of the whole batch.
- peak memory = torch.cuda.max_memory_allocated over the run; weights and KV cache are the bytes of
  the tensors each engine holds (KV cache for input_len + output_len tokens per sequence).

Engines: `qoq-w4a8kv4` (qoq.runtime.engine.Engine in fast mode, kernel backend), `fp16-engine` (the same decoder in
FP16: qoq.bench.fp16_engine), `fp8-engine` (that decoder with FP8 W8A8 GEMMs: qoq.bench.fp8_engine) and `hf-fp16`
(transformers `generate`, static cache, no torch.compile). The three engines of this project all decode through
one CUDA graph per step on CUDA.

Max batch (QServe's protocol: the largest batch that fits): each engine is probed at two small batches
(cache allocated for the full length, one prefill chunk, one decode step); peak = fixed + per_seq * batch
gives the largest batch under the usable memory, which is then confirmed by allocating and running it
(backing off 8% per out-of-memory).
"""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Callable

import torch

from qoq.bench.profiles import GIB, GpuProfile
from qoq.bench.synthetic import ModelDims
from qoq.errors import QoqError
from qoq.scheme.progressive import is_per_channel

ENGINES = ("qoq-w4a8kv4", "fp16-engine", "fp8-engine", "hf-fp16")
TOKENS_PER_S_DEFINITION = ("batch * output_len / (prefill + all decode steps) in seconds; TTFT = prefill of the "
                           "whole batch; decode_ms_per_token = one decode step of the whole batch")
DEFAULT_PREFILL_CHUNK_TOKENS = 16384
RESERVE_FRACTION = 0.03  # of device memory, kept free for fragmentation and library workspaces
RESERVE_MIN_BYTES = 1 * GIB


# ---- timing -----------------------------------------------------------------------------------------

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


# ---- memory -----------------------------------------------------------------------------------------

def tensor_bytes(*objs) -> int:
    """Bytes of every distinct tensor storage reachable through dataclasses, dicts, lists and tuples."""
    seen: set[tuple[str, int]] = set()
    total = 0

    def visit(o):
        nonlocal total
        if isinstance(o, torch.Tensor):
            st = o.untyped_storage()
            key = (str(o.device), st.data_ptr())
            if key not in seen:
                seen.add(key)
                total += st.nbytes()
        elif is_dataclass(o) and not isinstance(o, type):
            for f in fields(o):
                visit(getattr(o, f.name))
        elif isinstance(o, dict):
            for v in o.values():
                visit(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                visit(v)

    for o in objs:
        visit(o)
    return total


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def usable_capacity(device: torch.device) -> tuple[int, int]:
    """(bytes torch may hold in all: what it holds now + what the driver has free - a reserve, device total)."""
    free_memory()
    free, total = torch.cuda.mem_get_info(device)
    reserve = max(RESERVE_MIN_BYTES, int(RESERVE_FRACTION * total))
    return torch.cuda.memory_reserved(device) + free - reserve, total


@dataclass
class MaxBatchPlan:
    batch: int
    fixed_bytes: float  # peak at batch 0 (weights + prefill workspace)
    per_seq_bytes: float  # peak growth per sequence (KV for the full length + decode activations)
    capacity_bytes: int
    probes: list = field(default_factory=list)  # (batch, peak bytes or None for OOM)

    def batch_with_per_seq(self, per_seq: float, capacity: float | None = None) -> int:
        cap = self.capacity_bytes if capacity is None else capacity
        return max(0, int((cap - self.fixed_bytes) // per_seq))

    def as_dict(self) -> dict:
        return {"batch": self.batch, "fixed_gb": round(self.fixed_bytes / 1e9, 3),
                "per_seq_mb": round(self.per_seq_bytes / 1e6, 3), "capacity_gb": round(self.capacity_bytes / 1e9, 3),
                "probes": [[b, None if p is None else round(p / 1e9, 3)] for b, p in self.probes]}


def plan_max_batch(probe: Callable[[int], int], capacity: int, b0: int, b1: int, limit: int | None = None,
                   backoff: float = 0.92, tries: int = 6) -> MaxBatchPlan:
    """Fit peak(b) = fixed + per_seq * b on probes at b0 < b1, take the largest batch under `capacity`,
    then confirm it with a probe (backing off on out-of-memory or a peak over capacity).
    `probe(b)` returns the peak bytes at batch b and raises torch.cuda.OutOfMemoryError when it does not fit."""
    if not 0 < b0 < b1:
        raise ValueError("need 0 < b0 < b1")
    p0, p1 = probe(b0), probe(b1)
    per_seq = max((p1 - p0) / (b1 - b0), 1.0)
    fixed = p0 - per_seq * b0
    plan = MaxBatchPlan(batch=0, fixed_bytes=fixed, per_seq_bytes=per_seq, capacity_bytes=capacity,
                        probes=[(b0, p0), (b1, p1)])
    b = plan.batch_with_per_seq(per_seq)
    if limit is not None:
        b = min(b, limit)
    for _ in range(tries):
        if b < 1:
            break
        try:
            peak = probe(b)
        except Exception as e:  # noqa: BLE001 - only out-of-memory is expected here
            if not is_oom(e):
                raise
            plan.probes.append((b, None))
            free_memory()
            b = int(b * backoff)
            continue
        plan.probes.append((b, peak))
        if peak <= capacity:
            plan.batch = b
            return plan
        b = int(b * min(backoff, capacity / peak))
    plan.batch = max(b, 0)
    return plan


# ---- runners ----------------------------------------------------------------------------------------

class Runner:
    """One engine under test: `reset`, `probe`, `timed` and memory accounting."""

    engine = ""
    weights_kind = "fp16"  # fp16 | fp8 | w4a8: which tensor-core peak bounds its GEMMs
    kv_bits = 16

    def __init__(self, dims: ModelDims, device: torch.device, prefill_chunk_tokens: int = DEFAULT_PREFILL_CHUNK_TOKENS):
        self.dims = dims
        self.device = device
        self.prefill_chunk_tokens = prefill_chunk_tokens

    def chunk_rows(self, input_len: int) -> int:
        return max(1, self.prefill_chunk_tokens // max(input_len, 1))

    def weights_bytes(self) -> int:
        raise NotImplementedError

    def kv_cache_bytes(self, batch: int, total_len: int) -> int:
        return batch * total_len * self.dims.kv_bytes_per_token(self.kv_bits)

    def release(self) -> None:
        """Drop the KV cache."""

    def close(self) -> None:
        self.release()

    def probe(self, batch: int, input_len: int, output_len: int) -> None:
        """Allocate for `batch` x (input_len + output_len) and run one prefill chunk and a decode step."""
        raise NotImplementedError

    def warmup(self, batch: int, input_len: int, output_len: int) -> None:
        """Before a timed run: load/compile every kernel (and capture every graph) that run will use."""
        self.probe(batch, input_len, output_len)

    def timed(self, ids: torch.Tensor, output_len: int, clock: Clock) -> Timing:
        raise NotImplementedError


class EngineRunner(Runner):
    """A runner over an engine with reset(batch, max_len) / prefill / decode_step."""

    def _prefill(self, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _prefill_rows(self, ids: torch.Tensor, rows: slice) -> None:
        raise NotImplementedError

    def _decode(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _reset(self, batch: int, total_len: int) -> None:
        raise NotImplementedError

    def probe(self, batch: int, input_len: int, output_len: int) -> None:
        self._reset(batch, input_len + output_len)
        rows = min(batch, self.chunk_rows(input_len))
        ids = torch.randint(0, self.dims.vocab, (rows, input_len), device=self.device)
        self._prefill_rows(ids, slice(0, rows))
        self._decode(torch.zeros(batch, dtype=torch.long, device=self.device))

    def timed(self, ids: torch.Tensor, output_len: int, clock: Clock) -> Timing:
        self._reset(ids.shape[0], ids.shape[1] + output_len)
        clock.sync()
        t0 = clock.mark()
        tok = self._prefill(ids).argmax(-1)
        t1 = clock.mark()
        for _ in range(output_len - 1):
            tok = self._decode(tok).argmax(-1)
        t2 = clock.mark()
        clock.sync()
        return Timing(ttft_s=clock.seconds(t0, t1), total_s=clock.seconds(t0, t2))


class QoqRunner(EngineRunner):
    """The qoq engine (qoq.runtime.engine.Engine) in fast mode (fused linears, FP16 prefill attention,
    CUDA-graph decode), or in its plain mode with `fast=False`; chunked prefill by rows either way."""

    engine = "qoq-w4a8kv4"
    weights_kind = "w4a8"
    kv_bits = 4

    def __init__(self, artifact, dims: ModelDims, device: torch.device, backend: str = "auto",
                 prefill_chunk_tokens: int = DEFAULT_PREFILL_CHUNK_TOKENS, fast: bool = True,
                 cuda_graph: bool | None = None):
        super().__init__(dims, device, prefill_chunk_tokens)
        from qoq.runtime.engine import Engine

        self.serving = fast
        self.eng = Engine(artifact, device=device, backend=backend, fast=fast, cuda_graph=cuda_graph)

    @property
    def backend(self) -> str:
        e = self.eng
        if e is None:
            return self._backend_desc
        desc = e.backend.describe() if hasattr(e.backend, "describe") else str(e.backend)
        if self.serving:
            desc += ", serving mode"
            if getattr(e, "cuda_graph", False):
                desc += ", CUDA-graph decode"
            elif getattr(e, "graph_error", None):
                desc += f", eager decode (graph capture failed: {e.graph_error})"
        self._backend_desc = desc
        return desc

    def weights_bytes(self) -> int:
        e = self.eng
        return tensor_bytes(e.layers, e.embed, e.lm_head, e.norm)

    def release(self) -> None:
        if self.eng is not None:
            self.eng.release()
        free_memory()

    def close(self) -> None:
        if self.eng is not None:
            self.backend  # noqa: B018 - keep its description for the report
        self.release()
        self.eng = None

    def _reset(self, batch: int, total_len: int) -> None:
        self.eng.reset(batch, total_len)  # keeps a cache of the same shape, else frees it before allocating

    def _prefill_rows(self, ids: torch.Tensor, rows: slice) -> torch.Tensor:
        """Prefill sequences `rows` of the cache."""
        return self.eng.prefill(ids, rows=rows)

    def _prefill(self, ids: torch.Tensor) -> torch.Tensor:
        b, t = ids.shape
        chunk = self.chunk_rows(t)
        if chunk >= b:
            return self.eng.prefill(ids)
        return torch.cat([self._prefill_rows(ids[s:s + chunk], slice(s, min(s + chunk, b)))
                          for s in range(0, b, chunk)])

    def _decode(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.eng.decode_step(tokens)


class FP16EngineRunner(EngineRunner):
    """The FP16 baseline engine (qoq.bench.fp16_engine): cuBLAS GEMMs, FP16 KV, CUDA-graph decode on CUDA."""

    engine = "fp16-engine"
    weights_kind = "fp16"
    kv_bits = 16

    def __init__(self, config: dict, weights: dict, dims: ModelDims, device: torch.device,
                 prefill_chunk_tokens: int = DEFAULT_PREFILL_CHUNK_TOKENS, cuda_graph: bool | None = None):
        super().__init__(dims, device, prefill_chunk_tokens)
        self.eng = self._build(config, weights, device, cuda_graph)
        self._backend_desc = self.eng.describe()

    @staticmethod
    def _build(config, weights, device, cuda_graph):
        from qoq.bench.fp16_engine import FP16Engine

        return FP16Engine(config, weights, device, cuda_graph=cuda_graph)

    @property
    def backend(self) -> str:
        if self.eng is not None:
            self._backend_desc = self.eng.describe()  # says whether graphs and flash decode were used
        return self._backend_desc

    def weights_bytes(self) -> int:
        e = self.eng
        return tensor_bytes(e.layers, e.embed, e.lm_head, e.norm)

    def release(self) -> None:
        if self.eng is not None:
            self.eng.release()
        free_memory()

    def close(self) -> None:
        self.backend  # noqa: B018 - keep its description for the report
        self.release()
        self.eng = None

    def _reset(self, batch: int, total_len: int) -> None:
        self.eng.reset(batch, total_len)  # keeps a cache of the same shape, else frees it before allocating

    def _prefill_rows(self, ids: torch.Tensor, rows: slice) -> torch.Tensor:
        return self.eng.prefill(ids, rows=rows)

    def _prefill(self, ids: torch.Tensor) -> torch.Tensor:
        return self.eng.prefill(ids, chunk_rows=self.chunk_rows(ids.shape[1]))

    def _decode(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.eng.decode_step(tokens)


class FP8EngineRunner(FP16EngineRunner):
    """The FP8 W8A8 baseline (qoq.bench.fp8_engine): FP8 weights and per-token activations, 16-bit KV."""

    engine = "fp8-engine"
    weights_kind = "fp8"
    kv_bits = 16

    @staticmethod
    def _build(config, weights, device, cuda_graph):
        from qoq.bench.fp8_engine import FP8Engine

        return FP8Engine(config, weights, device, cuda_graph=cuda_graph)


class HFRunner(Runner):
    """transformers FP16 `generate` with a static cache (`cache_implementation="static"`), greedy,
    exactly output_len new tokens, without torch.compile (compiling per batch shape costs minutes)."""

    engine = "hf-fp16"
    weights_kind = "fp16"
    kv_bits = 16

    def __init__(self, config: dict, dims: ModelDims, device: torch.device):
        super().__init__(dims, device)
        from transformers import AutoModelForCausalLM

        from qoq.runtime.engine import hf_config

        cfg = hf_config(config)
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        with torch.device(device):
            self.model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
        self.model.eval()
        gc = self.model.generation_config
        gc.eos_token_id = None
        gc.pad_token_id = 0
        gc.bos_token_id = None
        self.backend = "transformers generate, static cache, sdpa"

    def weights_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def close(self) -> None:
        self.model = None
        free_memory()

    def _generate(self, ids: torch.Tensor, new_tokens: int, cache_len: int, streamer=None):
        return self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                   do_sample=False, cache_implementation="static", max_cache_len=cache_len,
                                   disable_compile=True, streamer=streamer, pad_token_id=0)

    def probe(self, batch: int, input_len: int, output_len: int) -> None:
        ids = torch.randint(0, self.dims.vocab, (batch, input_len), device=self.device)
        with torch.no_grad():
            self._generate(ids, 2, input_len + output_len)

    def warmup(self, batch: int, input_len: int, output_len: int) -> None:
        self.probe(min(batch, 2), input_len, output_len)  # eager torch: nothing to compile per batch

    def timed(self, ids: torch.Tensor, output_len: int, clock: Clock) -> Timing:
        first = _FirstTokenClock(clock)
        clock.sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = self._generate(ids, output_len, ids.shape[1] + output_len, streamer=first)
        clock.sync()
        t2 = time.perf_counter()
        if out.shape[1] - ids.shape[1] != output_len:
            raise QoqError(f"transformers generated {out.shape[1] - ids.shape[1]} tokens, not {output_len}")
        t1 = first.t_first if first.t_first is not None else t2
        return Timing(ttft_s=t1 - t0, total_s=t2 - t0)


class _FirstTokenClock:
    """A transformers streamer that notes when the first generated token exists (its 2nd `put`;
    the 1st is the prompt). `generate` already copies each token to the host, so this adds no sync."""

    def __init__(self, clock: Clock):
        self.clock = clock
        self.calls = 0
        self.t_first: float | None = None

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2:
            self.clock.sync()
            self.t_first = time.perf_counter()

    def end(self) -> None:
        pass


# ---- measuring --------------------------------------------------------------------------------------

def peak_probe(runner: Runner, input_len: int, output_len: int) -> Callable[[int], int]:
    """probe(b) -> peak bytes allocated while `runner` allocates and runs batch b."""
    def probe(b: int) -> int:
        runner.release()
        free_memory()
        if runner.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(runner.device)
        try:
            runner.probe(b, input_len, output_len)
            peak = torch.cuda.max_memory_allocated(runner.device) if runner.device.type == "cuda" else 0
        finally:
            runner.release()
        return peak
    return probe


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


# ---- roofline ---------------------------------------------------------------------------------------

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


def roofline_tokens_per_s(dims, weights_kind, kv_bits, batch, input_len, output_len, profile) -> float:
    return batch * output_len / roofline_seconds(dims, weights_kind, kv_bits, batch, input_len, output_len, profile)

