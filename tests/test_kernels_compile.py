"""CPU check that every CUDA kernel source builds for Ampere, Ada and Hopper (nvcc -cubin), without a GPU."""
import os
import re
import shutil
import subprocess

import pytest

import qoq.runtime_kernels as K
from qoq.runtime_kernels import _build as B


def test_package_imports_without_a_gpu():
    assert isinstance(K.available(), bool)
    assert callable(K.w4a8_linear) and callable(K.decode_attention_kv4)


def test_every_variant_has_a_unique_symbol():
    names = [v.name for v in K.all_variants()]
    assert len(names) == len(set(names))
    for v in K.all_variants():
        assert v.unit in B.UNITS
        assert not v.wrapper or f" {v.name}(" in v.wrapper


def test_nvrtc_options_keep_ieee_float_semantics():
    """No flush-to-zero or fast math: the kernels must treat fp32 denormals as the torch reference does."""
    for arch in ("80", "89", "90", "90a"):
        opts = B.nvrtc_options(arch)
        assert opts[0] == f"-arch=sm_{arch}" and "-std=c++17" in opts
        assert not any(o.startswith(("-ftz", "--ftz", "-use_fast_math", "--use_fast_math", "-prec", "--prec"))
                       for o in opts), opts


def test_cubin_cache_path_follows_every_input(tmp_path, monkeypatch):
    monkeypatch.setenv("QOQ_KERNEL_CACHE", str(tmp_path))
    base = B.cached_cubin_path("src", "k", B.nvrtc_options("90"), (13, 0))
    assert base.parent == tmp_path and base.name.startswith("k-") and base.suffix == ".cubin"
    assert base == B.cached_cubin_path("src", "k", B.nvrtc_options("90"), (13, 0))
    others = {B.cached_cubin_path("src2", "k", B.nvrtc_options("90"), (13, 0)),
              B.cached_cubin_path("src", "k", B.nvrtc_options("90a"), (13, 0)),
              B.cached_cubin_path("src", "k", B.nvrtc_options("90"), (12, 9)),
              B.cached_cubin_path("src", "k2", B.nvrtc_options("90"), (13, 0))}
    assert base not in others and len(others) == 4


def _variants(arch):
    """sm_90: every default variant; sm_80 / sm_89: every source with one variant of each GEMM template family
    (the GEMM variants dominate the compile time)."""
    from qoq.runtime_kernels import gemm

    allv = K.all_variants()
    if arch == "90":
        return allv
    keep = {gemm.variant_for(gemm.GemvConfig(tb=2, nt=1, warps=8, u=4), True)[0],
            gemm.variant_for(gemm.GemvConfig(tb=1), False)[0],
            gemm.variant_for(gemm.GemmConfig(128, 128, 2, 4, 4, 2), True)[0],
            gemm.variant_for(gemm.GemmConfig(32, 128, 1, 4, 4, 3), False)[0]}
    assert keep <= set(gemm.default_variants())
    return [v for v in allv if v.unit != "gemm.cu" or v in keep]


@pytest.mark.slow  # minutes of nvcc for three architectures: `make test-slow` (CI) runs it
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_kernel_sources_compile(tmp_path):
    jobs = []
    for arch in ("80", "89", "90"):
        for unit in B.UNITS:
            if unit in B.ARCH_SPECIFIC and B.ARCH_SPECIFIC[unit] != arch:
                continue
            variants = [v for v in _variants(arch) if v.unit == unit and B.runs_on(v, arch)]
            src = B.unit_source(unit) + "\n" + "\n".join(v.wrapper for v in variants if v.wrapper) + "\n"
            path = tmp_path / f"sm{arch}_{unit}"
            path.write_text(src)
            cmd = ["nvcc", f"-arch=sm_{B.compile_arch(B.Variant(unit, ''), arch)}", "-std=c++17", "-cubin",
                   "-Xptxas", "-v", "-o", str(path.with_suffix(".cubin")), str(path)]
            jobs.append((arch, unit, variants, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                                text=True)))
    for arch, unit, variants, proc in jobs:
        log, _ = proc.communicate(timeout=1800)
        assert proc.returncode == 0, f"sm_{arch} {unit}:\n{log[-4000:]}"
        built = set(re.findall(r"Compiling entry function '(\w+)'", log))
        assert {v.name for v in variants} <= built, f"sm_{arch} {unit}: missing kernels"
        if os.environ.get("QOQ_SHOW_PTXAS"):
            print(log)


