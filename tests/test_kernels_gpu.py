"""Every CUDA kernel of qoq.runtime_kernels against its torch reference twin in qoq.scheme.ops (GPU only)."""
import functools

import pytest
import torch

from qoq.scheme.progressive import quantize_weight
from qoq.formats.artifact import quantized_tensors
from qoq.scheme import ops
from qoq.scheme.ops import KV4Cache, QLinear

try:
    import qoq.runtime_kernels as K
    _AVAILABLE = K.available()
except Exception:  # pragma: no cover
    _AVAILABLE = False

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _AVAILABLE, reason="needs CUDA and cupy")]

DEV = "cuda"
GROUPS = [32, 64, 128, -1]


def _gen(seed):
    g = torch.Generator(device=DEV)
    g.manual_seed(seed)
    return g


def _randn(*shape, seed=0, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=_gen(seed), device=DEV) * scale).to(dtype)


@functools.lru_cache(maxsize=None)
def _linear(n, k, group, bias=False, seed=0):
    w = _randn(n, k, seed=seed, scale=0.05)
    # a few outlier rows/columns so groups see different ranges
    w[:, :: max(1, k // 7)] *= 4
    qw = quantize_weight(w, group)
    b = _randn(n, seed=seed + 1) if bias else None
    return QLinear.from_tensors(quantized_tensors("l", qw, b), "l", n, k, group, device=DEV)


def _act(m, k, kp, per_channel, seed=0):
    x = _randn(m, k, seed=seed, dtype=torch.float16)
    return ops.quantize_act(x, kp, with_qsum=per_channel)


@pytest.fixture(scope="module", autouse=True)
def _precompiled():
    """Compile every variant these tests use in parallel threads up front (NVRTC, ~5 s per GEMM variant)."""
    from qoq.runtime_kernels import _build as B
    from qoq.runtime_kernels.quant import launch_shape

    from qoq.runtime_kernels.gemm import variant_for

    extra = [variant_for(cfg, grouped)[0] for grouped in (True, False) for _, _, cfg in _configs()]
    extra += [variant_for(cfg, grouped)[0] for grouped in (True, False) for cfg in _wgmma_configs()]
    extra += [variant_for(cfg, grouped)[0] for grouped in (True, False) for cfg in _swap_configs()]
    for kp in (128, 576, 1536, 4096, 4128, 4160, 14336):
        threads, ch = launch_shape(kp)
        extra += [B.rowquant_variant(dt, mode, ch, threads) for dt in (0, 1, 2) for mode in (0, 1, 2, 3)]
    K.precompile(K.all_variants() + extra)


def _ref_acc(a, w):
    return ops.int_matmul(a.q, ops.int8_weight(w))[:, : w.out_features]


# ---- activation quantization -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m,k,kp", [(1, 576, 576), (3, 1536, 1536), (17, 4096, 4128), (128, 100, 128),
                                    (1000, 14336, 14336), (5, 4099, 4160)])
def test_quantize_act_exact(dtype, m, k, kp):
    x = _randn(m, k, seed=m + k, dtype=dtype, scale=3.0)
    x[0, 5 % k] = 0  # zeros and a zero row
    if m > 2:
        x[2] = 0
    ref = ops.quantize_act(x, kp, with_qsum=True)
    got = K.quantize_act(x, kp, with_qsum=True)
    assert got.q.shape == (m, kp)
    assert torch.equal(got.q, ref.q)
    assert torch.equal(got.scale, ref.scale)
    assert torch.equal(got.qsum, ref.qsum)
    got2 = K.quantize_act(x, kp)
    assert got2.qsum is None and torch.equal(got2.q, ref.q)


def _assert_nearly_equal_q(got, ref, frac=1e-3):
    d = (got.q.int() - ref.q.int()).abs()
    assert int(d.max()) <= 1, f"max int8 difference {int(d.max())}"
    assert int((d > 0).sum()) <= max(1, int(frac * d.numel())), f"{int((d > 0).sum())} of {d.numel()} differ"
    torch.testing.assert_close(got.scale, ref.scale, rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,k,kp", [(1, 576, 576), (16, 4096, 4096), (300, 1536, 1536), (7, 14336, 14336),
                                    (33, 100, 128)])
