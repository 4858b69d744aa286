"""WikiText-2 perplexity of an artifact (through the engine, KV4 in attention) and of its FP16 source model.

Protocol (GPTQ/AWQ/QServe): the test split's rows joined with "\\n\\n", tokenized once; non-overlapping
windows of `seq_len` tokens (the tail is dropped); each window's loss is over its tokens 1..T-1;
PPL = exp(mean NLL over every predicted token). The quantized model runs the engine's prefill path (fast
mode on CUDA, with `prefill_fp16` off): each window's K/V go through the KV4 cache and attention reads them
dequantized, as decode does. With `semantics="sglang"` the artifact runs the way sglang's qoq method runs
it (qoq.runtime.sglang_semantics: per-channel activation sum over unquantized activations, FP16 KV cache).
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qoq.errors import QoqError
from qoq.hub import hub_reachable
from qoq.progress import Reporter

DATASETS = ("wikitext2",)
SEMANTICS = ("qoq", "sglang")
WIKITEXT2_FILE = "wiki.test.raw"
WIKITEXT2_DIR = "wikitext-2-raw-v1"
LOGIT_CHUNK = 512  # tokens per lm_head chunk when computing the loss


DEFAULT_SEQ_LEN = 2048


@dataclass
class VerifyOptions:
    artifact: Path
    ppl: str = "wikitext2"
    data: str | None = None
    seq_len: int | None = None  # None: DEFAULT_SEQ_LEN, or the model's context if shorter
    max_windows: int | None = None
    baseline: bool = True
    backend: str = "auto"
    device: str = "auto"
    check_kernels: bool | None = None  # None: on when the cupy backend is available
    batch_size: int | None = None  # windows per forward; default 1 on CPU, 4 on CUDA
    semantics: str = "qoq"  # "sglang": the conventions sglang's qoq method runs the artifact with

    def validate(self) -> None:
        if self.ppl not in DATASETS:
            raise QoqError(f"--ppl {self.ppl!r} is not supported; use --ppl wikitext2")
        if self.seq_len is not None and self.seq_len < 2:
            raise QoqError(f"--seq-len must be >= 2, got {self.seq_len}")
        if self.max_windows is not None and self.max_windows < 1:
            raise QoqError(f"--max-windows must be >= 1, got {self.max_windows}")
        if self.batch_size is not None and self.batch_size < 1:
            raise QoqError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.semantics not in SEMANTICS:
            raise QoqError(f"--semantics {self.semantics!r} is not one of {', '.join(SEMANTICS)}")


@dataclass
class PplResult:
    ppl: float
    nll_sum: float
    tokens: int  # predicted tokens
    seconds: float

    def as_dict(self) -> dict:
        return {"ppl": self.ppl, "nll_sum": self.nll_sum, "tokens": self.tokens, "seconds": self.seconds}


@dataclass
class VerifyResult:
    artifact: str
    dataset: str
    data_source: str
    seq_len: int
    windows: int
    backend: str
    device: str
    quantized: PplResult
    baseline: PplResult | None = None
    baseline_dtype: str | None = None
    kernel_check: dict | None = None
    notes: list[str] = field(default_factory=list)
    quantization: dict = field(default_factory=dict)  # group size and recipe of the artifact
    semantics: str = "qoq"

    @property
    def delta(self) -> float | None:
        return None if self.baseline is None else self.quantized.ppl - self.baseline.ppl

    def as_dict(self) -> dict:
        return {
            "artifact": self.artifact, "dataset": self.dataset, "data_source": self.data_source,
            "seq_len": self.seq_len, "windows": self.windows, "tokens": self.quantized.tokens,
            "ppl_fp16": None if self.baseline is None else self.baseline.ppl,
            "ppl_quantized": self.quantized.ppl, "delta": self.delta,
            "time_fp16_s": None if self.baseline is None else self.baseline.seconds,
            "time_quantized_s": self.quantized.seconds,
            "baseline_dtype": self.baseline_dtype, "backend": self.backend, "device": self.device,
            "quantized": self.quantized.as_dict(),
            "baseline": None if self.baseline is None else self.baseline.as_dict(),
            "kernel_check": self.kernel_check, "notes": self.notes, "quantization": self.quantization,
            "semantics": self.semantics,
        }


# ---- data ---------------------------------------------------------------------------------------------

def hf_text_from_raw(raw: str) -> str:
    """The HF `wikitext-2-raw-v1` test text ("\\n\\n".join of its rows) from the canonical wiki.test.raw."""
    rows = [line if line.strip() else "" for line in raw.splitlines(keepends=True)]
    return "\n\n".join(rows)


def _local_file(path: Path, what: str) -> Path:
    if path.is_dir():
        for cand in (path / WIKITEXT2_FILE, path / WIKITEXT2_DIR / WIKITEXT2_FILE):
            if cand.is_file():
                return cand
        raise QoqError(f"{what} {path} is a folder without {WIKITEXT2_FILE}; point it at wiki.test.raw or its folder")
    if not path.exists():
        raise QoqError(f"{what} {path} does not exist; point it at WikiText-2's wiki.test.raw or its folder")
    if not path.is_file():
        raise QoqError(f"{what} {path} is not a regular file; point it at WikiText-2's wiki.test.raw or its folder")
    return path


def _read_raw(file: Path) -> str:
    try:
        raw = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise QoqError(f"cannot read {file} as UTF-8 text ({type(e).__name__}); point --data at WikiText-2's "
                       "wiki.test.raw") from None
    if not raw.strip():
        raise QoqError(f"{file} is empty; point --data at WikiText-2's wiki.test.raw")
    return raw


def load_wikitext2(data: str | None = None) -> tuple[str, str]:
    """(text, where it came from). Order: --data, $QOQ_WIKITEXT2, the hub (datasets), $QOQ_DATA_DIR."""
    if data:
        f = _local_file(Path(data).expanduser(), "--data")
        return hf_text_from_raw(_read_raw(f)), str(f)
    env = os.environ.get("QOQ_WIKITEXT2")
    if env:
        f = _local_file(Path(env).expanduser(), "$QOQ_WIKITEXT2")
        return hf_text_from_raw(_read_raw(f)), str(f)
    if hub_reachable():
        try:
            from datasets import load_dataset

            rows = load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"]
            return "\n\n".join(rows), "hf:wikitext/wikitext-2-raw-v1 (test)"
        except Exception:  # fall through to local copies
            pass
    root = os.environ.get("QOQ_DATA_DIR")
    if root:
        f = Path(root).expanduser() / WIKITEXT2_DIR / WIKITEXT2_FILE
        if f.is_file():
            return hf_text_from_raw(_read_raw(f)), str(f)
    raise QoqError("WikiText-2 is not available: the Hugging Face hub is unreachable and no local copy is set; "
                   "pass --data PATH/wiki.test.raw (or its folder), or set QOQ_WIKITEXT2 or QOQ_DATA_DIR")


def window_length(requested: int | None, context) -> int:
    """--seq-len, checked against the model's context; by default DEFAULT_SEQ_LEN or the context if shorter."""
    if type(context) is not int or context < 2:
        return requested or DEFAULT_SEQ_LEN
    if requested is None:
        return min(DEFAULT_SEQ_LEN, context)
    if requested > context:
        raise QoqError(f"--seq-len {requested} is longer than the model's context of {context} tokens "
                       f"(max_position_embeddings); pass --seq-len {context} or less")
    return requested


