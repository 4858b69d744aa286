"""The integer scheme of progressive group quantization (ARCHITECTURE.md, "The integer scheme")."""
import pytest
import torch

from qoq.scheme.progressive import (
    PROTECTIVE_RANGE, dequantize, level2_params_from_range, padded_dims, quantize_weight,
)


def all_level1_ranges(step=0.25):
    """Every (min, max) pair with min <= max on a 0.25 grid over the protective range."""
    v = torch.arange(-PROTECTIVE_RANGE, PROTECTIVE_RANGE + step / 2, step, dtype=torch.float64)
    lo, hi = torch.meshgrid(v, v, indexing="ij")
    keep = lo <= hi
    return lo[keep], hi[keep]


def test_reconstruction_stays_in_int8_for_every_level1_range():
    lo, hi = all_level1_ranges()
    s2, z = level2_params_from_range(lo, hi)
    s2, z = s2.long(), z.long()
    assert s2.min() >= 1 and s2.max() <= 16
    # q is monotonic in x, so the extremes of q*s2 - z inside a group come from its min and max
    q_lo = torch.round((lo + z) / s2).clamp(0, 15).long()
    q_hi = torch.round((hi + z) / s2).clamp(0, 15).long()
    assert (q_lo * s2 - z).min() >= -128
    assert (q_hi * s2 - z).max() <= 127
    assert (q_hi * s2).max() <= 255  # no carry between bytes in the packed multiply


