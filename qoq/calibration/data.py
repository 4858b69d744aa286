"""Calibration text → token samples [n_samples, seqlen].

Sources: `pileval` / `wikitext2` (Hugging Face hub, through `datasets`), a local text / jsonl file or
folder, `data-free` (text sampled from the model itself), or `auto` (pileval when the hub answers,
else local text from $QOQ_CALIB_DATA or $QOQ_DATA_DIR/calibration, else data-free).

Samples are built like the QoQ authors' deepcompressor: shuffle the documents with a seeded RNG,
tokenize each without special tokens, randomly crop each to at most `seqlen` tokens, collect until
there are >= n_samples documents and >= n_samples*seqlen tokens, concatenate and cut into
`seqlen`-token chunks, keep the first n_samples.
"""

from __future__ import annotations

import codecs
import hashlib
import itertools
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from qoq.errors import QoqError, arg, one_line
from qoq.hub import hub_reachable
from qoq.progress import Reporter

HUB_DATASETS = {
    "pileval": ("mit-han-lab/pile-val-backup", None, "validation"),
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "train"),
}
SPECS = ("auto", "pileval", "wikitext2", "data-free")
TEXT_SUFFIXES = (".txt", ".raw", ".utf8", ".text")
JSONL_SUFFIXES = (".jsonl",)
_DOC_TAG = re.compile(r"<doc\b[^>]*>|</doc\s*>")
_BLANK_LINES = re.compile(r"\n[ \t\r\f\v]*\n")
_TOKENIZE_BATCH = 64
# Local text is read up to max(64 MiB, 256 bytes per requested token): English needs about 4 bytes a
# token, so this leaves room for shuffling and cropping while a huge file or a device cannot stall the run.
READ_MIN_BYTES = 64 << 20
READ_BYTES_PER_TOKEN = 256
_SNIFF_BYTES = 64 << 10  # checked for NUL bytes and invalid UTF-8 before the file is used as text
_DATA_FREE_MAX_BATCH = 64
_DATA_FREE_KV_BUDGET = 2 << 30  # bytes of KV cache per generate() batch


@dataclass
class CalibrationSet:
    input_ids: torch.LongTensor  # [n_samples, seqlen]
    description: str  # one line for the user
    sha256: str  # of input_ids bytes (int64, little endian, row-major)


# Calibration budgets (samples x tokens per sample); change them here.
PAPER_BUDGET = (128, 1024)  # the QoQ paper's pileval setting, the default for real text
# Data-free on a CPU: every sampled token is a decoding step of the model. SmolLM2-135M on a 2-core CPU samples
# about 60 tokens/s (the paper's budget: over an hour). 32 x 256 halves the sampling of 32 x 512 for +0.1 PPL on
# the first 8 WikiText-2 windows (25.11 vs 25.01; 16 x 512: 25.41); README, first run.
DATA_FREE_CPU_BUDGET = (32, 256)
_PAPER_HOWTO = ("for the paper's setting pass --calib pileval (online) or --calib PATH (local text, offline) "
                f"with --calib-samples {PAPER_BUDGET[0]} --calib-seqlen {PAPER_BUDGET[1]}")


@dataclass
class CalibrationPlan:
    """Which calibration data a run will use and how much, decided before any of it is built."""

    spec: str  # what to pass to load_calibration
    source: str  # "hub" | "local" | "data-free"
    n_samples: int
    seqlen: int
    budget: str  # "paper" (the default), "data-free-cpu" (the smaller CPU default) or "user"
    message: str  # one or two lines for the user

    def record(self) -> dict:
        return {"source": self.source, "samples": self.n_samples, "seqlen": self.seqlen, "budget": self.budget,
                "paper_budget": list(PAPER_BUDGET)}


