"""`qoq bench`: one run that measures kernels and end-to-end throughput and returns the report dict
(schema in qoq.bench.report). The CLI renders it; the Python API is `run_bench(BenchOptions(...))`.

Order, so each engine has the GPU to itself: build the quantized model (artifact on the device, or a
synthetic shape quantized there) -> kernels -> qoq engine rows -> free it, build the FP16 twin ->
FP16-engine rows -> free it, build the twin again -> FP8-engine rows -> free it -> transformers rows.
Each engine: max batch first (plan + confirm), then its row at the max batch, then the other batches.
"""
from __future__ import annotations

import math
import os

from dataclasses import dataclass
from pathlib import Path

import torch

from qoq.bench import capacity, e2e, gemm, runners
from qoq.bench.profiles import GPU_CHOICES, detect_device, resolve_profile
from qoq.bench.report import build_report, check_min_speedup, require_matplotlib, write_json
from qoq.bench.synthetic import SHAPE_CHOICES, ModelDims, build_synthetic_artifact, fp16_twin
from qoq.errors import QoqError, one_line
from qoq.scheme.progressive import group_size_problem
from qoq.progress import Reporter

DEFAULT_BATCHES = (1, 16, 64, 256)
# the kernels the serving engine calls (kv4_quantize/kv4_dequantize/apply_rope are not on its fast path)
SERVING_KERNELS = ("quantize_act", "rmsnorm_quantize", "silu_mul_quantize", "w4a8_linear", "kv4_append",
                   "decode_attention_kv4")


@dataclass
class BenchOptions:
    artifact: Path | None = None
    shape: str | None = None
    gpu: str = "auto"
    input_len: int = 1024
    output_len: int = 512
    batches: tuple[int, ...] = DEFAULT_BATCHES
    max_batch: str | int = "auto"  # "auto" (largest that fits), an int, or "none" (no max-batch rows)
    json_path: Path | None = None
    min_speedup: float | None = None
    plot: Path | None = None
    skip_kernels: bool = False
    skip_hf: bool = False
    group_size: int = 128
    backend: str = "auto"
    prefill_chunk_tokens: int = e2e.DEFAULT_PREFILL_CHUNK_TOKENS
    engines: tuple[str, ...] = e2e.ENGINES


def parse_batches(text: str) -> tuple[int, ...]:
    """'1,8,32,64' -> (1, 8, 32, 64); a one-line QoqError for anything else."""
    try:
        values = tuple(int(x) for x in str(text).replace(" ", "").split(",") if x != "")
    except ValueError:
        raise QoqError(f"--batches {text!r} is not a comma-separated list of positive integers, "
                       "e.g. 1,8,32,64") from None
    if not values or any(v < 1 for v in values):
        raise QoqError(f"--batches {text!r} is not a comma-separated list of positive integers, e.g. 1,8,32,64")
    return tuple(sorted(set(values)))


def parse_max_batch(text: str | int) -> str | int:
    s = str(text).strip().lower()
    if s in ("auto", "none"):
        return s
    try:
        n = int(s)
    except ValueError:
        n = 0
    if n < 1:
        raise QoqError(f"--max-batch {text!r} is not 'auto', 'none' or a positive integer")
    return n


