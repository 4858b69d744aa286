"""Input-side guards shared by the pipeline, the recipe and the artifact reader: finite tensors, strict JSON,
file hashes."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Iterable

import torch

from qoq.errors import QoqError, arg


def count_non_finite(t: torch.Tensor) -> int:
    """How many NaN/Inf values `t` holds (0 for integer tensors)."""
    if not t.is_floating_point():
        return 0
    flat = t.reshape(-1)
    step = 1 << 20  # in pieces: isfinite of a big piece makes several temporaries of its size (0.5 GiB at 2^26)
    return sum(int((~torch.isfinite(flat[i:i + step])).sum()) for i in range(0, flat.numel(), step))


def first_non_finite(named: Iterable[tuple[str, torch.Tensor]]) -> tuple[str, int] | None:
    """(name, count) of the first tensor with NaN/Inf values, or None when all are finite."""
    for name, t in named:
        bad = count_non_finite(t.detach())
        if bad:
            return name, bad
    return None


def require_finite_source(model) -> None:
    """Refuse a source model with NaN/Inf weights before any calibration work is done."""
    found = first_non_finite(model.named_parameters())
    if found is not None:
        name, bad = found
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        raise QoqError(f"the source model's tensor {name} has {_values(bad)} (as loaded in {dtype}); "
                       "the model file is damaged or overflowed: re-download or re-export it")


def require_finite_activations(block: int, what: str, t: torch.Tensor) -> None:
    """Stop when a block's calibration activations overflowed, before they poison the next steps."""
    bad = count_non_finite(t)
    if bad:
        raise QoqError(f"block {block}: {what} {_values(bad, 'have')}; nothing was written; "
                       f"try {arg('calib_dtype', 'float32')}, or check the source model")


def require_finite_tensors(tensors: dict[str, torch.Tensor]) -> None:
    """Refuse to write an artifact any of whose tensors holds NaN/Inf (e.g. an fp16 overflow)."""
    found = first_non_finite(tensors.items())
    if found is not None:
        name, bad = found
        raise QoqError(f"tensor {name} would be written with {_values(bad)} (out of float16 range?); "
                       "nothing was written; check the source model")


def finite_or_none(obj):
    """`obj` with every non-finite float replaced by None (JSON null), recursively."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def strict_json(obj, **kwargs) -> str:
    """JSON without the NaN/Infinity tokens strict parsers reject: non-finite numbers become null."""
    return json.dumps(finite_or_none(obj), allow_nan=False, **kwargs)


def _values(n: int, verb: str = "") -> str:
    text = f"{n} NaN/Inf value{'' if n == 1 else 's'}"
    return f"{verb} {text}" if verb else text


def sha256_of_files(files: Iterable[Path]) -> str:
    """sha256 of the concatenated contents of `files`, in the given order."""
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            while block := fh.read(1 << 22):
                h.update(block)
    return h.hexdigest()