def plan_calibration(spec: str | None, device: torch.device | str = "cpu", n_samples: int | None = None,
                     seqlen: int | None = None, context: int | None = None) -> CalibrationPlan:
    """Resolve `spec` (auto probes the hub) and the budget: the paper's unless given, smaller for data-free on CPU.

    `context`: the model's longest sequence; a default data-free seqlen is shortened to fit it."""
    s = "auto" if spec is None or not str(spec).strip() else str(spec).strip()
    low = s.lower()
    if low == "auto":
        if hub_reachable():
            source, what = "hub", "auto: pileval from the Hugging Face hub"
        else:
            local = _auto_local_path()
            source, what = ("local", f"auto: hub unreachable → local text {local}") if local is not None else (
                "data-free", "auto: no Hugging Face hub and no local text ($QOQ_CALIB_DATA, "
                             "$QOQ_DATA_DIR/calibration) → data-free, sampled from the model")
    elif low == "data-free":
        source, what = "data-free", "data-free, sampled from the model"
    elif low in HUB_DATASETS:
        source, what = "hub", f"{low} from the Hugging Face hub"
    else:
        source, what = "local", f"local text {s}"
    small = source == "data-free" and torch.device(device).type == "cpu"
    if n_samples is not None or seqlen is not None:
        budget = "user"
    else:
        budget = "data-free-cpu" if small else "paper"
    default = DATA_FREE_CPU_BUDGET if small else PAPER_BUDGET  # per flag: a given one keeps the other's default
    n = default[0] if n_samples is None else n_samples
    t = default[1] if seqlen is None else seqlen
    if seqlen is None and source == "data-free" and context:
        t = min(t, context - 1)  # sampling starts from one BOS token
    message = f"calibration: {what}, {n} x {t} tokens"
    if budget == "data-free-cpu":
        message += (f" (a smaller budget on CPU: sampling the paper's {PAPER_BUDGET[0]} x {PAPER_BUDGET[1]} "
                    f"takes over an hour on 2 cores even for a 135M model)\n  {_PAPER_HOWTO}")
    elif source == "data-free":
        message += f"\n  {_PAPER_HOWTO}"
    return CalibrationPlan(spec=s, source=source, n_samples=n, seqlen=t, budget=budget, message=message)


def load_calibration(spec: str | None, tokenizer, n_samples: int = PAPER_BUDGET[0], seqlen: int = PAPER_BUDGET[1],
                     model=None, seed: int = 42, device: torch.device | str | None = None,
                     reporter: Reporter | None = None) -> CalibrationSet:
    """Build `n_samples` x `seqlen` calibration token samples from `spec` (see module doc).

    `device`: where data-free sampling runs (default: where the model is); `reporter`: its progress."""
    try:
        return _load_calibration(spec, tokenizer, n_samples, seqlen, model, seed, device, reporter)
    except QoqError:
        raise
    except Exception as e:  # tokenizers / datasets / generate / IO: one line for the user
        raise QoqError(one_line(f"could not build calibration data from '{spec if spec else 'auto'}': "
                                f"{type(e).__name__}: {e}")) from e


def _load_calibration(spec, tokenizer, n_samples, seqlen, model, seed, device=None,
                       reporter=None) -> CalibrationSet:
    if not isinstance(n_samples, int) or n_samples < 1:
        raise QoqError(f"{arg('n_samples')} must be >= 1, got {n_samples}")
    if not isinstance(seqlen, int) or seqlen < 8:
        raise QoqError(f"{arg('seqlen')} must be >= 8, got {seqlen}")
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(max_pos, int) and seqlen > max_pos:
        raise QoqError(f"{arg('seqlen')} {seqlen} is longer than the model's context ({max_pos} tokens, "
                       f"max_position_embeddings); lower {arg('seqlen')}")
    budget = read_budget(n_samples, seqlen)
    s = "auto" if spec is None or not str(spec).strip() else str(spec).strip()
    shape = f"{n_samples} x {seqlen} tokens"

    if s.lower() == "auto":
        if hub_reachable():
            docs, what = _hub_docs("pileval")
            ids = _build_samples(docs, tokenizer, n_samples, seqlen, seed, what)
            return _result(ids, f"auto: {what}, {shape}")
        local = _auto_local_path()
        if local is not None:
            docs, what = _local_docs(local, budget)
            ids = _build_samples(docs, tokenizer, n_samples, seqlen, seed, what)
            return _result(ids, f"auto: hub unreachable → {what}, {shape}")
        ids = _data_free(model, tokenizer, n_samples, seqlen, seed, device, reporter)
        return _result(ids, f"auto: hub unreachable, no local text → data-free (sampled from the model, "
                            f"top-k 50, T 1.0, seed {seed}), {shape}")
    if s.lower() == "data-free":
        ids = _data_free(model, tokenizer, n_samples, seqlen, seed, device, reporter)
        return _result(ids, f"data-free (sampled from the model, top-k 50, T 1.0, seed {seed}), {shape}")
    if s.lower() in HUB_DATASETS:
        if not hub_reachable():
            raise QoqError(_hub_unreachable(s))
        docs, what = _hub_docs(s.lower())
        ids = _build_samples(docs, tokenizer, n_samples, seqlen, seed, what)
        return _result(ids, f"{what}, {shape}")
    path = Path(s).expanduser()
    if not path.exists():
        raise QoqError(f"calibration path '{s}' does not exist; pass a text/jsonl file or folder, "
                       f"or one of: {', '.join(SPECS)}")
    docs, what = _local_docs(path, budget)
    ids = _build_samples(docs, tokenizer, n_samples, seqlen, seed, what)
    return _result(ids, f"{what}, {shape}")