def token_windows(tokenizer, text: str, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Tokenize once; non-overlapping windows [N, seq_len]."""
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # "sequence longer than the model maximum" is expected
    try:
        ids = tokenizer(text, return_tensors="pt").input_ids[0]
    finally:
        transformers.logging.set_verbosity(verbosity)
    n = ids.numel() // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise QoqError(f"the text has {ids.numel()} tokens, fewer than one window of --seq-len {seq_len}")
    return ids[: n * seq_len].view(n, seq_len)


# ---- evaluation ---------------------------------------------------------------------------------------

def _window_nll(hidden: torch.Tensor, targets: torch.Tensor, head) -> float:
    """Sum of NLL of targets [B, T-1] from hidden [B, T, H] (positions 0..T-2), lm_head in chunks."""
    total = 0.0
    h = hidden[:, :-1]
    for s in range(0, h.shape[1], LOGIT_CHUNK):
        logits = head(h[:, s:s + LOGIT_CHUNK]).float()
        total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets[:, s:s + LOGIT_CHUNK].flatten(),
                                                         reduction="sum"))
    return total


def _batches(windows: torch.Tensor, batch: int):
    return [windows[i:i + batch] for i in range(0, windows.shape[0], batch)]


@torch.no_grad()
def engine_perplexity(engine, windows: torch.Tensor, reporter: Reporter | None = None, batch: int = 1,
                      description: str = "quantized", fp16_kv: bool = False) -> PplResult:
    """Perplexity through `engine` with attention over the KV4 cache: a fast engine's FP16 prefill
    attention is turned off for the run (perplexity must see the KV4 path that decode sees). `fp16_kv`:
    attention reads each window's unquantized K/V instead, which is what an FP16 KV cache holds."""
    reporter = reporter or Reporter()
    t0 = time.perf_counter()
    nll, count = 0.0, 0
    fp16_attention, engine.prefill_fp16 = getattr(engine, "prefill_fp16", False), fp16_kv
    try:
        for ids in reporter.track(_batches(windows, batch), description):
            ids = ids.to(engine.device)
            engine.reset(ids.shape[0], ids.shape[1])
            hidden = engine.hidden_states(ids)
            nll += _window_nll(hidden, ids[:, 1:], engine.lm_logits)
            count += ids[:, 1:].numel()
    finally:
        engine.prefill_fp16 = fp16_attention
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)
    return _result(nll, count, time.perf_counter() - t0)


