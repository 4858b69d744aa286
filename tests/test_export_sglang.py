"""`qoq export --format sglang`: the checkpoint meets sglang's qoq loader contract and holds our weights exactly.

The contract, as sglang's source states it (python/sglang/srt/layers/quantization/qoq.py, layers/linear.py,
models/llama.py and sgl-kernel's qserve GEMM tests), is emulated here without sglang:
- `QoQConfig.from_config` reads `wbits` and `group_size` from config.json's `quantization_config`;
- `QoQLinearMethod.create_weights` allocates per fused linear (qkv_proj, o_proj, gate_up_proj, down_proj)
  `qweight` int8 [N, K/2], `s1_scales` fp16 [N], then `s1_szeros` fp16 [N] (group -1) or `s2_scales` and
  `s2_zeros` int8 [K/g, N] (output dim 1), from the true N and K;
- the model's loader maps q/k/v_proj -> qkv_proj and gate/up_proj -> gate_up_proj and copies each
  checkpoint tensor into its shard (narrowed along the output dim), asserting equal shapes.
"""
from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from qoq.scheme.progressive import QuantizedWeight, dequantize
from qoq.cli import app
from qoq.formats.artifact import read_artifact
from qoq.formats.export_sglang import export_sglang, sglang_shape_problem
from qoq.scheme.layout import pack_group_params, pack_weight, unpack_group_params, unpack_weight
from qoq.pipeline import QuantizeOptions, quantize

from conftest import TINY_CORPUS, assert_one_line_error, build_tiny_model  # noqa: E402

runner = CliRunner()
SGLANG_DIMS = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=32)
STACKED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
           "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
OUTPUT_DIM = {"qweight": 0, "s1_scales": 0, "s1_szeros": 0, "bias": 0, "s2_scales": 1, "s2_zeros": 1}


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QOQ_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """(arch, group, rotation, sglang dims?) -> an artifact written by a quick `rtn` quantize."""
    built = {}
    calib = tmp_path_factory.mktemp("calib") / "calib.txt"
    calib.write_text("\n\n".join([TINY_CORPUS] * 8))

    def make(arch: str, group: int, rotation: bool = False, sglang_dims: bool = True):
        key = (arch, group, rotation, sglang_dims)
        if key not in built:
            root = tmp_path_factory.mktemp(f"{arch}-{group}")
            model = build_tiny_model(arch, root / "model", **(SGLANG_DIMS if sglang_dims else {}))
            res = quantize(QuantizeOptions(model=str(model), calib=str(calib), calib_samples=4, calib_seqlen=32,
                                           group_size=group, recipe_name="rtn", rotation=rotation,
                                           output=root / "art", device="cpu"))
            built[key] = res.path
        return built[key]
    return make