def test_rmsnorm_quantize(dtype, m, k, kp):
    x = _randn(m, k, seed=k, dtype=dtype, scale=2.0)
    w = (1 + _randn(k, seed=k + 1, scale=0.1)).to(dtype)
    ref = ops.rmsnorm_quantize(x, w, 1e-5, kp, with_qsum=True)
    got = K.rmsnorm_quantize(x, w, 1e-5, kp, with_qsum=True)
    _assert_nearly_equal_q(got, ref)
    assert (got.qsum - ref.qsum).abs().max() <= max(1, int(1e-3 * k))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m,k,kp", [(1, 576, 576), (16, 4096, 4096), (300, 1536, 1536), (7, 14336, 14336),
                                    (33, 100, 128), (5, 4099, 4160)])
def test_add_rmsnorm_quantize(dtype, m, k, kp):
    h = _randn(m, k, seed=k + 7, dtype=dtype, scale=2.0)
    delta = _randn(m, k, seed=k + 8, dtype=dtype, scale=0.5)
    w = (1 + _randn(k, seed=k + 1, scale=0.1)).to(dtype)
    want_h = h + delta
    ref = ops.add_rmsnorm_quantize(h.clone(), delta, w, 1e-5, kp, with_qsum=True)
    same_kernel = K.rmsnorm_quantize(want_h, w, 1e-5, kp, with_qsum=True)
    got_h = h.clone()
    got = K.add_rmsnorm_quantize(got_h, delta, w, 1e-5, kp, with_qsum=True)
    assert torch.equal(got_h, want_h)  # the residual stream: the same bits as torch's add
    for f in ("q", "scale", "qsum"):  # the fused add changes nothing downstream of the sum
        assert torch.equal(getattr(got, f), getattr(same_kernel, f))
    _assert_nearly_equal_q(got, ref)


@pytest.mark.parametrize("mode", [0, 1, 2, 3])
@pytest.mark.parametrize("cluster", [2, 4, 8])
@pytest.mark.parametrize("m,k,kp", [(1, 14336, 14336), (3, 4096, 4096), (5, 4099, 4160), (2, 576, 576)])
def test_row_kernels_split_over_a_cluster(mode, cluster, m, k, kp):
    from qoq.runtime_kernels.quant import rowquant

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("thread-block clusters need sm_90")
    x = _randn(m, k, seed=k + mode, dtype=torch.float16, scale=2.0)
    x2 = (1 + _randn(k, seed=k + 1, scale=0.1)).half() if mode in (1, 3) else (
        _randn(m, k, seed=k + 2, dtype=torch.float16) if mode == 2 else None)
    res = _randn(m, k, seed=k + 3, dtype=torch.float16, scale=0.5) if mode == 3 else None
    x_want, x_got = x.clone(), x.clone()
    want = rowquant(mode, x_want, x2, 1e-5, kp, True, res=res, cluster=1)
    got = rowquant(mode, x_got, x2, 1e-5, kp, True, res=res, cluster=cluster)
    assert torch.equal(x_got, x_want)  # (updated in place by mode 3)
    if mode in (1, 3):  # the fp64 sum of squares is folded in another order: equal but for rounding ties
        _assert_nearly_equal_q(got, want)
        assert (got.qsum - want.qsum).abs().max() <= max(1, int(1e-3 * k))
    else:
        for f in ("q", "scale", "qsum"):
            assert torch.equal(getattr(got, f), getattr(want, f)), f


def test_add_rmsnorm_quantize_needs_contiguous_rows():
    h = _randn(4, 2 * 576, seed=3, dtype=torch.float16).t()  # columns: rows not contiguous
    w = torch.ones(4, dtype=torch.float16, device=DEV)
    with pytest.raises(ValueError, match="in place"):
        K.add_rmsnorm_quantize(h, h.clone(), w, 1e-5, 8)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m,k,kp", [(1, 1536, 1536), (17, 14336, 14336), (1000, 576, 576), (3, 100, 128)])
def test_silu_mul_quantize(dtype, m, k, kp):
    gate = _randn(m, k, seed=k + 2, dtype=dtype, scale=3.0)
    up = _randn(m, k, seed=k + 3, dtype=dtype, scale=2.0)
    ref = ops.silu_mul_quantize(gate, up, kp, with_qsum=True)
    got = K.silu_mul_quantize(gate, up, kp, with_qsum=True)
    _assert_nearly_equal_q(got, ref)


def test_quantize_into_preallocated_and_strided_input():
    x = _randn(8, 2 * 576, seed=9, dtype=torch.float16)[:, :576]  # row stride 1152
    out = ops.QuantAct(q=torch.empty(8, 576, dtype=torch.int8, device=DEV),
                       scale=torch.empty(8, device=DEV), qsum=torch.empty(8, dtype=torch.int32, device=DEV))
    got = K.quantize_act(x, 576, with_qsum=True, out=out)
    ref = ops.quantize_act(x, 576, with_qsum=True)
    assert got.q.data_ptr() == out.q.data_ptr()
    assert torch.equal(got.q, ref.q) and torch.equal(got.qsum, ref.qsum)