@torch.no_grad()
def hf_perplexity(model, windows: torch.Tensor, device: torch.device, reporter: Reporter | None = None,
                  batch: int = 1, description: str = "FP16") -> PplResult:
    """Perplexity of a transformers causal LM on the same windows (hidden states, then lm_head in chunks)."""
    reporter = reporter or Reporter()
    t0 = time.perf_counter()
    nll, count = 0.0, 0
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    head = model.get_output_embeddings()
    for ids in reporter.track(_batches(windows, batch), description):
        ids = ids.to(device)
        hidden = base(input_ids=ids, use_cache=False).last_hidden_state
        nll += _window_nll(hidden, ids[:, 1:], head)
        count += ids[:, 1:].numel()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return _result(nll, count, time.perf_counter() - t0)


def _result(nll: float, count: int, seconds: float) -> PplResult:
    mean = nll / max(count, 1)
    ppl = math.exp(mean) if mean < 700 else float("inf")
    return PplResult(ppl=ppl, nll_sum=nll, tokens=count, seconds=seconds)


def artifact_tokenizer(art):
    """The tokenizer saved in the artifact; QoqError when it is missing or unreadable."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(art.path))
    except Exception as e:
        raise QoqError(f"{art.path} has no usable tokenizer ({type(e).__name__}); re-run qoq quantize") from None


def verify(opts: VerifyOptions, reporter: Reporter | None = None) -> VerifyResult:
    """Perplexity of the artifact (and of its FP16 source unless opts.baseline is False), kernel check."""
    from qoq.formats.artifact import changed_weight_files, read_artifact
    from qoq.runtime.backend import cupy_available, get_backend, reference_backend, resolve_device
    from qoq.runtime.engine import Engine
    from qoq.verify.source_check import check_source_before_loading, check_source_hash
    from qoq.runtime.sglang_semantics import sglang_backend

    reporter = reporter or Reporter()
    opts.validate()
    device = resolve_device(opts.device)
    backend = get_backend(opts.backend, device)  # fail fast on an impossible backend
    notes: list[str] = []
    cupy_ok, cupy_why = cupy_available() if device.type == "cuda" else (False, "the device is the CPU")
    do_check = opts.check_kernels
    if do_check is None:
        do_check = cupy_ok
        if not cupy_ok:
            notes.append(f"kernel check skipped: the cupy backend is unavailable ({cupy_why})")
    elif do_check and not cupy_ok:
        raise QoqError(f"--check-kernels needs the cupy backend, which is unavailable ({cupy_why}); "
                       "pass --no-check-kernels")

    with reporter.status("reading the artifact"):
        art = read_artifact(opts.artifact)
    with reporter.status("checking the artifact's weights against their recorded sha256"):
        changed = changed_weight_files(art)
    if changed:
        raise QoqError(f"{art.path / changed[0]} is not the file qoq quantize wrote (its sha256 differs from the one "
                       "qoq_report.json records); re-run qoq quantize")
    if changed is None:
        notes.append("the artifact records no weights sha256, so its weights are not checked against what qoq "
                     "quantize wrote")
    reload_spec = art.report.get("source", {}).get("reload") if opts.baseline else None
    if opts.baseline and not reload_spec:
        raise QoqError(f"{art.path} records no source model to compare with (qoq_report.json); pass --no-baseline")
    recorded_sha = art.report.get("source", {}).get("sha256")
    source_checked = False
    if opts.baseline:
        with reporter.status(f"checking the source model {reload_spec} against its recorded sha256"):
            source_checked = check_source_before_loading(art.path, reload_spec, recorded_sha)
        if not recorded_sha:
            notes.append("the artifact records no source sha256, so the FP16 baseline is not checked to be its source")
    seq_len = window_length(opts.seq_len, art.config.get("max_position_embeddings"))
    text, source = load_wikitext2(opts.data)
    tokenizer = artifact_tokenizer(art)
    with reporter.status("tokenizing WikiText-2"):
        windows = token_windows(tokenizer, text, seq_len, opts.max_windows)
    reporter.info(f"WikiText-2 test from {source}: {windows.shape[0]} windows x {seq_len} tokens")
    batch = opts.batch_size or (4 if device.type == "cuda" else 1)

    sglang = opts.semantics == "sglang"
    with reporter.status("loading the engine"):
        # fast mode on CUDA (fused GEMMs: the same integers as the plain mode), plain on the CPU;
        # engine_perplexity keeps attention on the KV4 cache either way (on FP16 K/V for sglang)
        engine = Engine(art, device=device, backend=sglang_backend(backend) if sglang else backend)
    label = f"W4A8, FP16 KV, sglang semantics ({backend.describe()})" if sglang else f"W4A8KV4 ({backend.describe()})"
    quant = engine_perplexity(engine, windows, reporter, batch, label, fp16_kv=sglang)
    if sglang:
        notes.append("sglang semantics: FP16 KV cache" + (", per-channel zero point applied to the sum of the "
                                                          "unquantized activations" if art.group_size == -1 else ""))
    del engine

    baseline, baseline_dtype = None, None
    if opts.baseline:
        from qoq.models.sources import load_model

        dtype = torch.float16 if device.type == "cuda" else torch.float32
        baseline_dtype = str(dtype).removeprefix("torch.")
        # third-party bars and load reports: off unless --verbose (qoq.progress.quiet_third_party, in the CLI)
        with reporter.status(f"loading the source model {reload_spec}"):
            loaded = load_model(reload_spec, dtype)
        if not source_checked:
            check_source_hash(art.path, reload_spec, recorded_sha, loaded.source_sha256)
        model = loaded.model.to(device)
        del loaded
        baseline = hf_perplexity(model, windows, device, reporter, batch, f"FP16 baseline ({baseline_dtype})")
        del model

    kernel_check = None
    if do_check:
        from qoq.verify.kernel_check import check_kernels

        with reporter.status("checking kernels against the reference"):
            kc = check_kernels(art, windows[:2, : min(seq_len, 512)], device, get_backend("cupy", device),
                               reference_backend())
        kernel_check = kc.as_dict()
    return VerifyResult(artifact=str(art.path), dataset=opts.ppl, data_source=source, seq_len=seq_len,
                        windows=int(windows.shape[0]), backend=backend.describe(), device=str(device),
                        quantized=quant, baseline=baseline, baseline_dtype=baseline_dtype,
                        kernel_check=kernel_check, notes=notes,
                        quantization={"group_size": art.group_size, "recipe": art.qconfig.get("recipe", {}),
                                      "source": art.report.get("source", {}).get("model")},
                        semantics=opts.semantics)