def check_calibration_path(spec: str | None) -> None:
    """Refuse, before the model is loaded, a hub calibration set when the hub is unreachable and a local
    calibration file that is missing, not a regular file or not text (a folder's files are checked as read)."""
    s = "" if spec is None else str(spec).strip()
    if s.lower() in HUB_DATASETS and not hub_reachable():
        raise QoqError(_hub_unreachable(s))
    if not s or s.lower() in SPECS or s.lower() in HUB_DATASETS:
        return
    path = Path(s).expanduser()
    if not path.exists():
        raise QoqError(f"calibration path '{s}' does not exist; pass a text/jsonl file or folder, "
                       f"or one of: {', '.join(SPECS)}")
    if not path.is_dir():
        _require_text_file(path.resolve())


def _hub_unreachable(spec: str) -> str:
    return (f"calibration set '{spec}' needs the Hugging Face hub, which is unreachable; pass a local "
            f"text/jsonl file or folder as {arg('spec', 'PATH')}, or {arg('spec', 'data-free')}")


def _result(ids: torch.Tensor, description: str) -> CalibrationSet:
    ids = ids.to(device="cpu", dtype=torch.long).contiguous()
    return CalibrationSet(input_ids=ids, description=description,
                          sha256=hashlib.sha256(ids.numpy().tobytes()).hexdigest())


# -------------------------------------------------------------------------------------- text sources

def _auto_local_path() -> Path | None:
    env = os.environ.get("QOQ_CALIB_DATA")
    if env:
        p = Path(env).expanduser()
        if not p.exists():
            raise QoqError(f"QOQ_CALIB_DATA is set to '{env}', which does not exist; point it at a text/jsonl "
                           "file or folder, or unset it")
        return p
    data_dir = os.environ.get("QOQ_DATA_DIR")
    if data_dir:
        p = Path(data_dir).expanduser() / "calibration"
        if p.is_dir() and _folder_files(p):
            return p
    return None


class _Column(Sequence):
    """Lazy view of one string column of a `datasets.Dataset`."""

    def __init__(self, ds, field: str):
        self.ds, self.field = ds, field

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i):
        return self.ds[int(i)][self.field]


def _hub_docs(name: str) -> tuple[Sequence[str], str]:
    path, config, split = HUB_DATASETS[name]
    try:
        from datasets import load_dataset

        ds = load_dataset(path, config, split=split) if config else load_dataset(path, split=split)
    except Exception as e:
        raise QoqError(one_line(f"could not load calibration set '{name}' ({path}) from the hub: {type(e).__name__}: "
                                f"{e}; pass a local text/jsonl file as {arg('spec', 'PATH')}")) from e
    if "text" not in ds.column_names:
        raise QoqError(f"calibration set '{name}' ({path}) has no 'text' column")
    return _Column(ds, "text"), f"{name} ({path}, {split})"


def read_budget(n_samples: int, seqlen: int) -> int:
    """Most bytes of local calibration text read for `n_samples` x `seqlen` tokens."""
    return max(READ_MIN_BYTES, READ_BYTES_PER_TOKEN * n_samples * seqlen)


def _local_docs(path: Path, budget: int) -> tuple[list[str], str]:
    path = path.resolve()
    if path.is_dir():
        files = _folder_files(path)
        if not files:
            raise QoqError(f"calibration folder '{path}' has no {'/'.join(TEXT_SUFFIXES + JSONL_SUFFIXES)} files")
        docs, used = [], 0
        for f in files:
            if used >= budget:
                break
            text, nbytes = _read_text(f, budget - used)
            used += nbytes
            docs += _split_docs(f, text)
        what = f"local text {path} ({len(files)} file{'s' if len(files) != 1 else ''}, {len(docs)} documents)"
    else:
        docs = _split_docs(path, _read_text(path, budget)[0])
        what = f"local text {path} ({len(docs)} documents)"
    return docs, what


