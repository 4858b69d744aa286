"""A Hugging Face safetensors checkpoint read one module at a time into a model built without weights.

The skeleton comes from accelerate's `init_empty_weights` (parameters on the meta device, buffers such
as the rotary frequencies real). `load` reads a module's tensors from the shards with plain file reads
(no memory map, whose pages would count as this process's memory), cast to the dtype a full load would
give; `release` returns them to the meta device. Host memory therefore holds one block (and the
calibration state), never the model.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

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
        self._headers: dict[str, tuple[int, dict]] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def tensor(self, name: str) -> torch.Tensor:
        """`name` as a full load would hold it (cast to `dtype`); NaN/Inf are refused like a full load's."""
        entry = self._entry(name)
        out = torch.empty(entry.shape, dtype=self.dtype)
        rows_of_out = out.view(entry.rows_shape)
        for start, rows, stored in self._chunks(entry, rows_of_out):
            if stored is not None:
                rows_of_out[start:start + rows].copy_(stored)
        self._refuse_non_finite(name, count_non_finite(out))
        return out

    def require_finite(self) -> None:
        """Every tensor checked once as the quantization will read it (cast to `dtype`): NaN/Inf are refused
        before any work is done. A chunk at a time: never a whole tensor in memory."""
        for name in self.weight_map:
            entry = self._entry(name)
            bad = 0
            for _, _, stored in self._chunks(entry, None):
                bad += count_non_finite(stored if stored.dtype == self.dtype else stored.to(self.dtype))
            self._refuse_non_finite(name, bad)

    def require_shapes(self, model: torch.nn.Module) -> None:
        """Every stored parameter has the shape the model's config gives it: a mismatch is refused before
        any work is done, not when its block is reached."""
        for name, param in model.named_parameters():
            if name in self.weight_map and self._entry(name).shape != tuple(param.shape):
                raise QoqError(f"the checkpoint in {self.folder} stores {name} as {list(self._entry(name).shape)}, "
                               f"its config.json gives {list(param.shape)}; pass a consistent HF model folder")

    def load(self, module: torch.nn.Module, prefix: str) -> torch.nn.Module:
        """Give every parameter of `module` (named `prefix.<param>` in the checkpoint) its stored value, on
        the CPU."""
        from accelerate.utils import set_module_tensor_to_device

        for pname, _ in list(module.named_parameters()):
            set_module_tensor_to_device(module, pname, "cpu", value=self.tensor(f"{prefix}.{pname}"), dtype=self.dtype)
        return module

    @staticmethod
    def release(module: torch.nn.Module) -> None:
        module.to("meta")

    def _entry(self, name: str) -> "_Entry":
        file = self.weight_map.get(name)
        if file is None:
            raise QoqError(f"the checkpoint in {self.folder} has no tensor {name}; pass a complete HF model folder")
        if file not in self._headers:
            self._headers[file] = _read_header(self.folder / file)
        data_start, header = self._headers[file]
        info = header.get(name)
        if not isinstance(info, dict) or info.get("dtype") not in _STORED_DTYPES:
            raise QoqError(f"{self.folder / file} holds no readable tensor {name} (dtype "
                           f"{info.get('dtype') if isinstance(info, dict) else None}); pass a complete HF model folder")
        try:
            begin, end = (int(x) for x in info["data_offsets"])
            shape = tuple(int(x) for x in info["shape"])
        except (KeyError, TypeError, ValueError):
            begin, end, shape = 0, -1, ()
        entry = _Entry(self.folder / file, data_start + begin, end - begin, shape, _STORED_DTYPES[info["dtype"]])
        if entry.nbytes != math.prod(entry.shape) * entry.dtype.itemsize:
            raise QoqError(f"{entry.file} is damaged: tensor {name}'s size does not match its shape; "
                           "download the model again")
        return entry

    def _chunks(self, entry: "_Entry", out: torch.Tensor | None):
        """(first row, rows, stored rows) of `entry` a block of rows at a time, read with plain file reads:
        the pages of a memory map count as this process's memory while it is open (a whole embedding).
        Rows of the stored dtype are read straight into `out` (then None is given instead)."""
        shape = entry.rows_shape
        row_bytes = max(1, math.prod(shape[1:]) * entry.dtype.itemsize)
        rows = max(1, self.chunk_bytes // row_bytes)
        with open(entry.file, "rb", buffering=0) as f:
            for start in range(0, shape[0], rows):
                n = min(rows, shape[0] - start)
                direct = out is not None and out.dtype == entry.dtype
                target = out[start:start + n] if direct else torch.empty((n, *shape[1:]), dtype=entry.dtype)
                f.seek(entry.offset + start * row_bytes)
                _read_into(f, target, entry.file)
                yield start, n, None if direct else target

    def _refuse_non_finite(self, name: str, bad: int) -> None:
        if bad:
            raise QoqError(f"the source model's tensor {name} has {bad} NaN/Inf value{'' if bad == 1 else 's'} "
                           f"(as loaded in {str(self.dtype).removeprefix('torch.')}); the model file is damaged "
                           "or overflowed: re-download or re-export it")


@dataclass(frozen=True)
class _Entry:
    file: Path
    offset: int  # of its first byte in the file
    nbytes: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def rows_shape(self) -> tuple[int, ...]:
        """The shape read a block of rows at a time (a scalar is one row)."""
        return self.shape or (1,)


_STORED_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                  "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                  "BOOL": torch.bool}


def _read_header(file: Path) -> tuple[int, dict]:
    """(offset of the data, header) of a safetensors file."""
    try:
        with open(file, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
    except (OSError, ValueError) as e:
        raise QoqError(f"{file} is not a readable safetensors file ({e}); download the model again") from None
    if not isinstance(header, dict):
        raise QoqError(f"{file} is not a safetensors file; download the model again")
    return 8 + size, header


def _read_into(f, target: torch.Tensor, file: Path) -> None:
    """Fill the contiguous `target` with the next bytes of the unbuffered file `f`."""
    view = memoryview(target.view(-1).view(torch.uint8).numpy())
    done = 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            raise QoqError(f"{file} is truncated; download the model again")
        done += n


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
        weight_map.update({name: file.name for name in _read_header(file)[1] if name != "__metadata__"})
    return weight_map
