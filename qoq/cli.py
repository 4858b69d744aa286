"""The `qoq` command line: a thin Typer layer over the Python API, rendering with rich."""
from __future__ import annotations

import math
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from qoq.errors import QoqError, flags, one_line
from qoq.console import err, out, user_errors
from qoq.progress import Reporter, RichReporter, quiet_third_party
from qoq.summary import generate_summary, quantize_summary

try:
    from typer._click import exceptions as click_exceptions
except ImportError:  # a typer that uses click itself
    from click import exceptions as click_exceptions
ClickException = click_exceptions.ClickException
NoArgsIsHelpError = getattr(click_exceptions, "NoArgsIsHelpError", ())  # click < 8.2 exits 0 instead

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="QoQ W4A8KV4 quantization: quantize, inspect, verify, generate, bench, export.")
ARTIFACT_ARG = typer.Argument(None, help="artifact folder; default: the newest qoq artifact in the current "
                              "directory, else the one the last qoq quantize wrote")
VERBOSE_OPT = typer.Option(False, "--verbose", "-v", help="also show transformers / datasets progress bars, "
                           "load reports and warnings")

# How each command's flags spell the API arguments that library errors name (qoq.errors.arg)
RUNTIME_FLAGS = {"device": "--device", "backend": "--backend"}
QUANTIZE_FLAGS = {"device": "--device", "model": "--model", "output": "--output", "overwrite": "--overwrite",
                  "spec": "--calib", "n_samples": "--calib-samples", "seqlen": "--calib-seqlen",
                  "calib_dtype": "--calib-dtype", "group_size": "--group", "resume": "--resume"}
EXPORT_FLAGS = {"output": "--output", "overwrite": "--overwrite", "format": "--format",
                "group_size": "qoq quantize --group"}  # the artifact's group size is set where it was made
GENERATE_FLAGS = {**RUNTIME_FLAGS, "prompt": "-p", "max_new_tokens": "--max-new-tokens", "temperature": "--temperature",
                  "top_p": "--top-p", "seed": "--seed"}
BENCH_FLAGS = {"backend": "--backend", "group_size": "--group"}


