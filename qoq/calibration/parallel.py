"""Data-parallel calibration: several processes (one per GPU) share the calibration samples.

Rank r takes a contiguous slice of the samples. Everything the recipe decides from is reduced across
the ranks before it is used: Hessian sums added in float64, channel maxima maxed, row samples
gathered in rank order. So every rank takes the same decisions and holds the same quantized weights,
and each propagates only its own slice to the next block. With one process (world 1) every collective
returns its input untouched: the single-process path is the plain one, bit for bit.

The ranks come from the environment torchrun sets (WORLD_SIZE, RANK, LOCAL_RANK): NCCL between GPUs
(rank on cuda:LOCAL_RANK), gloo between CPU processes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from qoq.errors import QoqError

# Ranks wait for each other at every block; a rank still loading its model or calibration text can keep
# the others waiting far longer than NCCL's default 10 minutes.
WAIT_LIMIT = timedelta(hours=2)


@dataclass(frozen=True)
class DataParallelGroup:
    """This process's place among the calibration ranks, and the collectives the recipe needs."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")  # the rank's compute device; its collectives run there too

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    def sample_range(self, n_samples: int) -> tuple[int, int]:
        """[start, end) of this rank's contiguous slice of `n_samples` (sizes differ by at most one)."""
        if n_samples < self.world:
            raise QoqError(f"{n_samples} calibration samples cannot be shared by {self.world} processes; "
                           f"pass --calib-samples {self.world} or more")
        return self.rank * n_samples // self.world, (self.rank + 1) * n_samples // self.world

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """The float64 sum of `t` over the ranks (all_reduce SUM: the same bits on every rank)."""
        if self.world == 1:
            return t
        if t.dtype != torch.float64:
            raise ValueError(f"rank sums are float64, got {t.dtype}")
        return self._all_reduce(t, dist.ReduceOp.SUM)

    def sum_count(self, n: int) -> int:
        if self.world == 1:
            return n
        return int(self._all_reduce(torch.tensor([n], dtype=torch.int64), dist.ReduceOp.SUM))

    def max(self, t: torch.Tensor) -> torch.Tensor:
        """The elementwise maximum of `t` over the ranks."""
        if self.world == 1:
            return t
        return self._all_reduce(t, dist.ReduceOp.MAX)

    def gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's rows [n_r, ...] concatenated in rank order (trailing dims equal on all ranks)."""
        if self.world == 1:
            return t
        x = t.to(self.device).contiguous()
        sizes = [torch.zeros(1, dtype=torch.int64, device=self.device) for _ in range(self.world)]
        dist.all_gather(sizes, torch.tensor([x.shape[0]], dtype=torch.int64, device=self.device))
        counts = [int(s) for s in sizes]
        padded = torch.zeros((max(counts), *x.shape[1:]), dtype=x.dtype, device=self.device)
        padded[:x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)]).to(t.device)

    def from_first(self, t: torch.Tensor) -> torch.Tensor:
        """Rank 0's `t` on every rank (same shape and dtype everywhere)."""
        if self.world == 1:
            return t
        x = t.to(self.device).clone()
        dist.broadcast(x, src=0)
        return x.to(t.device)

    def first_shape(self, t: torch.Tensor) -> tuple[int, ...]:
        """The shape rank 0's `t` has (`t` has the same number of dimensions on every rank)."""
        if self.world == 1:
            return tuple(t.shape)
        return tuple(int(d) for d in self.from_first(torch.tensor(t.shape, dtype=torch.int64)))

    def align_to_first(self, module: torch.nn.Module) -> None:
        """Copy rank 0's parameters and buffers into `module`: the ranks compute the same weights from the
        same statistics, and this makes it exact even where a kernel is not bitwise deterministic."""
        if self.world == 1:
            return
        for t in (*module.parameters(), *module.buffers()):
            t.data.copy_(self.from_first(t.data))

    def _all_reduce(self, t: torch.Tensor, op) -> torch.Tensor:
        x = t.to(self.device).clone()
        dist.all_reduce(x, op=op)
        return x.to(t.device)


SINGLE_PROCESS = DataParallelGroup()


def launched_ranks() -> int:
    """How many ranks the launcher (torchrun) started; 1 when this process runs alone."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def join_ranks(device: torch.device) -> DataParallelGroup:
    """This process's group: world 1 on `device` unless torchrun started several ranks, in which case
    they meet here (NCCL on cuda:LOCAL_RANK for a CUDA `device`, gloo on the CPU otherwise)."""
    world = launched_ranks()
    if world == 1:
        return DataParallelGroup(device=device)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise QoqError(f"rank {rank} wants cuda:{local} but {torch.cuda.device_count()} GPUs are visible; "
                           "start at most one process per GPU")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=WAIT_LIMIT, device_id=device if backend == "nccl" else None)
    return DataParallelGroup(rank=dist.get_rank(), world=dist.get_world_size(), device=device)


def leave_ranks(group: DataParallelGroup) -> None:
    """Tear down the process group `join_ranks` set up (nothing for one process)."""
    if group.world > 1 and dist.is_initialized():
        dist.destroy_process_group()
