"""SmoothAttention is an exact reparameterisation before quantization, and it flattens key outliers."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from qoq.algorithm.smooth_attention import fuse_smooth_attention, smooth_attention_scales
from qoq.calibration.blocks import BlockRunner
from qoq.models.arch import block_linears, decoder_layers


def tiny(arch):
    torch.manual_seed(0)
    kw = dict(hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=6,
              num_key_value_heads=2, head_dim=16, vocab_size=301, max_position_embeddings=256)
    model = (Qwen2ForCausalLM(Qwen2Config(**kw)) if arch == "qwen2" else LlamaForCausalLM(LlamaConfig(**kw))).eval()
    with torch.no_grad():  # key outliers in a few channels, as in real models
        for layer in decoder_layers(model):
            layer.self_attn.k_proj.weight[3] *= 20
            if layer.self_attn.k_proj.bias is not None:
                layer.self_attn.k_proj.bias.normal_()
    return model


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_smooth_attention_leaves_fp32_logits_unchanged(arch):
    model = tiny(arch)
    ids = torch.randint(0, 301, (3, 48))
    with torch.no_grad():
        ref = model(ids).logits
        runner = BlockRunner(model, ids, torch.device("cpu"))
        for layer in runner.layers:
            out, stats = runner.forward_with_stats(layer)
            lam = smooth_attention_scales(stats.key_absmax, 0.5, runner.head_dim)
            assert lam.shape == (32,) and not torch.allclose(lam, torch.ones_like(lam))
            lin = block_linears(layer)
            fuse_smooth_attention(lin["self_attn.q_proj"], lin["self_attn.k_proj"], lam, 6, 2)
            runner.advance(out)
        got = model(ids).logits
    assert ((got - ref).norm() / ref.norm()) < 1e-4


def test_scales_are_shared_by_rope_pairs_and_safe():
    absmax = torch.tensor([4.0, 1.0, 0.0, 9.0, 16.0, 1.0, 0.0, float("nan")])
    lam = smooth_attention_scales(absmax, 0.5, head_dim=4)  # two heads of 4: pairs (0,2), (1,3)
    assert torch.equal(lam[:2], lam[2:4]) and torch.equal(lam[4:6], lam[6:8])
    assert lam[0] == 2.0 and lam[1] == 3.0 and lam[4] == 4.0
    assert torch.isfinite(lam).all() and (lam > 0).all()
