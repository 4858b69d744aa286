"""Bad input is refused before the work: non-finite weights, tampered artifacts, bad options and calibration
files, damaged caches and truncated GGUFs each end in one line, a non-zero exit and nothing written."""
from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from qoq.cli import app
from qoq.errors import QoqError

from conftest import TINY_CORPUS, assert_one_line_error

runner = CliRunner()
SMALL = ["--calib-samples", "2", "--calib-seqlen", "16", "--device", "cpu"]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QOQ_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("QOQ_SMOLLM2_GGUF", raising=False)
    monkeypatch.delenv("QOQ_NO_GGUF_CACHE", raising=False)


@pytest.fixture(autouse=True, scope="module")
def no_transformers_progress_bars():
    """transformers' own "Loading weights" bar would be a second line in the captured output."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    yield
    if enabled:
        hf_logging.enable_progress_bar()


@pytest.fixture(scope="module")
def calib_text(tmp_path_factory):
    file = tmp_path_factory.mktemp("calib") / "calib.txt"
    file.write_text("\n\n".join([TINY_CORPUS] * 8))
    return file


def planted_model(source: Path, folder: Path, tensor: str, value: float, index=(0, 0)) -> Path:
    """A copy of the tiny model with `value` written into one element of `tensor`."""
    shutil.copytree(source, folder)
    weights = folder / "model.safetensors"
    tensors = load_file(weights)
    t = tensors[tensor]
    t[index[: t.dim()]] = value
    save_file(tensors, weights, metadata={"format": "pt"})
    return folder


def quantize_cli(model: Path, calib: Path, output: Path, *extra: str):
    return runner.invoke(app, ["quantize", "--model", str(model), "--calib", str(calib), *SMALL,
                               "--output", str(output), *extra])


def assert_error_line(result, *fragments):
    """A failure after progress lines: they may stay, the error is one last line without a traceback."""
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert "Traceback" not in result.output and lines[-1].startswith("error:"), result.output
    assert sum(line.startswith("error") for line in lines) == 1, result.output
    for f in fragments:
        assert f in lines[-1], result.output


def nothing_written(tmp_path: Path, output: Path) -> bool:
    return not output.exists() and not [p for p in tmp_path.iterdir() if p.name.endswith((".partial", ".old"))]


# ---- non-finite values ---------------------------------------------------------------------------------

@pytest.mark.parametrize("tensor,value,recipe", [
    ("model.layers.1.mlp.down_proj.weight", math.inf, "rtn"),
    ("model.embed_tokens.weight", math.nan, "rtn"),
    ("model.layers.0.input_layernorm.weight", math.nan, "rtn"),
    ("model.layers.0.mlp.down_proj.weight", -math.inf, "qoq"),
])
def test_non_finite_source_weights_are_refused_before_any_work(tiny_model_dir, calib_text, tmp_path, tensor,
                                                              value, recipe):
    model = planted_model(tiny_model_dir("llama"), tmp_path / "bad", tensor, value)
    out = tmp_path / "art"
    r = quantize_cli(model, calib_text, out, "--recipe", recipe)
    assert_one_line_error(r, tensor, "NaN/Inf", "re-download")
    assert "quantizing blocks" not in r.output and nothing_written(tmp_path, out)


def test_non_finite_weights_of_a_model_loaded_in_memory_are_refused(tiny_model_dir, tmp_path):
    """Data-free calibration loads the whole model in memory: that path has its own check."""
    model = planted_model(tiny_model_dir("llama"), tmp_path / "bad", "model.layers.1.mlp.up_proj.weight", math.nan)
    out = tmp_path / "art"
    r = runner.invoke(app, ["quantize", "--model", str(model), "--calib", "data-free", "--calib-samples", "2",
                            "--calib-seqlen", "16", "--output", str(out)])
    assert r.exit_code == 1 and "Traceback" not in r.output
    last = r.output.strip().splitlines()[-1]  # after the note that the model is loaded in memory
    assert last.startswith("error:") and "model.layers.1.mlp.up_proj.weight" in last and "NaN/Inf" in last
    assert "sampling" not in r.output and nothing_written(tmp_path, out)


def test_a_source_tensor_of_the_wrong_shape_is_refused_before_any_work(tiny_model_dir, calib_text, tmp_path):
    model = tmp_path / "bad"
    shutil.copytree(tiny_model_dir("llama"), model)
    tensors = load_file(model / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"][:, :10].clone()
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "art"
    r = quantize_cli(model, calib_text, out)
    assert_one_line_error(r, "model.layers.1.mlp.up_proj.weight", "[160, 10]", "[160, 96]", "consistent HF model")
    assert "quantizing blocks" not in r.output and nothing_written(tmp_path, out)


def test_overflowing_block_outputs_stop_the_run(tiny_model_dir, calib_text, tmp_path):
    """Finite weights whose activations overflow: the default recipe names the block instead of failing
    inside GPTQ ("Hessian is not positive definite")."""
    model = planted_model(tiny_model_dir("llama"), tmp_path / "big", "model.layers.0.post_attention_layernorm.weight",
                          3e38, index=(slice(None),))
    out = tmp_path / "art"
    r = quantize_cli(model, calib_text, out, "--calib-dtype", "float32")
    assert_error_line(r, "block 0", "NaN/Inf", "nothing was written")
    assert nothing_written(tmp_path, out)


def test_tensors_that_overflow_float16_are_not_written(tiny_model_dir, calib_text, tmp_path):
    model = planted_model(tiny_model_dir("llama"), tmp_path / "wide", "model.embed_tokens.weight", 1e6,
                          index=(300, 0))
    out = tmp_path / "art"
    r = quantize_cli(model, calib_text, out, "--recipe", "rtn")
    assert_error_line(r, "model.embed_tokens.weight", "NaN/Inf", "nothing was written")
    assert nothing_written(tmp_path, out)


def test_strict_json_maps_non_finite_numbers_to_null():
    from qoq.checks import strict_json

    text = strict_json({"a": math.nan, "b": [1.5, math.inf, {"c": -math.inf}], "d": "NaN"})
    assert json.loads(text, parse_constant=_reject) == {"a": None, "b": [1.5, None, {"c": None}], "d": "NaN"}


def test_verify_json_is_strict(monkeypatch, tmp_path):
    from qoq.verify import perplexity
    from qoq.verify.perplexity import PplResult, VerifyResult

    def fake_verify(opts, reporter):
        return VerifyResult(artifact=str(opts.artifact), dataset="wikitext2", data_source="x", seq_len=16,
                            windows=1, backend="reference", device="cpu",
                            quantized=PplResult(ppl=math.inf, nll_sum=math.inf, tokens=15, seconds=0.1),
                            baseline=PplResult(ppl=math.nan, nll_sum=math.nan, tokens=15, seconds=0.1))

    monkeypatch.setattr(perplexity, "verify", fake_verify)
    r = runner.invoke(app, ["verify", str(tmp_path), "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output, parse_constant=_reject)
    assert data["ppl_quantized"] is None and data["ppl_fp16"] is None and data["delta"] is None
    assert data["tokens"] == 15


def _reject(token):
    raise AssertionError(f"non-standard JSON token {token}")


# ---- tampered artifacts ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def artifact(tiny_model_dir, calib_text, tmp_path_factory):
    out = tmp_path_factory.mktemp("rtn") / "art"
    r = runner.invoke(app, ["quantize", "--model", str(tiny_model_dir("llama")), "--calib", str(calib_text),
                            *SMALL, "--recipe", "rtn", "--output", str(out)],
                      env={"QOQ_CACHE_DIR": str(out.parent / "cache")})
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture
def copy(artifact, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(artifact, dst)
    return dst


def edit_config(folder: Path, edit) -> None:
    file = folder / "config.json"
    config = json.loads(file.read_text())
    edit(config)
    file.write_text(json.dumps(config))


def edit_tensors(folder: Path, edit) -> None:
    file = folder / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_report_is_strict_json_and_inspect_prints_the_hashes(artifact):
    report = json.loads((artifact / "qoq_report.json").read_text(), parse_constant=_reject)
    r = runner.invoke(app, ["inspect", str(artifact)])
    assert r.exit_code == 0, r.output
    assert report["source"]["sha256"] in r.output and report["calibration"]["sha256"] in r.output


@pytest.mark.parametrize("tensor", ["model.layers.0.mlp.down_proj.s1_scales", "model.norm.weight"])
def test_non_finite_artifact_tensors_are_corrupt(copy, tensor):
    edit_tensors(copy, lambda t: t[tensor].view(-1).__setitem__(0, math.inf))
    assert_one_line_error(runner.invoke(app, ["inspect", str(copy)]), "corrupt artifact", tensor, "NaN/Inf")


@pytest.mark.parametrize("bad", [[96], [96, "96"], [0, 96], [96, -1], True, None, [96, 96.0], [True, 96]])
def test_malformed_modules_entries_are_corrupt(copy, bad):
    edit_config(copy, lambda c: c["quantization_config"]["modules"].__setitem__(
        "model.layers.0.self_attn.q_proj", bad))
    assert_one_line_error(runner.invoke(app, ["inspect", str(copy)]), "corrupt artifact", "modules",
                          "model.layers.0.self_attn.q_proj")


def test_wrong_embedding_shape_is_corrupt_at_open(copy):
    edit_tensors(copy, lambda t: t.__setitem__("model.embed_tokens.weight",
                                               t["model.embed_tokens.weight"][:100].clone()))
    r = runner.invoke(app, ["generate", str(copy), "-p", "hello", "-n", "2", "--device", "cpu"])
    assert_one_line_error(r, "corrupt artifact", "model.embed_tokens.weight", "(100, 96)")


@pytest.mark.parametrize("key,value", [("w_bits", 8), ("a_bits", 16), ("kv_bits", 8), ("kv_bits", True),
                                       ("protective_range", 127), ("s2_zeros", "plain")])
def test_a_scheme_qoq_does_not_run_is_refused(copy, key, value):
    edit_config(copy, lambda c: c["quantization_config"].__setitem__(key, value))
    assert_one_line_error(runner.invoke(app, ["inspect", str(copy)]), f"quantization_config.{key}", "W4A8KV4")


@pytest.mark.parametrize("key,value,fragment", [
    ("num_hidden_layers", 1, "does not have"),
    ("num_hidden_layers", 3, "needs model.layers.2.self_attn.q_proj"),
    ("num_attention_heads", 8, "head and hidden sizes"),
    ("num_key_value_heads", 4, "model.layers.0.self_attn.k_proj"),
    ("head_dim", 8, "head and hidden sizes"),
    ("intermediate_size", 64, "model.layers.0.mlp.gate_proj"),
    ("num_hidden_layers", None, "num_hidden_layers"),
    ("rms_norm_eps", "x", "transformers rejects its config.json"),
])
def test_a_config_that_does_not_match_the_weights_is_corrupt(copy, key, value, fragment):
    edit_config(copy, lambda c: c.__setitem__(key, value))
    for command in (["inspect", str(copy)], ["generate", str(copy), "-p", "hi", "-n", "2", "--device", "cpu"]):
        assert_one_line_error(runner.invoke(app, command), "corrupt artifact", fragment)


def test_generation_past_the_context_is_refused(artifact):
    r = runner.invoke(app, ["generate", str(artifact), "-p", "hello", "-n", "600", "--device", "cpu"])
    assert_one_line_error(r, "exceed the model's context of 512 tokens", "--max-new-tokens")


def test_verify_windows_past_the_context_are_refused(artifact):
    r = runner.invoke(app, ["verify", str(artifact), "--seq-len", "1024", "--no-baseline", "--backend", "reference"])
    assert_one_line_error(r, "--seq-len 1024", "context of 512 tokens", "--seq-len 512")


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/tmp/outside.safetensors", "sub/model.safetensors"])
def test_index_pointing_outside_the_artifact_is_corrupt(copy, shard):
    (copy / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"model.embed_tokens.weight": shard}}))
    assert_one_line_error(runner.invoke(app, ["inspect", str(copy)]), "corrupt artifact", "outside", shard)


# ---- options validated before anything is loaded ------------------------------------------------------

@pytest.mark.parametrize("command", [
    ["quantize", "--model", "./no/such/model"],
    ["verify", "/no/such/artifact"],
])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_batch_size_is_validated_first(command, value):
    assert_one_line_error(runner.invoke(app, [*command, "--batch-size", value]), "--batch-size", ">= 1", value)


@pytest.mark.parametrize("spec", ["", "   "])
def test_an_empty_model_is_not_the_default_model(spec):
    assert_one_line_error(runner.invoke(app, ["quantize", "--model", spec]), "--model is empty", "leave --model out")


@pytest.mark.parametrize("args,fragment", [
    (["-n", "0"], "--max-new-tokens"), (["-t", "-1"], "--temperature"), (["-t", "nan"], "--temperature"),
    (["--top-p", "0"], "--top-p"), (["--top-p", "1.5"], "--top-p"), (["--top-p", "nan"], "--top-p"),
    (["--seed", "99999999999999999999999"], "--seed"), (["--seed", "-1"], "--seed"),
])
def test_generate_options_are_validated_before_the_artifact(args, fragment):
    r = runner.invoke(app, ["generate", "/no/such/artifact", "-p", "hi", *args])
    assert_one_line_error(r, fragment)


# ---- calibration files ---------------------------------------------------------------------------------

@pytest.mark.parametrize("content", [b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 40,
                                     "text " .encode() * 100 + b"\xff\xfe\xfd more text"])
def test_binary_calibration_files_are_refused(tiny_model_dir, tmp_path, content):
    calib = tmp_path / "program.txt"
    calib.write_bytes(content)
    r = quantize_cli(tiny_model_dir("llama"), calib, tmp_path / "art")
    assert_one_line_error(r, "not UTF-8 text", str(calib))


def test_device_files_are_refused(tiny_model_dir, tmp_path):
    r = quantize_cli(tiny_model_dir("llama"), Path("/dev/zero"), tmp_path / "art")
    assert_one_line_error(r, "/dev/zero", "not a regular file")


def test_calibration_longer_than_the_context_is_refused(tiny_model_dir, calib_text, tmp_path):
    r = runner.invoke(app, ["quantize", "--model", str(tiny_model_dir("llama")), "--calib", str(calib_text),
                            "--calib-samples", "2", "--calib-seqlen", "1024", "--output", str(tmp_path / "art")])
    assert_error_line(r, "--calib-seqlen 1024", "context (512 tokens")


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_calibration_reads_at_most_the_budget(tiny_model_dir, tmp_path, monkeypatch, suffix):
    from transformers import AutoTokenizer

    from qoq.calibration import data

    docs = [f"document number {i}: " + TINY_CORPUS.splitlines()[i % 10] for i in range(2000)]
    file = tmp_path / f"big{suffix}"
    if suffix == ".jsonl":
        file.write_text("\n".join(json.dumps({"text": d}) for d in docs) + "\n")
    else:
        file.write_text("\n\n".join(docs) + "\n")
    monkeypatch.setattr(data, "READ_MIN_BYTES", 0)
    monkeypatch.setattr(data, "READ_BYTES_PER_TOKEN", 64)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir("llama"))
    cs = data.load_calibration(str(file), tok, n_samples=8, seqlen=16)  # budget 64 x 8 x 16 = 8 KiB
    read = int(re.search(r"\((\d+) documents\)", cs.description).group(1))
    assert 8 <= read <= len(docs) * 8192 // file.stat().st_size + 1 < len(docs) // 10
    assert cs.input_ids.shape == (8, 16)


# ---- the default GGUF and the converted-model cache ------------------------------------------------------

def test_default_gguf_is_checked_against_its_pinned_sha256(tmp_path, monkeypatch, capsys):
    from qoq.models import smollm2

    good = b"GGUF" + bytes(range(200))
    target = tmp_path / "cache" / "smollm2" / smollm2.GGUF_NAME
    target.parent.mkdir(parents=True)
    target.write_bytes(good)
    monkeypatch.setattr(smollm2, "GGUF_SIZE", len(good))
    monkeypatch.setattr(smollm2, "GGUF_SHA256", hashlib.sha256(good).hexdigest())
    downloads = []

    def fake_download(path):
        downloads.append(path)
        raise QoqError("download attempted")

    monkeypatch.setattr(smollm2, "_download", fake_download)
    assert smollm2.default_gguf_path() == target.resolve() and not downloads
    hash_files = smollm2.sha256_of_files
    monkeypatch.setattr(smollm2, "sha256_of_files", lambda _p: pytest.fail("hashed twice"))
    assert smollm2.default_gguf_path() == target.resolve()  # the check is remembered by path+mtime+size
    monkeypatch.setattr(smollm2, "sha256_of_files", hash_files)
    target.write_bytes(good[:-1] + b"\x00")  # same size, different content
    with pytest.raises(QoqError, match="download attempted"):
        smollm2.default_gguf_path()
    assert downloads == [target]
    assert "corrupt" in capsys.readouterr().err


def write_gguf(path: Path, arch: str = "llama", n: int = 64) -> Path:
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
    w.add_tensor("token_embd.weight", np.ones((n, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("keep", [0.05, 0.5, 0.99])
def test_truncated_gguf_is_one_line(tmp_path, keep):
    p = write_gguf(tmp_path / "tiny.Q8_0.gguf")
    from qoq.models.gguf_check import require_complete_gguf
    require_complete_gguf(p)  # the complete file passes
    data = p.read_bytes()
    p.write_bytes(data[: int(len(data) * keep)])
    r = runner.invoke(app, ["quantize", "--model", str(p), "--output", str(tmp_path / "art")])
    assert_one_line_error(r, str(p), "not a valid GGUF file", "truncated")


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_conversion_cache_is_rebuilt_with_a_notice(tiny_model_dir, tmp_path, monkeypatch, capsys, damage):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qoq.models import load_model, sources

    conversions = []

    def fake_convert(path):
        conversions.append(path)
        folder = tiny_model_dir("llama")
        return AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)

    monkeypatch.setattr(sources, "_convert_gguf", fake_convert)
    gguf_file = write_gguf(tmp_path / "tiny.gguf")
    first = load_model(str(gguf_file))
    expected = {name: t.clone() for name, t in first.model.state_dict().items()}
    sha = first.source_sha256
    del first  # its tensors may be memory-mapped from the file damaged below
    load_model(str(gguf_file))
    assert len(conversions) == 1  # the second load came from the cache
    weights = sources._gguf_cache_dir(sha) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "truncate":
        weights.write_bytes(bytes(data[: len(data) // 2]))
    else:
        weights.unlink()
    capsys.readouterr()
    again = load_model(str(gguf_file))
    assert len(conversions) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "damaged" in err and str(weights.parent) in err and "QOQ_NO_GGUF_CACHE" in err
    got = again.model.state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    load_model(str(gguf_file))
    assert len(conversions) == 2  # rebuilt once, sound again
