"""Export an artifact as a checkpoint that sglang's `qoq` quantization method loads as it is.

sglang (python/sglang/srt/layers/quantization/qoq.py) runs the QServe W4A8 GEMMs of sgl-kernel
(`qserve_w4a8_per_group_gemm`, `qserve_w4a8_per_chn_gemm`) on the very tensors our artifact stores:
`qweight` int8 [N, K/2] in the same tile order, `s1_scales` fp16 [N], and either `s2_scales` /
`s2_zeros` int8 [K/128, N] (interleaved, zeros negated: the kernel adds them) or `s1_szeros` fp16 [N].
Its loader allocates each parameter from the model's true dimensions and concatenates q|k|v and
gate|up along N, so what has to change is small:

- `quantization_config` must carry the keys sglang reads: `quant_method` "qoq", `wbits` and `group_size`;
- only group size 128 and per-channel (-1) exist there;
- the kernels need K % 128 and the fused N % 64 (group 128) or % 128 (per-channel, which switches to
  128-wide tiles above 256 tokens); they launch N / tile blocks rounded down and never mask K, so any
  other shape computes silently wrong columns. Each part's N must also be a multiple of 32 so that the
  packed 32-row tiles of q, k and v (gate and up) concatenate into the fused layer's tiles.

Those shapes are exactly the ones our artifact stores without padding (N is padded to 32, K to the
group size and to 32), so every tensor is written unchanged, at its true shape.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from qoq.scheme.progressive import padded_dims
from qoq.errors import QoqError, arg
from qoq.output import EXPORT, EXPORT_MARKER, check_output, commit_partial, create_partial
from qoq.version import __version__
from qoq.formats.artifact import (INDEX_FILE, REPORT_FILE, WEIGHTS_FILE, Artifact, write_weights,
                                  read_artifact)

SGLANG_GROUP_SIZES = (128, -1)
MODEL_TYPES = ("llama", "mistral", "qwen2")
K_MULTIPLE = 128
PART_N_MULTIPLE = 32
FUSED_N_MULTIPLE = {128: 64, -1: 128}
# sglang's fused linears (name in its model, parts as in the HF checkpoint) and what each dimension is
FUSED = {
    "self_attn.qkv_proj": (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                           "hidden_size", "(num_heads + 2 * num_key_value_heads) * head_dim"),
    "self_attn.o_proj": (("self_attn.o_proj",), "num_heads * head_dim", "hidden_size"),
    "mlp.gate_up_proj": (("mlp.gate_proj", "mlp.up_proj"), "hidden_size", "2 * intermediate_size"),
    "mlp.down_proj": (("mlp.down_proj",), "intermediate_size", "hidden_size"),
}
SKIPPED_FILES = {"config.json", REPORT_FILE, WEIGHTS_FILE, INDEX_FILE, EXPORT_MARKER}


def sglang_quantization_config(group_size: int) -> dict:
    """What `QoQConfig.from_config` reads (`wbits`, `group_size`); `quant_method` selects the method."""
    return {"quant_method": "qoq", "wbits": 4, "group_size": group_size}


def sglang_shape_problem(modules: dict[str, tuple[int, int] | list[int]], group_size: int) -> str | None:
    """Why sglang's kernels cannot run these linears (one line naming the dimension), or None."""
    if group_size not in SGLANG_GROUP_SIZES:
        return (f"sglang's qoq method runs group size 128 or -1 (per-channel) only, this artifact has group size "
                f"{group_size}; re-quantize with {arg('group_size', 128)} (or -1)")
    layers = sorted({name.rsplit(".", 2)[0] for name in modules if name.startswith("model.layers.")},
                    key=lambda p: int(p.rsplit(".", 1)[1]))
    for prefix in layers:
        for fused, (parts, k_name, n_name) in FUSED.items():
            names = [f"{prefix}.{p}" for p in parts]
            missing = [n for n in names if n not in modules]
            if missing:
                return (f"{missing[0]} is not a quantized linear of this artifact, sglang needs every block linear; "
                        "re-run qoq quantize")
            shapes = [tuple(modules[n]) for n in names]
            k = shapes[0][1]
            if any(s[1] != k for s in shapes):
                return (f"{prefix}.{fused}: its parts read inputs of different widths {[s[1] for s in shapes]}; the "
                        "artifact is inconsistent, re-run qoq quantize")
            if k % K_MULTIPLE:
                return (f"sglang cannot run {prefix}.{fused}: its input width {k_name} = {k} is not a multiple of "
                        f"{K_MULTIPLE}, which sglang's QServe W4A8 kernels need; this model cannot be served there")
            for name, (n, _) in zip(names, shapes, strict=True):
                if n % PART_N_MULTIPLE:
                    return (f"sglang cannot run {name}: its output width {n} is not a multiple of "
                            f"{PART_N_MULTIPLE} (the packed weight tiles); this model cannot be served there")
            n_fused, multiple = sum(s[0] for s in shapes), FUSED_N_MULTIPLE[group_size]
            if n_fused % multiple:
                kind = "group-128" if group_size == 128 else "per-channel"
                return (f"sglang cannot run {prefix}.{fused}: its output width {n_name} = {n_fused} is not a "
                        f"multiple of {multiple}, which sglang's {kind} QServe W4A8 kernel needs; this model "
                        "cannot be served there")
    return None