# ---- W4A8 GEMM ---------------------------------------------------------------------------------------------

MS = [1, 3, 16, 17, 33, 64, 128, 1000]
NKS = [(32, 576), (192, 1536), (576, 4128), (4096, 4096)]


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("n,k", NKS)
def test_w4a8_linear_matches_reference(group, n, k):
    w = _linear(n, k, group)
    for m in MS:
        a = _act(m, k, w.padded_in, w.per_channel, seed=m)
        acc = K.w4a8_linear(a, w, out_dtype=torch.int32)
        assert torch.equal(acc, _ref_acc(a, w)), f"int32 accumulators differ at M={m}"
        for dt in (torch.float16, torch.float32):
            y = K.w4a8_linear(a, w, out_dtype=dt)
            ref = ops.w4a8_linear(a, w, out_dtype=dt)
            assert torch.equal(y, ref), f"{dt} output differs at M={m}: {(y.float() - ref.float()).abs().max()}"


@pytest.mark.parametrize("group", [128, -1])
def test_w4a8_bias_odd_n_bf16(group):
    n, k = 40, 100  # N and K not multiples of the tile: padded to 64 x 128
    w = _linear(n, k, group, bias=True)
    for m in (1, 5, 40):
        a = _act(m, k, w.padded_in, w.per_channel, seed=m)
        for dt in (torch.float16, torch.bfloat16, torch.float32):
            assert torch.equal(K.w4a8_linear(a, w, out_dtype=dt), ops.w4a8_linear(a, w, out_dtype=dt))


def _configs():
    from qoq.runtime_kernels.gemm import GemmConfig, GemvConfig
    return [
        ("gemv_tb1_s1", 8, GemvConfig(tb=1, splits=1)),
        ("gemv_tb2_s5", 16, GemvConfig(tb=2, splits=5)),
        ("gemv_tb1_nt2_w4_u2_s3", 7, GemvConfig(tb=1, nt=2, warps=4, u=2, splits=3)),
        ("gemv_tb2_nt2_w16_u2", 12, GemvConfig(tb=2, nt=2, warps=16, u=2)),
        ("gemv_tb2_atomic_red", 13, GemvConfig(tb=2, warps=8, u=4, red=0)),
        ("gemv_tb2_w32_wide_red", 16, GemvConfig(tb=2, nt=1, warps=32, u=2)),  # slices > 40 KB: atomics
        ("gemv_tb1_w16_u4_s2", 3, GemvConfig(tb=1, warps=16, u=4, splits=2)),
        ("gemv_tb4_nt2_w4_u1", 32, GemvConfig(tb=4, nt=2, warps=4, u=1)),
        ("gemv_tb3_w8_u2_s3", 20, GemvConfig(tb=3, warps=8, u=2, splits=3)),
        ("gemv_tb8_w8_u2", 64, GemvConfig(tb=8, warps=8, u=2)),
        ("gemv_tb6_w4_u1_s2", 41, GemvConfig(tb=6, warps=4, u=1, splits=2)),
        ("gemm32_s1", 33, GemmConfig(32, 128, 1, 4, 4, 3, splits=1)),
        ("gemm64_s4", 100, GemmConfig(64, 128, 2, 2, 4, 2, splits=4)),
        ("gemm128_s3", 300, GemmConfig(128, 128, 2, 2, 4, 2, splits=3)),
        ("gemm128_s1_m1", 1, GemmConfig(128, 128, 2, 2, 4, 2, splits=1)),
        ("gemm128_s2_3stages", 130, GemmConfig(128, 128, 2, 2, 3, 2, splits=2)),
        ("gemm128x256_s1", 200, GemmConfig(128, 256, 2, 4, 3, 1, splits=1)),
        ("gemm256x128_s2", 260, GemmConfig(256, 128, 4, 2, 3, 1, splits=2)),
        ("gemm128x128_w2x4", 129, GemmConfig(128, 128, 2, 4, 4, 2)),
    ]


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("m,cfg_kw", [(1, dict(tb=1, cluster=2)), (8, dict(tb=1, warps=8, u=2, cluster=4)),
                                      (64, dict(tb=8, warps=4, u=2, cluster=2)),
                                      (37, dict(tb=5, warps=4, u=1, cluster=2)),
                                      (16, dict(tb=2, warps=8, u=4, cluster=2)), (11, dict(tb=2, cluster=4))])
