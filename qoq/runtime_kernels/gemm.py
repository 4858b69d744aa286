"""W4A8 GEMM launcher: tile configuration by M, split-K planning, workspace, epilogue dtype."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from qoq.scheme.ops import QLinear, QuantAct

from . import _build as B

DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.int32: 3}


@dataclass(frozen=True)
class GemvConfig:
    """Weight-streaming kernel for M <= 8*tb: tb token blocks, nt n-tiles and u k-tiles per warp batch."""

    tb: int
    nt: int = 1
    warps: int = 16
    u: int = 2
    splits: int | None = None  # None: planned from the SM count
    red: int = 1  # cross-warp reduction: 1 per-warp shared-memory slices, 0 shared-memory atomics
    cluster: int = 1  # > 1: split K over a thread-block cluster of this many CTAs (sm_90+, DSMEM reduction)
    pdl: bool = True  # sm_90+: programmatic dependent launch (weights stream while the previous kernel ends)
    early_trigger: bool = True  # a PDL-launched next kernel may start with this one (False: after its main loop)


@dataclass(frozen=True)
class GemmConfig:
    """Tensor-core tile kernel: bm x bn x 128 CTA tile, wm x wn warps, cp.async stages."""

    bm: int
    bn: int
    wm: int
    wn: int
    stages: int = 4
    min_blocks: int = 1
    splits: int | None = None


@dataclass(frozen=True)
class IntMMConfig:
    """Large M: dequantize the packed W4 linear into an int8 scratch (one per device, reused), int32 accumulators
    from `torch._int_mm` (cuBLAS), then the fused epilogue kernel. `n_chunk` output channels at a time (None: all;
    a multiple of 32): the chunk's int8 weights and int32 accumulators are small enough to stay in L2 between
    the three kernels. Rows are processed in chunks so the int32 accumulator buffer stays <= `max_acc_bytes`."""

    max_acc_bytes: int = 256 << 20
    n_chunk: int | None = None


@dataclass(frozen=True)
class WgmmaConfig:
    """Hopper (sm_90a) large-M kernel: 128 x 128 x 128 CTA tile, two warpgroups of `wgmma` s8, W4 dequantized into
    shared memory inside the kernel, epilogue on the accumulators (wgmma.cu). Default measured on H100: 3 stages,
    two CTAs per SM (NOTES.md)."""

    stages: int = 3
    min_blocks: int = 2


@dataclass(frozen=True)
class SwapConfig:
    """Hopper (sm_90a) swapped-operand kernel (wgmma.cu): Y^T = W X^T with the dequantized weights as `wgmma`'s
    register A operand (never in shared memory) and `bt` tokens as its N dimension; one warpgroup per 128 output
    channels; activations through a `stages`-deep cp.async ring; weights `pf` stages ahead in registers; K split
    over a thread-block `cluster` of CTAs whose int32 sums meet in distributed shared memory."""

    bt: int = 64
    stages: int = 4
    pf: int = 2
    cluster: int = 1
    min_blocks: int = 1
    overlap: bool = False  # dequantize the next stage while this one's wgmmas run (two fragment buffers)
    tma: bool = False  # activations by the tensor-memory accelerator (no proxy fence per stage); not with overlap


@dataclass(frozen=True)
class TmaConfig:
    """Hopper (sm_90a), large M, two passes: the layer's W4 is dequantized into the int8 scratch (as for
    `IntMMConfig`), then an int8 x int8 `wgmma` GEMM whose operands the tensor-memory accelerator copies into a
    `stages`-deep ring (a producer warp, two consumer warpgroups, 128 x `bn` tiles) runs the fused epilogue.
    Persistent: one wave of CTAs loops over the tiles."""

    bn: int = 256
    stages: int = 4
    min_blocks: int = 1
    cluster: int = 1  # 2: pairs of CTAs (adjacent row tiles) share the weight tile by TMA multicast


PDL_ENABLED = os.environ.get("QOQ_PDL", "1") != "0"  # QOQ_PDL=0: never use programmatic dependent launch
GEMV_MAX_M = 32  # 17-32 tokens: 2-3x faster than the tiled kernel on Llama-3-8B shapes (NOTES.md)
GEMV_MID_M = 64  # up to here too when there are < 4 channel groups per SM (33-64 tokens: 1.1-1.7x)
INTMM_MIN_M = 256  # measured on H100: dequant + _int_mm beats the tiled kernel from M = 256 (NOTES.md)
SWAP_MIN_M, SWAP_MID_M = 17, 256  # sm_90a swapped-operand kernel ranges (_swap_wins)
SWAP16_MIN_M = 9  # and 16-token tiles at M = 9-16 on wide layers (_choose_swap16)
WGMMA_MIN_M = 33  # (M <= 64 reaches it only with >= 4 channel groups per SM; below that the GEMV wins)
# sm_90a two-pass TMA path from here: per-group weights / per-channel weights; measured on H100 (`--tune-large`,
# NOTES.md)
TMA_MIN_M, TMA_MIN_M_PER_CHANNEL = 512, 2048
TMA_LONG_K = 8192  # Kp from which K counts as long (Llama-3-8B: down_proj's 14336)
TMA_WIDE_M = 2048, 16384  # from here 128 x 256 tiles: on long K / on short K (with the weight tile multicast)

DEQUANT_G = B.Variant("gemm.cu", "qoq_w4_dequant_g")
DEQUANT_C = B.Variant("gemm.cu", "qoq_w4_dequant_c")
EPILOGUE = B.Variant("gemm.cu", "qoq_w4a8_epilogue")


def choose_config(m: int, np_: int, kp: int, sms: int, intmm: bool = True, cc: int = 80,
                  grouped: bool = True) -> GemvConfig | GemmConfig | IntMMConfig | WgmmaConfig | SwapConfig | TmaConfig:
    """Measured on H100 (`python -m qoq.bench.gemm --tune`, NOTES.md). M <= 32 (M <= 64 with few channel groups):
    the weight-streaming GEMV, its shape by how many 32-channel groups there are per SM and by K. On sm_90 above
    that: the two-pass TMA path from M = 512 (2048 for per-channel weights, whose fused kernels dequantize more
    cheaply; `choose_tma` picks its tiles), the wgmma kernel when its 128 x 128 tiles give at least half the SMs a
    CTA (it has no split-K).
    Otherwise from M = 256 the dequant + `_int_mm` path, below it the largest tiled-kernel tile that still gives
    every SM a CTA (16 warps per SM beat bigger warp tiles: the kernel is latency-bound). `cc`: compute
    capability (90 enables the thread-block-cluster split-K and the sm_90a wgmma kernel). `intmm=False`: the
    tiled mma.sync kernel only (benchmark baseline)."""
    if intmm and cc == 90 and _tma_wins(m, grouped):
        return choose_tma(m, kp)
    if intmm and cc == 90 and _swap_wins(m, kp // 32):
        return _choose_swap(m, np_, kp // 32, sms)
    if intmm and cc == 90 and grouped and SWAP16_MIN_M <= m <= 16 and np_ // 32 >= 4 * sms:
        return _choose_swap16(np_, kp // 32, sms)
    if m <= GEMV_MAX_M or (m <= GEMV_MID_M and np_ // 32 < 4 * sms):
        return _choose_gemv(m, np_ // 32, kp // 32, sms, cc)
    if intmm and cc == 90 and m >= WGMMA_MIN_M and 2 * math.ceil(m / 128) * math.ceil(np_ / 128) >= sms:
        return WgmmaConfig()
    if intmm and m >= INTMM_MIN_M and kp % 8 == 0 and np_ % 8 == 0:
        return IntMMConfig()
    ntile = lambda bm, bn: math.ceil(m / bm) * math.ceil(np_ / bn)  # noqa: E731
    if m >= 128 and ntile(128, 128) >= sms:
        return GemmConfig(128, 128, 2, 4, stages=4, min_blocks=2)
    if m >= 64 and ntile(64, 128) >= sms:
        return GemmConfig(64, 128, 2, 2, stages=4, min_blocks=2)
    return GemmConfig(32, 128, 1, 4, stages=4, min_blocks=3)


def _tma_wins(m: int, grouped: bool) -> bool:
    return m >= (TMA_MIN_M if grouped else TMA_MIN_M_PER_CHANNEL)


def choose_tma(m: int, kp: int) -> TmaConfig:
    """Measured on H100 (`--tune-large`, NOTES.md). Long K: 128 x 256 tiles (one CTA per SM) from M = 2048; below
    that few tiles run long k-loops, so 128 x 128 tiles with a 6-stage ring, one CTA per SM, in pairs that multicast
    the weight tile. Short K: 128 x 128 tiles, two CTAs per SM (they overlap each other's epilogue and ring fill),
    and at prefill sizes 128 x 256 tiles in pairs that multicast the weight tile."""
    if kp >= TMA_LONG_K:
        return TmaConfig(256, 4) if m >= TMA_WIDE_M[0] else TmaConfig(128, 6, cluster=2)
    return TmaConfig(256, 4, cluster=2) if m >= TMA_WIDE_M[1] else TmaConfig(128, 3, 2)


def _swap_wins(m: int, kt: int) -> bool:
    """Where the swapped-operand kernel beat every other path on H100 (`--tune-swap`, `--tune-large`, NOTES.md):
    M = 17-256 on every Llama-3-8B shape (M = 256: 24.8-88.4 us against the 128 x 128 wgmma kernel's 26.6-97.4)
    and above that on long K (K >= 8192, where the wgmma kernel has no split-K). From M = 1024 on short K the
    wgmma kernel measured as fast or faster (up to 24 %). M <= 16 stays with the GEMV but on wide layers
    (`_choose_swap16`)."""
    return SWAP_MIN_M <= m <= SWAP_MID_M or (m > SWAP_MID_M and kt >= 256)


def _fit_cluster(tiles: int, kt: int, sms: int, per_sm: int = 2) -> int:
    """The largest cluster split-K of 1 / 2 / 4 / 8 that leaves each CTA >= 8 k-tiles and whose CTAs all fit at
    `per_sm` per SM (1 when none does)."""
    cluster = 1
    while cluster < 8 and kt // (2 * cluster) >= 8 and tiles * 2 * cluster <= per_sm * sms:
        cluster *= 2
    return cluster


def _choose_swap(m: int, np_: int, kt: int, sms: int) -> SwapConfig:
    """Activations by TMA up to M = 256. M <= 32: 32-token tiles, M <= 64: 64, in the `_fit_cluster` split-K
    (4096 x 4096 and 4096 x 14336 at M = 64: 8 CTAs, 12.8 / 23.9 us against 15.7 / 34.7 with cp.async and 4).
    M = 65-256: still 64-token tiles where they fit two per SM in 4-CTA clusters (M <= 128) or unsplit (M > 128),
    else 128-token tiles in the smallest cluster that gives 0.9 CTAs per SM (M <= 128) or in pairs while they
    cover fewer than 1.5 CTAs per SM (M = 128: 4096 x 4096 17.2 us with 64-token tiles against 21.2 with 128;
    M = 256: 4096 x 4096 24.8 against 26.6 for the wgmma kernel). Above M = 256 (long K only): 128-token tiles
    by cp.async. Measured on H100 (NOTES.md)."""
    tiles = lambda bt: math.ceil(np_ / 128) * math.ceil(m / bt)  # noqa: E731
    if m <= 64:
        bt = 32 if m <= 32 else 64
        return SwapConfig(bt, cluster=_fit_cluster(tiles(bt), kt, sms), tma=True)
    cluster = _fit_cluster(tiles(64), kt, sms)
    if m <= SWAP_MID_M and (cluster >= 4 if m <= 128 else tiles(64) <= 2 * sms):
        return SwapConfig(64, cluster=cluster, tma=True)
    if m > 128:
        return SwapConfig(128, cluster=2 if tiles(128) < 1.5 * sms else 1, tma=m <= SWAP_MID_M)
    cluster = 1
    while cluster < 8 and kt // (2 * cluster) >= 8 and tiles(128) * cluster < 0.9 * sms:
        cluster *= 2
    return SwapConfig(128, cluster=cluster, tma=True)


def _choose_swap16(np_: int, kt: int, sms: int) -> SwapConfig:
    """M = 9-16 with per-group weights and >= 4 channel groups per SM (Llama-3-8B: gate_up's 28672 x 4096):
    16-token tiles by TMA, in the largest cluster split-K (>= 8 k-tiles per CTA) whose CTAs fit four per SM (126
    registers: four CTAs of one warpgroup fill the register file), so all run in one wave (28672 x 4096: 224 tiles
    x 2 = 448 CTAs, 27.9-28.3 us against the GEMV's 30.2-30.7 in three H100 runs, NOTES.md)."""
    return SwapConfig(16, cluster=_fit_cluster(math.ceil(np_ / 128), kt, sms, per_sm=4), tma=True)


def _choose_gemv(m: int, ngroups: int, kt: int, sms: int, cc: int) -> GemvConfig:
    """GEMV shape by token blocks (tb = ceil(M/8)), 32-channel groups per SM and K; measured on H100
    (`python -m qoq.bench.gemm --tune-gemv`, NOTES.md). sm_90 (programmatic dependent launch, M <= 16):
    M <= 8: 8 warps x 2 k-tiles with >= 4 groups per SM, 32 warps x 1 k-tile on long K or with no more groups
    than SMs, else 16 warps x 2; M = 9-16: 4 warps x 1 k-tile x 2 n-tiles with >= 4 groups per SM, else 16
    warps x 1 k-tile (a 2-CTA cluster split-K on long K), or 16 x 2 with no more groups than SMs; PDL off with
    >= 4 groups per SM (several small CTAs per SM: the next call's CTAs landed unevenly, 28672x4096 M=1
    24-41 us). Without sm_90: 8 warps x 2 with >= 4 groups per SM, 32 warps (M <= 8) or 8 warps x 4 (M > 8) on
    long K, else 16 x 2 (8 x 4 for M > 8 with more groups than SMs). M = 17-32: 8 warps x 2 k-tiles, or with
    >= 4 groups per SM 4 warps x 1 k-tile x 2 n-tiles (the activations, re-read by every CTA, serve twice the
    channels). M = 33-64: 4 warps x 2-CTA cluster split-K (sm_90) on long K or with more groups than SMs, else
    8 warps x 2 k-tiles. PDL is off above M = 16 (measured neutral to 30 % slower there)."""
    tb = (m + 7) // 8
    if tb > 4:
        if cc >= 90 and (kt >= 256 or ngroups > sms):
            return GemvConfig(tb, warps=4, u=2 if kt >= 256 else 1, cluster=2, pdl=False)
        return GemvConfig(tb, warps=8, u=2, pdl=False)
    if tb > 2:
        return (GemvConfig(tb, nt=2, warps=4, u=1, pdl=False) if ngroups >= 4 * sms
                else GemvConfig(tb, warps=8, u=2, pdl=False))
    long_k, many = kt >= 256, ngroups >= 4 * sms
    if cc >= 90:
        if tb == 1:
            if many:  # (several 8-warp CTAs per SM: PDL landed the next call's CTAs unevenly, 24-41 µs on 28672)
                return GemvConfig(1, warps=8, u=2, pdl=False)
            return GemvConfig(1, warps=32, u=1) if long_k or ngroups <= sms else GemvConfig(1, warps=16, u=2)
        if many:  # (as at M = 17-32: the activations serve twice the channels, 4-way instead of 16-way partials)
            return GemvConfig(2, nt=2, warps=4, u=1, pdl=False)
        if long_k:
            return GemvConfig(2, warps=16, u=1, cluster=2)
        return GemvConfig(2, warps=16, u=1) if ngroups > sms else GemvConfig(2, warps=16, u=2)
    if many:
        return GemvConfig(tb, warps=8, u=2)
    if long_k:
        return GemvConfig(tb, warps=32, u=2) if tb == 1 else GemvConfig(tb, warps=8, u=4)
    return GemvConfig(tb, warps=8, u=4) if tb == 2 and ngroups > sms else GemvConfig(tb, warps=16, u=2)


def gemv_slices_fit(cfg: GemvConfig) -> bool:
    """The per-warp shared-memory slices of the cross-warp reduction fit (gemm.cu GemvRed::PARTIALS)."""
    return cfg.warps * cfg.tb * 8 * (cfg.nt * 32 + 4) * 4 <= 40960


def variant_for(cfg: GemvConfig | GemmConfig, grouped: bool, smem_optin: int = 227 * 1024):
    """(kernel variant, dynamic shared memory bytes) of a configuration."""
    if isinstance(cfg, IntMMConfig):
        return (DEQUANT_G if grouped else DEQUANT_C), 0
    if isinstance(cfg, WgmmaConfig):
        return B.wgmma_variant(cfg.stages, grouped, cfg.min_blocks), B.wgmma_smem_bytes(cfg.stages)
    if isinstance(cfg, TmaConfig):
        return (B.wgmma_tma_variant(cfg.bn, cfg.stages, cfg.min_blocks, cfg.cluster),
                B.wgmma_tma_smem_bytes(cfg.bn, cfg.stages))
    if isinstance(cfg, SwapConfig):
        return (B.wgmma_swap_variant(cfg.bt, cfg.stages, cfg.pf, cfg.cluster, grouped, cfg.min_blocks, cfg.overlap,
                                     cfg.tma),
                B.wgmma_swap_smem_bytes(cfg.bt, cfg.stages, cfg.cluster))
    if isinstance(cfg, GemvConfig):
        return B.gemv_variant(cfg.tb, cfg.nt, grouped, cfg.warps, cfg.u, cfg.red, cfg.cluster, cfg.early_trigger), 0
    stages = cfg.stages
    while stages > 2 and B.gemm_smem_bytes(cfg.bm, cfg.bn, stages, grouped) > smem_optin:
        stages -= 1
    return (B.gemm_variant(cfg.bm, cfg.bn, cfg.wm, cfg.wn, stages, grouped, cfg.min_blocks),
            B.gemm_smem_bytes(cfg.bm, cfg.bn, stages, grouped))


def _plan_gemv(cfg: GemvConfig, ngroups: int, kt: int, sms: int) -> tuple[int, int]:
    """(splits, k-tiles per split): split K over CTAs only when the n-groups cannot keep half the SMs busy
    (the cross-CTA reduction costs global round trips at the end of the kernel); a cluster config always
    launches `cluster` splits (trailing ones may get no k-tiles)."""
    unit = cfg.warps * cfg.u
    if cfg.cluster > 1:
        return cfg.cluster, math.ceil(math.ceil(kt / cfg.cluster) / unit) * unit
    if cfg.splits is not None:
        s0 = max(1, cfg.splits)
    else:
        s0 = 1 if 2 * ngroups >= sms else math.ceil(sms / ngroups)
    tps = math.ceil(math.ceil(kt / s0) / unit) * unit
    return math.ceil(kt / tps), tps


def _plan_gemm(cfg: GemmConfig, tiles: int, kt: int, sms: int) -> tuple[int, int]:
    if cfg.splits is not None:
        s0 = max(1, cfg.splits)
    elif tiles >= sms:
        s0 = 1
    else:
        s0 = max(1, min(math.ceil(1.5 * sms / tiles), kt // 8))
    tps = math.ceil(math.ceil(kt / s0) / 4) * 4
    return math.ceil(kt / tps), tps


_workspaces: dict = {}


def _workspace(device: int, name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
    key = (device, name)  # one per device: kernels on one stream; warm up before graph capture
    t = _workspaces.get(key)
    if t is None or t.numel() < numel:
        t = torch.zeros(max(numel, 1 << 16), dtype=dtype, device=torch.device("cuda", device))
        _workspaces[key] = t
    return t


def w4a8_linear(a: QuantAct, w: QLinear, out_dtype: torch.dtype = torch.float16, out: torch.Tensor | None = None,
                config: GemvConfig | GemmConfig | IntMMConfig | WgmmaConfig | SwapConfig | TmaConfig | None = None,
                ) -> torch.Tensor:
    """y [M, N] = ops.w4a8_linear(a, w, out_dtype); out_dtype=torch.int32 returns the raw int32 accumulators."""
    q = a.q
    if q.dim() != 2 or q.dtype != torch.int8:
        raise ValueError(f"activations must be int8 [M, Kp], got {q.dtype} {tuple(q.shape)}")
    m, kp = q.shape
    np_, half_k = w.qweight.shape
    if kp != 2 * half_k:
        raise ValueError(f"activation width {kp} != the layer's padded in_features {2 * half_k}")
    if out_dtype not in DTYPE_CODES:
        raise ValueError(f"unsupported out_dtype {out_dtype}")
    n = w.out_features
    dev = q.device
    if out is None:
        out = torch.empty(m, n, dtype=out_dtype, device=dev)
    elif out.shape != (m, n) or out.dtype != out_dtype or not out.is_contiguous():
        raise ValueError("out must be a contiguous [M, N] tensor of out_dtype")
    if m == 0:
        return out
    grouped = not w.per_channel
    if not grouped and a.qsum is None and out_dtype != torch.int32:
        raise ValueError("per-channel weights need QuantAct.qsum (quantize with with_qsum=True)")
    q = q.contiguous()
    qw = w.qweight.contiguous()
    if grouped:
        s2, z2 = w.s2_scales.contiguous(), w.s2_zeros.contiguous()
        log2g = int(math.log2(w.group_size))
        if 1 << log2g != w.group_size or w.group_size < 32:
            raise ValueError(f"group size {w.group_size} is not a power of two >= 32")
    else:
        s2 = z2 = None
        log2g = 0
    s1 = w.s1.contiguous()
    szeros = None if grouped else w.szeros.contiguous()
    bias = w.bias
    bias_dt = 0
    if bias is not None:
        bias = bias.contiguous()
        bias_dt = DTYPE_CODES[bias.dtype]
    scale = a.scale.float().contiguous()
    qsum = None if a.qsum is None else a.qsum.to(torch.int32).contiguous()
    for t in (q, qw, s2, z2):
        if t is not None and t.data_ptr() % 16:
            raise ValueError("kernel operands must be 16-byte aligned")

    device = dev.index if dev.index is not None else torch.cuda.current_device()
    info = B.device_info(device)
    sms = info["sms"]
    cfg = config or choose_config(m, np_, kp, sms, cc=info["cc"], grouped=grouped)
    if isinstance(cfg, IntMMConfig):
        _intmm_linear(cfg, q, qw, s2, z2, log2g, grouped, s1, szeros, bias, bias_dt, scale, qsum, out, out_dtype,
                      m, n, np_, kp, device)
        return out
    if isinstance(cfg, TmaConfig):
        _tma_linear(cfg, q, qw, s2, z2, log2g, grouped, s1, szeros, bias, bias_dt, scale, qsum, out, out_dtype,
                    m, n, np_, kp, device, info)
        return out
    kt = kp // 32
    variant, smem = variant_for(cfg, grouped, info["smem_optin"])
    if isinstance(cfg, WgmmaConfig):
        if info["cc"] != 90:
            raise ValueError(f"WgmmaConfig needs compute capability 9.0 (sm_90a), this GPU has {info['cc']}")
        grid, block = (math.ceil(m / 128) * math.ceil(np_ / 128), 1, 1), (256, 1, 1)
        splits, tps, ncounters = 1, kt, 0
        s1, szeros = _aligned4(s1), _aligned4(szeros)  # its epilogue reads channel-scale pairs as 32-bit words
    elif isinstance(cfg, SwapConfig):
        if info["cc"] != 90:
            raise ValueError(f"SwapConfig needs compute capability 9.0 (sm_90a), this GPU has {info['cc']}")
        if cfg.bt % 16 or not 16 <= cfg.bt <= 128 or not 1 <= cfg.cluster <= 8:
            raise ValueError(f"{cfg}: bt must be 16, 32, ..., 128 and cluster 1..8")
        if cfg.overlap and (cfg.stages < 3 or cfg.pf % 2 or cfg.tma):
            raise ValueError(f"{cfg}: the overlapped kernel needs stages >= 3, an even pf and no tma")
        splits, tps = cfg.cluster, _swap_k_tiles(kt, cfg.cluster)
        grid, block = (math.ceil(np_ / 128), math.ceil(m / cfg.bt), splits), (128, 1, 1)
        ncounters = 0
    elif isinstance(cfg, GemvConfig):
        if m > 8 * cfg.tb:
            raise ValueError(f"GemvConfig(tb={cfg.tb}) handles M <= {8 * cfg.tb}, got {m}")
        if cfg.cluster > 1 and info["cc"] < 90:
            raise ValueError(f"GemvConfig(cluster={cfg.cluster}) needs sm_90 or newer")
        if cfg.cluster > 1 and not gemv_slices_fit(cfg):
            raise ValueError(f"{cfg}: a cluster split-K needs warps * tb * 8 * (nt * 32 + 4) * 4 <= 40960 bytes")
        ngroups = math.ceil((np_ // 32) / cfg.nt)
        splits, tps = _plan_gemv(cfg, ngroups, kt, sms)
        grid, block = (ngroups, splits, 1), (cfg.warps * 32, 1, 1)
        ncounters = ngroups
    else:
        mt, ntl = math.ceil(m / cfg.bm), math.ceil(np_ / cfg.bn)
        splits, tps = _plan_gemm(cfg, mt * ntl, kt, sms)
        grid, block = (mt, ntl, splits), (cfg.wm * cfg.wn * 32, 1, 1)
        ncounters = mt * ntl
    if splits > 1 and not getattr(cfg, "cluster", 1) > 1:
        ws = _workspace(device, "gemm_partials", splits * m * np_, torch.int32)
        counters = _workspace(device, "gemm_counters", ncounters, torch.int32)
    else:
        ws = counters = None
    args = (B.ptr(q), B.ptr(scale), B.ptr(qsum), B.ptr(qw), B.ptr(s2), B.ptr(z2), B.ptr(s1), B.ptr(szeros),
            B.ptr(bias), B.i32(bias_dt), B.ptr(out), B.i32(DTYPE_CODES[out_dtype]), B.ptr(ws), B.ptr(counters),
            B.i32(m), B.i32(n), B.i32(np_), B.i32(kp), B.i32(log2g), B.i32(splits), B.i32(tps))
    if isinstance(cfg, SwapConfig) and cfg.tma:
        args += (B.tensor_map_2d(q, cfg.bt),)
    pdl = isinstance(cfg, GemvConfig) and cfg.pdl and info["cc"] >= 90 and PDL_ENABLED
    B.launch(variant, device, grid, block, args, smem, pdl=pdl)
    return out


def _tma_linear(cfg: TmaConfig, q, qw, s2, z2, log2g, grouped, s1, szeros, bias, bias_dt, scale, qsum, out,
                out_dtype, m, n, np_, kp, device, info) -> None:
    if info["cc"] != 90:
        raise ValueError(f"TmaConfig needs compute capability 9.0 (sm_90a), this GPU has {info['cc']}")
    if cfg.bn not in (128, 256) or cfg.stages < 2 or cfg.cluster not in (1, 2):
        raise ValueError(f"{cfg}: bn must be 128 or 256, stages >= 2 and cluster 1 or 2")
    variant, smem = variant_for(cfg, grouped)
    if smem > info["smem_optin"]:
        raise ValueError(f"{cfg}: its ring ({smem} bytes) does not fit shared memory ({info['smem_optin']})")
    w8 = _workspace(device, "w8_scratch", np_ * kp, torch.int8)[: np_ * kp].view(np_, kp)
    _dequant(qw, s2, z2, log2g, grouped, w8, kp, device)
    s1, szeros = _aligned4(s1), _aligned4(szeros)  # the epilogue reads channel-scale pairs as 32-bit words
    args = (B.tensor_map_2d(q, 128), B.tensor_map_2d(w8, cfg.bn // cfg.cluster), B.ptr(scale), B.ptr(qsum), B.ptr(s1),
            B.ptr(szeros), B.ptr(bias), B.i32(bias_dt), B.ptr(out), B.i32(DTYPE_CODES[out_dtype]), B.i32(m),
            B.i32(n), B.i32(np_), B.i32(kp))
    units = math.ceil(math.ceil(m / 128) / cfg.cluster) * math.ceil(np_ / cfg.bn)  # a tile per CTA of a cluster
    clusters = min(units, B.resident_ctas(variant, device, 288, smem, cfg.cluster) // cfg.cluster)
    grid = (clusters * cfg.cluster, 1, 1)
    B.launch(variant, device, grid, (288, 1, 1), args, smem)


def _swap_k_tiles(kt: int, cluster: int) -> int:
    """k-tiles per CTA of a swap-kernel cluster: whole 128-wide stages (trailing CTAs may get none)."""
    return math.ceil(math.ceil(kt / cluster) / 4) * 4


def _aligned4(t: torch.Tensor | None) -> torch.Tensor | None:
    return t if t is None or t.data_ptr() % 4 == 0 else t.clone()


def dequant_int8_weight(w: QLinear) -> torch.Tensor:
    """The int8 [Np, Kp] operand ops.int8_weight(w) computes, by the dequant kernel (a fresh tensor)."""
    np_, half_k = w.qweight.shape
    kp = 2 * half_k
    dst = torch.empty(np_, kp, dtype=torch.int8, device=w.qweight.device)
    device = dst.device.index if dst.device.index is not None else torch.cuda.current_device()
    grouped = not w.per_channel
    _dequant(w.qweight.contiguous(), w.s2_scales.contiguous() if grouped else None,
             w.s2_zeros.contiguous() if grouped else None, int(math.log2(w.group_size)) if grouped else 0,
             grouped, dst, kp, device)
    return dst


def _dequant(qw, s2, z2, log2g, grouped, dst, kp, device) -> None:
    """dst [rows, Kp] int8 = the channels of qw [rows, Kp/2] (s2 / z2: [Kp/g, rows] views, any row stride)."""
    grid = (math.ceil(kp // 32 / 8), qw.shape[0] // 32, 1)
    B.launch(DEQUANT_G if grouped else DEQUANT_C, device, grid, (256, 1, 1),
             (B.ptr(qw), B.ptr(s2), B.ptr(z2), B.ptr(dst), B.i32(s2.stride(0) if grouped else 0), B.i32(kp),
              B.i32(log2g)))


def _intmm_linear(cfg: IntMMConfig, q, qw, s2, z2, log2g, grouped, s1, szeros, bias, bias_dt, scale, qsum, out,
                  out_dtype, m, n, np_, kp, device) -> None:
    if m <= 16 or kp % 8 or np_ % 8:
        raise ValueError(f"IntMMConfig needs M > 16 and K, N multiples of 8 (torch._int_mm), got M={m}")
    chunk = np_ if not cfg.n_chunk or cfg.n_chunk >= np_ else cfg.n_chunk
    if chunk % 32:
        raise ValueError(f"IntMMConfig.n_chunk must be a multiple of 32, got {chunk}")
    scratch = _workspace(device, "w8_scratch", chunk * kp, torch.int8)
    for c0 in range(0, n, chunk):  # chunks past N would hold padding channels only
        c1 = min(np_, c0 + chunk)
        w8 = scratch[: (c1 - c0) * kp].view(c1 - c0, kp)
        cols = slice(c0, c1)
        _dequant(qw[cols], None if s2 is None else s2[:, cols], None if z2 is None else z2[:, cols], log2g,
                 grouped, w8, kp, device)
        nc = min(n, c1) - c0
        _intmm_rows(cfg, q, w8, s1[c0:], None if szeros is None else szeros[c0:],
                    None if bias is None else bias[c0:], bias_dt, scale, qsum, out[:, c0:], out_dtype, m, nc, device)


def _intmm_rows(cfg, q, w8, s1, szeros, bias, bias_dt, scale, qsum, out, out_dtype, m, nc, device) -> None:
    """out[:, :nc] (row stride out.stride(0)) = epilogue(q @ w8^T) for the channels of one column chunk."""
    npc = w8.shape[0]
    rows = max(32, (cfg.max_acc_bytes // (4 * npc)) // 32 * 32)
    r0 = 0
    while r0 < m:
        r1 = m if m - r0 <= rows + 16 else r0 + rows  # chunks of `rows`; the last one keeps M > 16
        acc = torch._int_mm(q[r0:r1], w8.t())
        if out_dtype == torch.int32:
            out[r0:r1, :nc].copy_(acc[:, :nc])
            r0 = r1
            continue
        mc = r1 - r0
        grid = (math.ceil(math.ceil(nc / 8) / 128), min(mc, 65535), 1)
        args = (B.ptr(acc), B.ptr(scale[r0:r1]), B.ptr(None if qsum is None else qsum[r0:r1]), B.ptr(s1),
                B.ptr(szeros), B.ptr(bias), B.i32(bias_dt), B.ptr(out[r0:r1]), B.i32(DTYPE_CODES[out_dtype]),
                B.i32(mc), B.i32(nc), B.i32(npc), B.i32(out.stride(0)))
        B.launch(EPILOGUE, device, grid, (128, 1, 1), args)
        r0 = r1


DEFAULT_CONFIGS = tuple(GemvConfig(tb, warps=w, u=u, cluster=cl) for tb in (1, 2)
                        for w, u, cl in ((16, 2, 1), (8, 2, 1), (32, 2, 1), (8, 4, 1), (8, 4, 2), (8, 2, 2),
                                         (32, 1, 1), (16, 1, 1), (16, 1, 2))) + tuple(
    GemvConfig(tb, nt=nt, warps=w, u=u) for tb in (3, 4) for nt, w, u in ((1, 8, 2), (2, 4, 1))) + (
    GemvConfig(2, nt=2, warps=4, u=1, pdl=False),) + tuple(
    GemvConfig(tb, warps=w, u=u, cluster=cl) for tb in (5, 6, 7, 8)
    for w, u, cl in ((8, 2, 1), (4, 1, 2), (4, 2, 2))) + (
    GemmConfig(32, 128, 1, 4, 4, 3), GemmConfig(64, 128, 2, 2, 4, 2), GemmConfig(128, 128, 2, 4, 4, 2),
    WgmmaConfig(), TmaConfig(), TmaConfig(128, 3, 2), TmaConfig(256, 4, cluster=2),
    TmaConfig(128, 6, cluster=2)) + tuple(
    SwapConfig(bt, cluster=cl, tma=True) for bt in (16, 32, 64, 128) for cl in (1, 2, 4, 8)) + (
    SwapConfig(128, cluster=1), SwapConfig(128, cluster=2))


def default_variants() -> list:
    """Every GEMM variant `choose_config` can pick (for compile checks and precompilation)."""
    variants = [variant_for(cfg, grouped)[0] for grouped in (True, False) for cfg in DEFAULT_CONFIGS] + [
        DEQUANT_G, DEQUANT_C, EPILOGUE]
    return list(dict.fromkeys(variants))  # (the TMA GEMM serves both weight kinds)
