"""The engines `qoq bench` measures, behind one interface (`Runner`: reset, probe, warm up, timed run, bytes
held): `qoq-w4a8kv4` (qoq.runtime.engine.Engine in fast mode, kernel backend), `fp16-engine` (the same decoder in
FP16: qoq.bench.fp16_engine), `fp8-engine` (that decoder with FP8 W8A8 GEMMs: qoq.bench.fp8_engine) and `hf-fp16`
(transformers `generate`, static cache, no torch.compile). The three engines of this project all decode through
one CUDA graph per step on CUDA.
"""
from __future__ import annotations

import time

import torch

from qoq.bench.capacity import free_memory, tensor_bytes
from qoq.bench.e2e import DEFAULT_PREFILL_CHUNK_TOKENS, Clock, Timing
from qoq.bench.synthetic import ModelDims
from qoq.errors import QoqError


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
    """A runner over an engine (`self.eng`) with reset(batch, max_len) / prefill(ids, rows=...) / decode_step /
    release."""

    eng = None

    def _prefill(self, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

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

    def _decode(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.eng.decode_step(tokens)

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

    def _prefill(self, ids: torch.Tensor) -> torch.Tensor:
        b, t = ids.shape
        chunk = self.chunk_rows(t)
        if chunk >= b:
            return self.eng.prefill(ids)
        return torch.cat([self._prefill_rows(ids[s:s + chunk], slice(s, min(s + chunk, b)))
                          for s in range(0, b, chunk)])


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

    def _prefill(self, ids: torch.Tensor) -> torch.Tensor:
        return self.eng.prefill(ids, chunk_rows=self.chunk_rows(ids.shape[1]))


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