def validate_options(o: BenchOptions) -> BenchOptions:
    """Every argument check that needs no GPU; QoqError (one line) on the first problem."""
    if o.gpu.lower() not in GPU_CHOICES:
        raise QoqError(f"--gpu {o.gpu!r} is not one of {', '.join(GPU_CHOICES)}")
    if o.shape is not None and o.shape not in SHAPE_CHOICES:
        raise QoqError(f"--shape {o.shape!r} is not one of {', '.join(SHAPE_CHOICES)}")
    if o.shape is not None and o.artifact is not None:
        raise QoqError("give either ARTIFACT or --shape, not both")
    if o.input_len < 1 or o.output_len < 2:
        raise QoqError("--input-len must be >= 1 and --output-len >= 2")
    if o.min_speedup is not None and not (0 < o.min_speedup < math.inf):
        raise QoqError(f"--min-speedup {o.min_speedup:g} must be a positive number")
    if group_size_problem(o.group_size):
        raise QoqError(f"--group {o.group_size} {group_size_problem(o.group_size)}")
    if o.backend not in ("auto", "cupy", "reference"):
        raise QoqError(f"--backend {o.backend!r} is not one of auto, cupy, reference")
    if o.prefill_chunk_tokens < 1:
        raise QoqError("--prefill-chunk must be positive")
    o.max_batch = parse_max_batch(o.max_batch)
    engines = [e for e in o.engines if not (o.skip_hf and e == "hf-fp16")]
    unknown = [e for e in engines if e not in e2e.ENGINES]
    if unknown:
        raise QoqError(f"unknown engine {unknown[0]!r}; engines are {', '.join(e2e.ENGINES)}")
    o.engines = tuple(engines)
    if o.min_speedup is not None and not {"qoq-w4a8kv4", "fp16-engine"} <= set(o.engines):
        raise QoqError("--min-speedup compares qoq with the FP16 engine: both must run")
    if o.plot is not None:
        require_matplotlib()
    for flag, path in (("--json", o.json_path), ("--plot", o.plot)):
        if path is not None:
            _check_result_file(flag, Path(path))
    return o


def _check_result_file(flag: str, path: Path) -> None:
    """Before the run, not after it: a results path that cannot be written is refused at once."""
    if path.is_dir():
        raise QoqError(f"{flag} {path} is a folder; give a file path such as {path / 'bench.json'}")
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise QoqError(f"{flag} {path}: {parent} is a file, not a folder; choose another {flag} path")
    if parent is not None and not os.access(parent, os.W_OK):
        raise QoqError(f"{flag} {path}: cannot write into {parent}; choose another {flag} path")


# ---- kernels ----------------------------------------------------------------------------------------

def run_kernels(reporter: Reporter) -> tuple[list | None, str | None]:
    """Rows of the kernel micro-benchmark (qoq.bench.gemm), or (None, why it failed)."""
    with reporter.status("kernel micro-benchmarks (qoq.bench.gemm)"):
        try:
            rows = gemm.run(log=reporter.info)
        except QoqError:
            raise
        except Exception as e:  # noqa: BLE001 - a kernel failure must not lose the e2e numbers
            return None, f"kernel benchmark failed: {type(e).__name__}: {one_line(e, 200)}"
    return [dict(r) for r in rows], None


# ---- end to end -------------------------------------------------------------------------------------

