"""Export a per-channel artifact as a compressed-tensors `pack-quantized` checkpoint (vLLM loads it).

Per-channel QoQ weights are one level of asymmetric UINT4: W = s1 * (q - z) with an integer zero z
in 0..15 (the artifact stores s1_szeros = fp16(z * s1)). compressed-tensors' asymmetric channel-wise
4-bit scheme stores exactly those integers and that scale: `weight_packed` int32 [N, K/8] (eight codes
per word along K, code i in bits 4i..4i+3, stored as the signed value + 8, i.e. our q),
`weight_zero_point` int32 [N/8, 1] (packed the same way along N, so our z), `weight_scale` [N, 1] (s1)
and `weight_shape` [N, K]. vLLM runs it as W4A16: activations and KV cache stay FP16.

Group-size QoQ has no exact form there: W = s1 * (q * s2 - z) is a 4-bit code with scale s1 * s2 and a
fractional zero z / s2, and those formats store integer zeros (and round s1 * s2 to fp16).
"""
from __future__ import annotations

from pathlib import Path

import torch

from qoq.errors import QoqError, arg
from qoq.scheme.progressive import is_per_channel
from qoq.formats.artifact import Artifact, read_artifact
from qoq.formats.export_sglang import MODEL_TYPES, checked_output, write_checkpoint

PACK = 8  # 4-bit codes per int32


def compressed_tensors_config() -> dict:
    weights = {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "channel", "group_size": None,
               "dynamic": False, "actorder": None, "block_structure": None, "observer": "minmax",
               "observer_kwargs": {}}
    return {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                      "output_activations": None, "format": "pack-quantized"}},
        "ignore": ["lm_head"], "kv_cache_scheme": None, "sparsity_config": {},
    }


def export_compressed_tensors(artifact: str | Path | Artifact, output: str | Path, overwrite: bool = False) -> Path:
    """Write the compressed-tensors checkpoint of a per-channel `artifact` to `output` atomically."""
    art = artifact if isinstance(artifact, Artifact) else read_artifact(artifact)
    output = checked_output(art, output, overwrite)
    if not is_per_channel(art.group_size):
        raise QoqError(f"compressed-tensors has no exact form of group size {art.group_size} QoQ weights (their "
                       f"per-group zero z/s2 is fractional); export a per-channel artifact ({arg('group_size', -1)}) "
                       f"or serve this one with {arg('format', 'sglang')}")
    if art.config.get("model_type") not in MODEL_TYPES:
        raise QoqError(f"model_type {art.config.get('model_type')!r} is not one qoq exports "
                       f"({', '.join(MODEL_TYPES)})")
    linears = art.qconfig["modules"]
    tensors = {name: t for name, t in art.tensors.items() if name.rsplit(".", 1)[0] not in linears
               or name.endswith(".bias")}
    for name, (n, k) in linears.items():
        if n % PACK:
            raise QoqError(f"vLLM packs zero points {PACK} output channels per int32 and fuses q|k|v and gate|up "
                           f"along them: {name} has {n} output channels, not a multiple of {PACK}")
        tensors.update(channel_tensors(art, name, n, k))
    config = {k: v for k, v in art.config.items() if k != "quantization_config"}
    config["torch_dtype"] = "float16"
    config["quantization_config"] = compressed_tensors_config()
    return write_checkpoint(output, config, tensors, art, "compressed-tensors", overwrite)


def channel_tensors(art: Artifact, name: str, n: int, k: int) -> dict[str, torch.Tensor]:
    """weight_packed / weight_scale / weight_zero_point / weight_shape of one per-channel linear."""
    qw = art.quantized_weight(name)
    s1, szeros = qw.s1[:n], qw.szeros[:n]
    zero = torch.round(szeros.float() / s1.float()).clamp(0, 15)
    if not torch.equal((zero * s1.float()).to(torch.float16), szeros):  # the quantizer stores fp16(z * s1)
        raise QoqError(f"{art.path} is inconsistent: {name}.s1_szeros is not s1 times an integer zero; "
                       "re-run qoq quantize")
    return {f"{name}.weight_packed": pack_int32(qw.q[:n, :k], dim=1),
            f"{name}.weight_zero_point": pack_int32(zero.to(torch.uint8)[:, None], dim=0),
            f"{name}.weight_scale": s1[:, None].contiguous(),
            f"{name}.weight_shape": torch.tensor([n, k], dtype=torch.int64)}


def pack_int32(codes: torch.Tensor, dim: int) -> torch.Tensor:
    """uint8 codes 0..15 -> int32, eight per word along `dim` (zero-padded), code i in bits 4i..4i+3."""
    c = codes.to(torch.int64)
    if dim == 0:
        c = c.t()
    rows, cols = c.shape
    c = torch.nn.functional.pad(c, (0, -cols % PACK)).reshape(rows, -1, PACK)
    words = (c << (4 * torch.arange(PACK))).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # two's complement of the top bit
    return (words.t() if dim == 0 else words).contiguous()
