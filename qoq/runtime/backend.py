"""Backend selection: which implementation of the kernel-level ops (qoq.scheme.ops) the engine calls.

A backend is one function per kernel, with exactly the names and signatures of `qoq.scheme.ops`:
- `reference`: the torch reference twins in `qoq.scheme.ops` (CPU or GPU). Its `w4a8_linear` keeps
  each linear's unpacked int8 weight operand (and, on CPU, an exact fp32 copy of it) after the first
  call, which changes no result and saves the unpacking on every token.
- `cupy`: the GPU kernels of `qoq.runtime_kernels` (needs CUDA and `qoq.runtime_kernels.available()`).
- `auto`: `cupy` on a CUDA device when it is available, else `reference`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

import qoq.runtime_kernels as rk
from qoq.errors import QoqError, arg
from qoq.scheme import ops

# One function per GPU kernel; `rmsnorm` (final norm, fp32) is optional for a kernel backend.
KERNELS = ("quantize_act", "rmsnorm_quantize", "silu_mul_quantize", "w4a8_linear", "kv4_append",
           "kv4_quantize", "kv4_dequantize", "apply_rope", "decode_attention_kv4")
OPTIONAL = ("rmsnorm",)
# fused kernels the engine's fast mode uses when the backend has them (and composes from the ops above otherwise)
FUSED = ("rope_kv4_append", "add_rmsnorm_quantize")
BACKENDS = ("auto", "reference", "cupy")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class Backend:
    name: str  # "reference" | "cupy"
    fns: dict[str, Callable] = field(default_factory=dict)
    fallbacks: tuple[str, ...] = ()  # kernels a `cupy` backend lacked and took from the reference

    def __getattr__(self, item: str):
        fns = self.__dict__.get("fns", {})
        if item in fns:
            return fns[item]
        raise AttributeError(item)

    def describe(self) -> str:
        if self.fallbacks:
            return f"{self.name} (reference for {', '.join(self.fallbacks)})"
        return self.name


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device not in DEVICES:
        raise QoqError(f"{arg('device')} {device!r} is not one of {', '.join(DEVICES)}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise QoqError(f"{arg('device', 'cuda')} was asked for but no CUDA GPU is visible; "
                       f"use {arg('device', 'cpu')}")
    return torch.device(device)


def cupy_available() -> tuple[bool, str]:
    """(available, why not) for the cupy kernel backend."""
    if not torch.cuda.is_available():
        return False, "no CUDA GPU is visible"
    if not rk.available():  # (it imports without CuPy and never raises)
        return False, "qoq.runtime_kernels reports the kernels are unavailable (cupy/NVRTC)"
    return True, ""


def reference_backend() -> Backend:
    fns = {name: getattr(ops, name) for name in KERNELS + OPTIONAL + FUSED if hasattr(ops, name)}
    fns["w4a8_linear"] = cached_w4a8_linear
    return Backend("reference", fns)


def cupy_backend() -> Backend:
    ok, why = cupy_available()
    if not ok:
        raise QoqError(f"{arg('backend', 'cupy')} is not available: {why}; use {arg('backend', 'reference')}")
    fns, fallbacks = {}, []
    for name in KERNELS + OPTIONAL:
        fn = getattr(rk, name, None)
        if fn is None:
            fn = getattr(ops, name) if name != "w4a8_linear" else cached_w4a8_linear
            if name in KERNELS:
                fallbacks.append(name)
        fns[name] = fn
    fns.update({name: getattr(rk, name) for name in FUSED if hasattr(rk, name)})
    return Backend("cupy", fns, tuple(fallbacks))


def get_backend(name: str, device: torch.device) -> Backend:
    """The backend `name` for `device`; QoqError when it cannot run there."""
    if name not in BACKENDS:
        raise QoqError(f"{arg('backend')} {name!r} is not one of {', '.join(BACKENDS)}")
    if name == "reference":
        return reference_backend()
    if name == "cupy":
        if device.type != "cuda":
            raise QoqError(f"{arg('backend', 'cupy')} needs a CUDA device; use {arg('device', 'cuda')} or "
                           f"{arg('backend', 'reference')}")
        return cupy_backend()
    if device.type == "cuda" and cupy_available()[0]:
        return cupy_backend()
    return reference_backend()


# ---- the reference W4A8 linear with the unpacked weight kept per linear -----------------------------

_F32_EXACT_K = 1024  # |sum of 1024 products of int8 x int8| < 2^24: fp32 accumulation stays exact


def cached_w4a8_linear(a: ops.QuantAct, w: ops.QLinear, out_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """`ops.w4a8_linear` with the int8 weight operand unpacked once per QLinear (same integers)."""
    cache = w.__dict__.setdefault("_qoq_cache", {})
    w8 = cache.get("w8")
    if w8 is None:
        w8 = cache["w8"] = ops.int8_weight(w)
    if a.q.is_cuda or torch.get_float32_matmul_precision() != "highest":
        acc = ops.int_matmul(a.q, w8)
    else:
        acc = _exact_f32_matmul(a.q, cache, w8)
    return ops.w4a8_epilogue(acc, a, w, out_dtype)


def _exact_f32_matmul(a: torch.Tensor, cache: dict, w8: torch.Tensor) -> torch.Tensor:
    """Exact int32 a @ w8^T on CPU through fp32 GEMMs over K-chunks of 1024 (every partial sum is an
    integer below 2^24, so fp32 represents it exactly whatever the summation order)."""
    wf = cache.get("w8_f32")
    if wf is None:
        wf = cache["w8_f32"] = w8.float()
    af = a.float()
    k = a.shape[1]
    if k <= _F32_EXACT_K:
        return (af @ wf.t()).to(torch.int32)
    acc = None
    for s in range(0, k, _F32_EXACT_K):
        part = (af[:, s:s + _F32_EXACT_K] @ wf[:, s:s + _F32_EXACT_K].t()).to(torch.int32)
        acc = part if acc is None else acc + part
    return acc