@app.command()
@user_errors
@flags(QUANTIZE_FLAGS)
def quantize(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="HF hub id, local HF folder or .gguf file; "
                                        "default: the embedded SmolLM2-135M-Instruct"),
    calib: Optional[str] = typer.Option(None, "--calib", help="pileval | wikitext2 | data-free | PATH (text/jsonl "
                                        "file or folder); default auto: pileval, else local data, else data-free"),
    calib_samples: Optional[int] = typer.Option(None, "--calib-samples", help="calibration samples "
                                                "(default 128; 32 for data-free on a CPU)"),
    calib_seqlen: Optional[int] = typer.Option(None, "--calib-seqlen", help="tokens per calibration sample "
                                               "(default 1024; 256 for data-free on a CPU)"),
    group: int = typer.Option(128, "--group", "-g", help="weight group size: 32, 64, 128, or -1 for per-channel"),
    recipe: str = typer.Option("qoq", "--recipe", help="qoq: the full QoQ recipe (rotation, smoothing, reordering, "
                               "GPTQ, clip search, SmoothAttention search); rtn: progressive RTN + SmoothAttention"),
    rotation: Optional[bool] = typer.Option(None, "--rotation/--no-rotation",
                                            help="Hadamard rotation (norms folded) + per-head V rotation"),
    smooth_linear: Optional[bool] = typer.Option(None, "--smooth-linear/--no-smooth-linear",
                                                 help="down_proj input smoothing (alpha searched)"),
    reorder: Optional[bool] = typer.Option(None, "--reorder/--no-reorder",
                                           help="down_proj channel reordering (per-group only)"),
    gptq: Optional[bool] = typer.Option(None, "--gptq/--no-gptq", help="GPTQ on the 4-bit level (else RTN)"),
    clip_search: Optional[bool] = typer.Option(None, "--clip-search/--no-clip-search",
                                               help="weight-clip search (per-channel only)"),
    smooth_attn_search: Optional[bool] = typer.Option(None, "--smooth-attn-search/--no-smooth-attn-search",
                                                      help="SmoothAttention (alpha, beta) grid search"),
    smooth_attn_alpha: Optional[float] = typer.Option(None, "--smooth-attn-alpha",
                                                      help="fixed SmoothAttention alpha (default 0.5 when not "
                                                      "searched); 0 turns it off"),
    calib_dtype: str = typer.Option("auto", "--calib-dtype", help="compute dtype of the calibration passes: "
                                    "auto (bfloat16 on CPUs with native bf16, else float32) | float32 | bfloat16"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="artifact folder "
                                          "(default ./<model>-qoq-w4a8kv4-g<group>, -gchn for per-channel)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing output folder if it "
                                   "is a qoq artifact (never the source model or the current directory)"),
    batch_size: int = typer.Option(4, "--batch-size", help="calibration samples per forward pass"),
    resume: bool = typer.Option(False, "--resume", help="continue the interrupted run of the same --output "
                                "(same model, calibration data and options) from its last finished blocks"),
    stream: bool = typer.Option(True, "--stream/--no-stream", help="read an HF safetensors model one block at a "
                                "time (host memory: one block, not the model); --no-stream loads it whole"),
    gpus: Optional[int] = typer.Option(None, "--gpus", help="data-parallel calibration on N GPUs of this machine: "
                                       "N processes (torchrun), each calibrating on its share of the samples"),
    verbose: bool = VERBOSE_OPT,
):
    """Calibrate and quantize a model to a QoQ W4A8KV4 artifact."""
    from qoq.calibration.launch import launch_ranks, require_gpus, require_launched_as, under_launcher
    from qoq.pipeline import QuantizeOptions, check_before_launch, quantize as run_quantize

    _require_positive("--batch-size", batch_size)
    _require_positive("--gpus", gpus)
    if model is not None and not model.strip():
        raise QoqError("--model is empty; pass a HF hub id, a local folder or a .gguf file, or leave --model out "
                       "for the default model")

    opts = QuantizeOptions(model=model, calib=calib, calib_samples=calib_samples, calib_seqlen=calib_seqlen,
                           group_size=group, recipe_name=recipe, rotation=rotation, smooth_linear=smooth_linear,
                           reorder=reorder, gptq=gptq, clip_search=clip_search, smooth_attn_search=smooth_attn_search,
                           smooth_attn_alpha=smooth_attn_alpha, calib_dtype=calib_dtype, device=device,
                           output=output, overwrite=overwrite, batch_size=batch_size, resume=resume,
                           stream=stream)
    if gpus is not None and under_launcher():
        require_launched_as(gpus)
    elif gpus is not None:
        require_gpus(gpus, device)
        if gpus > 1:
            check_before_launch(opts, gpus)  # one line now rather than one per rank later
            raise typer.Exit(launch_ranks(gpus, sys.argv[1:]))
    rank = _launched_rank()
    with quiet_third_party(verbose), _rank_errors(rank):
        result = run_quantize(opts, RichReporter(err) if rank == 0 else Reporter())
    if rank != 0:  # rank 0 holds the same weights, writes the artifact and reports
        return
    sizes, timings = result.report["sizes"], result.report["timings"]
    worst = max(result.report["layers"], key=lambda r: _nan_as_inf(r["block_output_rel_error"]))
    out.print(f"wrote [bold]{result.path}[/]: {_mb(sizes['artifact_bytes'])} vs {_mb(sizes['fp16_bytes'])} FP16 "
              f"({sizes['compression']:.2f}x smaller), recipe {result.report['recipe']['name']}, "
              f"quantized in {timings['quantize_s']:.1f} s; "
              f"largest block output error {worst['block_output_rel_error']:.3%} (layer {worst['layer']})",
              highlight=False)
    for line in quantize_summary(result.path, result.report):
        out.print(line, highlight=False, soft_wrap=True)


