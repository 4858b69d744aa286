"""Resume points of an interrupted `qoq quantize`, kept inside its partial folder.

A resume point after block k holds the calibration inputs of block k+1 (the hidden states, in chunks
so no full host copy is ever made), the per-block reports so far, the shard writer's state and a
fingerprint of everything that decides the result (source model, calibration data, options, qoq
version). It is written into a fresh folder and then named by `resume/state.json`, replaced
atomically, so a kill at any moment leaves the previous point or the new one, never half of one.
Points are taken at most every `every_seconds` (the hidden states are large), and always when a
shard was just written, since the staged copies of its units are dropped only then.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from qoq.checks import strict_json
from qoq.errors import QoqError, arg
from qoq.formats.shards import ShardWriter

RESUME_DIR = "resume"
STATE_FILE = "state.json"
CHECKPOINT_SECONDS = 120.0
_CHUNK_BYTES = 256 << 20


@dataclass
class ResumePoint:
    next_block: int
    hidden: "HiddenChunks"  # block `next_block`'s calibration inputs, [samples, tokens, hidden] fp32 in chunks
    layer_reports: list
    writer: ShardWriter


class Checkpoints:
    """Takes resume points for the run writing into `folder` through `writer`."""

    def __init__(self, folder: Path, writer: ShardWriter, fingerprint: dict, every_seconds: float = CHECKPOINT_SECONDS):
        self.folder = Path(folder)
        self.writer = writer
        self.fingerprint = fingerprint
        self.every_seconds = every_seconds
        self._last = time.monotonic()
        self._shards_saved = len(writer.shards)

    def after_block(self, next_block: int, hidden: torch.Tensor, layer_reports: list) -> bool:
        """Take a point if one is due; returns whether it did."""
        shard_written = len(self.writer.shards) != self._shards_saved
        if not shard_written and time.monotonic() - self._last < self.every_seconds:
            return False
        self.save(next_block, hidden, layer_reports)
        return True

    def save(self, next_block: int, hidden: torch.Tensor, layer_reports: list) -> None:
        root = self.folder / RESUME_DIR
        point = root / f"block-{next_block:05d}"
        shutil.rmtree(point, ignore_errors=True)
        point.mkdir(parents=True)
        chunks = _save_chunks(hidden, point)
        state = {"fingerprint": self.fingerprint, "next_block": next_block, "point": point.name,
                 "hidden_chunks": chunks, "hidden_shape": list(hidden.shape), "layer_reports": layer_reports,
                 "writer": self.writer.state()}
        tmp = root / (STATE_FILE + ".tmp")
        tmp.write_text(strict_json(state, indent=1))
        os.replace(tmp, root / STATE_FILE)
        for old in root.iterdir():
            if old.is_dir() and old.name != point.name:
                shutil.rmtree(old, ignore_errors=True)
        self.writer.drop_written_units()
        self._last = time.monotonic()
        self._shards_saved = len(self.writer.shards)

    def discard(self) -> None:
        """The run finished: its resume points are not part of the artifact."""
        shutil.rmtree(self.folder / RESUME_DIR, ignore_errors=True)


def saved_state(folder: Path) -> dict | None:
    """The resume state in a partial folder, or None when it holds none (or an unreadable one)."""
    try:
        state = json.loads((Path(folder) / RESUME_DIR / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and "next_block" in state else None


def fingerprint_difference(saved: dict, fingerprint: dict) -> str | None:
    """The first thing that differs between a saved fingerprint and this run's, in words."""
    for key in sorted(set(saved) | set(fingerprint)):
        if saved.get(key) != fingerprint.get(key):
            if isinstance(saved.get(key), dict) and isinstance(fingerprint.get(key), dict):
                inner = fingerprint_difference(saved[key], fingerprint[key])
                return f"{key}.{inner}" if inner else key
            return key
    return None


def load_resume_point(folder: Path, fingerprint: dict, shard_bytes: int) -> ResumePoint:
    """The point saved in `folder`; refused with one line when this run differs from the saved one."""
    folder = Path(folder)
    state = saved_state(folder)
    if state is None:
        raise QoqError(f"{folder} holds no resume point; delete it and run without {arg('resume')}")
    differs = fingerprint_difference(state.get("fingerprint", {}), fingerprint)
    if differs is not None:
        raise QoqError(f"{folder} was made with a different {differs.replace('_', ' ')}; rerun with the options "
                       "of the interrupted run, or delete that folder to start over")
    point = folder / RESUME_DIR / state["point"]
    try:
        hidden = HiddenChunks(point, state["hidden_chunks"], state["hidden_shape"])
    except (OSError, KeyError, ValueError, RuntimeError) as e:
        raise QoqError(f"the resume point in {folder} is damaged ({type(e).__name__}); delete that folder and "
                       f"run without {arg('resume')}") from None
    writer = ShardWriter.restore(folder, state["writer"], shard_bytes)
    return ResumePoint(next_block=int(state["next_block"]), hidden=hidden,
                       layer_reports=list(state["layer_reports"]), writer=writer)


def _save_chunks(hidden: torch.Tensor, point: Path) -> list[str]:
    """The hidden states as files of about 256 MiB each (a GPU tensor is copied a chunk at a time)."""
    per_sample = max(1, hidden[0].numel() * hidden.element_size())
    rows = max(1, _CHUNK_BYTES // per_sample)
    names = []
    for i, start in enumerate(range(0, hidden.shape[0], rows)):
        name = f"hidden-{i:05d}.safetensors"
        save_file({"hidden": hidden[start:start + rows].contiguous().cpu()}, point / name)
        names.append(name)
    return names


class HiddenChunks:
    """The saved hidden states, read one chunk at a time as they are iterated (never a full host copy);
    the chunk files' headers are checked against the recorded shape up front."""

    def __init__(self, point: Path, names: list[str], shape: list[int]):
        self.files = [point / name for name in names]
        shapes = []
        for file in self.files:
            with safe_open(str(file), framework="pt") as f:
                shapes.append(list(f.get_slice("hidden").get_shape()))
        rows = sum(s[0] for s in shapes)
        if rows != shape[0] or any(s[1:] != list(shape[1:]) for s in shapes):
            raise ValueError(f"hidden state chunks {shapes} do not make up {shape}")

    def __iter__(self):
        for file in self.files:
            yield load_file(file)["hidden"]
