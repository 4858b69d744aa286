"""Every weight-side transform of the QoQ recipe is an exact reparameterisation of the FP32 model."""
import pytest
import torch

from qoq.algorithm.hadamard import _base, _decompose, hadamard
from qoq.algorithm.reorder import apply_down_reorder, channel_order
from qoq.algorithm.rotation import rotate_model
from qoq.algorithm.smooth_attention import (fuse_smooth_attention, smooth_attention_scales,
                                            smooth_attention_scales_ab)
from qoq.algorithm.smooth_linear import apply_down_smoothing, smooth_scales
from qoq.models.arch import decoder_layers
from recipe_tiny import ARCHS, VOCAB, logits, one_thread, rel, tiny_model

_one_thread = pytest.fixture(autouse=True)(one_thread)
TOL = 1e-4
SMALL_SIZES = (12, 16, 20, 28, 36, 40, 52, 60, 64, 80, 96, 108, 128, 140, 148, 156, 172, 576, 960, 1536)
LARGE_SIZES = (2048, 3584, 4096, 5120, 8960, 11008, 14336, 18944)


def ids():
    torch.manual_seed(1)
    return torch.randint(0, VOCAB, (2, 40))


# ---- Hadamard ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", SMALL_SIZES)
def test_hadamard_is_orthogonal(n):
    h = hadamard(n)
    assert h.shape == (n, n)
    assert torch.allclose(h @ h.t(), torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.equal((h * n ** 0.5).round().abs(), torch.ones(n, n, dtype=torch.float64))
    assert torch.equal(h, hadamard(n))  # deterministic


@pytest.mark.parametrize("n", LARGE_SIZES)
def test_large_hadamard_factors_are_orthogonal(n):
    pow2, m = _decompose(n)  # (2^a, m): the Sylvester part and the base factor
    assert pow2 * m == n and pow2 & (pow2 - 1) == 0
    b = _base(m)
    assert torch.equal(b @ b.t(), m * torch.eye(m, dtype=torch.int64))  # Sylvester (x) base is then orthogonal


@pytest.mark.parametrize("n", (0, 6, 100, 116))
def test_unsupported_hadamard_size_is_a_clear_error(n):
    with pytest.raises(ValueError, match="Hadamard"):
        hadamard(n)


# ---- exact transforms on tiny GQA models -------------------------------------------------------------

def down_input_absmax(model, x):
    """Per-channel max |down_proj input| for each layer, captured with hooks."""
    stats = {}
    hooks = [layer.mlp.down_proj.register_forward_hook(
        lambda m, inp, out, i=i: stats.__setitem__(i, inp[0].abs().amax(dim=(0, 1))))
        for i, layer in enumerate(decoder_layers(model))]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return stats


def rope_absmax(model, x):
    """Per-channel max |post-RoPE q / k| per layer."""
    from qoq.calibration.blocks import BlockRunner
    runner = BlockRunner(model, x, torch.device("cpu"))
    out = []
    for layer in runner.layers:
        o, stats = runner.forward_with_stats(layer)
        out.append(stats)
        runner.advance(o)
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_rotation_leaves_logits_unchanged(arch):
    model = tiny_model(arch)
    x = ids()
    ref = logits(model, x)
    tied = model.config.tie_word_embeddings
    done = rotate_model(model, per_head=True)
    assert done == {"residual": "hadamard96", "per_head": "hadamard16"}
    got = logits(model, x)
    assert rel(got, ref) < TOL
    assert model.config.tie_word_embeddings is False
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr() or not tied
    for layer in decoder_layers(model):
        assert torch.all(layer.input_layernorm.weight == 1) and torch.all(layer.post_attention_layernorm.weight == 1)
    assert torch.all(model.model.norm.weight == 1)


def test_channel_order_is_descending_max_abs_and_stable():
    absmax = torch.tensor([0.5, 3.0, 0.5, 7.0, 0.0, 3.0])
    assert channel_order(absmax).tolist() == [3, 1, 5, 0, 2, 4]  # ties keep their order


@pytest.mark.parametrize("arch", ARCHS)
def test_reorder_and_down_smoothing_leave_logits_unchanged(arch):
    model = tiny_model(arch)
    x = ids()
    ref = logits(model, x)
    absmax = down_input_absmax(model, x)
    for i, layer in enumerate(decoder_layers(model)):
        perm = channel_order(absmax[i])
        assert sorted(perm.tolist()) == list(range(160)) and perm.tolist() != list(range(160))
        apply_down_reorder(layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj, perm)
        s = smooth_scales(absmax[i][perm], layer.mlp.down_proj.weight.abs().amax(dim=0), 0.3)
        assert not torch.allclose(s, torch.ones_like(s))
        apply_down_smoothing(layer.mlp.up_proj, layer.mlp.down_proj, s)
        expected = absmax[i][perm] / s
        absmax[i] = expected
    assert rel(logits(model, x), ref) < TOL
    new = down_input_absmax(model, x)  # channels now in descending max|X| order, then divided by s
    for i in new:
        assert torch.allclose(new[i], absmax[i], rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("alpha,beta", [(0.5, 0.0), (0.3, 0.7)])
def test_smooth_attention_alpha_beta_leaves_logits_unchanged(arch, alpha, beta):
    model = tiny_model(arch)
    x = ids()
    ref = logits(model, x)
    stats = rope_absmax(model, x)
    for layer, st in zip(decoder_layers(model), stats, strict=True):
        lam = smooth_attention_scales_ab(st.key_absmax, st.query_absmax, alpha, beta, 16, 6, 2)
        assert lam.shape == (32,) and torch.equal(lam[:8], lam[8:16])  # RoPE pairs share a value
        if beta == 0:
            assert torch.allclose(lam, smooth_attention_scales(st.key_absmax, alpha, 16))
        fuse_smooth_attention(layer.self_attn.q_proj, layer.self_attn.k_proj, lam, 6, 2)
    assert rel(logits(model, x), ref) < TOL


@pytest.mark.parametrize("arch", ARCHS)
def test_whole_recipe_chain_leaves_logits_unchanged(arch):
    """rotate -> reorder -> smooth -> SmoothAttention, in the pipeline's order, statistics re-measured."""
    model = tiny_model(arch)
    x = ids()
    ref = logits(model, x)
    rotate_model(model)
    absmax = down_input_absmax(model, x)
    for i, layer in enumerate(decoder_layers(model)):
        perm = channel_order(absmax[i])
        apply_down_reorder(layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj, perm)
        s = smooth_scales(absmax[i][perm], layer.mlp.down_proj.weight.abs().amax(dim=0), 0.15)
        apply_down_smoothing(layer.mlp.up_proj, layer.mlp.down_proj, s)
    for layer, st in zip(decoder_layers(model), rope_absmax(model, x), strict=True):
        lam = smooth_attention_scales_ab(st.key_absmax, st.query_absmax, 0.5, 0.5, 16, 6, 2)
        fuse_smooth_attention(layer.self_attn.q_proj, layer.self_attn.k_proj, lam, 6, 2)
    assert rel(logits(model, x), ref) < TOL


def test_rotation_works_in_reduced_precision_models():
    model = tiny_model("llama").to(torch.bfloat16)
    rotate_model(model)
    assert model.lm_head.weight.dtype == torch.bfloat16 and torch.all(model.model.norm.weight == 1)


def test_norm_folding_a_chunk_of_rows_at_a_time_equals_the_whole_matrix_at_once():
    from qoq.algorithm.rotation import _fold

    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(16, 37, bias=False, dtype=torch.float16)
    head.weight.data.normal_(0, 0.5, generator=g)
    norm = torch.nn.Module()
    norm.weight = torch.nn.Parameter((1 + 0.3 * torch.randn(16, generator=g)).half(), requires_grad=False)
    whole = (head.weight.double() * norm.weight.double()[None, :]).half()
    _fold(norm, [head], rows=5)
    assert torch.equal(head.weight.data, whole) and torch.equal(norm.weight, torch.ones(16, dtype=torch.float16))