def _folder_files(folder: Path) -> list[Path]:
    suffixes = TEXT_SUFFIXES + JSONL_SUFFIXES
    return sorted((f for f in folder.rglob("*") if f.is_file() and f.suffix.lower() in suffixes
                   and not any(part.startswith(".") for part in f.relative_to(folder).parts)),
                  key=lambda f: f.relative_to(folder).as_posix())


def _read_text(path: Path, limit: int) -> tuple[str, int]:
    """At most `limit` bytes of a regular UTF-8 text file (cut at a line end when the limit is hit), and
    how many bytes that was."""
    _require_text_file(path)
    data = _read_bytes(path, limit + 1)
    if len(data) > limit:
        data = data[:limit]
        data = data[:data.rfind(b"\n") + 1] or data  # no half line (a jsonl record) at the cut
    return data.decode("utf-8", errors="replace"), len(data)


def _require_text_file(path: Path) -> None:
    if not path.is_file():
        raise QoqError(f"calibration path '{path}' is not a regular file or folder (a device or pipe?); "
                       "pass a text/jsonl file or folder")
    if not _looks_like_text(_read_bytes(path, _SNIFF_BYTES)):
        raise QoqError(f"calibration file '{path}' is not UTF-8 text (NUL bytes or invalid UTF-8 in its first "
                       "bytes); pass a text/jsonl file or folder")


def _read_bytes(path: Path, limit: int) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(limit)
    except OSError as e:
        raise QoqError(one_line(f"cannot read calibration file '{path}': {e}")) from e


def _looks_like_text(head: bytes) -> bool:
    if b"\x00" in head:
        return False
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)  # a sequence cut at the end is fine
    except UnicodeDecodeError:
        return False
    return True


def _split_docs(path: Path, text: str) -> list[str]:
    if path.suffix.lower() in JSONL_SUFFIXES:
        docs = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise QoqError(one_line(f"{path}:{lineno}: not valid JSON ({e})")) from e
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise QoqError(f"{path}:{lineno}: expected a JSON object with a string \"text\" field")
            docs.append(obj["text"])
        return [d.strip() for d in docs if d.strip()]
    parts = _DOC_TAG.split(text) if _DOC_TAG.search(text) else _BLANK_LINES.split(text)
    return [p.strip() for p in parts if p.strip()]


def _build_samples(docs: Sequence[str], tokenizer, n_samples: int, seqlen: int, seed: int,
                   what: str) -> torch.Tensor:
    if tokenizer is None:
        raise QoqError("calibration from text needs the model's tokenizer")
    rng = random.Random(seed)
    order = list(range(len(docs)))
    rng.shuffle(order)
    need = n_samples * seqlen
    samples: list[list[int]] = []
    n_tokens = 0
    done = False
    for start in range(0, len(order), _TOKENIZE_BATCH):
        texts = [t for t in (str(docs[i]).strip() for i in order[start:start + _TOKENIZE_BATCH]) if t]
        if not texts:
            continue
        encoded = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        for ids in encoded:
            if not ids:
                continue
            if len(ids) > seqlen:
                tok = rng.randint(0, len(ids) - seqlen)
                ids = ids[tok:tok + seqlen]
            samples.append(list(ids))
            n_tokens += len(ids)
            if len(samples) >= n_samples and n_tokens >= need:
                done = True
                break
        if done:
            break
    if not done:
        raise QoqError(f"not enough calibration text in {what}: found {n_tokens} tokens in {len(samples)} "
                       f"documents, need {need} tokens ({n_samples} x {seqlen}) from at least {n_samples} "
                       f"documents; lower {arg('n_samples')}/{arg('seqlen')} or pass more data as {arg('spec')}")
    flat = torch.tensor(list(itertools.chain.from_iterable(samples)), dtype=torch.long)
    return flat[: need].view(n_samples, seqlen)


# ---------------------------------------------------------------------------------------- data-free

