"""The qoq artifact: a folder with config.json, safetensors weights, tokenizer files and a report.

Writing is atomic (a temporary sibling folder renamed into place). Reading validates the whole schema
against config.json before any tensor is used and never unpickles anything.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from qoq.scheme.progressive import PROTECTIVE_RANGE, QuantizedWeight, group_size_problem, is_per_channel
from qoq.checks import first_non_finite, require_finite_tensors, sha256_of_files, strict_json
from qoq.errors import QoqError, one_line
from qoq.scheme.schema import (
    BIAS,
    FORMAT_VERSION,
    QUANT_METHOD,
    QWEIGHT,
    S1_SCALES,
    S1_SZEROS,
    S2_SCALES,
    S2_ZEROS,
    linear_tensor_shapes,
)
from qoq.scheme.layout import LAYOUT_NAME, pack_group_params, pack_weight, unpack_group_params, unpack_weight
from qoq.formats.shards import INDEX_FILE, SHARD_BYTES, WEIGHTS_FILE, ShardWriter  # noqa: F401
from qoq.output import PartialFolder, check_output, commit_partial, create_partial

REPORT_FILE = "qoq_report.json"
WEIGHTS_SHA256 = "weights_sha256"  # in the report: {shard file: sha256} as written
# quantization_config fields every artifact carries with these values: the runtime assumes them
FIXED_SCHEME = {"w_bits": 4, "a_bits": 8, "kv_bits": 4, "protective_range": PROTECTIVE_RANGE, "s2_zeros": "negated"}


@dataclass
class Artifact:
    """A loaded artifact: its folder, HF config (with quantization_config) and every tensor on CPU."""

    path: Path
    config: dict
    tensors: dict[str, torch.Tensor]
    report: dict = field(default_factory=dict)

    @property
    def qconfig(self) -> dict:
        return self.config["quantization_config"]

    @property
    def group_size(self) -> int:
        return self.qconfig["group_size"]

    @property
    def linear_names(self) -> list[str]:
        return list(self.qconfig["modules"])

    def quantized_weight(self, name: str) -> QuantizedWeight:
        """Unpack one linear back to natural order (the inverse of what `write_artifact` stored)."""
        n, k = self.qconfig["modules"][name]
        t = self.tensors
        q = unpack_weight(t[f"{name}.{QWEIGHT}"])
        s1 = t[f"{name}.{S1_SCALES}"]
        if is_per_channel(self.group_size):
            return QuantizedWeight(q=q, s1=s1, group_size=self.group_size, out_features=n, in_features=k,
                                   szeros=t[f"{name}.{S1_SZEROS}"])
        return QuantizedWeight(q=q, s1=s1, group_size=self.group_size, out_features=n, in_features=k,
                               s2=unpack_group_params(t[f"{name}.{S2_SCALES}"]),
                               z=-unpack_group_params(t[f"{name}.{S2_ZEROS}"]))


def quantized_tensors(name: str, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The stored tensors of one linear: packed qweight, scales, zeros (negated: the kernel adds them)."""
    out = {f"{name}.{QWEIGHT}": pack_weight(qw.q), f"{name}.{S1_SCALES}": qw.s1.to(torch.float16).contiguous()}
    if is_per_channel(qw.group_size):
        out[f"{name}.{S1_SZEROS}"] = qw.szeros.to(torch.float16).contiguous()
    else:
        out[f"{name}.{S2_SCALES}"] = pack_group_params(qw.s2)
        out[f"{name}.{S2_ZEROS}"] = pack_group_params(-qw.z)
    if bias is not None:
        out[f"{name}.{BIAS}"] = bias.detach().to(torch.float16).contiguous()
    return out


def quantization_config(group_size: int, modules: dict[str, tuple[int, int]], recipe: dict) -> dict:
    return {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        **FIXED_SCHEME,
        "group_size": group_size,
        "layout": LAYOUT_NAME,
        "norms_folded": bool(recipe.get("rotation", False)),
        "recipe": recipe,
        "modules": {name: list(shape) for name, shape in modules.items()},
    }