@app.command()
@user_errors
def inspect(
    artifact: Optional[Path] = ARTIFACT_ARG,
    linears: bool = typer.Option(False, "--linears", help="one row per quantized linear instead of per block"),
):
    """What is inside an artifact: layers, bits per weight, sizes and the compression ratio."""
    from qoq.formats.artifact import read_artifact
    from qoq.state import resolve_artifact

    art = read_artifact(resolve_artifact(artifact, RichReporter(err)))
    qc = art.qconfig
    rows = _inspect_rows(art, by_linear=linears)
    table = Table(title=f"{art.path}  (W4A8KV4, group {qc['group_size']}, layout {qc['layout']})")
    for col, justify in (("tensor" if linears else "part", "left"), ("weights", "right"), ("bytes", "right"),
                         ("bits/weight", "right")):
        table.add_column(col, justify=justify)
    for name, params, nbytes in rows:
        table.add_row(name, f"{params:,}", _mb(nbytes), f"{8 * nbytes / max(params, 1):.2f}")
    total_params = sum(r[1] for r in rows)
    total_bytes = sum(r[2] for r in rows)
    table.add_row("[bold]total[/]", f"{total_params:,}", _mb(total_bytes), f"{8 * total_bytes / total_params:.2f}")
    out.print(table)
    fp16 = 2 * total_params
    out.print(f"FP16 size {_mb(fp16)}, artifact {_mb(total_bytes)}: compression {fp16 / total_bytes:.2f}x; "
              f"recipe {qc.get('recipe', {}).get('name', '?')}; "
              f"source {art.report.get('source', {}).get('model', '?')}",
              highlight=False)
    source, calib = art.report.get("source", {}), art.report.get("calibration", {})
    out.print(f"source sha256 {source.get('sha256') or '?'}; calibration {calib.get('description') or '?'}, "
              f"sha256 {calib.get('sha256') or '?'}", highlight=False, soft_wrap=True)


def _launched_rank() -> int:
    return int(os.environ.get("RANK", "0"))


@contextmanager
def _rank_errors(rank: int):
    """Ranks after the first name themselves in their errors and stay quiet when the launcher stops them
    (because another rank failed, or on Ctrl-C: rank 0 says so)."""
    if rank == 0:
        yield
        return
    try:
        yield
    except QoqError as e:
        raise QoqError(f"rank {rank}: {e}") from None
    except KeyboardInterrupt as e:
        raise typer.Exit(getattr(e, "exit_code", 130)) from None


def _require_positive(option: str, value: Optional[int]) -> None:
    """Checked before anything is loaded, so a typo costs no model or artifact load."""
    if value is not None and value < 1:
        raise QoqError(f"{option} must be >= 1, got {value}")


def _nan_as_inf(x: float) -> float:
    return x if math.isfinite(x) else math.inf


def _inspect_rows(art, by_linear: bool) -> list[tuple[str, int, int]]:
    """(name, weights represented, bytes stored) per linear or per block/part."""
    modules = art.qconfig["modules"]
    rows: dict[str, list[int]] = {}

    def add(key, params, nbytes):
        r = rows.setdefault(key, [0, 0])
        r[0] += params
        r[1] += nbytes

    claimed = set()
    for name, (n, k) in modules.items():
        tnames = [t for t in art.tensors if t.startswith(name + ".")]
        claimed.update(tnames)
        key = name if by_linear else _block_key(name)
        add(key, n * k, sum(art.tensors[t].numel() * art.tensors[t].element_size() for t in tnames))
    for tname, t in art.tensors.items():
        if tname in claimed:
            continue
        key = tname if by_linear else _block_key(tname)
        add(key, t.numel(), t.numel() * t.element_size())
    return sorted(((k, v[0], v[1]) for k, v in rows.items()), key=lambda r: _natural_key(r[0]))


