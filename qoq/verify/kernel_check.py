"""The kernel check: per-op errors of a candidate backend (the cupy kernels) against the reference.

`check_kernels(...)` runs the reference engine on real token windows; at every kernel call it replays the same
inputs through the candidate backend and records the largest relative error per op type, so errors never
accumulate across layers and each op is judged on its own.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from qoq.formats.artifact import Artifact
from qoq.runtime.backend import KERNELS, Backend
from qoq.runtime.engine import Engine
from qoq.scheme import ops


@dataclass
class OpError:
    calls: int = 0
    max_rel: float = 0.0  # max over calls of max|cand - ref| / max|ref|, over the float outputs
    int_mismatch: int = 0  # integer outputs (int8 codes, KV4 nibbles, qsum) that differ
    int_total: int = 0
    max_int_diff: int = 0

    def as_dict(self) -> dict:
        return {"calls": self.calls, "max_rel_error": self.max_rel, "int_mismatches": self.int_mismatch,
                "int_values": self.int_total, "max_int_diff": self.max_int_diff}


@dataclass
class KernelCheck:
    candidate: str
    ops: dict[str, OpError] = field(default_factory=dict)
    logits_rel_error: float | None = None
    tokens: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"candidate": self.candidate, "tokens": self.tokens, "seconds": self.seconds,
                "logits_rel_error": self.logits_rel_error, "ops": {k: v.as_dict() for k, v in self.ops.items()}}


def _clone(x):
    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, ops.KV4Cache):
        return ops.KV4Cache(*(getattr(x, f).clone() for f in ("k", "k_scale", "k_zero", "v", "v_scale", "v_zero")))
    if isinstance(x, ops.QuantAct):
        return ops.QuantAct(x.q.clone(), x.scale.clone(), None if x.qsum is None else x.qsum.clone())
    return x


def _leaves(x) -> list[torch.Tensor | None]:
    if isinstance(x, ops.QuantAct):
        return [x.q, x.scale, x.qsum]
    if isinstance(x, ops.KV4Cache):
        return [x.k, x.k_scale, x.k_zero, x.v, x.v_scale, x.v_zero]
    if isinstance(x, (tuple, list)):
        return [t for item in x for t in _leaves(item)]
    return [x]


def _compare(err: OpError, ref, cand) -> None:
    err.calls += 1
    for r, c in zip(_leaves(ref), _leaves(cand), strict=True):
        if r is None or c is None:
            continue
        if r.dtype.is_floating_point:
            denom = r.float().abs().max().clamp_min(1e-30)
            err.max_rel = max(err.max_rel, float((c.float() - r.float()).abs().max() / denom) if r.numel() else 0.0)
        else:
            if r.dtype == torch.uint8:  # packed nibbles: compare the 4-bit values
                r = torch.stack((r & 0xF, r >> 4), -1)
                c = torch.stack((c & 0xF, c >> 4), -1)
            d = (c.to(torch.int64) - r.to(torch.int64)).abs()
            err.int_mismatch += int((d > 0).sum())
            err.int_total += d.numel()
            err.max_int_diff = max(err.max_int_diff, int(d.max()) if d.numel() else 0)


def comparing_backend(reference: Backend, candidate: Backend, result: KernelCheck) -> Backend:
    """A backend that computes with `reference` and replays each call through `candidate`."""
    def wrap(name):
        ref_fn, cand_fn = reference.fns[name], candidate.fns[name]

        def fn(*args, **kwargs):
            cargs = [_clone(a) for a in args]
            ckw = {k: _clone(v) for k, v in kwargs.items()}
            out = ref_fn(*args, **kwargs)
            cout = cand_fn(*cargs, **ckw)
            err = result.ops.setdefault(name, OpError())
            if name == "kv4_append":  # in place: compare the caches after the append
                _compare(err, args[0], cargs[0])
            else:
                _compare(err, out, cout)
            return out
        return fn

    fns = dict(reference.fns)
    for name in KERNELS:
        if name not in candidate.fallbacks:
            fns[name] = wrap(name)
    return Backend(f"{reference.name}+check", fns)


@torch.no_grad()
def check_kernels(art: Artifact, windows: torch.Tensor, device: torch.device, candidate: Backend,
                  reference: Backend, decode_tokens: int = 8) -> KernelCheck:
    """Per-op errors of `candidate` against `reference` on `windows` [N, T] (prefill, then decode the last
    `decode_tokens` tokens one by one), plus the relative error of the two engines' final logits."""
    t0 = time.perf_counter()
    result = KernelCheck(candidate=candidate.describe())
    checker = Engine(art, device=device, backend=comparing_backend(reference, candidate, result), fast=False)
    fast = Engine(art, device=device, backend=candidate, fast=False)
    worst = 0.0
    for row in windows:
        ids = row[None].to(device)
        split = max(1, ids.shape[1] - decode_tokens)
        for eng in (checker, fast):
            eng.reset(1, ids.shape[1])
        ref_logits = [checker.prefill(ids[:, :split], all_logits=True)]
        cand_logits = [fast.prefill(ids[:, :split], all_logits=True)]
        for j in range(split, ids.shape[1]):
            ref_logits.append(checker.decode_step(ids[:, j])[:, None])
            cand_logits.append(fast.decode_step(ids[:, j])[:, None])
        r, c = torch.cat(ref_logits, 1), torch.cat(cand_logits, 1)
        worst = max(worst, float((c - r).abs().max() / r.abs().max().clamp_min(1e-30)))
        result.tokens += ids.shape[1]
    result.logits_rel_error = worst
    result.seconds = time.perf_counter() - t0
    return result