def test_w4a8_gemv_cluster_split_k(group, m, cfg_kw):
    """sm_90 thread-block-cluster split-K (DSMEM reduction), including clusters whose last CTAs get no k-tiles."""
    from qoq.runtime_kernels.gemm import GemvConfig

    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("thread-block clusters need sm_90")
    cfg = GemvConfig(**cfg_kw)
    for n, k in [(192, 1536), (576, 4128), (40, 100)]:
        w = _linear(n, k, group)
        a = _act(m, k, w.padded_in, w.per_channel, seed=m + n)
        assert torch.equal(K.w4a8_linear(a, w, out_dtype=torch.int32, config=cfg), _ref_acc(a, w))
        assert torch.equal(K.w4a8_linear(a, w, config=cfg), ops.w4a8_linear(a, w))


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("name,m,cfg", _configs(), ids=[c[0] for c in _configs()])
def test_w4a8_every_tile_config_and_split(group, name, m, cfg):
    for n, k in [(192, 1536), (576, 4128)]:
        w = _linear(n, k, group)
        a = _act(m, k, w.padded_in, w.per_channel, seed=m + n)
        ref = _ref_acc(a, w)
        for _ in range(2):  # twice: the split-K counters must reset themselves
            acc = K.w4a8_linear(a, w, out_dtype=torch.int32, config=cfg)
            assert torch.equal(acc, ref)
        assert torch.equal(K.w4a8_linear(a, w, config=cfg), ops.w4a8_linear(a, w))


LARGE_MS = [512, 1000, 2048]


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("n,k", [(576, 4128), (4096, 4096)])
def test_w4a8_large_m_intmm_path(group, n, k):
    """M >= 512: dequant kernel + torch._int_mm + epilogue kernel (the default) vs ops.py; int32 exact."""
    from qoq.runtime_kernels.gemm import IntMMConfig, choose_config, dequant_int8_weight

    w = _linear(n, k, group)
    assert torch.equal(dequant_int8_weight(w), ops.int8_weight(w))
    for m in LARGE_MS:
        assert isinstance(choose_config(m, w.qweight.shape[0], w.padded_in, 132, cc=80), IntMMConfig)
        a = _act(m, k, w.padded_in, w.per_channel, seed=m + 7)
        ref_acc = _ref_acc(a, w)
        assert torch.equal(K.w4a8_linear(a, w, out_dtype=torch.int32), ref_acc), f"int32 differs at M={m}"
        for dt in (torch.float16, torch.bfloat16, torch.float32):
            y = K.w4a8_linear(a, w, out_dtype=dt)
            ref = ops.w4a8_linear(a, w, out_dtype=dt)
            assert torch.equal(y, ref), f"{dt} differs at M={m}: {(y.float() - ref.float()).abs().max()}"
        # row chunks (small accumulator budget) and out=
        out = torch.empty(m, n, dtype=torch.float16, device=DEV)
        got = K.w4a8_linear(a, w, out=out, config=IntMMConfig(max_acc_bytes=4 * w.qweight.shape[0] * 200))
        assert got.data_ptr() == out.data_ptr() and torch.equal(got, ops.w4a8_linear(a, w))
        acc_out = torch.empty(m, n, dtype=torch.int32, device=DEV)
        K.w4a8_linear(a, w, out_dtype=torch.int32, out=acc_out, config=IntMMConfig(max_acc_bytes=4 * 128 * 1024))
        assert torch.equal(acc_out, ref_acc)
        # output-channel chunks (L2-resident scratch), alone and with row chunks; 96 leaves a ragged last chunk
        for cfg in (IntMMConfig(n_chunk=96), IntMMConfig(n_chunk=1024, max_acc_bytes=4 * 1024 * 300)):
            assert torch.equal(K.w4a8_linear(a, w, out_dtype=torch.int32, config=cfg), ref_acc)
            assert torch.equal(K.w4a8_linear(a, w, config=cfg), ops.w4a8_linear(a, w))


