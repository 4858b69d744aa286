"""Safetensors shards written while the model is still being quantized.

Tensors arrive in units (the embedding, one decoder block, the final norm and lm_head). A unit never
spans two shards: a shard is written as soon as the next unit would take it past `shard_bytes`, so
at most one shard's worth of tensors is held in memory. Shards carry temporary names until `finish`
knows how many there are; a single shard becomes `model.safetensors`, several become
`model-0000i-of-0000N.safetensors` with `model.safetensors.index.json`.

Each unit is also staged in its own file until its shard is written, so an interrupted run can
pick up every finished unit again (`restore`).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from qoq.checks import require_finite_tensors

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SHARD_BYTES = 2 * 2**30  # safetensors serializes a whole shard in memory: 2 GiB keeps that bounded
STAGING_DIR = "staging"
# one key: safetensors writes metadata in hash-map order, so a second key would make the bytes of two
# identical runs differ; config.json says what the tensors are
_METADATA = {"format": "pt"}


def nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


@dataclass
class ShardWriter:
    """Writes units of tensors into shards inside `folder` (an artifact's partial folder)."""

    folder: Path
    shard_bytes: int = SHARD_BYTES
    stage_units: bool = False  # keep each pending unit on disk too, for resuming
    shards: list[dict] = field(default_factory=list)  # {"file", "names", "bytes", "units"} of written shards
    units: int = 0  # units added so far
    _pending: dict[str, torch.Tensor] = field(default_factory=dict)
    _pending_units: list[int] = field(default_factory=list)

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        """One unit; refused (nothing written) when any tensor holds NaN/Inf."""
        require_finite_tensors(tensors)
        self.make_room(nbytes(tensors))
        unit = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
        if self.stage_units:
            _save_atomic(unit, self._staged(self.units))
        self._pending.update(unit)
        self._pending_units.append(self.units)
        self.units += 1

    def make_room(self, size: int) -> None:
        """Write the pending shard now if a unit of `size` bytes will not fit it: called before a big unit is
        even read, the pending tensors are not held alongside it (the shards are the same either way)."""
        if self._pending and nbytes(self._pending) + size > self.shard_bytes:
            self._flush()

    def finish(self) -> list[str]:
        """Write what is pending, give the shards their final names (and the index); returns the file names."""
        if self._pending or not self.shards:
            self._flush()
        total = len(self.shards)
        names = [WEIGHTS_FILE] if total == 1 else [f"model-{i:05d}-of-{total:05d}.safetensors"
                                                   for i in range(1, total + 1)]
        for shard, name in zip(self.shards, names, strict=True):
            os.replace(self.folder / shard["file"], self.folder / name)
            shard["file"] = name
        if total > 1:
            weight_map = {n: s["file"] for s in self.shards for n in s["names"]}
            index = {"metadata": {"total_size": sum(s["bytes"] for s in self.shards)}, "weight_map": weight_map}
            (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True))
        _remove_tree(self.folder / STAGING_DIR)
        return names

    def total_bytes(self) -> int:
        return sum(s["bytes"] for s in self.shards) + nbytes(self._pending)

    def state(self) -> dict:
        """What `restore` needs: the shards written and how many units were added (the rest are staged)."""
        return {"shards": [dict(s) for s in self.shards], "units": self.units}

    def drop_written_units(self) -> None:
        """Staged copies of units already inside a shard; only once a state naming that shard is saved."""
        for unit in (u for s in self.shards for u in s["units"]):
            self._staged(unit).unlink(missing_ok=True)

    @classmethod
    def restore(cls, folder: Path, state: dict, shard_bytes: int = SHARD_BYTES) -> "ShardWriter":
        """The writer as it was when `state` was taken: its shards kept, its pending units reloaded, and
        whatever was written after it (by work that will be redone) removed."""
        writer = cls(folder, shard_bytes, stage_units=True, shards=[dict(s) for s in state["shards"]])
        writer.units = state["units"]
        _remove_later_files(folder, {s["file"] for s in writer.shards}, writer.units)
        written = [u for s in writer.shards for u in s["units"]]
        for unit in range(max(written) + 1 if written else 0, writer.units):
            writer._pending.update(load_file(writer._staged(unit)))
            writer._pending_units.append(unit)
        return writer

    def _flush(self) -> None:
        file = f"shard-{len(self.shards) + 1:05d}.partial.safetensors"
        _save_atomic(self._pending, self.folder / file)
        self.shards.append({"file": file, "names": list(self._pending), "bytes": nbytes(self._pending),
                            "units": list(self._pending_units)})
        self._pending, self._pending_units = {}, []

    def _staged(self, unit: int) -> Path:
        (self.folder / STAGING_DIR).mkdir(exist_ok=True)
        return self.folder / STAGING_DIR / f"unit-{unit:05d}.safetensors"


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, tmp, metadata=_METADATA)
    os.replace(tmp, path)


def _remove_tree(folder: Path) -> None:
    if folder.is_dir():
        for f in folder.iterdir():
            f.unlink(missing_ok=True)
        folder.rmdir()


def _remove_later_files(folder: Path, shards: set[str], units: int) -> None:
    for f in folder.glob("shard-*"):
        if f.name not in shards:
            f.unlink()
    staging = folder / STAGING_DIR
    if staging.is_dir():
        for f in staging.iterdir():
            unit = f.name.removeprefix("unit-").removesuffix(".safetensors")
            if not unit.isdigit() or int(unit) >= units:
                f.unlink()