def _engine_rows(runner: runners.Runner, o: BenchOptions, profile, clock: e2e.Clock, reporter: Reporter,
                 memory: dict) -> list[dict]:
    rows: list[dict] = []
    name = runner.engine
    max_b = None
    if o.max_batch != "none":
        cap, total = capacity.usable_capacity(runner.device)
        chunk = runner.chunk_rows(o.input_len) if name != "hf-fp16" else 2
        limit = o.max_batch if isinstance(o.max_batch, int) else None
        probe = capacity.peak_probe(runner, o.input_len, o.output_len)
        with reporter.status(f"{name}: finding the largest batch that fits"):
            if isinstance(o.max_batch, int):
                plan = capacity.plan_max_batch(probe, cap, chunk, 2 * chunk, limit=limit)
            else:
                plan = capacity.plan_max_batch(probe, cap, chunk, 2 * chunk)
        max_b = plan.batch
        memory["plans"][name] = plan.as_dict()
        memory["max_batch"][name] = max_b
        memory["capacity_gb"] = round(cap / 1e9, 3)
        overhead = total - cap  # what the device holds outside the engines' reach
        prof_cap = profile.memory_bytes - overhead
        memory["profile_max_batch"][name] = plan.batch_with_per_seq(plan.per_seq_bytes, prof_cap)
        if name == "qoq-w4a8kv4":
            tl = o.input_len + o.output_len
            fp16_kv_extra = runner.dims.kv_bytes_per_token(16) - runner.dims.kv_bytes_per_token(4)
            fp16_per_seq = plan.per_seq_bytes + tl * fp16_kv_extra
            fp16_b = plan.batch_with_per_seq(fp16_per_seq)
            memory["kv4_vs_fp16_kv"] = {"kv4_batch": max_b, "fp16_kv_batch": fp16_b,
                                        "gain": (max_b / fp16_b) if fp16_b else None}
        reporter.info(f"{name}: max batch {max_b} (per sequence {plan.per_seq_bytes / 1e6:.1f} MB, fixed "
                      f"{plan.fixed_bytes / 1e9:.2f} GB, usable {cap / 1e9:.1f} GB)")
    if max_b:  # the max batch first, on a clean device; out of memory in the full run: 10% less, twice
        for attempt in range(3):
            with reporter.status(f"{name}: batch {max_b} (max), in {o.input_len} / out {o.output_len}"):
                row = e2e.measure(runner, max_b, o.input_len, o.output_len, profile, clock)
            runner.release()
            if row.get("error") != "out of memory" or attempt == 2:
                break
            reporter.info(f"{name} batch {max_b}: out of memory in the full run; trying {int(max_b * 0.9)}")
            memory["plans"][name]["probes"].append([max_b, None])
            max_b = int(max_b * 0.9)
            memory["max_batch"][name] = max_b
        rows.append({**row, "is_max_batch": True})
        _say(reporter, name, rows[-1])
    for b in o.batches:
        if b == max_b:
            continue
        if max_b is not None and b > max_b:
            rows.append({"engine": name, "batch": b, "is_max_batch": False, "input_len": o.input_len,
                         "output_len": o.output_len, "error": f"exceeds the max batch {max_b}"})
            continue
        with reporter.status(f"{name}: batch {b}, in {o.input_len} / out {o.output_len}"):
            row = e2e.measure(runner, b, o.input_len, o.output_len, profile, clock)
        row = {**row, "is_max_batch": False}
        rows.append(row)
        runner.release()
        _say(reporter, name, row)
    return rows


def _say(reporter: Reporter, name: str, row: dict) -> None:
    b = row["batch"]
    if row.get("error"):
        reporter.info(f"{name} batch {b}: {row['error']}")
    else:
        reporter.info(f"{name} batch {b}: {row['tokens_per_s']:,.0f} tok/s, TTFT {row['ttft_ms']:,.0f} ms, "
                      f"decode {row['decode_ms_per_token']:.2f} ms/token, peak {row['peak_mem_gb'] or 0:.1f} GB")