def _wgmma_configs():
    from qoq.runtime_kernels.gemm import WgmmaConfig
    return [WgmmaConfig(4, 1), WgmmaConfig(3, 2)]


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("n,k", [(576, 4128), (4096, 4096), (40, 100), (192, 1536)])
def test_w4a8_wgmma_kernel(group, n, k):
    """sm_90a warpgroup-MMA kernel (in-kernel W4 dequant, fused epilogue): int32 accumulators exact and every output
    dtype bit-equal to ops.py, with M, N (Np not a multiple of BN) and K (Kp not a multiple of 128) tails."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("wgmma needs sm_90a")
    w = _linear(n, k, group, bias=(n == 40))
    for m in (1, 17, 128, 130, 1000, 1200):  # 1200: ten row tiles, two groups of the tile raster
        a = _act(m, k, w.padded_in, w.per_channel, seed=m + 3)
        ref_acc = _ref_acc(a, w)
        for cfg in _wgmma_configs():
            acc = K.w4a8_linear(a, w, out_dtype=torch.int32, config=cfg)
            assert torch.equal(acc, ref_acc), f"{cfg} int32 differs at M={m}: {(acc - ref_acc).abs().max()}"
            for dt in (torch.float16, torch.bfloat16, torch.float32):
                y, ref = K.w4a8_linear(a, w, out_dtype=dt, config=cfg), ops.w4a8_linear(a, w, out_dtype=dt)
                assert torch.equal(y, ref), f"{cfg} {dt} differs at M={m}"


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("n,k", [(576, 4128), (4096, 4096), (40, 100), (192, 1536)])
def test_w4a8_tma_kernel(group, n, k):
    """sm_90a two-pass path (dequant into the int8 scratch, then the TMA-fed int8 wgmma GEMM): int32 accumulators
    exact and every output dtype bit-equal to ops.py, with M, N (Np not a multiple of the tile) and K (Kp not a
    multiple of 128) tails, rings of 2-4 stages (several passes around the ring at K = 4096) and persistent CTAs
    with several tiles each (M = 1200 at N = 4096: 160 tiles of 128 x 256 for 132 CTAs), alone or in clusters of two
    CTAs sharing the weight tile (a cluster's second row tile past M at M <= 128)."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("wgmma needs sm_90a")
    from qoq.runtime_kernels.gemm import TmaConfig
    w = _linear(n, k, group, bias=(n == 40))
    for m in (1, 17, 128, 130, 300, 1200):
        a = _act(m, k, w.padded_in, w.per_channel, seed=m + 7)
        ref_acc = _ref_acc(a, w)
        for cfg in (TmaConfig(256, 4), TmaConfig(128, 3, 2), TmaConfig(256, 2), TmaConfig(256, 4, cluster=2),
                    TmaConfig(256, 3, cluster=2), TmaConfig(128, 3, 2, cluster=2), TmaConfig(128, 6, cluster=2)):
            acc = K.w4a8_linear(a, w, out_dtype=torch.int32, config=cfg)
            assert torch.equal(acc, ref_acc), f"{cfg} int32 differs at M={m}: {(acc - ref_acc).abs().max()}"
            for dt in (torch.float16, torch.bfloat16, torch.float32):
                y, ref = K.w4a8_linear(a, w, out_dtype=dt, config=cfg), ops.w4a8_linear(a, w, out_dtype=dt)
                assert torch.equal(y, ref), f"{cfg} {dt} differs at M={m}"


def _swap_configs():
    from qoq.runtime_kernels.gemm import SwapConfig
    # token tiles 16..128, register prefetch 1..4, cluster split-K with trailing CTAs that get no k-tiles
    return [SwapConfig(16, 4, 2, 1), SwapConfig(64, 4, 2, 4), SwapConfig(128, 3, 3, 2), SwapConfig(32, 2, 1, 8),
            SwapConfig(48, 4, 4, 1), SwapConfig(32, 3, 2, 8, overlap=True), SwapConfig(64, 4, 2, 4, overlap=True),
            SwapConfig(128, 4, 2, 1, overlap=True), SwapConfig(16, 5, 4, 2, overlap=True),
            SwapConfig(16, 4, 2, 1, tma=True), SwapConfig(64, 4, 2, 4, tma=True), SwapConfig(128, 3, 3, 2, tma=True),
            SwapConfig(32, 2, 1, 8, tma=True), SwapConfig(64, cluster=8, tma=True), SwapConfig(32, cluster=4, tma=True),
            SwapConfig(64, cluster=1, tma=True), SwapConfig(128, cluster=4, tma=True),
            SwapConfig(128, cluster=1, tma=True), SwapConfig(64, cluster=2, tma=True),
            SwapConfig(16, cluster=2, tma=True)]


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("n,k", [(576, 4128), (4096, 4096), (40, 100), (192, 1536)])
def test_w4a8_swap_kernel(group, n, k):
    """sm_90a swapped-operand kernel (weights as wgmma's register operand, tokens as N, cluster split-K): int32
    accumulators exact and every output dtype bit-equal to ops.py, with M, N (Np not a multiple of 128) and K tails."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("wgmma needs sm_90a")
    w = _linear(n, k, group, bias=(n == 40))
    for m in (1, 17, 64, 100, 257):
        a = _act(m, k, w.padded_in, w.per_channel, seed=m + 5)
        ref_acc = _ref_acc(a, w)
        for cfg in _swap_configs():
            acc = K.w4a8_linear(a, w, out_dtype=torch.int32, config=cfg)
            assert torch.equal(acc, ref_acc), f"{cfg} int32 differs at M={m}: {(acc - ref_acc).abs().max()}"
            for dt in (torch.float16, torch.bfloat16, torch.float32):
                y, ref = K.w4a8_linear(a, w, out_dtype=dt, config=cfg), ops.w4a8_linear(a, w, out_dtype=dt)
                assert torch.equal(y, ref), f"{cfg} {dt} differs at M={m}"


def test_every_swap_tuner_candidate_is_exact():
    """Whatever `--tune-swap` finds fastest can be dispatched: every configuration it times on the Llama-3-8B
    tilings at M = 16-256 (g128) is bit-exact here, on a shape with N and K tails."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("wgmma needs sm_90a")
    from qoq.bench.gemm_tuner import swap_candidates
    from qoq.runtime_kernels.gemm import variant_for

    sms = torch.cuda.get_device_properties(DEV).multi_processor_count
    cfgs = sorted({c for m in (16, 32, 64, 128, 256) for c in swap_candidates(m, 4096, 128, sms)}, key=repr)
    K.precompile(list(dict.fromkeys(variant_for(c, True)[0] for c in cfgs)))
    w = _linear(576, 4128, 128)
    for m in (1, 17, 100):
        a = _act(m, 4128, w.padded_in, w.per_channel, seed=m)
        ref_acc, ref = _ref_acc(a, w), ops.w4a8_linear(a, w, out_dtype=torch.float16)
        for cfg in cfgs:
            assert torch.equal(K.w4a8_linear(a, w, out_dtype=torch.int32, config=cfg), ref_acc), f"{cfg} M={m}"
            assert torch.equal(K.w4a8_linear(a, w, out_dtype=torch.float16, config=cfg), ref), f"{cfg} M={m}"


@pytest.mark.parametrize("group", [128, -1])
def test_w4a8_intmm_bias_odd_n_and_small_m(group):
    from qoq.runtime_kernels.gemm import GemmConfig, IntMMConfig

    n, k = 40, 100  # N % 8 != 0: the epilogue's scalar tail; Np = 64, Kp = 128
    w = _linear(n, k, group, bias=True)
    for m in (17, 512, 1000):
        a = _act(m, k, w.padded_in, w.per_channel, seed=m)
        assert torch.equal(K.w4a8_linear(a, w, out_dtype=torch.int32, config=IntMMConfig()), _ref_acc(a, w))
        for dt in (torch.float16, torch.bfloat16, torch.float32):
            ref = ops.w4a8_linear(a, w, out_dtype=dt)
            assert torch.equal(K.w4a8_linear(a, w, out_dtype=dt, config=IntMMConfig()), ref)
            assert torch.equal(K.w4a8_linear(a, w, out_dtype=dt, config=IntMMConfig(n_chunk=32)), ref)
            # the tiled kernel stays reachable at large M through config=
            assert torch.equal(K.w4a8_linear(a, w, out_dtype=dt, config=GemmConfig(128, 128, 2, 4, 4, 2)), ref)
    with pytest.raises(ValueError):
        K.w4a8_linear(_act(16, k, w.padded_in, w.per_channel), w, config=IntMMConfig())


def test_w4a8_extreme_values_are_exact():
    # activations at +-127 and weights at the edges of the protective range exercise every byte of the dequant
    n, k = 64, 256
    w = torch.zeros(n, k, device=DEV)
    w[:, ::2] = 1.0
    w[:, 1::2] = -1.0
    w[::3] *= torch.linspace(0.1, 1, k, device=DEV)
    for group in GROUPS:
        lin = QLinear.from_tensors(quantized_tensors("l", quantize_weight(w, group)), "l", n, k, group, device=DEV)
        x = torch.where(torch.rand(33, k, generator=_gen(3), device=DEV) > 0.5, 1.0, -1.0).half()
        a = ops.quantize_act(x, lin.padded_in, with_qsum=lin.per_channel)
        for m in (1, 16, 33):
            sub = ops.QuantAct(a.q[:m], a.scale[:m], None if a.qsum is None else a.qsum[:m])
            assert torch.equal(K.w4a8_linear(sub, lin, out_dtype=torch.int32), _ref_acc(sub, lin))


# ---- KV4 cache -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("d", [64, 128])
def test_kv4_append_exact(dtype, d):
    b, hkv, t, tmax = 3, 2, 5, 32
    k = _randn(b, hkv, t, d, seed=1, dtype=dtype, scale=2.0)
    v = _randn(b, hkv, t, d, seed=2, dtype=dtype)
    k[0, 0, 0] = 0.5  # constant row: scale 1
    start = torch.tensor([0, 7, 27], device=DEV)
    ref, got = KV4Cache.empty(b, hkv, tmax, d, DEV), KV4Cache.empty(b, hkv, tmax, d, DEV)
    ops.kv4_append(ref, k, v, start)
    K.kv4_append(got, k, v, start)
    for name in ("k", "k_scale", "k_zero", "v", "v_scale", "v_zero"):
        assert torch.equal(getattr(got, name), getattr(ref, name)), name


def test_kv4_append_strided_input():
    b, hkv, t, d = 2, 4, 6, 128
    kv = _randn(b, t, 2, hkv, d, seed=5, dtype=torch.float16)  # projection layout, heads transposed in
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    start = torch.tensor([3, 0], device=DEV)
    ref, got = KV4Cache.empty(b, hkv, 16, d, DEV), KV4Cache.empty(b, hkv, 16, d, DEV)
    ops.kv4_append(ref, k, v, start)
    K.kv4_append(got, k, v, start)
    assert torch.equal(got.k, ref.k) and torch.equal(got.v_zero, ref.v_zero) and torch.equal(got.k_scale, ref.k_scale)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 128])