def sglang_parameters(config: dict, group: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """What sglang allocates for block 0 (QoQLinearMethod.create_weights on the fused linears)."""
    h, inter = config["hidden_size"], config["intermediate_size"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    d = config.get("head_dim") or h // heads
    linears = {"self_attn.qkv_proj": ((heads + 2 * kv) * d, h), "self_attn.o_proj": (h, heads * d),
               "mlp.gate_up_proj": (2 * inter, h), "mlp.down_proj": (h, inter)}
    params = {}
    for name, (n, k) in linears.items():
        p = f"model.layers.0.{name}"
        params[f"{p}.qweight"] = (torch.int8, (n, k // 2))
        params[f"{p}.s1_scales"] = (torch.float16, (n,))
        if group == -1:
            params[f"{p}.s1_szeros"] = (torch.float16, (n,))
        else:
            params[f"{p}.s2_scales"] = params[f"{p}.s2_zeros"] = (torch.int8, (k // group, n))
    return params


def shard_sizes(config: dict) -> dict[str, list[int]]:
    heads, kv, d = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    inter = config["intermediate_size"]
    return {"qkv_proj": [heads * d, kv * d, kv * d], "gate_up_proj": [inter, inter]}


def load_like_sglang(tensors: dict[str, torch.Tensor], config: dict, group: int) -> dict[str, torch.Tensor]:
    """Block 0's fused parameters filled from the checkpoint the way sglang's weight loaders do it."""
    params = {name: torch.full(shape, 99, dtype=dtype)
              for name, (dtype, shape) in sglang_parameters(config, group).items()}
    written = {name: torch.zeros(p.shape, dtype=torch.bool) for name, p in params.items()}
    sizes = shard_sizes(config)
    for tname, t in tensors.items():
        if not tname.startswith("model.layers.0.") or tname.rsplit(".", 1)[1] not in OUTPUT_DIM:
            continue
        module, suffix = tname.rsplit(".", 1)
        part = module.rsplit(".", 1)[1]
        if suffix == "bias":
            continue  # fp16 [N] into the fused bias: the same narrowing as s1_scales
        fused, shard = STACKED.get(part, (part, None))
        pname = f"{module.rsplit('.', 1)[0]}.{fused}.{suffix}"
        assert pname in params, f"{tname}: sglang allocates no {pname}"
        dst, mask = params[pname], written[pname]
        if shard is not None:
            offset, size = sum(sizes[fused][:shard]), sizes[fused][shard]
            dst = dst.narrow(OUTPUT_DIM[suffix], offset, size)
            mask = mask.narrow(OUTPUT_DIM[suffix], offset, size)
        assert dst.shape == t.shape and dst.dtype == t.dtype, (tname, t.dtype, tuple(t.shape), tuple(dst.shape))
        dst.copy_(t)
        mask.fill_(True)
    assert all(bool(m.all()) for m in written.values()), [n for n, m in written.items() if not m.all()]
    return params


def fused_dequantized(params: dict[str, torch.Tensor], name: str, group: int) -> torch.Tensor:
    t = {k.rsplit(".", 1)[1]: v for k, v in params.items() if k.startswith(name + ".")}
    q = unpack_weight(t["qweight"])
    n, k = q.shape
    if group == -1:
        qw = QuantizedWeight(q=q, s1=t["s1_scales"], group_size=-1, out_features=n, in_features=k,
                             szeros=t["s1_szeros"])
    else:
        qw = QuantizedWeight(q=q, s1=t["s1_scales"], group_size=group, out_features=n, in_features=k,
                             s2=unpack_group_params(t["s2_scales"]), z=-unpack_group_params(t["s2_zeros"]))
    return dequantize(qw)


def read_checkpoint(folder) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    config = json.loads((folder / "config.json").read_text())
    return config, load_file(folder / "model.safetensors")


@pytest.mark.parametrize("arch,group,rotation", [("llama", 128, True), ("llama", -1, False), ("qwen2", 128, False)])
def test_export_meets_sglang_loader_contract_and_keeps_weights_exactly(artifacts, tmp_path, arch, group, rotation):
    path = artifacts(arch, group, rotation)
    out = tmp_path / "sglang"
    r = runner.invoke(app, ["export", str(path), "--format", "sglang", "--output", str(out)])
    assert r.exit_code == 0, r.output
    assert "sglang.launch_server" in r.output and "--quantization qoq" in r.output
    config, tensors = read_checkpoint(out)
    assert config["quantization_config"] == {"quant_method": "qoq", "wbits": 4, "group_size": group}
    assert config["torch_dtype"] == "float16" and config["model_type"] == arch
    assert (out / "tokenizer.json").exists() and not (out / "qoq_report.json").exists()

    params = load_like_sglang(tensors, config, group)
    art = read_artifact(path)
    sizes = shard_sizes(config)
    for fused, parts in (("self_attn.qkv_proj", ("q_proj", "k_proj", "v_proj")), ("self_attn.o_proj", ("o_proj",)),
                         ("mlp.gate_up_proj", ("gate_proj", "up_proj")), ("mlp.down_proj", ("down_proj",))):
        w = fused_dequantized(params, f"model.layers.0.{fused}", group)
        widths = sizes.get(fused.split(".")[1], [w.shape[0]])
        for part, rows in zip(parts, w.split(widths), strict=True):
            name = f"model.layers.0.{fused.split('.')[0]}.{part}"
            assert torch.equal(rows, dequantize(art.quantized_weight(name))), name
    if arch == "qwen2":
        assert tensors["model.layers.0.self_attn.k_proj.bias"].dtype == torch.float16
    if rotation:  # norms folded to ones, untied rotated lm_head: a plain Llama checkpoint
        assert config["tie_word_embeddings"] is False and "lm_head.weight" in tensors
        assert torch.equal(tensors["model.layers.1.input_layernorm.weight"], torch.ones(128, dtype=torch.float16))


def test_export_is_a_plain_hf_model_computing_the_artifact(artifacts, tmp_path):
    """Dequantized into a stock transformers Llama (strict load: no missing or extra names), the export gives
    the logits of the artifact's floating-point twin."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from qoq.verify.simulated import simulated_model

    path = artifacts("llama", 128, True)
    out = export_sglang(path, tmp_path / "sglang")
    config, tensors = read_checkpoint(out)
    art = read_artifact(path)
    state = {name: t for name, t in tensors.items() if name.rsplit(".", 1)[1] not in OUTPUT_DIM}
    for name in art.linear_names:
        state[f"{name}.weight"] = dequantize(art.quantized_weight(name))
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out), dtype=torch.float32).eval()
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    ids = torch.randint(0, config["vocab_size"], (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model(ids).logits
        want = simulated_model(art, act_quant=False, kv_quant=False)(ids).logits
    assert float((got - want).abs().max() / want.abs().max()) < 1e-5


def test_layout_is_the_qserve_format_of_sgl_kernel():
    """Our packing equals the order sgl-kernel's qserve GEMM tests build (convert_to_qserve_format)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (64, 256), generator=g, dtype=torch.uint8)
    t = q.to(torch.int16).reshape(2, 2, 2, 8, 8, 2, 4, 4).permute(0, 4, 3, 6, 1, 5, 2, 7)
    t = t.permute(0, 1, 2, 3, 5, 6, 7, 4)  # (n/32, k/32, 8, 4, k16 half, n8 half, 4, nibble half)
    want = ((t[..., 1] << 4) + t[..., 0]).to(torch.uint8).reshape(64, 128)
    assert torch.equal(pack_weight(q).view(torch.uint8), want)
    z = torch.randint(-64, 64, (64, 2), generator=g, dtype=torch.int8)  # [N, K/128], natural order
    interleaved = z.t().reshape(2, 2, 4, 8).transpose(-2, -1).reshape(2, 64)  # columns 0, 8, 16, 24, 1, 9, ...
    assert torch.equal(pack_group_params(z), interleaved)


def test_export_refuses_shapes_sglang_cannot_run(artifacts, tmp_path):
    path = artifacts("llama", 128, sglang_dims=False)  # hidden 96
    out = tmp_path / "sglang"
    r = runner.invoke(app, ["export", str(path), "--output", str(out)])
    assert_one_line_error(r, "hidden_size = 96", "multiple of 128")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]

    def linears(h, inter, q, kv):
        shapes = {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
                  "self_attn.o_proj": (h, q), "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h),
                  "mlp.down_proj": (h, inter)}
        return {f"model.layers.{i}.{n}": s for i in range(2) for n, s in shapes.items()}

    smollm2 = linears(576, 1536, 576, 192)
    assert "input width hidden_size = 576 is not a multiple of 128" in sglang_shape_problem(smollm2, 128)
    assert "group size 128 or -1" in sglang_shape_problem(linears(128, 256, 128, 64), 64)
    # q+k+v = 192: enough for the group-128 kernel's 64-wide tiles, not for per-channel's 128-wide ones
    assert sglang_shape_problem(linears(128, 256, 128, 32), 128) is None
    qkv_192 = sglang_shape_problem(linears(128, 256, 128, 32), -1)
    assert "(num_heads + 2 * num_key_value_heads) * head_dim = 192" in qkv_192
    assert "intermediate_size = 320" in sglang_shape_problem(linears(128, 320, 128, 64), 128)
    assert "k_proj: its output width 16" in sglang_shape_problem(linears(128, 256, 224, 16), 128)
    assert sglang_shape_problem(linears(4096, 14336, 4096, 1024), -1) is None  # Llama-3-8B


def test_export_output_folder_rules(artifacts, tmp_path, monkeypatch):
    path = artifacts("llama", -1)
    out = tmp_path / "sglang"
    out.mkdir()
    r = runner.invoke(app, ["export", str(path), "--output", str(out)])  # an empty folder is free to use
    assert r.exit_code == 0, r.output
    marker = json.loads((out / "qoq_export.json").read_text())
    assert marker["format"] == "sglang" and marker["artifact"] == str(path.resolve())
    r = runner.invoke(app, ["export", str(path), "--output", str(out)])
    assert_one_line_error(r, "already exists", "--overwrite")
    r = runner.invoke(app, ["export", str(path), "--output", str(out), "--overwrite"])  # an earlier export
    assert r.exit_code == 0, r.output
    assert (out / "model.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("target,fragments", [
    ("mine", ["exists and is not a qoq export", "choose another --output"]),
    ("mine/keep.txt", ["is a file", "choose another --output"]),
    (".", ["current directory", "choose another --output"]),
    ("ART", ["is, contains or lies inside the artifact"]),
    ("ART_PARENT", ["is, contains or lies inside the artifact"]),
    ("MODEL", ["is, contains or lies inside the artifact's source model"]),
    ("OTHER_ARTIFACT", ["is not a qoq export"]),
])
def test_export_overwrite_never_replaces_what_it_did_not_write(artifacts, tmp_path, monkeypatch, target, fragments):
    path = artifacts("llama", -1)
    other = artifacts("llama", 128)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("mine")
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "notes.txt").write_text("mine")
    monkeypatch.chdir(tmp_path / "work")
    named = {"ART": path, "ART_PARENT": path.parent, "MODEL": path.parent / "model", "OTHER_ARTIFACT": other}
    target = str(named.get(target, tmp_path / target if target != "." else "."))
    before = sorted(str(p) for root in (tmp_path, path.parent, other.parent) for p in root.rglob("*"))
    r = runner.invoke(app, ["export", str(path), "--output", target, "--overwrite"])
    assert_one_line_error(r, *fragments)
    assert sorted(str(p) for root in (tmp_path, path.parent, other.parent) for p in root.rglob("*")) == before
    assert (tmp_path / "mine" / "keep.txt").read_text() == "mine"


def test_export_into_an_unwritable_place_is_one_line(artifacts, tmp_path):
    path = artifacts("llama", -1)
    (tmp_path / "a-file").write_text("x")
    r = runner.invoke(app, ["export", str(path), "--output", str(tmp_path / "a-file" / "out")])
    assert_one_line_error(r, "cannot create the folder", "choose another --output")
    assert (tmp_path / "a-file").read_text() == "x"


def test_export_vllm_format_is_named(artifacts, tmp_path):
    path = artifacts("llama", -1)
    r = runner.invoke(app, ["export", str(path), "--format", "vllm", "--output", str(tmp_path / "x")])
    assert_one_line_error(r, "--format 'vllm'", "sglang")
