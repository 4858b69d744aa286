"""The engine `qoq bench` measures: the runtime's fast mode (qoq.runtime.engine.Engine with fast=True:
fused q|k|v and gate|up GEMMs, RoPE + KV4 append kernel, FP16 prefill attention, chunked prefill by
rows, CUDA-graph decode; qoq.runtime.fast). `ServingEngine` and `fuse_qlinears` stay importable here."""
from __future__ import annotations

import torch

from qoq.runtime.engine import Engine
from qoq.runtime.fast import fuse_qlinears

__all__ = ["ServingEngine", "fuse_qlinears"]


class ServingEngine(Engine):
    """`Engine(..., fast=True)`; `cuda_graph` defaults to on for CUDA."""

    def __init__(self, artifact, device="auto", backend="auto", act_dtype: torch.dtype | None = None,
                 cuda_graph: bool | None = None):
        super().__init__(artifact, device=device, backend=backend, act_dtype=act_dtype, fast=True,
                         cuda_graph=cuda_graph)
