"""Write a random-weight Hugging Face checkpoint of a published shape, to measure qoq on big models offline.

The folder is what `from_pretrained` and `qoq quantize --model FOLDER` read: `config.json` (written by
transformers' config class), `generation_config.json`, sharded `model-0000i-of-0000N.safetensors` with
`model.safetensors.index.json`, and a tokenizer. Tensor names and shapes are those of transformers' Llama /
Mistral / Qwen2 (q/k/v biases for Qwen2); values are normal(0, 0.02) like a freshly initialised model, norms
1 + normal(0, 0.02), so a forward pass stays finite (the outputs are noise: only time and memory mean something).

Memory stays at about one shard (--shard-gb) whatever the model's size: tensors are generated one by one
and a shard is written and freed as soon as it is full. Every tensor is seeded by (--seed, its name), in
fixed-size chunks filled in parallel, so its values depend neither on the shard layout nor on the thread
count, and the first N blocks of a `--layers N` checkpoint equal those of the full model.

The default tokenizer is a byte-level one built here (ids 0-2: <s> </s> <pad>, then one token per byte):
it needs no download and its ids are below every vocab size, while the embedding keeps the shape's full
vocab; --tokenizer FOLDER copies a real one instead. config.json's bos/eos/pad ids are the tokenizer's, and
its `qoq_synthetic` entry says how the weights were made.

    python3 scripts/synthetic_checkpoint.py --shape llama-3-70b --layers 4 --out /data/llama-3-70b-4l
    python3 scripts/synthetic_checkpoint.py --shape qwen2.5-7b --dtype float16 --out /data/qwen2.5-7b-random
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import resource
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from qoq.bench.synthetic import HAS_QKV_BIAS, SHAPES
from qoq.errors import QoqError
from qoq.output import commit_partial, create_partial, remove_stale_partials
from qoq.progress import Reporter

# Published shapes: the bench's table, plus the two it lacks. Qwen2.5-7B has exactly Qwen2-7B's shape.
PRESETS: dict[str, dict] = {
    **SHAPES,
    "llama-3-70b": {**SHAPES["llama-3-8b"], "hidden_size": 8192, "intermediate_size": 28672,
                    "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8},
    "qwen2.5-7b": dict(SHAPES["qwen2-7b"]),
    # a few hundred KB: for tests and smoke runs
    "tiny": dict(model_type="llama", hidden_size=64, intermediate_size=160, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=512, rope_theta=10000.0,
                 max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=0,
                 eos_token_id=1),
}
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# command-line overrides of the preset's sizes: flag -> config field
SIZE_FLAGS = {"--layers": "num_hidden_layers", "--hidden": "hidden_size", "--intermediate": "intermediate_size",
              "--heads": "num_attention_heads", "--kv-heads": "num_key_value_heads", "--vocab": "vocab_size"}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
INIT_STD = 0.02  # transformers' initializer_range: the scale of a freshly initialised model
CHUNK = 1 << 22  # elements per seeded block; a constant, so a tensor's values never depend on the threads
INDEX_FILE = "model.safetensors.index.json"
SPECIAL_TOKENS = ("<s>", "</s>", "<pad>")
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    mean: float  # 1.0 for norm weights, 0.0 for the rest

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-3-8b", choices=tuple(PRESETS), help="published shape to copy")
    ap.add_argument("--out", type=Path, required=True, help="new folder to write (must not exist or be empty)")
    ap.add_argument("--dtype", default="bfloat16", choices=tuple(DTYPES))
    ap.add_argument("--shard-gb", type=float, default=4.9, help="largest shard, in GB (10^9 bytes)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer", type=Path, help="HF folder whose tokenizer to copy (default: a byte-level one)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads generating random values")
    for flag, key in SIZE_FLAGS.items():
        ap.add_argument(flag, type=int, dest=key, help=f"override the shape's {key}")
    return ap.parse_args(argv)


def shape_fields(args: argparse.Namespace) -> dict:
    """The preset's config fields with the command line's overrides applied (and checked)."""
    fields = dict(PRESETS[args.shape])
    overrides = {}
    for flag, key in SIZE_FLAGS.items():
        value = getattr(args, key)
        if value is not None and value < 1:
            raise QoqError(f"{flag} {value} must be a positive integer; pass a value >= 1")
        if value is not None:
            overrides[key] = value
    fields.update(overrides)
    hidden, heads, kv_heads = fields["hidden_size"], fields["num_attention_heads"], fields["num_key_value_heads"]
    if {"hidden_size", "num_attention_heads"} & overrides.keys():
        if hidden % heads:
            raise QoqError(f"--hidden {hidden} is not a multiple of --heads {heads}; pick sizes that divide")
        fields["head_dim"] = hidden // heads
    if heads % kv_heads:
        raise QoqError(f"--heads {heads} is not a multiple of --kv-heads {kv_heads}; pick sizes that divide")
    return fields


def tensor_specs(fields: dict) -> list[TensorSpec]:
    """Every weight of the transformers model of this shape, in the order they are written (block by block)."""
    hidden, inter = fields["hidden_size"], fields["intermediate_size"]
    q_rows = fields["num_attention_heads"] * fields["head_dim"]
    kv_rows = fields["num_key_value_heads"] * fields["head_dim"]
    qkv_bias = fields["model_type"] in HAS_QKV_BIAS
    specs = [TensorSpec("model.embed_tokens.weight", (fields["vocab_size"], hidden), 0.0)]
    for i in range(fields["num_hidden_layers"]):
        p = f"model.layers.{i}"
        for proj, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
            specs.append(TensorSpec(f"{p}.self_attn.{proj}.weight", (rows, hidden), 0.0))
            if qkv_bias:
                specs.append(TensorSpec(f"{p}.self_attn.{proj}.bias", (rows,), 0.0))
        specs += [TensorSpec(f"{p}.self_attn.o_proj.weight", (hidden, q_rows), 0.0),
                  TensorSpec(f"{p}.mlp.gate_proj.weight", (inter, hidden), 0.0),
                  TensorSpec(f"{p}.mlp.up_proj.weight", (inter, hidden), 0.0),
                  TensorSpec(f"{p}.mlp.down_proj.weight", (hidden, inter), 0.0),
                  TensorSpec(f"{p}.input_layernorm.weight", (hidden,), 1.0),
                  TensorSpec(f"{p}.post_attention_layernorm.weight", (hidden,), 1.0)]
    specs.append(TensorSpec("model.norm.weight", (hidden,), 1.0))
    if not fields.get("tie_word_embeddings", False):
        specs.append(TensorSpec("lm_head.weight", (fields["vocab_size"], hidden), 0.0))
    return specs


def plan_shards(specs: list[TensorSpec], itemsize: int, shard_bytes: int) -> list[list[TensorSpec]]:
    """Consecutive tensors grouped greedily up to `shard_bytes` (a larger tensor gets a shard of its own),
    as transformers shards: planned up front so the file names can carry the shard count."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        nbytes = spec.numel * itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    return shards


