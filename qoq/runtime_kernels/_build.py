"""Compile (NVRTC), cache and launch the qoq CUDA kernels.

Sources: `common.cuh` (helpers, no #include) is prepended to each unit (`gemm.cu`, `quant.cu`, `attention.cu`;
`wgmma.cu` also gets `gemm.cu` before it and is compiled for `sm_90a`, the arch-specific Hopper target).
Templated kernels get a small `extern "C"` wrapper per variant (see `Variant`), so every variant is compiled on
first use only, once per process per device arch: options `-arch=sm_XX -std=c++17` (IEEE division, no fast math,
no flush-to-zero). Compiled cubins are also kept on disk (`$QOQ_KERNEL_CACHE`, default ~/.cache/qoq/kernels),
keyed by source, options and NVRTC version. CuPy only loads modules and launches; torch owns every buffer and
the stream (kernels go to torch's current stream). cupy is imported lazily: this module imports without it.

Why NVRTC directly and not `cupy.RawModule` (checked against CuPy 14.2, the version the GPU numbers used):
RawModule appends `-ftz=true` after the caller's options, so `-ftz=false` loses (cupy/cupy#9576) and every
fp32 denormal the kernels touch would flush to zero, unlike the torch reference twins; it appends its own
`-arch=sm_XX` from the device and parses the arch as a number, so the `sm_90a` unit has no supported way
in; and it insists on finding the CUDA headers, which these sources never include.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qoq.state import cache_dir

SRC_DIR = Path(__file__).resolve().parent
UNITS = ("gemm.cu", "quant.cu", "attention.cu", "wgmma.cu")
UNIT_PREFIX = {"wgmma.cu": ("gemm.cu",)}  # sources a unit builds on
ARCH_SPECIFIC = {"wgmma.cu": "90"}  # units compiled for sm_XXa (warpgroup MMA): they run on exactly that arch
NVRTC_OPTIONS = ("-std=c++17",)
_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8  # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES

_lock = threading.RLock()
_functions: dict = {}  # (device, variant) -> cupy Function
_streams: dict = {}
_smem_set: set = set()


@dataclass(frozen=True)
class Variant:
    """One kernel: the unit it lives in, its C symbol and the wrapper code appended to the unit (may be empty)."""

    unit: str
    name: str
    wrapper: str = ""


def unit_source(unit: str) -> str:
    files = ("common.cuh",) + UNIT_PREFIX.get(unit, ()) + (unit,)
    return "\n".join((SRC_DIR / f).read_text() for f in files)


def compile_arch(v: Variant, arch: str) -> str:
    """`arch` of the device, or `<arch>a` for the arch-specific units."""
    return arch + "a" if ARCH_SPECIFIC.get(v.unit) == arch else arch


def variant_source(v: Variant) -> str:
    return unit_source(v.unit) + "\n" + v.wrapper + "\n"


# ---- variants ---------------------------------------------------------------------------------------------------

def gemv_variant(tb: int, nt: int, grouped: bool, warps: int, u: int, red: int = 1, cluster: int = 1,
                 early_trigger: bool = True) -> Variant:
    """`cluster` > 1: split-K over a thread-block cluster of that many CTAs (sm_90+; the wrapper is empty of
    the cluster attribute below sm_90, where it must not be launched). `early_trigger`: a dependent kernel
    launched with PDL may start when this one starts (else when its weights are read)."""
    name = (f"qoq_gemv_tb{tb}_nt{nt}_{'g' if grouped else 'c'}_w{warps}_u{u}_r{red}"
            + (f"_cl{cluster}" if cluster > 1 else "") + ("" if early_trigger else "_late"))
    dims = f"__cluster_dims__(1, {cluster}, 1) " if cluster > 1 else ""
    body = (f'extern "C" __global__ void {dims}__launch_bounds__({warps * 32}) {name}(GEMM_PARAMS) '
            f'{{ gemv_body<{tb}, {nt}, {str(grouped).lower()}, {warps}, {u}, {red}, {cluster}, '
            f'{str(early_trigger).lower()}>(GEMM_ARGS); }}')
    return Variant("gemm.cu", name, body)


def gemm_variant(bm: int, bn: int, wm: int, wn: int, stages: int, grouped: bool, min_blocks: int) -> Variant:
    name = f"qoq_gemm_{bm}x{bn}_w{wm}x{wn}_s{stages}_b{min_blocks}_{'g' if grouped else 'c'}"
    body = (f'extern "C" __global__ void __launch_bounds__({wm * wn * 32}, {min_blocks}) {name}(GEMM_PARAMS) '
            f'{{ gemm_body<{bm}, {bn}, {wm}, {wn}, {stages}, {str(grouped).lower()}>(GEMM_ARGS); }}')
    return Variant("gemm.cu", name, body)


def gemm_smem_bytes(bm: int, bn: int, stages: int, grouped: bool) -> int:
    bk = 128
    return stages * (bm * bk + bn * bk // 2 + (2 * (bk // 32) * bn if grouped else 0))


def wgmma_variant(stages: int, grouped: bool, min_blocks: int = 1) -> Variant:
    name = f"qoq_wgmma_128x128_s{stages}_b{min_blocks}_{'g' if grouped else 'c'}"
    body = (f'extern "C" __global__ void __launch_bounds__(256, {min_blocks}) {name}(GEMM_PARAMS) '
            f'{{ wgmma_gemm_body<{stages}, {str(grouped).lower()}>(GEMM_ARGS); }}')
    return Variant("wgmma.cu", name, body)


def wgmma_smem_bytes(stages: int) -> int:
    return stages * 128 * (128 + 128) + 1024  # + alignment slack for the 1024-byte swizzle atoms


def wgmma_tma_variant(bn: int, stages: int, min_blocks: int = 1, cluster: int = 1) -> Variant:
    """The persistent int8 x int8 wgmma GEMM fed by the tensor-memory accelerator (wgmma.cu): 128 x `bn` tiles,
    a `stages`-deep ring, 288 threads (a producer warp, two consumer warpgroups); `cluster` = 2: pairs of CTAs
    share (multicast) the weight tile."""
    name = f"qoq_wgtma_128x{bn}_s{stages}_b{min_blocks}" + (f"_cl{cluster}" if cluster > 1 else "")
    dims = f"__cluster_dims__({cluster}, 1, 1) " if cluster > 1 else ""
    body = (f'extern "C" __global__ void {dims}__launch_bounds__(288, {min_blocks}) {name}(TMA_GEMM_PARAMS) '
            f'{{ wgmma_tma_body<{bn}, {stages}, {cluster}>(TMA_GEMM_ARGS); }}')
    return Variant("wgmma.cu", name, body)


def wgmma_tma_smem_bytes(bn: int, stages: int) -> int:
    return stages * 128 * (128 + bn) + 1024  # + alignment slack for the 1024-byte swizzle atoms


def wgmma_swap_variant(bt: int, stages: int, pf: int, cluster: int, grouped: bool, min_blocks: int = 1,
                       overlap: bool = False, tma: bool = False) -> Variant:
    """The swapped-operand kernel (weights as wgmma's register A operand, tokens as N; wgmma.cu): `bt` tokens per
    CTA, `stages` activation buffers, weights `pf` stages ahead in registers, split-K over a `cluster` of CTAs;
    `overlap`: the next stage is dequantized while this one's wgmmas run; `tma`: the activations arrive by the
    tensor-memory accelerator (a tensor map as the last parameter) instead of cp.async."""
    name = (f"qoq_wgswap_t{bt}_s{stages}_p{pf}_b{min_blocks}_{'g' if grouped else 'c'}"
            + (f"_cl{cluster}" if cluster > 1 else "") + ("_ov" if overlap else "") + ("_tma" if tma else ""))
    dims = f"__cluster_dims__(1, 1, {cluster}) " if cluster > 1 else ""
    params, map_arg = ("GEMM_PARAMS, const __grid_constant__ TmaMap tma_a", "&tma_a") if tma else ("GEMM_PARAMS",
                                                                                                   "nullptr")
    body = (f'extern "C" __global__ void {dims}__launch_bounds__(128, {min_blocks}) {name}({params}) '
            f'{{ wgmma_swap_body<{bt}, {stages}, {pf}, {cluster}, {str(grouped).lower()}, '
            f'{str(overlap).lower()}, {str(tma).lower()}>(GEMM_ARGS, {map_arg}); }}')
    return Variant("wgmma.cu", name, body)


def wgmma_swap_smem_bytes(bt: int, stages: int, cluster: int) -> int:
    ring, tile = stages * bt * 128, bt * 132 * 4  # the epilogue's int32 accumulator tile reuses the ring
    return max(ring, tile) + 1024  # + alignment slack for the 1024-byte swizzle atoms


def rowquant_variant(dt: int, mode: int, ch: int, threads: int, cluster: int = 1) -> Variant:
    """The row kernel (quant.cu); `cluster` > 1: each row split over a thread-block cluster of that many CTAs
    (sm_90+)."""
    name = f"qoq_rowquant_d{dt}_m{mode}_c{ch}_t{threads}" + (f"_cl{cluster}" if cluster > 1 else "")
    dims = f"__cluster_dims__({cluster}, 1, 1) " if cluster > 1 else ""
    body = (f'extern "C" __global__ void {dims}__launch_bounds__({threads}) {name}(ROWQUANT_PARAMS) '
            f'{{ rowquant_body<{dt}, {mode}, {ch}, {threads}, {cluster}>(ROWQUANT_ARGS); }}')
    return Variant("quant.cu", name, body)


def attn_variant(d: int, nw: int, stages: int, min_blocks: int = 1) -> Variant:
    name = f"qoq_attn_d{d}_w{nw}_s{stages}" + (f"_b{min_blocks}" if min_blocks > 1 else "")
    body = (f'extern "C" __global__ void __launch_bounds__({nw * 32}, {min_blocks}) {name}(ATTN_PARAMS) '
            f'{{ attn_body<{d}, {nw}, {stages}>(ATTN_ARGS); }}')
    return Variant("attention.cu", name, body)


def attn_smem_bytes(d: int, nw: int, stages: int) -> int:
    return nw * stages * (16 * d + 128)


KV4_APPEND = Variant("attention.cu", "qoq_kv4_append")
ATTN_COMBINE = Variant("attention.cu", "qoq_attn_combine")


# ---- compile ------------------------------------------------------------------------------------------------------

def _cache_dir() -> Path:
    return Path(os.environ.get("QOQ_KERNEL_CACHE") or cache_dir() / "kernels").expanduser()


def nvrtc_options(arch: str) -> tuple[str, ...]:
    """NVRTC options for `sm_<arch>`: nothing that trades IEEE float semantics for speed (no -ftz=true,
    no fast math), so fp32 denormals and divisions behave as in the torch reference twins."""
    return (f"-arch=sm_{arch}",) + NVRTC_OPTIONS


def cached_cubin_path(source: str, name: str, options: tuple[str, ...], nvrtc_version) -> Path:
    """Where the cubin of `source` built with `options` by that NVRTC is kept (any change: another file)."""
    key = hashlib.sha256(f"{nvrtc_version}|{options}|{name}|".encode() + source.encode()).hexdigest()[:40]
    return _cache_dir() / f"{name}-{key}.cubin"


def nvrtc_compile(source: str, name: str, arch: str) -> bytes:
    """NVRTC -> cubin for `sm_<arch>`, with an on-disk cache."""
    from cupy_backends.cuda.libs import nvrtc

    options = nvrtc_options(arch)
    path = cached_cubin_path(source, name, options, nvrtc.getVersion())
    if path.is_file():
        return path.read_bytes()
    prog = nvrtc.createProgram(source, f"{name}.cu", [], [])
    try:
        try:
            nvrtc.compileProgram(prog, list(options))
        except Exception as e:
            log = nvrtc.getProgramLog(prog)
            raise RuntimeError(f"NVRTC failed to compile {name} for sm_{arch}:\n{log}") from e
        cubin = nvrtc.getCUBIN(prog)
    finally:
        nvrtc.destroyProgram(prog)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(cubin)
        os.replace(tmp, path)
    except OSError:
        pass
    return cubin


def runs_on(v: Variant, arch: str) -> bool:
    """Thread-block-cluster variants exist from sm_90 on; arch-specific units run on their arch only."""
    if v.unit in ARCH_SPECIFIC:
        return ARCH_SPECIFIC[v.unit] == arch
    return int(arch) >= 90 or "__cluster_dims__" not in v.wrapper


def device_arch(device: int) -> str:
    import torch

    major, minor = torch.cuda.get_device_capability(device)
    return f"{major}{minor}"


def get_function(v: Variant, device: int):
    key = (device, v)
    fn = _functions.get(key)
    if fn is not None:
        return fn
    with _lock:
        fn = _functions.get(key)
        if fn is None:
            import cupy
            from cupy.cuda import function

            cubin = nvrtc_compile(variant_source(v), v.name, compile_arch(v, device_arch(device)))
            with cupy.cuda.Device(device):
                mod = function.Module()
                mod.load(cubin)
                fn = mod.get_function(v.name)
            _functions[key] = fn
    return fn


def _stream(device: int):
    import torch

    ptr = torch.cuda.current_stream(device).cuda_stream
    s = _streams.get((device, ptr))
    if s is None:
        import cupy

        import warnings

        with warnings.catch_warnings():  # CuPy 14 deprecates ExternalStream; it still is the plain handle wrapper
            warnings.simplefilter("ignore", DeprecationWarning)
            s = cupy.cuda.ExternalStream(ptr, device)
        _streams[(device, ptr)] = s
    return s


def _function_with_smem(v: Variant, device: int, smem: int):
    fn = get_function(v, device)
    if smem > 0 and (device, v) not in _smem_set:  # opt in (static smem counts against the 48 KB default)
        from cupy.cuda import driver

        driver.funcSetAttribute(fn.ptr, _MAX_DYNAMIC_SHARED_SIZE_BYTES, smem)
        _smem_set.add((device, v))
    return fn


_resident: dict = {}


def resident_ctas(v: Variant, device: int, threads: int, smem: int, cluster: int = 1) -> int:
    """How many CTAs of `v` the device runs at once (what a persistent grid may launch), from the driver's
    occupancy calculator (clusters of `cluster` CTAs: whole clusters)."""
    key = (device, v, threads, smem, cluster)
    n = _resident.get(key)
    if n is None:
        import cupy

        fn = _function_with_smem(v, device, smem)
        out = ctypes.c_int(0)
        with cupy.cuda.Device(device):
            if cluster == 1:
                err = _driver().cuOccupancyMaxActiveBlocksPerMultiprocessor(ctypes.byref(out), fn.ptr, threads, smem)
                out.value *= device_info(device)["sms"]
            else:
                cfg = _LaunchConfig((ctypes.c_uint * 3)(cluster, 1, 1), (ctypes.c_uint * 3)(threads, 1, 1), smem,
                                    None, None, 0)
                err = _driver().cuOccupancyMaxActiveClusters(ctypes.byref(out), fn.ptr, ctypes.byref(cfg))
                out.value *= cluster
        if err or out.value < 1:
            raise RuntimeError(f"the occupancy calculator failed for {v.name} (CUresult {err})")
        n = _resident[key] = out.value
    return n


def launch(v: Variant, device: int, grid, block, args, smem: int = 0, pdl: bool = False) -> None:
    """Launch on torch's current stream. `pdl`: programmatic dependent launch (sm_90+, the kernel must call
    pdl_wait before it reads anything an earlier kernel writes): its CTAs may start while the previous kernel
    finishes. `args` may hold `TensorMap`s (passed by value, as `__grid_constant__` parameters)."""
    fn = _function_with_smem(v, device, smem)
    import cupy

    def go():
        if pdl or any(isinstance(a, TensorMap) for a in args):
            _launch_ex(fn, device, grid, block, args, smem, pdl)
        else:
            fn(tuple(grid), tuple(block), tuple(args), shared_mem=smem, stream=_stream(device))

    if cupy.cuda.runtime.getDevice() != device:
        with cupy.cuda.Device(device):
            go()
    else:
        go()


class _LaunchAttr(ctypes.Structure):  # CUlaunchAttribute: id, pad to 8, 64-byte value union
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int), ("rest", ctypes.c_char * 60)]


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("smem", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_LaunchAttr)), ("num_attrs", ctypes.c_uint)]


_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
_CTYPES = {np.uint64: ctypes.c_uint64, np.int64: ctypes.c_int64, np.int32: ctypes.c_int32, np.float32: ctypes.c_float}
_libcuda = None


def _launch_ex(fn, device: int, grid, block, args, smem: int, pdl: bool) -> None:
    """cuLaunchKernelEx on the CUfunction of CuPy's `fn.ptr`, optionally with programmatic stream serialization.

    The launches that bypass CuPy: its launcher takes no launch attributes (programmatic dependent launch is one)
    and no by-value structs (a tensor map is one). (Thread-block clusters need neither: those variants declare
    `__cluster_dims__` in the source, so CuPy launches them as any other kernel.)"""
    import torch

    lib = _driver()
    vals = [None if isinstance(a, TensorMap) else
            _CTYPES[type(a)](int(a) if not isinstance(a, np.float32) else float(a)) for a in args]
    params = (ctypes.c_void_p * len(vals))(*[a.ptr if isinstance(a, TensorMap) else
                                             ctypes.cast(ctypes.pointer(x), ctypes.c_void_p)
                                             for a, x in zip(args, vals, strict=True)])
    attr = _LaunchAttr(id=_PROGRAMMATIC_STREAM_SERIALIZATION, value=1)
    cfg = _LaunchConfig((ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block), smem,
                        torch.cuda.current_stream(device).cuda_stream, ctypes.pointer(attr) if pdl else None,
                        1 if pdl else 0)
    err = lib.cuLaunchKernelEx(ctypes.byref(cfg), fn.ptr, params, None)
    if err:
        raise RuntimeError(f"cuLaunchKernelEx failed with CUresult {err}")


def _driver():
    global _libcuda
    if _libcuda is None:
        lib = ctypes.CDLL("libcuda.so.1")
        lib.cuLaunchKernelEx.argtypes = [ctypes.POINTER(_LaunchConfig), ctypes.c_void_p,
                                         ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p]
        lib.cuOccupancyMaxActiveBlocksPerMultiprocessor.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_void_p,
                                                                    ctypes.c_int, ctypes.c_size_t]
        lib.cuOccupancyMaxActiveClusters.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_void_p,
                                                     ctypes.POINTER(_LaunchConfig)]
        lib.cuTensorMapEncodeTiled.argtypes = [
            ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint64),
            ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint32),
            ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
        _libcuda = lib
    return _libcuda


class TensorMap:
    """A CUtensorMap (128 opaque bytes, 64-byte aligned) in host memory, passed to a kernel by value."""

    __slots__ = ("_buf", "ptr")

    def __init__(self):
        self._buf = ctypes.create_string_buffer(128 + 64)
        self.ptr = (ctypes.addressof(self._buf) + 63) & ~63


_TMAP_UINT8, _TMAP_SWIZZLE_128B, _TMAP_L2_256B = 0, 3, 3  # CUtensorMapDataType / Swizzle / L2promotion values


def tensor_map_2d(t, box_rows: int, box_cols: int = 128) -> TensorMap:
    """A TMA descriptor of the row-major int8 matrix `t` [rows, cols] in `box_rows` x `box_cols`-byte boxes with
    the 128-byte swizzle (the wgmma K-major layout); reads past the matrix are zero-filled."""
    rows, cols = t.shape
    if t.stride(1) != 1 or (t.stride(0) % 16) or t.data_ptr() % 16 or t.element_size() != 1:
        raise ValueError("a tensor map needs a 16-byte aligned int8 matrix with a row stride a multiple of 16")
    m = TensorMap()
    dims = (ctypes.c_uint64 * 2)(cols, rows)
    strides = (ctypes.c_uint64 * 1)(t.stride(0))
    box = (ctypes.c_uint32 * 2)(box_cols, box_rows)
    one = (ctypes.c_uint32 * 2)(1, 1)
    err = _driver().cuTensorMapEncodeTiled(m.ptr, _TMAP_UINT8, 2, t.data_ptr(), dims, strides, box, one,
                                           0, _TMAP_SWIZZLE_128B, _TMAP_L2_256B, 0)
    if err:
        raise RuntimeError(f"cuTensorMapEncodeTiled failed with CUresult {err} for a {rows} x {cols} matrix")
    return m


# ---- argument helpers ---------------------------------------------------------------------------------------------

def ptr(t) -> np.uint64:
    return np.uint64(0 if t is None else t.data_ptr())


def i32(x) -> np.int32:
    return np.int32(x)


def i64(x) -> np.int64:
    return np.int64(x)


def f32(x) -> np.float32:
    return np.float32(x)


_props: dict = {}


def device_info(device: int) -> dict:
    info = _props.get(device)
    if info is None:
        import cupy
        import torch

        p = torch.cuda.get_device_properties(device)
        optin = cupy.cuda.runtime.deviceGetAttribute(97, device)  # cudaDevAttrMaxSharedMemoryPerBlockOptin
        info = {"sms": p.multi_processor_count, "smem_optin": int(optin), "name": p.name, "cc": 10 * p.major + p.minor}
        _props[device] = info
    return info


def precompile(variants, device: int | None = None, max_workers: int | None = None) -> None:
    """Compile (NVRTC, in parallel threads) and load the given variants ahead of first use."""
    import torch
    from concurrent.futures import ThreadPoolExecutor

    if device is None:
        device = torch.cuda.current_device()
    arch = device_arch(device)
    todo = [v for v in dict.fromkeys(variants) if (device, v) not in _functions and runs_on(v, arch)]
    workers = max_workers or min(len(todo), os.cpu_count() or 4, 16) or 1
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda v: nvrtc_compile(variant_source(v), v.name, compile_arch(v, arch)), todo))
    for v in todo:
        get_function(v, device)  # loads from the disk cache just written