def _natural_key(name: str) -> list:
    """'block 10' after 'block 9', embeddings first, lm_head last."""
    order = 0 if "embed" in name else 2 if ("lm_head" in name or name.startswith("model.norm")) else 1
    return [order] + [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _block_key(name: str) -> str:
    m = re.match(r"model\.layers\.(\d+)\.", name)
    if m:
        return f"block {int(m.group(1))}"
    return name.removesuffix(".weight")


def _mb(nbytes: float) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


@app.command()
@user_errors
@flags(RUNTIME_FLAGS)
def verify(
    artifact: Optional[Path] = ARTIFACT_ARG,
    ppl: str = typer.Option("wikitext2", "--ppl", help="perplexity dataset (wikitext2)"),
    data: Optional[str] = typer.Option(None, "--data", help="local WikiText-2 wiki.test.raw (or its folder); "
                                       "default: $QOQ_WIKITEXT2, the hub, then $QOQ_DATA_DIR"),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="tokens per non-overlapping window (default 2048, "
                                          "or the model's context if shorter)"),
    max_windows: Optional[int] = typer.Option(None, "--max-windows", help="evaluate only the first N windows"),
    no_baseline: bool = typer.Option(False, "--no-baseline", help="skip the FP16 source model"),
    backend: str = typer.Option("auto", "--backend", help="auto | reference | cupy"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
    check_kernels: Optional[bool] = typer.Option(None, "--check-kernels/--no-check-kernels",
                                                 help="compare cupy kernels with the reference, op by op "
                                                 "(default: on when the cupy backend is available)"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="windows per forward (default 1 CPU, 4 CUDA)"),
    semantics: str = typer.Option("qoq", "--semantics", help="qoq: this runtime (W4A8KV4); sglang: as sglang's qoq "
                                  "method runs it (FP16 KV cache, its per-channel activation sum)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object on stdout instead of the table"),
    max_delta: Optional[float] = typer.Option(None, "--max-delta", help="exit 1 when PPL quantized - PPL FP16 "
                                              "exceeds this"),
    verbose: bool = VERBOSE_OPT,
):
    """Perplexity of an artifact on WikiText-2 against its FP16 source model (and kernel numerics)."""
    from qoq.checks import strict_json
    from qoq.state import resolve_artifact
    from qoq.verify.perplexity import DATASETS, VerifyOptions, verify as run_verify

    _require_positive("--batch-size", batch_size)

    if ppl not in DATASETS:
        raise QoqError(f"--ppl {ppl!r} is not supported; use --ppl wikitext2")
    if max_delta is not None and no_baseline:
        raise QoqError("--max-delta compares with the FP16 baseline; drop --no-baseline")
    reporter = RichReporter(err)
    path = resolve_artifact(artifact, reporter)
    opts = VerifyOptions(artifact=path, ppl=ppl, data=data, seq_len=seq_len, max_windows=max_windows,
                         baseline=not no_baseline, backend=backend, device=device, check_kernels=check_kernels,
                         batch_size=batch_size, semantics=semantics)
    with quiet_third_party(verbose):
        result = run_verify(opts, reporter)
    if as_json:
        print(strict_json(result.as_dict(), indent=2))
    else:
        out.print(_verify_table(result))
        if result.kernel_check:
            out.print(_kernel_table(result.kernel_check))
        for note in result.notes:
            out.print(f"note: {note}", highlight=False)
    if max_delta is not None and result.delta is not None and not result.delta <= max_delta:
        raise QoqError(f"quantized PPL {result.quantized.ppl:.4f} is {result.delta:+.4f} over FP16 "
                       f"{result.baseline.ppl:.4f}, more than --max-delta {max_delta}")


def _verify_table(result) -> Table:
    table = Table(title=f"{result.artifact}: WikiText-2, {result.windows} x {result.seq_len} tokens "
                        f"({result.backend} on {result.device})")
    quant = "W4A8 (sglang)" if result.semantics == "sglang" else "W4A8KV4"
    b, q = result.baseline, result.quantized
    if b is None:  # --no-baseline: no baseline columns to leave empty
        for col in (f"PPL {quant}", "tokens", f"time {quant}"):
            table.add_column(col, justify="right")
        table.add_row(f"{q.ppl:.4f}", f"{q.tokens:,}", f"{q.seconds:.1f} s")
        return table
    base = {"float16": "FP16", "float32": "FP32"}.get(result.baseline_dtype, result.baseline_dtype)
    for col in (f"PPL {base}", f"PPL {quant}", "delta", "tokens", f"time {base}", f"time {quant}"):
        table.add_column(col, justify="right")
    table.add_row(f"{b.ppl:.4f}", f"{q.ppl:.4f}", f"{result.delta:+.4f}", f"{q.tokens:,}", f"{b.seconds:.1f} s",
                  f"{q.seconds:.1f} s")
    return table


def _kernel_table(kc: dict) -> Table:
    table = Table(title=f"kernels vs reference, op by op on the same inputs ({kc['candidate']}, {kc['tokens']} "
                        f"tokens); free-running logits rel. error {kc['logits_rel_error']:.2e} (quantizer "
                        "boundary flips grow over the layers)")
    for col, justify in (("op", "left"), ("calls", "right"), ("max rel. error", "right"),
                         ("int mismatches", "right"), ("max int diff", "right")):
        table.add_column(col, justify=justify)
    for op, e in kc["ops"].items():
        table.add_row(op, str(e["calls"]), f"{e['max_rel_error']:.2e}",
                      f"{e['int_mismatches']}/{e['int_values']}" if e["int_values"] else "-",
                      str(e["max_int_diff"]) if e["int_values"] else "-")
    return table


EXPORT_FORMATS = ("sglang", "compressed-tensors")


@app.command()
@user_errors
@flags(EXPORT_FLAGS)
def export(
    artifact: Optional[Path] = ARTIFACT_ARG,
    fmt: str = typer.Option("sglang", "--format", "-f", help="sglang: a checkpoint sglang's qoq quantization "
                            "method loads as it is (group size 128 or per-channel); compressed-tensors: per-channel "
                            "artifacts as asymmetric W4A16 pack-quantized (vLLM)"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="checkpoint folder "
                                          "(default: <artifact>-<format> beside the artifact)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an earlier qoq export at --output (a folder "
                                   "holding qoq_export.json)"),
):
    """Write an artifact as a serving engine's checkpoint (sglang W4A8, or compressed-tensors W4A16 for vLLM)."""
    from qoq.formats.export_compressed_tensors import export_compressed_tensors
    from qoq.formats.export_sglang import export_sglang
    from qoq.state import resolve_artifact

    if fmt not in EXPORT_FORMATS:
        raise QoqError(f"--format {fmt!r} is not supported; use --format {' | '.join(EXPORT_FORMATS)}")
    path = resolve_artifact(artifact, RichReporter(err))
    target = output or path.with_name(f"{path.name}-{fmt}")
    if fmt == "sglang":
        written = export_sglang(path, target, overwrite=overwrite)
        out.print(f"wrote [bold]{written}[/] (sglang checkpoint: W4A8 weights as they are, FP16 KV cache in sglang); "
                  f"serve it with: python -m sglang.launch_server --model-path {written} --quantization qoq "
                  "--dtype float16 --tp 1", highlight=False, soft_wrap=True)
    else:
        written = export_compressed_tensors(path, target, overwrite=overwrite)
        out.print(f"wrote [bold]{written}[/] (compressed-tensors pack-quantized: the same 4-bit weights, run as W4A16 "
                  f"with an FP16 KV cache); serve it with: vllm serve {written} --dtype float16",
                  highlight=False, soft_wrap=True)


@app.command()
@user_errors
@flags(GENERATE_FLAGS)
def generate(
    artifact: Optional[Path] = ARTIFACT_ARG,
    prompt: str = typer.Option(..., "--prompt", "-p", help="the prompt"),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", "-n", help="most tokens to generate"),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="0 = greedy; > 0 samples"),
    top_p: float = typer.Option(0.9, "--top-p", help="nucleus sampling mass (with --temperature > 0)"),
    seed: Optional[int] = typer.Option(None, "--seed", help="sampling seed"),
    no_chat_template: bool = typer.Option(False, "--no-chat-template", help="feed the prompt as raw text"),
    backend: str = typer.Option("auto", "--backend", help="auto | reference | cupy"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
    verbose: bool = VERBOSE_OPT,
):
    """Generate text with the quantized model (KV4 cache), streaming tokens as they come."""
    from qoq.runtime.engine import generate_text
    from qoq.state import resolve_artifact

    _require_positive("--max-new-tokens", max_new_tokens)
    if not (math.isfinite(temperature) and temperature >= 0):
        raise QoqError(f"--temperature must be a number >= 0 (0 = greedy), got {temperature}")
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise QoqError(f"--top-p must be in (0, 1], got {top_p}")
    if seed is not None and not 0 <= seed < 2**64:  # torch.Generator's range
        raise QoqError(f"--seed must be in [0, 2**64), got {seed}")
    path = resolve_artifact(artifact, RichReporter(err))
    with quiet_third_party(verbose):
        stats = generate_text(path, prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                              seed=seed, chat_template=not no_chat_template, backend=backend, device=device,
                              write=lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    sys.stdout.write("\n")
    err.print(generate_summary(stats), highlight=False, soft_wrap=True)


@app.command()
@user_errors
@flags(BENCH_FLAGS)
def bench(
    artifact: Optional[Path] = ARTIFACT_ARG,
    gpu: str = typer.Option("auto", "--gpu", help="GPU profile: l40s | a100 | h100 | h200 | auto (the detected GPU)"),
    shape: Optional[str] = typer.Option(None, "--shape", help="synthetic model instead of ARTIFACT: llama-3-8b | "
                                        "llama-2-7b | mistral-7b | qwen2-7b | smollm2-135m (random weights, RTN)"),
    input_len: int = typer.Option(1024, "--input-len", help="prompt tokens per sequence"),
    output_len: int = typer.Option(512, "--output-len", help="generated tokens per sequence"),
    batches: str = typer.Option("1,16,64,256", "--batches", help="batch sizes measured besides the max batch"),
    max_batch: str = typer.Option("auto", "--max-batch", help="auto (largest that fits), N (at most N) or none"),
    json_path: Optional[Path] = typer.Option(None, "--json", help="write every figure as JSON here"),
    min_speedup: Optional[float] = typer.Option(None, "--min-speedup", help="exit 1 when qoq's end-to-end speedup "
                                                "over the FP16 engine at the max batch is below this"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="PNG of tokens/s vs batch (needs matplotlib)"),
    skip_kernels: bool = typer.Option(False, "--skip-kernels", help="no GEMM/attention micro-benchmarks"),
    skip_hf: bool = typer.Option(False, "--skip-hf", help="no transformers FP16 baseline"),
    group: int = typer.Option(128, "--group", help="group size of the synthetic model (--shape)"),
    backend: str = typer.Option("auto", "--backend", help="qoq engine backend: auto | cupy | reference"),
    prefill_chunk: int = typer.Option(16384, "--prefill-chunk", help="prompt tokens per prefill chunk (engines)"),
):
    """GEMM + end-to-end throughput of the quantized model vs FP16 baselines on this GPU."""
    from qoq.bench.report import e2e_table, kernels_table, plot_throughput, summary_lines, write_json
    from qoq.bench.suite import BenchOptions, min_speedup_error, parse_batches, run_bench

    opts = BenchOptions(artifact=artifact, shape=shape, gpu=gpu, input_len=input_len, output_len=output_len,
                        batches=parse_batches(batches), max_batch=max_batch, json_path=json_path,
                        min_speedup=min_speedup, plot=plot, skip_kernels=skip_kernels, skip_hf=skip_hf,
                        group_size=group, backend=backend, prefill_chunk_tokens=prefill_chunk)
    report = run_bench(opts, RichReporter(err))
    screen = out if out.is_terminal else Console(width=160)  # logs and CI: no truncated columns
    if report["kernels"]:
        screen.print(kernels_table(report))
    elif report["kernels_note"]:
        out.print(f"kernels: {report['kernels_note']}", highlight=False)
    screen.print(e2e_table(report))
    for line in summary_lines(report):
        out.print(line, highlight=False)
    if json_path is not None:
        write_json(report, json_path)
        out.print(f"wrote {json_path}", highlight=False)
    if plot is not None:
        plot_throughput(report, plot)
        out.print(f"wrote {plot}", highlight=False)
    failure = min_speedup_error(report, min_speedup)
    if failure:
        raise QoqError(failure)


def main() -> None:
    """The `qoq` entry point: a usage error (bad flag, bad value, unknown command) is one line too."""
    sys.exit(run_cli())


def run_cli(args: Optional[list[str]] = None) -> int:
    try:
        code = app(args, prog_name="qoq", standalone_mode=False)
    except ClickException as e:
        if not isinstance(e, NoArgsIsHelpError):  # that one has printed the help already
            err.print(f"[bold red]error:[/] {usage_error_line(e)}", highlight=False, soft_wrap=True)
        return e.exit_code
    except typer.Abort:
        err.print("[bold red]interrupted[/]; nothing was written")
        return 130
    return code if isinstance(code, int) else 0


def usage_error_line(e: ClickException) -> str:
    """Click's message on one line, with the help command of the (sub)command it concerns."""
    message = one_line(e.format_message())
    ctx = getattr(e, "ctx", None)
    return f"{message} (see '{ctx.command_path} --help')" if ctx is not None else message


if __name__ == "__main__":
    main()
