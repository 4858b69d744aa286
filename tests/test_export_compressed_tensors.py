"""`qoq export --format compressed-tensors`: per-channel artifacts as asymmetric W4A16 `pack-quantized`.

The contract, as compressed-tensors' PackedQuantizationCompressor and vLLM's CompressedTensorsWNA16 state
it, is emulated here without either library: eight 4-bit codes per int32 (code i in bits 4i..4i+3, stored
as the signed value + 8), `weight_packed` [N, K/8] packed along K, `weight_zero_point` [N/8, 1] packed
along N, `weight_scale` [N, 1], `weight_shape` [N, K]; W = scale * (code - zero_point).
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from qoq.scheme.progressive import dequantize
from qoq.cli import app
from qoq.formats.artifact import read_artifact
from qoq.formats.export_compressed_tensors import pack_int32
from qoq.pipeline import QuantizeOptions, quantize

from conftest import TINY_CORPUS, assert_one_line_error  # noqa: E402

runner = CliRunner()


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QOQ_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def artifacts(tiny_model_dir, tmp_path_factory):
    built = {}
    calib = tmp_path_factory.mktemp("calib") / "calib.txt"
    calib.write_text("\n\n".join([TINY_CORPUS] * 8))

    def make(arch: str, group: int):
        if (arch, group) not in built:
            out = tmp_path_factory.mktemp(f"ct-{arch}-{group}") / "art"
            built[(arch, group)] = quantize(QuantizeOptions(
                model=str(tiny_model_dir(arch)), calib=str(calib), calib_samples=4, calib_seqlen=32, group_size=group,
                recipe_name="rtn", output=out, device="cpu")).path
        return built[(arch, group)]
    return make


def unpack(words: torch.Tensor, dim: int, length: int) -> torch.Tensor:
    """compressed-tensors' unpacking: word j, nibble i -> index 8j + i along `dim`; unsigned codes."""
    w = words.t() if dim == 0 else words
    codes = torch.stack([(w >> (4 * i)) & 0xF for i in range(8)], dim=-1).reshape(w.shape[0], -1)[:, :length]
    return codes.t() if dim == 0 else codes


def test_pack_int32_layout():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 15, 9]], dtype=torch.uint8)
    words = pack_int32(codes, dim=1)
    assert words.dtype == torch.int32 and words.shape == (1, 2)
    assert int(words[0, 0]) == 0xF7654321 - 2**32 and int(words[0, 1]) == 9
    assert torch.equal(pack_int32(codes.t(), dim=0), words.t())


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_export_keeps_the_per_channel_integers_exactly(artifacts, tmp_path, arch):
    path = artifacts(arch, -1)
    out = tmp_path / "ct"
    r = runner.invoke(app, ["export", str(path), "--format", "compressed-tensors", "--output", str(out)])
    assert r.exit_code == 0, r.output
    assert "vllm serve" in r.output
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["config_groups"]["group_0"]["weights"] | {"observer": None, "observer_kwargs": None} == {
        "num_bits": 4, "type": "int", "symmetric": False, "strategy": "channel", "group_size": None,
        "dynamic": False, "actorder": None, "block_structure": None, "observer": None, "observer_kwargs": None}
    assert qc["config_groups"]["group_0"]["input_activations"] is None and qc["ignore"] == ["lm_head"]
    tensors = load_file(out / "model.safetensors")
    art = read_artifact(path)
    assert not any(name.endswith((".qweight", ".s1_scales", ".s1_szeros")) for name in tensors)
    for name, (n, k) in art.qconfig["modules"].items():
        packed, zp, scale = (tensors[f"{name}.{s}"] for s in ("weight_packed", "weight_zero_point", "weight_scale"))
        assert packed.dtype == zp.dtype == torch.int32 and scale.dtype == torch.float16
        assert packed.shape == (n, k // 8) and zp.shape == (n // 8, 1) and scale.shape == (n, 1)
        assert tensors[f"{name}.weight_shape"].tolist() == [n, k]
        qw = art.quantized_weight(name)
        q, z = unpack(packed, 1, k), unpack(zp, 0, n)[:, 0]
        assert torch.equal(q, qw.q[:n, :k].to(torch.int32)) and torch.equal(scale[:, 0], qw.s1[:n])
        # the artifact's s1_szeros is fp16(z * s1) of exactly these integer zeros
        assert torch.equal((z.float() * scale[:, 0].float()).half(), qw.szeros[:n])
        w_ct = scale.float() * (q - z[:, None]).float()
        rounding = (qw.szeros[:n].float() - z.float() * scale[:, 0].float()).abs().max()
        assert float((w_ct - dequantize(qw)).abs().max()) <= float(rounding) + 1e-7
    if arch == "qwen2":
        assert tensors["model.layers.0.self_attn.q_proj.bias"].dtype == torch.float16


def test_export_refuses_group_artifacts(artifacts, tmp_path):
    path = artifacts("llama", 128)
    r = runner.invoke(app, ["export", str(path), "--format", "compressed-tensors", "--output", str(tmp_path / "ct")])
    assert_one_line_error(r, "no exact form of group size 128", "--group -1", "--format sglang")
    assert not (tmp_path / "ct").exists()