def _data_free(model, tokenizer, n_samples: int, seqlen: int, seed: int, device: torch.device | None = None,
               reporter: Reporter | None = None) -> torch.Tensor:
    if model is None:
        raise QoqError("data-free calibration samples text from the model, but no model was given")
    cfg = model.config
    start = None
    for cand in (getattr(tokenizer, "bos_token_id", None), getattr(cfg, "bos_token_id", None),
                 getattr(tokenizer, "eos_token_id", None), getattr(cfg, "eos_token_id", None)):
        if isinstance(cand, (list, tuple)):
            cand = cand[0] if cand else None
        if cand is not None:
            start = int(cand)
            break
    if start is None:
        raise QoqError("data-free calibration needs a BOS or EOS token to start from; the tokenizer has neither")
    max_pos = getattr(cfg, "max_position_embeddings", None)
    if max_pos and seqlen + 1 > max_pos:
        raise QoqError(f"{arg('seqlen')} {seqlen} is longer than the model's context ({max_pos} tokens)")
    banned = _eos_ids(tokenizer, cfg)  # never sampled: min_new_tokens keeps every sample seqlen long
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    reporter = reporter or Reporter()
    batch = _data_free_batch(cfg, seqlen, next(model.parameters()).element_size(), n_samples)
    was_training = model.training
    model.eval()
    out_rows: list[torch.Tensor] = []
    devices = [device.index or 0] if device.type == "cuda" else []
    try:
        model.to(device)
        with torch.random.fork_rng(devices=devices), \
                reporter.task(f"sampling {n_samples} x {seqlen} data-free calibration tokens from the model",
                              total=n_samples * seqlen, unit="tokens") as task:
            torch.manual_seed(seed)
            done = 0
            while done < n_samples:
                b = min(batch, n_samples - done)
                out_rows.append(_sample_batch(model, start, b, seqlen, banned, device, task.advance).cpu())
                done += b
    finally:
        model.to(home)
        model.train(was_training)
    return torch.cat(out_rows, 0)


class _StepCounter:
    """A generate() streamer that only counts: one call per decoding step after the prompt."""

    def __init__(self, batch: int, advance: Callable[[int], None]):
        self.batch, self.advance, self.prompt_seen = batch, advance, False

    def put(self, value) -> None:
        if self.prompt_seen:
            self.advance(self.batch)
        self.prompt_seen = True

    def end(self) -> None:
        pass


@torch.no_grad()
def _sample_batch(model, start: int, batch: int, seqlen: int, banned: list[int], device: torch.device,
                  advance: Callable[[int], None]) -> torch.Tensor:
    """`batch` sequences of `seqlen` tokens sampled together (top-k 50, T 1.0) over the model's KV cache."""
    from transformers import GenerationConfig

    pad = banned[0] if banned else start
    gen = GenerationConfig(do_sample=True, temperature=1.0, top_k=50, top_p=1.0, max_new_tokens=seqlen,
                           min_new_tokens=seqlen, pad_token_id=pad, eos_token_id=banned or None, bos_token_id=start,
                           use_cache=True)
    prompt = torch.full((batch, 1), start, dtype=torch.long, device=device)
    out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), generation_config=gen,
                         streamer=_StepCounter(batch, advance))
    if out.shape[1] != seqlen + 1:
        raise QoqError(f"data-free sampling produced {out.shape[1] - 1} tokens per sequence, expected {seqlen}")
    return out[:, 1:]


def _eos_ids(tokenizer, cfg) -> list[int]:
    ids: set[int] = set()
    for src in (getattr(tokenizer, "eos_token_id", None), getattr(cfg, "eos_token_id", None)):
        ids.update(int(i) for i in (src if isinstance(src, (list, tuple)) else ([] if src is None else [src])))
    vocab = getattr(cfg, "vocab_size", None)
    return sorted(i for i in ids if vocab is None or 0 <= i < vocab)


def _data_free_batch(cfg, seqlen: int, elem_size: int, n_samples: int) -> int:
    """Sequences per generate() call: decoding is weight-bandwidth bound, so batch up to a KV-cache budget."""
    layers = getattr(cfg, "num_hidden_layers", None) or 32
    heads = getattr(cfg, "num_attention_heads", None) or 32
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or (getattr(cfg, "hidden_size", 4096) // heads)
    per_seq = 2 * layers * kv_heads * head_dim * (seqlen + 1) * elem_size
    return max(1, min(n_samples, _DATA_FREE_MAX_BATCH, _DATA_FREE_KV_BUDGET // max(per_seq, 1)))