def test_rope_kv4_append_exact(dtype, d):
    b, hq, hkv, t = 2, 8, 2, 7
    q = _randn(b, hq, t, d, seed=11, dtype=dtype)
    k = _randn(b, hkv, t, d, seed=12, dtype=dtype)
    v = _randn(b, hkv, t, d, seed=13, dtype=dtype)
    pos = torch.arange(t, device=DEV).float()[None] + torch.tensor([[0.0], [5.0]], device=DEV)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device=DEV).float() / d))
    ang = torch.cat([pos[..., None] * inv, pos[..., None] * inv], dim=-1)
    cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
    start = torch.tensor([0, 5], device=DEV)
    ref, got = KV4Cache.empty(b, hkv, 16, d, DEV), KV4Cache.empty(b, hkv, 16, d, DEV)
    q_ref, k_ref = ops.apply_rope(q, cos, sin), ops.apply_rope(k, cos, sin)
    ops.kv4_append(ref, k_ref, v, start)
    q_got, k_got = K.rope_kv4_append(q, k, v, cos, sin, got, start)
    assert torch.equal(q_got, q_ref) and torch.equal(k_got, k_ref)
    for name in ("k", "k_scale", "k_zero", "v", "v_scale", "v_zero"):
        assert torch.equal(getattr(got, name), getattr(ref, name)), name


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("ratio", [1, 3, 4, 8])
@pytest.mark.parametrize("splits", [None, 1, 3])
@pytest.mark.parametrize("warps", [None, 2, 3, 4])
def test_decode_attention_kv4(d, ratio, splits, warps):
    from qoq.runtime_kernels.attention import decode_attention_kv4 as attn
    b, hkv, tmax = 4, 2, 300
    hq = hkv * ratio
    cache = KV4Cache.empty(b, hkv, tmax, d, DEV)
    lengths = torch.tensor([1, 17, 300, 129], device=DEV)
    k = _randn(b, hkv, tmax, d, seed=21, dtype=torch.float16, scale=1.5)
    v = _randn(b, hkv, tmax, d, seed=22, dtype=torch.float16)
    ops.kv4_append(cache, k, v, torch.zeros(b, dtype=torch.long, device=DEV))
    q = _randn(b, hq, d, seed=23, dtype=torch.float16, scale=2.0)
    sm = d ** -0.5
    ref = ops.decode_attention_kv4(q.float(), cache, lengths, sm)
    # garbage past each length must be ignored (the reference itself would turn it into NaN)
    cache.k_scale[1, :, 17:] = float("nan")
    cache.v_scale[3, :, 129:] = float("inf")
    got = attn(q, cache, lengths, sm, splits=splits, warps=warps)
    assert got.dtype == torch.float16 and torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), ref, rtol=1e-2, atol=3e-3)


