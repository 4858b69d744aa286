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


def _gemm_row(m, impl, us, fp8=None, fp16=40.0, int8=None):
    ratio = lambda base: None if base is None else round(base / us, 2)  # noqa: E731
    return {"bench": "gemm", "n": 4096, "k": 4096, "m": m, "impl": impl, "us": us, "vs_fp16": ratio(fp16),
            "vs_int8": ratio(int8), "vs_fp8": ratio(fp8)}


def test_summary_reports_the_fp8_targets_where_fp8_was_timed():
    rows = [_gemm_row(1, "w4a8_g128", 5.0, fp8=8.5), _gemm_row(16, "w4a8_g128", 7.0, fp8=8.4),
            _gemm_row(64, "w4a8_g128", 15.0, fp8=9.0, int8=11.0),
            _gemm_row(4096, "w4a8_g128", 134.0, fp8=100.0, int8=170.0),
            {"bench": "attention", "impl": "kv4", "vs_sdpa": 2.1}]
    text = gemm.summary(rows)
    assert "w4a8_g128: M<=16 min 1.20x FP8 _scaled_mm (target 1.5x)" in text
    assert "w4a8_g128: M=32-256 min 0.60x FP8 _scaled_mm (target 1.3x)" in text
    assert "w4a8_g128: M>=1024 min 0.75x FP8 _scaled_mm (target 0.85x)" in text
    assert "M>=1024 min 1.27x _int_mm" in text and "kv4 decode attention: 2.10x" in text
    no_fp8 = gemm.summary([_gemm_row(1, "w4a8_pc", 5.0)])  # (not Hopper: no FP8 rows)
    assert "FP8" not in no_fp8 and "M<=16 min 8.00x cuBLAS FP16" in no_fp8


def test_gemm_line_shows_every_ratio_and_the_tma_path():
    res = {"fp16": {"us": 40.0}, "fp8": {"us": 20.0}, "w4a8_g128": {"us": 10.0}, "w4a8_pc": {"us": 8.0},
           "w4a8_g128_tma": {"us": 10.0}, "w4a8_pc_tma": {"us": 9.0}}
    line = gemm._gemm_line(4096, 4096, 1024, res)
    assert "vs fp8/fp16/int8: 2.00x/4.00x/   -   2.50x/5.00x/   - " in line
    assert "[tma: g128      10.0 pc       9.0]" in line