def write_artifact(output: Path, config: dict, tensors: dict[str, torch.Tensor] | None, report: dict,
                   tokenizer=None, overwrite: bool = False, partial: PartialFolder | None = None,
                   shards: ShardWriter | None = None) -> Path:
    """Write everything into the hidden partial sibling folder (`partial`, else a new one), then rename it
    to `output`. The weights are `tensors`, or what `shards` (writing into `partial`) already holds.
    What `overwrite` may replace: see qoq/output.py."""
    output = check_output(output, None, overwrite)
    if tensors is not None:
        require_finite_tensors(tensors)  # before anything is created
    partial = partial or create_partial(output)
    tmp = partial.path
    try:
        if shards is None:
            shards = _writer_of(tmp, tensors)
        files = shards.finish()
        report = {**report, WEIGHTS_SHA256: {f: sha256_of_files([tmp / f]) for f in files}}
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / REPORT_FILE).write_text(strict_json(report, indent=2) + "\n")
        check_output(output, None, overwrite)  # again: it may have appeared while we wrote
        commit_partial(tmp, output)
    except BaseException:
        partial.discard()
        raise
    return output


def write_weights(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    """`tensors` as the shards of an artifact (or a checkpoint) in `folder`."""
    _writer_of(folder, tensors).finish()


def _writer_of(folder: Path, tensors: dict[str, torch.Tensor]) -> ShardWriter:
    writer = ShardWriter(folder)
    for name, t in tensors.items():  # tensor by tensor: shards split anywhere
        writer.add({name: t})
    return writer


def read_artifact(path: str | Path) -> Artifact:
    """Load and validate an artifact; any defect is a one-line QoqError."""
    path = Path(path)
    if not path.is_dir():
        raise QoqError(f"artifact {path} does not exist or is not a folder; pass the folder `qoq quantize` wrote")
    config = _read_json(path / "config.json", path)
    qc = config.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        raise QoqError(f"{path} is not a qoq artifact (config.json has no qoq quantization_config); "
                       "run qoq quantize first")
    if qc.get("format_version") != FORMAT_VERSION or qc.get("layout") != LAYOUT_NAME:
        raise QoqError(f"{path} has artifact format {qc.get('format_version')}/{qc.get('layout')}, this qoq reads "
                       f"{FORMAT_VERSION}/{LAYOUT_NAME}; re-run qoq quantize with this version")
    _validate_scheme(path, qc)
    _validate_modules(path, qc)
    _validate_architecture(path, config, qc["modules"])
    _validate_hf_config(path)
    tensors = _read_weights(path)
    _validate_tensors(path, qc, tensors)
    _validate_model_tensors(path, config, tensors)
    _validate_finite(path, tensors)
    report_file = path / REPORT_FILE
    report = _read_json(report_file, path) if report_file.exists() else {}
    return Artifact(path=path, config=config, tensors=tensors, report=report)


def changed_weight_files(art: Artifact) -> list[str] | None:
    """The shard files whose sha256 differs from the one recorded when they were written (None: no record)."""
    recorded = art.report.get(WEIGHTS_SHA256)
    if not isinstance(recorded, dict) or not recorded:
        return None
    return [f for f, sha in recorded.items()
            if not (art.path / f).is_file() or sha256_of_files([art.path / f]) != sha]


def expected_shapes(name: str, n: int, k: int, group_size: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {f"{name}.{suffix}": spec for suffix, spec in linear_tensor_shapes(n, k, group_size).items()}


# ---- internals ----------------------------------------------------------------------------------------

def _read_json(file: Path, artifact: Path) -> dict:
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        raise QoqError(f"{artifact} is not a qoq artifact: {file.name} is missing; "
                       "run qoq quantize to create one") from None
    except (OSError, ValueError) as e:
        raise QoqError(f"{artifact} is corrupt: {file.name} is not valid JSON ({one_line(e, 200)}); "
                       "re-run qoq quantize") from None
    if not isinstance(data, dict):
        raise QoqError(f"{artifact} is corrupt: {file.name} is not a JSON object; re-run qoq quantize")
    return data


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if (path / INDEX_FILE).exists():
        files = _index_files(path)
    else:
        files = [WEIGHTS_FILE]
    tensors: dict[str, torch.Tensor] = {}
    for fname in files:
        file = path / fname
        if not file.is_file():
            raise QoqError(f"{path} is incomplete: {fname} is missing; re-run qoq quantize")
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)
        except Exception as e:  # safetensors raises several types for truncated/corrupt headers
            raise QoqError(f"{path} is corrupt: {fname} cannot be read ({one_line(e, 200)}); "
                           "re-run qoq quantize") from None
    return tensors


def _index_files(path: Path) -> list[str]:
    """The shard files an index names; each must be a plain file name inside the artifact folder."""
    weight_map = _read_json(path / INDEX_FILE, path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise QoqError(f"corrupt artifact {path}: {INDEX_FILE} has no weight_map; re-run qoq quantize")
    files = sorted(set(weight_map.values()), key=str)
    for fname in files:
        if not isinstance(fname, str) or Path(fname).name != fname or fname in ("", ".", ".."):
            raise QoqError(f"corrupt artifact {path}: {INDEX_FILE} names shard {fname!r}, outside the artifact "
                           "folder (shards are plain file names inside it); re-run qoq quantize")
    return files


def _validate_modules(path: Path, qc: dict) -> None:
    group_size = qc.get("group_size")
    if group_size_problem(group_size):
        raise QoqError(f"{path} is corrupt: group_size {group_size!r} {group_size_problem(group_size)}; "
                       "re-run qoq quantize")
    modules = qc.get("modules")
    if not isinstance(modules, dict) or not modules:
        raise QoqError(f"{path} is corrupt: quantization_config lists no modules; re-run qoq quantize")
    for name, shape in modules.items():
        if not (isinstance(shape, list) and len(shape) == 2
                and all(type(d) is int and d > 0 for d in shape)):  # type(): bool is an int subclass
            raise QoqError(f"corrupt artifact {path}: modules[{name!r}] is {shape!r}, expected [N, K] of "
                           "positive integers; re-run qoq quantize")


def _validate_scheme(path: Path, qc: dict) -> None:
    for key, value in FIXED_SCHEME.items():
        if qc.get(key) != value or type(qc.get(key)) is bool:
            raise QoqError(f"{path} has quantization_config.{key} = {qc.get(key)!r}; qoq runs W4A8KV4 artifacts, "
                           f"whose {key} is {value!r}: re-run qoq quantize")


def decoder_linear_shapes(config: dict) -> dict[str, tuple[int, int]] | None:
    """{linear: (N, K)} of every block of a Llama-family decoder by its config; None when a size is missing."""
    heads, hidden, inter, layers = (config.get(k) for k in ("num_attention_heads", "hidden_size",
                                                             "intermediate_size", "num_hidden_layers"))
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or (hidden // heads if type(hidden) is int and type(heads) is int and heads
                                          else None)
    if not all(type(v) is int and v > 0 for v in (heads, kv_heads, head_dim, hidden, inter, layers)):
        return None
    block = block_linear_shapes(hidden, inter, heads, kv_heads, head_dim)
    return {f"model.layers.{i}.{name}": shape for i in range(layers) for name, shape in block.items()}


def block_linear_shapes(hidden: int, inter: int, heads: int, kv_heads: int,
                        head_dim: int) -> dict[str, tuple[int, int]]:
    """{linear: (N, K)} of one Llama-family block, named as in the block ("self_attn.q_proj", ...)."""
    q, kv = heads * head_dim, kv_heads * head_dim
    return {"self_attn.q_proj": (q, hidden), "self_attn.k_proj": (kv, hidden), "self_attn.v_proj": (kv, hidden),
            "self_attn.o_proj": (hidden, q), "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden),
            "mlp.down_proj": (hidden, inter)}


def _validate_architecture(path: Path, config: dict, modules: dict) -> None:
    """config.json's layer count and attention / MLP sizes must be the stored linears' shapes: an edited
    config would otherwise run (or export) the wrong model."""
    expected = decoder_linear_shapes(config)
    if expected is None:
        raise QoqError(f"corrupt artifact {path}: config.json lacks a positive num_hidden_layers, hidden_size, "
                       "intermediate_size or num_attention_heads; re-run qoq quantize")
    for name, shape in expected.items():
        if name not in modules:
            raise QoqError(f"corrupt artifact {path}: config.json's num_hidden_layers = {config['num_hidden_layers']}"
                           f" needs {name}, which the artifact does not hold; re-run qoq quantize")
        if tuple(modules[name]) != shape:
            raise QoqError(f"corrupt artifact {path}: {name} is stored as {list(modules[name])}, config.json's "
                           f"head and hidden sizes give {list(shape)}; re-run qoq quantize")
    extra = sorted(set(modules) - set(expected))
    if extra:
        raise QoqError(f"corrupt artifact {path}: it holds {extra[0]}, which config.json's num_hidden_layers = "
                       f"{config['num_hidden_layers']} does not have; re-run qoq quantize")


def _validate_hf_config(path: Path) -> None:
    """transformers' own checks of config.json (types, head sizes), reported as the config's problem."""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(str(path))
    except Exception as e:
        raise QoqError(f"corrupt artifact {path}: transformers rejects its config.json ({type(e).__name__}: "
                       f"{one_line(e, 200)}); re-run qoq quantize") from None


def _validate_model_tensors(path: Path, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Embedding, lm_head and norms must match the config's vocabulary and hidden sizes."""
    vocab, hidden = config.get("vocab_size"), config.get("hidden_size")
    if not all(type(v) is int and v > 0 for v in (vocab, hidden)):
        raise QoqError(f"corrupt artifact {path}: config.json has no positive vocab_size/hidden_size; "
                       "re-run qoq quantize")
    expected = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    if not config.get("tie_word_embeddings", False) or "lm_head.weight" in tensors:
        expected["lm_head.weight"] = (vocab, hidden)
    for name in tensors:
        if name.endswith("layernorm.weight"):
            expected[name] = (hidden,)
    for name, shape in expected.items():
        t = tensors.get(name)
        if t is None:
            raise QoqError(f"corrupt artifact {path}: tensor {name} is missing; re-run qoq quantize")
        if tuple(t.shape) != shape or not t.is_floating_point():
            raise QoqError(f"corrupt artifact {path}: {name} is {t.dtype} {tuple(t.shape)}, expected a float "
                           f"tensor of shape {shape}; re-run qoq quantize")


def _validate_finite(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    found = first_non_finite(tensors.items())
    if found is not None:
        name, bad = found
        raise QoqError(f"corrupt artifact {path}: {name} has {bad} NaN/Inf value{'s' if bad != 1 else ''}; "
                       "re-run qoq quantize")


def _validate_tensors(path: Path, qc: dict, tensors: dict[str, torch.Tensor]) -> None:
    group_size, modules = qc["group_size"], qc["modules"]
    for name, (n, k) in modules.items():
        for tname, (shape, dtype) in expected_shapes(name, n, k, group_size).items():
            t = tensors.get(tname)
            if t is None:
                raise QoqError(f"{path} is corrupt: tensor {tname} is missing; re-run qoq quantize")
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise QoqError(f"{path} is corrupt: {tname} is {t.dtype} {tuple(t.shape)}, expected {dtype} {shape}; "
                               "re-run qoq quantize")