def chunk_seed(seed: int, name: str, chunk: int) -> int:
    # sha256, not hash(): the same on every run and machine
    digest = hashlib.sha256(f"{seed}/{name}/{chunk}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def random_tensor(spec: TensorSpec, dtype: torch.dtype, seed: int, pool: ThreadPoolExecutor) -> torch.Tensor:
    """normal(spec.mean, INIT_STD) in `dtype`, generated in float32 chunks (one Generator each) and cast."""
    out = torch.empty(spec.numel, dtype=dtype)

    def fill(chunk: int) -> None:
        start = chunk * CHUNK
        n = min(CHUNK, spec.numel - start)
        gen = torch.Generator().manual_seed(chunk_seed(seed, spec.name, chunk))
        block = torch.randn(n, generator=gen, dtype=torch.float32).mul_(INIT_STD).add_(spec.mean)
        out[start:start + n].copy_(block)

    list(pool.map(fill, range(math.ceil(spec.numel / CHUNK))))  # list(): re-raises a worker's error
    return out.view(spec.shape)


def byte_level_tokenizer(max_length: int):
    """Three special tokens then one token per byte (id = byte + 3): encodes any text, needs no training;
    like Llama's, it starts every encoded text with <s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({char: len(SPECIAL_TOKENS) + b for b, char in enumerate(_byte_chars())})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   model_max_length=max_length)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _byte_chars() -> list[str]:
    """The printable character GPT-2's byte-level encoding gives each byte 0..255 (its bytes_to_unicode)."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def load_tokenizer(args: argparse.Namespace, fields: dict):
    if args.tokenizer is None:
        return byte_level_tokenizer(fields["max_position_embeddings"])
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(args.tokenizer))
    except Exception as e:  # transformers' many failure types: one line for the user
        raise QoqError(f"could not load a tokenizer from '{args.tokenizer}' ({type(e).__name__}); "
                       "pass a Hugging Face model folder with tokenizer files") from e


def check_tokenizer_fits(tokenizer, vocab_size: int) -> None:
    top = max(tokenizer.get_vocab().values())
    if top >= vocab_size:
        raise QoqError(f"the tokenizer has token id {top}, outside the embedding's vocab of {vocab_size}; "
                       "pass a larger --vocab or another --tokenizer")


