"""What fits on the device for `qoq bench`: bytes held by an engine, out-of-memory handling, the usable
capacity and the max-batch plan (QServe's protocol: the largest batch that fits).

Each engine is probed at two small batches (cache allocated for the full length, one prefill chunk, one decode
step); peak = fixed + per_seq * batch gives the largest batch under the usable memory, which is then confirmed
by allocating and running it (backing off 8% per out-of-memory).
"""
from __future__ import annotations

import gc
from dataclasses import dataclass, field, fields, is_dataclass
from typing import TYPE_CHECKING, Callable

import torch

from qoq.bench.profiles import GIB

if TYPE_CHECKING:
    from qoq.bench.runners import Runner

RESERVE_FRACTION = 0.03  # of device memory, kept free for fragmentation and library workspaces
RESERVE_MIN_BYTES = 1 * GIB


def tensor_bytes(*objs) -> int:
    """Bytes of every distinct tensor storage reachable through dataclasses, dicts, lists and tuples."""
    seen: set[tuple[str, int]] = set()
    total = 0

    def visit(o):
        nonlocal total
        if isinstance(o, torch.Tensor):
            st = o.untyped_storage()
            key = (str(o.device), st.data_ptr())
            if key not in seen:
                seen.add(key)
                total += st.nbytes()
        elif is_dataclass(o) and not isinstance(o, type):
            for f in fields(o):
                visit(getattr(o, f.name))
        elif isinstance(o, dict):
            for v in o.values():
                visit(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                visit(v)

    for o in objs:
        visit(o)
    return total


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def usable_capacity(device: torch.device) -> tuple[int, int]:
    """(bytes torch may hold in all: what it holds now + what the driver has free - a reserve, device total)."""
    free_memory()
    free, total = torch.cuda.mem_get_info(device)
    reserve = max(RESERVE_MIN_BYTES, int(RESERVE_FRACTION * total))
    return torch.cuda.memory_reserved(device) + free - reserve, total


@dataclass
class MaxBatchPlan:
    batch: int
    fixed_bytes: float  # peak at batch 0 (weights + prefill workspace)
    per_seq_bytes: float  # peak growth per sequence (KV for the full length + decode activations)
    capacity_bytes: int
    probes: list = field(default_factory=list)  # (batch, peak bytes or None for OOM)

    def batch_with_per_seq(self, per_seq: float, capacity: float | None = None) -> int:
        cap = self.capacity_bytes if capacity is None else capacity
        return max(0, int((cap - self.fixed_bytes) // per_seq))

    def as_dict(self) -> dict:
        return {"batch": self.batch, "fixed_gb": round(self.fixed_bytes / 1e9, 3),
                "per_seq_mb": round(self.per_seq_bytes / 1e6, 3), "capacity_gb": round(self.capacity_bytes / 1e9, 3),
                "probes": [[b, None if p is None else round(p / 1e9, 3)] for b, p in self.probes]}


def plan_max_batch(probe: Callable[[int], int], capacity: int, b0: int, b1: int, limit: int | None = None,
                   backoff: float = 0.92, tries: int = 6) -> MaxBatchPlan:
    """Fit peak(b) = fixed + per_seq * b on probes at b0 < b1, take the largest batch under `capacity`,
    then confirm it with a probe (backing off on out-of-memory or a peak over capacity).
    `probe(b)` returns the peak bytes at batch b and raises torch.cuda.OutOfMemoryError when it does not fit."""
    if not 0 < b0 < b1:
        raise ValueError("need 0 < b0 < b1")
    p0, p1 = probe(b0), probe(b1)
    per_seq = max((p1 - p0) / (b1 - b0), 1.0)
    fixed = p0 - per_seq * b0
    plan = MaxBatchPlan(batch=0, fixed_bytes=fixed, per_seq_bytes=per_seq, capacity_bytes=capacity,
                        probes=[(b0, p0), (b1, p1)])
    b = plan.batch_with_per_seq(per_seq)
    if limit is not None:
        b = min(b, limit)
    for _ in range(tries):
        if b < 1:
            break
        try:
            peak = probe(b)
        except Exception as e:  # noqa: BLE001 - only out-of-memory is expected here
            if not is_oom(e):
                raise
            plan.probes.append((b, None))
            free_memory()
            b = int(b * backoff)
            continue
        plan.probes.append((b, peak))
        if peak <= capacity:
            plan.batch = b
            return plan
        b = int(b * min(backoff, capacity / peak))
    plan.batch = max(b, 0)
    return plan


def peak_probe(runner: Runner, input_len: int, output_len: int) -> Callable[[int], int]:
    """probe(b) -> peak bytes allocated while `runner` allocates and runs batch b."""
    def probe(b: int) -> int:
        runner.release()
        free_memory()
        if runner.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(runner.device)
        try:
            runner.probe(b, input_len, output_len)
            peak = torch.cuda.max_memory_allocated(runner.device) if runner.device.type == "cuda" else 0
        finally:
            runner.release()
        return peak
    return probe