@pytest.mark.parametrize("cc", [80, 89, 90])
def test_choose_config_picks_precompiled_variants_for_the_arch(cc):
    """Every config the dispatcher picks (Llama-3-8B and SmolLM2 shapes, every M bucket) is among the default
    variants, and thread-block-cluster variants only from sm_90 on."""
    from qoq.runtime_kernels import gemm

    defaults = set(gemm.default_variants())
    for n, k in [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (576, 640), (1536, 640), (576, 1536)]:
        for m in (1, 5, 8, 9, 16, 17, 24, 32, 33, 48, 64, 65, 100, 255, 256, 512, 1024, 2048, 4096, 16384):
            cfg = gemm.choose_config(m, n, k, 132, cc=cc)
            if isinstance(cfg, gemm.IntMMConfig):
                continue
            for grouped in (True, False):
                v = gemm.variant_for(cfg, grouped)[0]
                assert v in defaults, (n, k, m, cfg)
                assert B.runs_on(v, str(cc)), (n, k, m, cfg)
    assert gemm.choose_config(16, 6144, 4096, 132, cc=90) == gemm.GemvConfig(2, warps=16, u=1)
    assert gemm.choose_config(16, 4096, 14336, 132, cc=90) == gemm.GemvConfig(2, warps=16, u=1, cluster=2)
    assert gemm.choose_config(1, 4096, 4096, 132, cc=90) == gemm.GemvConfig(1, warps=32, u=1)
    # M = 9-16 on sm_90 with >= 4 channel groups per SM and per-group weights: 16-token swapped-operand tiles in
    # the largest cluster whose CTAs fit four per SM; per-channel weights and other archs keep the GEMV
    assert gemm.choose_config(16, 28672, 4096, 132, cc=90) == gemm.SwapConfig(16, cluster=2, tma=True)
    assert gemm.choose_config(16, 28672, 256, 132, cc=90) == gemm.SwapConfig(16, cluster=1, tma=True)  # 8 k-tiles
    assert gemm.choose_config(9, 28672, 4096, 132, cc=90) == gemm.SwapConfig(16, cluster=2, tma=True)
    assert gemm.choose_config(16, 28672, 4096, 66, cc=90) == gemm.SwapConfig(16, cluster=1, tma=True)
    assert gemm.choose_config(8, 28672, 4096, 132, cc=90) == gemm.GemvConfig(1, warps=8, u=2, pdl=False)
    assert gemm.choose_config(16, 28672, 4096, 132, cc=90, grouped=False) == gemm.GemvConfig(
        2, nt=2, warps=4, u=1, pdl=False)
    assert gemm.choose_config(16, 28672, 4096, 132, cc=89) == gemm.GemvConfig(2, warps=8, u=2)


def test_choose_config_large_m_paths():
    """sm_90: the two-pass TMA path from M = 512 (2048 per-channel); below it the swapped-operand
    kernel at M = 17-256 and on long K above 256, the wgmma kernel above 256 once its 128 x 128 tiles cover half
    the SMs; else (and below sm_90) dequant + _int_mm from M = 256, the tiled kernel below that."""
    from qoq.runtime_kernels import gemm

    W, I, T, S, X = gemm.WgmmaConfig, gemm.IntMMConfig, gemm.GemmConfig, gemm.SwapConfig, gemm.TmaConfig
    for m, n, k, cc, kind in [(4096, 4096, 4096, 90, X), (1024, 28672, 4096, 90, X), (1024, 4096, 14336, 90, X),
                              (256, 6144, 4096, 90, S), (257, 6144, 4096, 90, W), (500, 6144, 4096, 90, W),
                              (512, 28672, 4096, 90, X), (511, 28672, 4096, 90, W), (256, 4096, 4096, 90, S),
                              (257, 4096, 4096, 90, W), (300, 2048, 4096, 90, I), (65, 4096, 14336, 90, S),
                              (256, 4096, 14336, 90, S), (33, 28672, 4096, 90, S), (100, 4096, 4096, 90, S),
                              (16, 4096, 4096, 90, gemm.GemvConfig), (4096, 4096, 4096, 80, I),
                              (4096, 4096, 4096, 89, I), (100, 4096, 4096, 80, T), (64, 28672, 4096, 89, T)]:
        assert isinstance(gemm.choose_config(m, n, k, 132, cc=cc), kind), (m, n, k, cc)
    assert isinstance(gemm.choose_config(4096, 4096, 4096, 132, intmm=False, cc=90), T)
    # token tile by M (activations by TMA up to 256); cluster split-K by how many 128-channel tiles there are per SM
    # (Llama-3-8B, 132 SMs)
    assert gemm.choose_config(32, 4096, 4096, 132, cc=90) == S(32, cluster=8, tma=True)
    assert gemm.choose_config(32, 6144, 4096, 132, cc=90) == S(32, cluster=4, tma=True)
    assert gemm.choose_config(64, 4096, 14336, 132, cc=90) == S(64, cluster=8, tma=True)
    assert gemm.choose_config(64, 6144, 4096, 132, cc=90) == S(64, cluster=4, tma=True)
    assert gemm.choose_config(64, 28672, 4096, 132, cc=90) == S(64, cluster=1, tma=True)
    assert gemm.choose_config(100, 4096, 4096, 132, cc=90) == S(64, cluster=4, tma=True)
    assert gemm.choose_config(100, 6144, 4096, 132, cc=90) == S(128, cluster=4, tma=True)
    assert gemm.choose_config(256, 4096, 4096, 132, cc=90) == S(64, cluster=2, tma=True)
    assert gemm.choose_config(256, 6144, 4096, 132, cc=90) == S(64, cluster=1, tma=True)
    assert gemm.choose_config(256, 28672, 4096, 132, cc=90) == S(128, cluster=1, tma=True)
    assert gemm.choose_config(128, 28672, 4096, 132, cc=90) == S(128, cluster=1, tma=True)
    assert gemm.choose_config(511, 4096, 14336, 132, cc=90) == S(128, cluster=2)
    assert gemm.choose_config(2048, 4096, 14336, 132, cc=90) == X(256, 4)
    assert gemm.choose_config(1024, 4096, 14336, 132, cc=90) == X(128, 6, cluster=2)
    assert gemm.choose_config(512, 4096, 14336, 132, cc=90) == X(128, 6, cluster=2)
    assert gemm.choose_config(4096, 28672, 4096, 132, cc=90) == X(128, 3, 2)
    assert gemm.choose_config(16384, 28672, 4096, 132, cc=90) == X(256, 4, cluster=2)
    assert gemm.choose_config(1024, 4096, 14336, 132, cc=90, grouped=False) == S(128, cluster=1)
    assert gemm.choose_config(2048, 4096, 14336, 132, cc=90, grouped=False) == X(256, 4)
    assert isinstance(gemm.choose_config(16384, 4096, 4096, 132, cc=89), I)
    assert isinstance(gemm.choose_config(1024, 4096, 4096, 132, cc=90, grouped=False), W)
    assert gemm.choose_config(40, 128, 256, 132, cc=90).cluster == 1  # 8 k-tiles: no split
    assert gemm.choose_config(32, 4096, 4096, 132, cc=80) == gemm.GemvConfig(4, warps=8, u=2, pdl=False)
    assert gemm.choose_config(17, 28672, 4096, 132, cc=80) == gemm.GemvConfig(3, nt=2, warps=4, u=1, pdl=False)
    assert gemm.choose_config(64, 4096, 14336, 132, cc=80) == gemm.GemvConfig(8, warps=8, u=2, pdl=False)
    assert gemm.choose_config(40, 4096, 4096, 132, cc=80) == gemm.GemvConfig(5, warps=8, u=2, pdl=False)
    assert not B.runs_on(gemm.variant_for(gemm.WgmmaConfig(), True)[0], "100")
    assert not B.runs_on(gemm.variant_for(S(), True)[0], "89")
    assert gemm.choose_config(16, 6144, 4096, 132, cc=89).cluster == 1


