"""Is a GGUF file complete? Walks its header and tensor table (no tensor data is read) and compares the
size the tensors need with the file's size, so a truncated download fails with one line instead of a
reshape or struct error deep inside the converter."""
from __future__ import annotations

import os
import struct
from pathlib import Path

from qoq.errors import QoqError

# GGUF metadata value types with a fixed size in bytes (8 = string, 9 = array)
_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
_MAX_STRING = 1 << 24
_MAX_DIMS = 8
_DEFAULT_ALIGNMENT = 32


def require_complete_gguf(path: Path) -> None:
    """QoqError unless the file holds every byte its tensor table promises."""
    size = path.stat().st_size
    needed = gguf_needed_bytes(path)
    if size < needed:
        raise QoqError(f"'{path}' is not a valid GGUF file or is truncated ({size:,} bytes, its tensors need "
                       f"{needed:,}); download it again")


def gguf_needed_bytes(path: Path) -> int:
    """Bytes a complete copy of this GGUF has: the end of its last tensor's data."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    with open(path, "rb") as f:
        reader = _Reader(f, path)
        if reader.read(4) != b"GGUF":
            raise QoqError(f"'{path}' is not a GGUF file (bad magic)")
        reader.u32()  # version: gguf_architecture already checked it
        n_tensors, n_kv = reader.u64(), reader.u64()
        alignment = _DEFAULT_ALIGNMENT
        for _ in range(n_kv):
            key, vtype = reader.string(), reader.u32()
            if key == "general.alignment" and vtype == 4:
                alignment = reader.u32() or _DEFAULT_ALIGNMENT
            else:
                reader.skip(vtype)
        end = 0
        for _ in range(n_tensors):
            name, n_dims = reader.string(), reader.u32()
            if n_dims > _MAX_DIMS:
                raise reader.invalid(f"tensor {name} has {n_dims} dimensions")
            elements = 1
            for _ in range(n_dims):
                elements *= reader.u64()
            ttype, offset = reader.u32(), reader.u64()
            try:
                block, type_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
            except (ValueError, KeyError):
                raise reader.invalid(f"tensor {name} has unknown type {ttype}") from None
            end = max(end, offset + elements // block * type_bytes)
        data_start = -(-f.tell() // alignment) * alignment
    return data_start + end


class _Reader:
    def __init__(self, f, path: Path):
        self.f, self.path = f, path

    def invalid(self, why: str) -> QoqError:
        return QoqError(f"'{self.path}' is not a valid GGUF file or is truncated ({why}); download it again")

    def read(self, n: int) -> bytes:
        b = self.f.read(n)
        if len(b) != n:
            raise self.invalid("the header ends early")
        return b

    def u32(self) -> int:
        return struct.unpack("<I", self.read(4))[0]

    def u64(self) -> int:
        return struct.unpack("<Q", self.read(8))[0]

    def string(self) -> str:
        n = self.u64()
        if n > _MAX_STRING:
            raise self.invalid("bad string length")
        return self.read(n).decode("utf-8", errors="replace")

    def skip(self, vtype: int) -> None:
        if vtype in _FIXED:
            self.read(_FIXED[vtype])
        elif vtype == _STRING:
            self.string()
        elif vtype == _ARRAY:
            etype, count = self.u32(), self.u64()
            if etype in _FIXED:
                self.f.seek(_FIXED[etype] * count, os.SEEK_CUR)
            else:
                for _ in range(count):
                    self.skip(etype)
        else:
            raise self.invalid(f"unknown value type {vtype}")
