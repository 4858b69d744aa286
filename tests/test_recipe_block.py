"""The block-by-block recipe: exact before rounding, valid integers after, better than RTN on tiny models."""
import tempfile
from pathlib import Path

import pytest
import torch

import qoq.recipe as recipe
from qoq.scheme.progressive import PROTECTIVE_RANGE
from qoq.recipe import RecipeOptions, quantize_decoder_blocks
from recipe_tiny import ARCHS, VOCAB, logits, one_thread, rel, tiny_model

_one_thread = pytest.fixture(autouse=True)(one_thread)


def calib():
    torch.manual_seed(5)
    return torch.randint(0, VOCAB, (6, 48))


def test_presets_and_record():
    full = RecipeOptions.preset("qoq")
    assert full.rotation and full.smooth_linear and full.reorder and full.gptq and full.propagate == "quantized"
    rtn = RecipeOptions.preset("rtn")
    assert not (rtn.rotation or rtn.smooth_linear or rtn.reorder or rtn.gptq or rtn.clip_search)
    assert rtn.smooth_attn_alpha == 0.5 and rtn.propagate == "fp"
    assert RecipeOptions.preset("qoq", gptq=False, reorder=None).reorder is True
    model = tiny_model("llama")
    rec = full.record(model.config, 128)
    assert rec["rotation"] == {"residual": "hadamard96", "per_head": "hadamard16"} and rec["weights"] == "gptq"
    assert rec["clip_search"] is False and full.record(model.config, -1)["clip_search"]
    assert full.record(model.config, -1)["reorder"] is False
    assert rtn.record(model.config, 128)["rotation"] is False
    with pytest.raises(ValueError, match="recipe"):
        RecipeOptions.preset("awq")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("group", [128, -1])
def test_recipe_is_exact_without_rounding(arch, group, monkeypatch):
    """With the quantizers replaced by identity, rotate + reorder + smooth + SmoothAttention, block by
    block with quantized propagation, leave the FP32 logits unchanged."""
    class Exact:
        def __init__(self, w):
            self.w = w.detach().clone()

    monkeypatch.setattr(recipe, "gptq_quantize_many", lambda ws, h, g, clip_ratios=None: [Exact(w) for w in ws])
    monkeypatch.setattr(recipe, "quantize_weight", lambda w, g: Exact(w))
    monkeypatch.setattr(recipe, "quantize_per_channel", lambda w, r: Exact(w))
    monkeypatch.setattr(recipe, "dequantize", lambda qw: qw.w)
    import qoq.formats.artifact as artifact
    monkeypatch.setattr(artifact, "quantized_tensors", lambda *a, **k: {})
    model = tiny_model(arch)
    x = torch.randint(0, VOCAB, (2, 40))
    ref = logits(model, x)
    _, _, reports = quantize_decoder_blocks(model, calib(), group, RecipeOptions.preset("qoq"), torch.device("cpu"), 2)
    assert all(r["smooth_attn"] is not None for r in reports)
    assert rel(logits(model, x), ref) < 1e-4
    for r in reports:
        assert r["block_output_rel_error"] < 1e-5


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("group", [128, -1])
def test_full_recipe_beats_rtn_through_the_engine(arch, group):
    from qoq.formats.artifact import write_artifact
    from qoq.pipeline import artifact_config
    from qoq.runtime.engine import Engine

    x = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(9))
    errs = {}
    for name in ("rtn", "qoq"):
        model = tiny_model(arch)
        ref = logits(model, x)
        ropts = RecipeOptions.preset(name)
        tensors, modules, reports = quantize_decoder_blocks(model, calib(), group, ropts, torch.device("cpu"), 3)
        config = artifact_config(model, group, modules, ropts.record(model.config, group))
        assert config["quantization_config"]["norms_folded"] is (name == "qoq")
        assert config["tie_word_embeddings"] is (name == "rtn" and arch == "llama")
        if name == "qoq":
            for i in range(2):
                for norm in ("input_layernorm", "post_attention_layernorm"):
                    assert torch.all(tensors[f"model.layers.{i}.{norm}.weight"] == 1)
            assert torch.all(tensors["model.norm.weight"] == 1) and "lm_head.weight" in tensors
        out = Path(tempfile.mkdtemp()) / "artifact"
        write_artifact(out, config, tensors, {"layers": reports})
        engine = Engine(str(out), device="cpu", backend="reference")
        errs[name] = rel(engine.logits(x).double(), ref)
    assert errs["qoq"] < errs["rtn"], errs


def test_gptq_weights_respect_the_integer_scheme(monkeypatch):
    model = tiny_model("mistral")
    ropts = RecipeOptions.preset("qoq")
    layer_results = []
    orig = recipe.quantize_block

    def spy(*a, **k):
        r = orig(*a, **k)
        layer_results.append(r)
        return r

    monkeypatch.setattr(recipe, "quantize_block", spy)
    quantize_decoder_blocks(model, calib(), 32, ropts, torch.device("cpu"), 3)
    for r in layer_results:
        assert set(r.weights) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
        for qw in r.weights.values():
            w8 = qw.int8_weight().to(torch.int32)
            assert int(w8.min()) >= -128 and int(w8.max()) <= 127
            assert int(qw.z.abs().max()) <= PROTECTIVE_RANGE and int(qw.s2.max()) <= 16
        assert set(r.report["step_seconds"]) == {"capture", "transform", "quantize", "propagate"}
