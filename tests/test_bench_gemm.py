"""CPU tests of the kernel micro-benchmark's pieces: its command line, the L2-busting weight copies, and the
configuration sweeps' candidates (the timing itself needs a GPU)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from qoq.bench import gemm, gemm_tuner, kernel_timing, profile_case
from qoq.runtime_kernels import gemm as G


def test_module_entry_point_offers_benchmark_sweeps_and_profiler_cases():
    r = subprocess.run([sys.executable, "-m", "qoq.bench.gemm", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for flag in ("--quick", "--json", "--tune", "--tune-gemv", "--tune-attention", "--one"):
        assert flag in r.stdout
    for case in profile_case.CASES:
        assert case in r.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU this would run the benchmark")
def test_benchmark_without_a_gpu_says_so():
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        gemm.main(["--quick"])


def test_weight_copies_overflow_the_l2_cache():
    assert kernel_timing.WORKING_SET > kernel_timing.L2_BYTES
    for nbytes in (7 << 20, 33 << 20, 100 << 20):  # fewest copies whose sum exceeds the working set
        n = kernel_timing.copies_beyond_l2(nbytes)
        assert n * nbytes >= kernel_timing.WORKING_SET > (n - 1) * nbytes, nbytes
    assert kernel_timing.copies_beyond_l2(1) == 64 and kernel_timing.copies_beyond_l2(1, cap=8) == 8
    assert kernel_timing.copies_beyond_l2(10 * kernel_timing.WORKING_SET) == 1


@pytest.mark.parametrize("group", [128, -1])
def test_quantized_weight_copies_are_equal_but_never_share_memory(group):
    lins = kernel_timing.quantized_weights(64, 256, group, 3, "cpu")
    assert len(lins) == 3
    fields = ("qweight", "s1", "s2_scales", "s2_zeros", "szeros")
    for lin in lins[1:]:
        for f in fields:
            a, b = getattr(lins[0], f), getattr(lin, f)
            assert (a is None) == (b is None)
            if a is not None:
                assert torch.equal(a, b) and a.data_ptr() != b.data_ptr(), f


def test_tuner_candidates_can_launch():
    """Every swept configuration passes the launcher's own limits (the sweep would die midway otherwise)."""
    for kw in gemm_tuner.GEMV_CANDIDATES.values():
        for tb in (1, 2):
            cfg = G.GemvConfig(tb, **kw)
            assert cfg.cluster == 1 or G.gemv_slices_fit(cfg), cfg
    sm90_smem_per_sm, reserved_per_cta = 228 * 1024, 1024
    for stages, min_blocks in gemm_tuner.WGMMA_CANDIDATES:  # min_blocks CTAs must fit one SM together
        _, smem = G.variant_for(G.WgmmaConfig(stages, min_blocks), True)
        assert min_blocks * (smem + reserved_per_cta) <= sm90_smem_per_sm, (stages, min_blocks)
    for n, k in gemm_tuner.LLAMA3_8B_SHAPES:
        for m in gemm_tuner.SWAP_MS:
            for cfg in gemm_tuner.swap_candidates(m, n, k // 32, 132):
                _, smem = G.variant_for(cfg, True)
                assert smem + reserved_per_cta <= sm90_smem_per_sm and (not cfg.overlap or cfg.pf % 2 == 0), cfg


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU this would run the profile")
def test_decode_profile_without_a_gpu_says_so(capsys):
    from qoq.bench import decode_profile

    assert decode_profile.main(["--batches", "1"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().out


def test_decode_profile_rows_are_kernel_families():
    from qoq.bench.decode_profile import short_name

    assert short_name("void at::native::vectorized_elementwise_kernel<4, Foo>(int, Foo)") == \
        "void at::native::vectorized_elementwise_kernel"
    assert short_name("qoq_rowquant_d0_m3_c1_t512") == "qoq_rowquant_d0_m3_c1_t512"