def test_packed_multiply_then_byte_add_equals_integer_dequant():
    """4 nibbles x s2 in one 32-bit multiply, then a byte-wise add of -z (mod 256) == q*s2 - z."""
    lo, hi = all_level1_ranges(step=0.5)
    s2, z = level2_params_from_range(lo, hi)
    s2, z = s2.long(), z.long()
    q_lo = torch.round((lo + z) / s2).clamp(0, 15).long()
    q_hi = torch.round((hi + z) / s2).clamp(0, 15).long()
    for q0 in range(16):
        # four lanes of one register: q0, and three other in-range values of each group
        qs = [torch.maximum(q_lo, torch.minimum(q_hi, torch.full_like(q_lo, q))) for q in (q0, 15 - q0, q0 // 2, 7)]
        word = sum(q << (8 * i) for i, q in enumerate(qs))
        prod = (word * s2) & 0xFFFFFFFF
        neg_z = (-z) & 0xFF
        for i, q in enumerate(qs):
            byte = (((prod >> (8 * i)) & 0xFF) + neg_z) & 0xFF  # __vadd4 is byte-wise mod 256
            as_int8 = torch.where(byte >= 128, byte - 256, byte)
            assert torch.equal(as_int8, q * s2 - z)


@pytest.mark.parametrize("group", [32, 64, 128, -1])
@pytest.mark.parametrize("shape", [(64, 256), (96, 576), (40, 100), (192, 1536)])
def test_quantize_dequantize_shapes_and_error(group, shape):
    torch.manual_seed(0)
    w = torch.randn(shape) * 0.02
    qw = quantize_weight(w, group)
    assert qw.q.shape == padded_dims(*shape, group)
    assert qw.q.max() <= 15
    w_hat = dequantize(qw)
    assert w_hat.shape == w.shape
    rel = (w_hat - w).norm() / w.norm()
    assert rel < (0.12 if group > 0 else 0.2)
    if group > 0:
        assert qw.s2.min() >= 1 and qw.s2.max() <= 16


def test_finer_groups_are_more_accurate():
    torch.manual_seed(0)
    w = torch.randn(128, 512) * torch.logspace(-2, 0, 512)
    errs = [(dequantize(quantize_weight(w, g)) - w).norm() for g in (32, 64, 128, -1)]
    assert errs[0] < errs[1] < errs[2] < errs[3]


def test_zero_rows_and_constant_groups():
    w = torch.zeros(32, 64)
    w[1] = 1.0
    qw = quantize_weight(w, 32)
    assert torch.equal(dequantize(qw)[0], torch.zeros(64))
    assert torch.allclose(dequantize(qw)[1], torch.ones(64), rtol=1e-3)


def test_bad_group_size():
    with pytest.raises(ValueError, match="32, 64, 128"):
        quantize_weight(torch.zeros(32, 32), 100)


def test_group_rules_on_hand_computed_values():
    """s1 = max|W|/119; per group s2 = round(span/15), z = round(-min); q = round((x+z)/s2) clamped to 0..15."""
    s1 = 2.0 ** -6  # exact in fp16, so x = W/s1 is exactly the integers below
    x = torch.zeros(32, 32)
    x[0, :6] = torch.tensor([-30.0, 0.0, 119.0, 7.0, 64.0, -12.0])
    qw = quantize_weight(x * s1, group_size=32)
    assert qw.s1[0].item() == s1
    assert (qw.s2[0, 0].item(), qw.z[0, 0].item()) == (10, 30)  # span 149 -> round(9.93); -min 30
    assert qw.q[0, :6].tolist() == [0, 3, 15, 4, 9, 2]  # round((x + 30) / 10)
    assert qw.int8_weight()[0, :6].tolist() == [-30, 0, 120, 10, 60, -10]
    w_hat = dequantize(qw)[0, :6]
    assert torch.equal(w_hat, torch.tensor([-30.0, 0.0, 120.0, 10.0, 60.0, -10.0]) * s1)


def test_per_channel_rules_on_hand_computed_values():
    """s1 = (max - min)/15 over the row's range including 0; zero = round(-min/s1); q = round(W/s1 + zero)."""
    s1 = 2.0 ** -4
    w = torch.zeros(32, 32)
    w[0, :4] = torch.tensor([-0.25, 0.6875, 0.1, -0.1])  # range 15 * s1, min = -4 * s1
    qw = quantize_weight(w, group_size=-1)
    assert qw.s1[0].item() == s1 and qw.szeros[0].item() == 4 * s1
    assert qw.q[0, :4].tolist() == [0, 15, 6, 2]  # 0.1/s1 = 1.6 -> 5.6; -0.1/s1 -> 2.4
    assert torch.equal(dequantize(qw)[0, :4], torch.tensor([-4.0, 11.0, 2.0, -2.0]) * s1)


@pytest.mark.parametrize("group", [32, 64, 128, -1])
def test_each_code_is_the_nearest_on_its_grid_or_its_clamped_end(group):
    """In code units (x/s2 + z/s2 per group, W/s1 + zero per channel) every code is within 1/2 of the value,
    or the value lies beyond the grid and the code is its end (0 or 15)."""
    torch.manual_seed(1)
    w = torch.randn(64, 512, dtype=torch.float64) * 0.02
    w[3, 5] = 0.3  # an outlier: s1 and the groups' ranges come from it
    qw = quantize_weight(w, group)
    s1 = qw.s1.double()[:64, None]
    q = qw.q[:64].double()
    if group > 0:
        x = (w / s1).clamp(-PROTECTIVE_RANGE, PROTECTIVE_RANGE)
        s2 = qw.s2[:64].double().repeat_interleave(group, dim=1)
        z = qw.z[:64].double().repeat_interleave(group, dim=1)
        code = (x + z) / s2
    else:
        code = w / s1 + torch.round(qw.szeros.double()[:64, None] / s1)
    inside = (code >= 0) & (code <= 15)
    assert ((code - q).abs()[inside] <= 0.5 + 1e-3).all()
    assert torch.equal(q[code < 0], torch.zeros_like(q[code < 0]))
    assert torch.equal(q[code > 15], torch.full_like(q[code > 15], 15))
    assert inside.float().mean() > 0.9  # s2 and z are rounded: a group's extremes may fall just off its grid