def test_decode_attention_kv4_more_splits_than_combine_threads():
    from qoq.runtime_kernels.attention import decode_attention_kv4 as attn
    b, hq, hkv, d, tmax = 2, 8, 2, 64, 4096
    cache = KV4Cache.empty(b, hkv, tmax, d, DEV)
    lengths = torch.tensor([4096, 333], device=DEV)
    ops.kv4_append(cache, _randn(b, hkv, tmax, d, seed=35, dtype=torch.float16),
                   _randn(b, hkv, tmax, d, seed=36, dtype=torch.float16), torch.zeros(b, dtype=torch.long, device=DEV))
    q = _randn(b, hq, d, seed=37, dtype=torch.float16)
    ref = ops.decode_attention_kv4(q.float(), cache, lengths, d ** -0.5)
    for splits in (100, 256):  # 64 combine threads; most of the second row's splits are empty
        got = attn(q, cache, lengths, d ** -0.5, splits=splits)
        torch.testing.assert_close(got.float(), ref, rtol=1e-2, atol=3e-3)


def test_decode_attention_kv4_public_api_and_max_len():
    b, hq, hkv, d, tmax = 3, 32, 8, 128, 2048
    cache = KV4Cache.empty(b, hkv, tmax, d, DEV)
    lengths = torch.tensor([1000, 1, 700], device=DEV)
    ops.kv4_append(cache, _randn(b, hkv, 1000, d, seed=31, dtype=torch.float16),
                   _randn(b, hkv, 1000, d, seed=32, dtype=torch.float16), torch.zeros(b, dtype=torch.long, device=DEV))
    q = _randn(b, hq, d, seed=33, dtype=torch.float16)
    ref = ops.decode_attention_kv4(q.float(), cache, lengths, d ** -0.5)
    for max_len in (None, 1000):
        got = K.decode_attention_kv4(q, cache, lengths, d ** -0.5, max_len=max_len)
        torch.testing.assert_close(got.float(), ref, rtol=1e-2, atol=3e-3)