def run_bench(o: BenchOptions, reporter: Reporter | None = None, device_override=None) -> dict:
    """Run everything `o` asks for on the visible GPU; the report dict (qoq.bench.report schema).
    `device_override` = (DeviceInfo, torch.device) runs elsewhere (the CPU tests, with max_batch "none")."""
    reporter = reporter or Reporter()
    o = validate_options(o)
    if device_override is None:
        device_info = detect_device()
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device_info, device = device_override
    profile, detected, note = resolve_profile(o.gpu, device_info)
    if note:
        reporter.info(note)

    if o.shape is not None:
        artifact = build_synthetic_artifact(o.shape, device, o.group_size, reporter=reporter)
        model_name = f"synthetic:{o.shape}"
    else:
        from qoq.formats.artifact import read_artifact
        from qoq.state import resolve_artifact

        path = resolve_artifact(o.artifact, reporter)
        with reporter.status(f"reading {path}"):
            artifact = read_artifact(path)
        model_name = str(path)
    config = {k: v for k, v in artifact.config.items() if k != "quantization_config"}
    dims = ModelDims.from_config(config)

    kernels, kernels_note = (None, "skipped (--skip-kernels)") if o.skip_kernels else run_kernels(reporter)

    clock = e2e.Clock(device)
    memory = {"capacity_gb": 0.0, "max_batch": {}, "plans": {}, "kv4_vs_fp16_kv": None, "profile_max_batch": {}}
    rows: list[dict] = []
    errors: dict[str, str] = {}
    backends: dict[str, str] = {}
    backend = o.backend

    def run_engine(name, build):
        nonlocal backend
        runner = None
        try:
            with reporter.status(f"{name}: loading"):
                runner = build()
            if name == "qoq-w4a8kv4":
                backend = runner.backend
                be = runner.eng.backend
                slow = [f for f in getattr(be, "fallbacks", ()) if f in SERVING_KERNELS]
                if getattr(be, "name", "") != "cupy" or slow:
                    reporter.info(f"qoq-w4a8kv4 runs the {backend} backend"
                                  f"{' (reference ' + ', '.join(slow) + ')' if slow else ''}: "
                                  "its numbers do not show the GPU kernels' speed")
            rows.extend(_engine_rows(runner, o, profile, clock, reporter, memory))
            if name == "qoq-w4a8kv4":
                backend = runner.backend  # after the runs: says whether decode graphs were used
        except QoqError as e:
            errors[name] = str(e)
            reporter.info(f"{name}: not measured: {e}")
        except Exception as e:  # noqa: BLE001 - one engine's failure must not lose the others' numbers
            if capacity.is_oom(e):
                errors[name] = "out of memory"
            else:
                errors[name] = f"{type(e).__name__}: {one_line(e, 200)}"
            reporter.info(f"{name}: not measured: {errors[name]}")
        finally:
            if runner is not None:
                runner.close()
                backends[name] = str(runner.backend)
            del runner
            capacity.free_memory()

    def report() -> dict:
        settings = {"model": model_name, "shape": o.shape,
                    "group_size": artifact.qconfig.get("group_size", o.group_size),
                    "input_len": o.input_len, "output_len": o.output_len, "batches": list(o.batches),
                    "max_batch": o.max_batch, "backend": str(backend), "engines": list(o.engines),
                    "skip_kernels": o.skip_kernels, "skip_hf": o.skip_hf,
                    "prefill_chunk_tokens": o.prefill_chunk_tokens, "tokens_per_s": e2e.TOKENS_PER_S_DEFINITION}
        return build_report(device=device_info.as_dict(), profile=profile.as_dict(),
                            profile_matches_device=detected is profile, settings=settings, model=dims.as_dict(),
                            memory=memory, kernels=kernels, kernels_note=kernels_note, rows=rows,
                            engine_errors=errors, min_speedup=o.min_speedup, engine_backends=backends)

    def checkpoint() -> None:
        """--json is rewritten after each engine: a run cut short keeps what it measured."""
        if o.json_path is not None:
            write_json(report(), o.json_path)

    if "qoq-w4a8kv4" in o.engines:
        run_engine("qoq-w4a8kv4", lambda: runners.QoqRunner(artifact, dims, device, o.backend, o.prefill_chunk_tokens))
        checkpoint()
    # FP8 first: on Hopper it is the strongest baseline, so a run cut short still has it
    baselines = [(name, runner) for name, runner in (("fp8-engine", runners.FP8EngineRunner),
                                                     ("fp16-engine", runners.FP16EngineRunner)) if name in o.engines]
    if baselines:  # host copy: the twins are rebuilt from it, and the engines get the whole device
        artifact.tensors.update({k: v.cpu() for k, v in artifact.tensors.items()})
        capacity.free_memory()
    for name, runner_cls in baselines:
        with reporter.status(f"{name}: building the FP16 twin (dequantized weights)"):
            twin = fp16_twin(artifact, device)  # the engine takes (and frees) the twin's tensors as it builds
        run_engine(name, lambda runner_cls=runner_cls, twin=twin:
                   runner_cls(config, twin, dims, device, o.prefill_chunk_tokens))
        twin.clear()
        checkpoint()
    artifact.tensors.clear()  # the quantized weights are no longer needed on the device
    if "hf-fp16" in o.engines:
        run_engine("hf-fp16", lambda: runners.HFRunner(config, dims, device))
    return report()


def min_speedup_error(report: dict, min_speedup: float | None) -> str | None:
    passed, line = check_min_speedup(report, min_speedup)
    return line if passed is False else None