def hf_config(fields: dict, args: argparse.Namespace, tokenizer):
    """transformers' config object of the shape; bos/eos/pad ids are the tokenizer's (where it has them)."""
    from transformers import AutoConfig

    kw = dict(fields)
    model_type = kw.pop("model_type")
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        tok_id = getattr(tokenizer, key, None)
        if tok_id is not None:
            kw[key] = tok_id
        elif kw.get(key) is not None and kw[key] >= fields["vocab_size"]:
            kw[key] = None
    tokenizer_note = (f"byte-level, {len(tokenizer)} tokens (ids < vocab_size)" if args.tokenizer is None
                      else f"copied from {args.tokenizer}, {len(tokenizer)} tokens")
    synthetic = {"shape": args.shape, "seed": args.seed, "tokenizer": tokenizer_note,
                 "weights": f"random: normal(0, {INIT_STD}); norm weights 1 + normal(0, {INIT_STD})"}
    return AutoConfig.for_model(model_type, architectures=[ARCHITECTURES[model_type]], dtype=args.dtype,
                                qoq_synthetic=synthetic, **kw)


def shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.2f} GB"


def total_bytes(specs: list[TensorSpec], dtype: torch.dtype) -> int:
    return sum(s.numel for s in specs) * dtype.itemsize


def write_shards(folder: Path, shards: list[list[TensorSpec]], dtype: torch.dtype, seed: int,
                 threads: int) -> dict:
    """Generate and write every shard, holding one at a time; returns the index (HF's format)."""
    from safetensors.torch import save_file

    total = total_bytes([s for shard in shards for s in shard], dtype)
    weight_map: dict[str, str] = {}
    written, start = 0, time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for i, shard in enumerate(shards):
            name = shard_name(i, len(shards))
            tensors = {spec.name: random_tensor(spec, dtype, seed, pool) for spec in shard}
            save_file(tensors, str(folder / name), metadata={"format": "pt"})
            written += total_bytes(shard, dtype)
            del tensors
            weight_map.update({spec.name: name for spec in shard})
            print(f"[{i + 1}/{len(shards)}] {name}: {gb(written)} of {gb(total)} written, "
                  f"{time.perf_counter() - start:.0f} s, peak RSS {gb(peak_rss_bytes())}", flush=True)
    return {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}


def write_checkpoint(folder: Path, args: argparse.Namespace, fields: dict, tokenizer) -> None:
    from transformers import GenerationConfig

    dtype = DTYPES[args.dtype]
    shards = plan_shards(tensor_specs(fields), dtype.itemsize, int(args.shard_gb * 1e9))
    config = hf_config(fields, args, tokenizer)
    config.to_json_file(str(folder / "config.json"))
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                     pad_token_id=config.pad_token_id).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    index = write_shards(folder, shards, dtype, args.seed, args.threads)
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def check_out_folder(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise QoqError(f"--out '{out}' exists and is not an empty folder; pass a new folder")


def check_disk_space(parent: Path, needed: int) -> None:
    free = shutil.disk_usage(parent).free
    if free < needed:
        raise QoqError(f"the checkpoint needs {gb(needed)} but '{parent}' has {gb(free)} free; "
                       "choose another --out or fewer --layers")


class PrintReporter(Reporter):
    def info(self, message: str) -> None:
        print(message, flush=True)


def run(args: argparse.Namespace) -> Path:
    if args.shard_gb <= 0:
        raise QoqError(f"--shard-gb {args.shard_gb} must be positive; pass e.g. --shard-gb 4.9")
    out = args.out.expanduser().absolute()
    check_out_folder(out)
    fields = shape_fields(args)
    tokenizer = load_tokenizer(args, fields)
    check_tokenizer_fits(tokenizer, fields["vocab_size"])
    remove_stale_partials(out, PrintReporter())  # a killed run's half checkpoint can be 100+ GB
    # a hidden sibling, renamed at the end: an interrupted run never leaves a half checkpoint under --out
    partial = create_partial(out)
    try:
        check_disk_space(out.parent, total_bytes(tensor_specs(fields), DTYPES[args.dtype]))
        write_checkpoint(partial.path, args, fields, tokenizer)
        commit_partial(partial.path, out)  # --out was checked to be missing or empty above
    except BaseException:
        partial.discard()
        raise
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        out = run(args)
    except QoqError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({args.shape}, {args.dtype}, seed {args.seed}); peak RSS {gb(peak_rss_bytes())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
