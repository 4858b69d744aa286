"""Pack -> unpack round trips of the kernel layout, and the layout's defining properties."""
import pytest
import torch

from qoq.scheme.progressive import dequantize, quantize_weight
from qoq.scheme.layout import pack_group_params, pack_weight, unpack_group_params, unpack_weight


@pytest.mark.parametrize("shape", [(32, 32), (64, 128), (96, 576), (160, 1536)])
def test_weight_round_trip(shape):
    q = torch.randint(0, 16, shape, dtype=torch.uint8)
    packed = pack_weight(q)
    assert packed.dtype == torch.int8 and packed.shape == (shape[0], shape[1] // 2)
    assert torch.equal(unpack_weight(packed), q)


def test_each_lane_holds_its_mma_b_fragments():
    """Lane t of tile (0,0) holds, in byte r of register (p, b), row c+8b (low) / c+8b+16 (high), k = 16p+4l+r."""
    n_idx = torch.arange(64)[:, None].expand(64, 64)
    k_idx = torch.arange(64)[None, :].expand(64, 64)
    q = ((n_idx * 7 + k_idx * 3) % 16).to(torch.uint8)
    tile = pack_weight(q).view(torch.uint8).flatten()[:512].reshape(32, 2, 2, 4)  # lane, p, b, r
    for lane in range(32):
        c, l = divmod(lane, 4)
        for p in range(2):
            for b in range(2):
                for r in range(4):
                    byte = int(tile[lane, p, b, r])
                    k = 16 * p + 4 * l + r
                    assert byte & 0xF == int(q[c + 8 * b, k])
                    assert byte >> 4 == int(q[c + 8 * b + 16, k])


def test_tiles_are_contiguous_512_bytes_in_k_order():
    q = torch.zeros(64, 128, dtype=torch.uint8)
    q[32:64, 96:128] = 5  # tile (nt=1, kt=3)
    flat = pack_weight(q).view(torch.uint8).flatten()
    tile_index = 1 * (128 // 32) + 3
    assert torch.all(flat[tile_index * 512:(tile_index + 1) * 512] == 0x55)
    assert flat.sum() == 512 * 0x55


@pytest.mark.parametrize("groups", [1, 3, 18])
def test_group_params_round_trip_and_interleave(groups):
    p = torch.randint(-128, 128, (96, groups), dtype=torch.int8)
    packed = pack_group_params(p)
    assert packed.shape == (groups, 96)
    assert torch.equal(unpack_group_params(packed), p)
    # position 4c + j of every 32 columns holds channel c + 8j
    for c in range(8):
        for j in range(4):
            assert torch.equal(packed[:, 32 + 4 * c + j], p[32 + c + 8 * j])


@pytest.mark.parametrize("group", [32, 64, 128, -1])
@pytest.mark.parametrize("shape", [(64, 96), (40, 100), (576, 576), (192, 1536)])
def test_quantized_weight_pack_round_trip_with_padding(group, shape):
    from qoq.formats.artifact import quantized_tensors
    torch.manual_seed(1)
    qw = quantize_weight(torch.randn(shape), group)
    t = quantized_tensors("x", qw)
    assert torch.equal(unpack_weight(t["x.qweight"]), qw.q)
    if group > 0:
        assert torch.equal(unpack_group_params(t["x.s2_scales"]), qw.s2)
        assert torch.equal(-unpack_group_params(t["x.s2_zeros"]), qw.z)
    assert dequantize(qw).shape == shape
