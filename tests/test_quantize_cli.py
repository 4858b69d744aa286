"""`qoq quantize` and `qoq inspect` end to end, and their answers to bad input."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from qoq.scheme.progressive import dequantize
from qoq.cli import app, run_cli
from qoq.formats.artifact import read_artifact
from qoq.pipeline import QuantizeOptions, quantize

from conftest import assert_one_line_error  # noqa: E402
from recipe_tiny import one_thread  # noqa: E402

runner = CliRunner()


@pytest.fixture
def calib_text(tmp_path):
    from conftest import TINY_CORPUS
    file = tmp_path / "calib.txt"
    file.write_text("\n\n".join([TINY_CORPUS] * 8))
    return file


_one_thread = pytest.fixture(autouse=True)(one_thread)  # byte equality across runs: one summation order


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QOQ_CACHE_DIR", str(tmp_path / "cache"))


def no_partial_left(folder: Path):
    return not [p for p in folder.iterdir() if p.name.endswith(".partial") or p.name.endswith(".old")]


@pytest.mark.parametrize("arch,group", [("llama", 128), ("qwen2", 32), ("mistral", 64), ("llama", -1)])
def test_tiny_models_quantize_and_reload_exactly(tiny_model_dir, calib_text, tmp_path, arch, group):
    out = tmp_path / "art"
    res = quantize(QuantizeOptions(model=str(tiny_model_dir(arch)), calib=str(calib_text), calib_samples=4,
                                   calib_seqlen=32, group_size=group, output=out, device="cpu", stream=False))
    art = read_artifact(res.path)
    assert art.qconfig["group_size"] == group and art.qconfig["layout"] == "qserve-mma-m16n8k32-v1"
    assert len(art.linear_names) == 2 * 7
    for name in art.linear_names:
        w_hat = res.model.get_submodule(name).weight.detach()
        assert torch.equal(dequantize(art.quantized_weight(name)), w_hat), name
    if arch == "qwen2":
        assert "model.layers.0.self_attn.q_proj.bias" in art.tensors
    assert (res.path / "tokenizer.json").exists() and (res.path / "qoq_report.json").exists()
    assert art.report["calibration"]["samples"] == 4

    streamed = quantize(QuantizeOptions(model=str(tiny_model_dir(arch)), calib=str(calib_text), calib_samples=4,
                                        calib_seqlen=32, group_size=group, output=tmp_path / "streamed",
                                        device="cpu"))
    assert streamed.model is None and streamed.report["source"]["streamed"]
    for file in ("model.safetensors", "config.json"):  # streaming changes memory, not results
        assert (streamed.path / file).read_bytes() == (res.path / file).read_bytes(), file


def test_cli_quantize_then_inspect(tiny_model_dir, calib_text, tmp_path):
    out = tmp_path / "art"
    r = runner.invoke(app, ["quantize", "--model", str(tiny_model_dir("llama")), "--calib", str(calib_text),
                            "--calib-samples", "4", "--calib-seqlen", "32", "--output", str(out)])
    assert r.exit_code == 0, r.output
    assert "wrote" in r.output and "smaller" in r.output
    r = runner.invoke(app, ["inspect", str(out)])
    assert r.exit_code == 0, r.output
    assert "compression" in r.output and "block 1 " in r.output
    # the output folder exists now: refused without --overwrite, replaced with it
    r = runner.invoke(app, ["quantize", "--model", str(tiny_model_dir("llama")), "--calib", str(calib_text),
                            "--calib-samples", "4", "--calib-seqlen", "32", "--output", str(out)])
    assert_one_line_error(r, "already exists", "--overwrite")
    r = runner.invoke(app, ["quantize", "--model", str(tiny_model_dir("llama")), "--calib", str(calib_text),
                            "--calib-samples", "4", "--calib-seqlen", "32", "--output", str(out), "--overwrite"])
    assert r.exit_code == 0, r.output
    assert no_partial_left(tmp_path)


@pytest.mark.parametrize("args,fragments", [
    (["--group", "100"], ["--group 100", "32, 64, 128 or -1"]),
    (["--model", "./no/such/model"], ["does not exist"]),
    (["--model", "/no/such/model.gguf"], ["does not exist"]),
])
def test_bad_quantize_inputs(args, fragments, tmp_path):
    r = runner.invoke(app, ["quantize", *args, "--output", str(tmp_path / "o")])
    assert_one_line_error(r, *fragments)
    assert not (tmp_path / "o").exists() and no_partial_left(tmp_path)


def test_unknown_hub_id_offline(hub_offline, tmp_path):
    r = runner.invoke(app, ["quantize", "--model", "nobody/no-such-model", "--output", str(tmp_path / "o")])
    assert_one_line_error(r, "hub", "--model")
    assert not (tmp_path / "o").exists()


def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(folder)
    r = runner.invoke(app, ["quantize", "--model", str(folder), "--output", str(tmp_path / "o")])
    assert_one_line_error(r, "GPT2LMHeadModel", "Llama", "Mistral", "Qwen2")
    assert not (tmp_path / "o").exists() and no_partial_left(tmp_path)


def test_inspect_rejects_corrupt_and_truncated_artifacts(tiny_model_dir, calib_text, tmp_path):
    out = tmp_path / "art"
    quantize(QuantizeOptions(model=str(tiny_model_dir("llama")), calib=str(calib_text), calib_samples=2,
                             calib_seqlen=16, output=out, device="cpu"))
    weights = out / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    assert_one_line_error(runner.invoke(app, ["inspect", str(out)]), "corrupt", "qoq quantize")
    weights.write_bytes(b"\x00" * 64)
    assert_one_line_error(runner.invoke(app, ["inspect", str(out)]), "corrupt")
    assert_one_line_error(runner.invoke(app, ["inspect", str(tmp_path / "nothing")]), "does not exist")
    assert_one_line_error(runner.invoke(app, ["inspect", str(tiny_model_dir("llama"))]), "not a qoq artifact")


def test_default_model_quantizes_on_cpu(smollm2_gguf, shared_data_dir, tmp_path):
    """`qoq quantize` with no model argument: the embedded SmolLM2-135M (small calibration set for CI)."""
    out = tmp_path / "smol"
    r = runner.invoke(app, ["quantize", "--calib-samples", "4", "--calib-seqlen", "128", "--device", "cpu",
                            "--output", str(out)], env={"QOQ_DATA_DIR": str(shared_data_dir)})
    assert r.exit_code == 0, r.output
    assert "SmolLM2-135M" in r.output and "calibration:" in r.output
    r = runner.invoke(app, ["inspect", str(out)])
    assert r.exit_code == 0, r.output
    art = read_artifact(out)
    assert len(art.linear_names) == 30 * 7
    assert art.report["sizes"]["compression"] > 1.5


@pytest.mark.parametrize("args, fragment", [
    (["quantize", "--group", "abc"], "Invalid value for '--group'"),
    (["quantize", "--no-such-flag"], "No such option: --no-such-flag"),
    (["bogus"], "No such command 'bogus'"),
    (["generate", "--temperature", "warm"], "Invalid value for '--temperature'"),
])
def test_usage_errors_are_one_line_naming_the_help(args, fragment, capsys):
    assert run_cli(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], lines
    assert lines[0].endswith(f"(see 'qoq {args[0]} --help')" if args[0] != "bogus" else "(see 'qoq --help')")


def test_help_still_prints_and_exits_zero(capsys):
    assert run_cli(["quantize", "--help"]) == 0
    assert "--group" in capsys.readouterr().out


def test_the_installed_entry_point_exits_with_the_usage_error_code():
    r = subprocess.run([sys.executable, "-m", "qoq.cli", "export", "--format", "nope", "--bogus"],
                       capture_output=True, text=True, timeout=120, env=dict(os.environ, QOQ_DEBUG=""))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