def test_kernels_run_on_the_current_stream_and_in_a_graph():
    w = _linear(192, 1536, 128)
    x = _randn(4, 1536, seed=41, dtype=torch.float16)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        a = K.quantize_act(x, w.padded_in)
        y = K.w4a8_linear(a, w)
    s.synchronize()
    assert torch.equal(y, ops.w4a8_linear(ops.quantize_act(x, w.padded_in), w))
    g = torch.cuda.CUDAGraph()
    static_x = x.clone()
    with torch.cuda.graph(g):
        gy = K.w4a8_linear(K.quantize_act(static_x, w.padded_in), w)
    static_x.copy_(_randn(4, 1536, seed=42, dtype=torch.float16))
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(gy, ops.w4a8_linear(ops.quantize_act(static_x, w.padded_in), w))


@pytest.mark.parametrize("m,cfg_kw", [(1, dict(tb=1)), (16, dict(tb=2, warps=8, u=2, cluster=2)),
                                      (5, dict(tb=1, warps=8, u=2, splits=3)), (40, dict(tb=5, warps=8, u=2))])
def test_w4a8_gemv_programmatic_dependent_launch_chain(m, cfg_kw):
    """Each GEMV (launched with PDL on sm_90) reads the activations the previous kernels just wrote: a chain of
    quantize -> GEMV layers, eager and in a CUDA graph, equals the same chain launched without PDL."""
    from dataclasses import replace

    from qoq.runtime_kernels.gemm import GemvConfig

    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("programmatic dependent launch needs sm_90")
    cfg = GemvConfig(**cfg_kw)
    layers = [_linear(2048, 2048, 128 if i % 2 else -1, seed=50 + i) for i in range(6)]
    x0 = _randn(m, 2048, seed=51, dtype=torch.float16)

    def chain(x, c):
        for w in layers:
            a = K.quantize_act(x, w.padded_in, with_qsum=w.per_channel)
            x = K.w4a8_linear(a, w, config=c) * 0.05  # keeps the activations in fp16 range
        return x

    ref = chain(x0, replace(cfg, pdl=False))
    for _ in range(3):
        assert torch.equal(chain(x0, cfg), ref)
    static_x = x0.clone()
    chain(static_x, cfg)  # warm-up (workspaces) before capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        gy = chain(static_x, cfg)
    for _ in range(3):
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(gy, ref)
