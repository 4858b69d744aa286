"""A Hugging Face safetensors checkpoint read one module at a time into a model built without weights.

The skeleton comes from accelerate's `init_empty_weights` (parameters on the meta device, buffers such
as the rotary frequencies real). `load` reads a module's tensors straight from the memory-mapped
shards, cast to the dtype a full load would give; `release` returns them to the meta device. Host
memory therefore holds one block (and the calibration state), never the model.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from qoq.checks import count_non_finite
from qoq.errors import QoqError

INDEX_FILE = "model.safetensors.index.json"
CHUNK_BYTES = 256 << 20  # a tensor is read and cast this many stored bytes at a time


class CheckpointReader:
    """Tensors of the checkpoint in `folder` by name, each read on demand."""

    def __init__(self, folder: Path, dtype: torch.dtype, chunk_bytes: int = CHUNK_BYTES):
        self.folder = Path(folder)
        self.dtype = dtype
        self.chunk_bytes = chunk_bytes
        self.weight_map = _weight_map(self.folder)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def tensor(self, name: str) -> torch.Tensor:
        """`name` as a full load would hold it (cast to `dtype`); NaN/Inf are refused like a full load's."""
        file = self.weight_map.get(name)
        if file is None:
            raise QoqError(f"the checkpoint in {self.folder} has no tensor {name}; pass a complete HF model folder")
        # opened per tensor: a mapping kept open keeps every page read so far resident (the whole model, after
        # the NaN scan)
        with safe_open(str(self.folder / file), framework="pt") as f:
            t = _read_rows(f.get_slice(name), self.dtype, self.chunk_bytes)
        bad = count_non_finite(t)
        if bad:
            raise QoqError(f"the source model's tensor {name} has {bad} NaN/Inf value{'' if bad == 1 else 's'} "
                           f"(as loaded in {str(self.dtype).removeprefix('torch.')}); the model file is damaged "
                           "or overflowed: re-download or re-export it")
        return t

    def require_finite(self) -> None:
        """Read every tensor once, as the quantization will: NaN/Inf are refused before any work is done."""
        for name in self.weight_map:
            self.tensor(name)

    def load(self, module: torch.nn.Module, prefix: str, names: dict[str, str] | None = None) -> torch.nn.Module:
        """Give every parameter of `module` (named `prefix.<param>` in the checkpoint, or as `names` maps
        them) its stored value, on the CPU."""
        from accelerate.utils import set_module_tensor_to_device

        for pname, _ in list(module.named_parameters()):
            stored = (names or {}).get(pname, f"{prefix}.{pname}")
            set_module_tensor_to_device(module, pname, "cpu", value=self.tensor(stored), dtype=self.dtype)
        return module

    @staticmethod
    def release(module: torch.nn.Module) -> None:
        module.to("meta")


def _read_rows(stored, dtype: torch.dtype, chunk_bytes: int) -> torch.Tensor:
    """The tensor behind a safetensors slice, cast to `dtype` a block of rows at a time into a new tensor:
    never the stored tensor and its cast copy at once (an 8B model's embedding would be 2 GB of them). Always
    a copy of its own, since safetensors may hand out views of the memory map, and the recipe edits weights."""
    shape = stored.get_shape()
    if not shape or shape[0] <= 1:
        return stored[:].to(dtype, copy=True)
    out = torch.empty(shape, dtype=dtype)
    row_bytes = max(1, out[0].numel() * _STORED_BYTES.get(stored.get_dtype(), 4))
    rows = max(1, chunk_bytes // row_bytes)
    for start in range(0, shape[0], rows):
        out[start:start + rows].copy_(stored[start:start + rows])
    return out


_STORED_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def can_stream(folder: Path) -> bool:
    """A folder whose weights are safetensors (single file or sharded with an index)."""
    return any(Path(folder).glob("*.safetensors"))


def empty_model(folder: Path, dtype: torch.dtype):
    """The model of `folder`'s config with its parameters on the meta device, in eval mode."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(folder))
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    model.to(dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    return model


def _weight_map(folder: Path) -> dict[str, str]:
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise QoqError(f"{index} is not a safetensors index ({e}); pass a complete HF model folder") from None
        missing = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
        if missing:
            raise QoqError(f"{folder} lacks the shard {missing[0]} its index names; download the model again")
        return dict(weight_map)
    weight_map = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            weight_map.update({name: file.name for name in f.keys()})
    return weight_map