def export_sglang(artifact: str | Path | Artifact, output: str | Path, overwrite: bool = False) -> Path:
    """Write the sglang checkpoint of `artifact` to `output` atomically; QoqError when it cannot run there."""
    art = artifact if isinstance(artifact, Artifact) else read_artifact(artifact)
    output = checked_output(art, output, overwrite)
    model_type = art.config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise QoqError(f"model_type {model_type!r} is not one qoq exports for sglang ({', '.join(MODEL_TYPES)})")
    problem = sglang_shape_problem(art.qconfig["modules"], art.group_size)
    if problem:
        raise QoqError(problem)
    tensors = sglang_tensors(art)
    config = {k: v for k, v in art.config.items() if k != "quantization_config"}
    config["torch_dtype"] = "float16"  # sglang's qoq kernels take fp16 activations only
    config["quantization_config"] = sglang_quantization_config(art.group_size)
    return write_checkpoint(output, config, tensors, art, "sglang", overwrite)


def sglang_tensors(art: Artifact) -> dict[str, torch.Tensor]:
    """Every tensor of the artifact; the linears are checked to be stored at their true shapes."""
    for name, (n, k) in art.qconfig["modules"].items():
        if padded_dims(n, k, art.group_size) != (n, k):  # excluded by sglang_shape_problem: a guard
            raise QoqError(f"{name} is stored padded to {padded_dims(n, k, art.group_size)}, sglang allocates "
                           f"{(n, k)}; this model cannot be served there")
    return {name: t.contiguous() for name, t in art.tensors.items()}


def checked_output(art: Artifact, output: str | Path, overwrite: bool) -> Path:
    """The resolved output folder; QoqError when it exists (unless `overwrite` and an earlier export is
    there), or is, holds or lies inside the artifact or its source model."""
    protected = {art.path.resolve(): f"the artifact {art.path}"}
    source = art.report.get("source", {}).get("reload") if isinstance(art.report.get("source"), dict) else None
    if isinstance(source, str) and Path(source).exists():
        protected[Path(source).resolve()] = f"the artifact's source model {source}"
    return check_output(Path(output), None, overwrite, kind=EXPORT, protected=protected)


def write_checkpoint(output: Path, config: dict, tensors: dict[str, torch.Tensor], art: Artifact, fmt: str,
                     overwrite: bool) -> Path:
    """Weights, config.json, the tokenizer files and EXPORT_MARKER into a hidden sibling folder, renamed
    into place."""
    partial = create_partial(output)
    tmp = partial.path
    try:
        write_weights(tmp, tensors)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for file in sorted(art.path.iterdir()):
            if file.is_file() and file.name not in SKIPPED_FILES and not file.name.endswith(".safetensors"):
                shutil.copy2(file, tmp / file.name)
        marker = {"format": fmt, "artifact": str(art.path.resolve()), "qoq_version": __version__}
        (tmp / EXPORT_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        check_output(output, None, overwrite, kind=EXPORT)  # again: it may have appeared while we wrote
        commit_partial(tmp, output)
    except BaseException:
        partial.discard()
        raise
    return output