def test_attention_takes_the_most_warps_with_which_every_cta_fits_at_once():
    from qoq.runtime_kernels.attention import attn_ctas_per_sm, choose_warps

    assert [attn_ctas_per_sm(128, w) for w in (4, 3, 2)] == [3, 4, 6]
    assert choose_warps(16, 8, 4096, 132, 128) == 4  # 384 CTAs, 3 per SM fit
    assert choose_warps(64, 8, 1024, 132, 128) == 3  # 512 CTAs: 4 per SM fit with 3 warps
    assert choose_warps(128, 8, 1024, 132, 128) == 2  # 1024 CTAs
    assert choose_warps(1, 8, 1024, 132, 128) == 4
    assert choose_warps(64, 8, 1024, 132, 64) == 4  # D = 64: four fit an SM
    assert choose_warps(16, 8, 4096, 132, 256) == 2  # D = 256: two fit an SM


def test_rows_split_over_clusters_only_on_sm90_and_while_rows_are_few():
    from qoq.runtime_kernels.quant import launch_shape, row_cluster

    assert row_cluster(1, 14336, 132, 90) == 8 and row_cluster(64, 14336, 132, 90) == 2
    assert row_cluster(128, 4096, 132, 90) == 1 and row_cluster(1, 14336, 108, 80) == 1
    assert row_cluster(1, 576, 132, 90) == 1 and row_cluster(1, 4096, 132, 90) == 1  # too short to split
    for m, kp in ((1, 14336), (16, 14336), (64, 14336), (1, 8192)):
        cl = row_cluster(m, kp, 132, 90)
        threads, ch = launch_shape(kp, cl)
        assert threads * ch * cl * 8 >= kp  # the cluster's CTAs cover the row


def test_row_kernel_companions_must_match_the_rows():
    import torch

    from qoq.runtime_kernels.quant import MODE_ADD_RMSNORM, MODE_SILU_MUL, rowquant

    x, w = torch.zeros(2, 64, dtype=torch.float16), torch.ones(64, dtype=torch.float16)
    with pytest.raises(ValueError, match="gate and up must have the same shape and dtype"):
        rowquant(MODE_SILU_MUL, x, torch.zeros(3, 64, dtype=torch.float16), 0.0, 64, False)
    with pytest.raises(ValueError, match="the residual and its update must have the same shape and dtype"):
        rowquant(MODE_ADD_RMSNORM, x, w, 1e-5, 64, False, res=torch.zeros(2, 64, dtype=torch.float32))
