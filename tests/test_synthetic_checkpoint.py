"""scripts/synthetic_checkpoint.py: a random-weight HF checkpoint that transformers loads as its own model,
written reproducibly and in memory bounded by one shard whatever the depth."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "synthetic_checkpoint.py"
TINY_SHARD_GB = "0.0001"  # 100 KB: the tiny shape spreads over several shards
QWEN2_TINY = ["--shape", "qwen2.5-7b", "--hidden", "64", "--intermediate", "96", "--heads", "4", "--kv-heads", "2",
              "--vocab", "320", "--layers", "2"]


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("synthetic_checkpoint", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def write(script, out: Path, *args: str) -> Path:
    assert script.main([*args, "--out", str(out)]) == 0
    return out


def stored_tensors(folder: Path) -> dict[str, torch.Tensor]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    tensors = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(folder / shard), "pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})
    assert {name: index["weight_map"][name] for name in tensors} == index["weight_map"]
    return tensors


@pytest.mark.parametrize("args", [["--shape", "tiny"], QWEN2_TINY], ids=["llama", "qwen2"])
def test_index_covers_the_transformers_state_dict(script, tmp_path, args):
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = write(script, tmp_path / "ckpt", *args, "--shard-gb", TINY_SHARD_GB)
    config = AutoConfig.from_pretrained(str(folder))
    with torch.device("meta"):
        expected = AutoModelForCausalLM.from_config(config).state_dict()
    stored = stored_tensors(folder)
    assert {n: tuple(t.shape) for n, t in stored.items()} == {n: tuple(t.shape) for n, t in expected.items()}
    assert {t.dtype for t in stored.values()} == {torch.bfloat16} and config.dtype == torch.bfloat16
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in stored.values())
    assert len(set(index["weight_map"].values())) >= 3


def test_transformers_loads_it_and_a_forward_pass_is_finite(script, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = write(script, tmp_path / "ckpt", *QWEN2_TINY, "--dtype", "float16", "--shard-gb", TINY_SHARD_GB)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    ids = tokenizer(["Random weights, real shapes: ünïcödé too."], return_tensors="pt")["input_ids"]
    assert ids.max() < model.config.vocab_size and ids[0, 0] == model.config.bos_token_id
    logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 320) and torch.isfinite(logits).all()
    assert model.config.qoq_synthetic["seed"] == 0 and model.config.eos_token_id == tokenizer.eos_token_id
    stored = stored_tensors(folder)
    assert {t.dtype for t in stored.values()} == {torch.float16}
    proj = stored["model.layers.1.mlp.down_proj.weight"].float()
    assert abs(proj.std().item() - 0.02) < 0.002 and abs(proj.mean().item()) < 0.002
    assert abs(stored["model.norm.weight"].float().mean().item() - 1) < 0.01


def test_same_seed_gives_the_same_bytes_whatever_the_shards(script, tmp_path):
    first = write(script, tmp_path / "a", "--shape", "tiny", "--shard-gb", TINY_SHARD_GB)
    again = write(script, tmp_path / "b", "--shape", "tiny", "--shard-gb", TINY_SHARD_GB, "--threads", "1")
    files = sorted(p.name for p in first.iterdir())
    assert files == sorted(p.name for p in again.iterdir())
    for name in files:
        assert (first / name).read_bytes() == (again / name).read_bytes(), name

    one_shard = stored_tensors(write(script, tmp_path / "c", "--shape", "tiny"))
    reference = stored_tensors(first)
    assert all(torch.equal(one_shard[n], t) for n, t in reference.items())
    shallow = stored_tensors(write(script, tmp_path / "d", "--shape", "tiny", "--layers", "2"))
    assert all(torch.equal(reference[n], t) for n, t in shallow.items())  # the first blocks of the deep one
    assert "model.layers.2.mlp.up_proj.weight" not in shallow
    other_seed = stored_tensors(write(script, tmp_path / "e", "--shape", "tiny", "--seed", "1"))
    assert not torch.equal(other_seed["model.layers.0.mlp.up_proj.weight"],
                           reference["model.layers.0.mlp.up_proj.weight"])


@pytest.mark.parametrize("shape, params", [("llama-3-8b", 8_030_261_248), ("llama-3-70b", 70_553_706_496),
                                           ("qwen2.5-7b", 7_615_616_512)])
def test_presets_have_the_published_parameter_counts(script, shape, params):
    fields = script.shape_fields(script.parse_args(["--shape", shape, "--out", "unused"]))
    assert sum(spec.numel for spec in script.tensor_specs(fields)) == params


def test_refuses_a_non_empty_out_and_leaves_it_alone(script, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert script.main(["--shape", "tiny", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--out" in err and "new folder" in err, err
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no partial sibling left behind


def test_an_interrupted_run_leaves_nothing_behind(script, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(script, "write_shards", interrupted)
    with pytest.raises(KeyboardInterrupt):
        script.main(["--shape", "tiny", "--out", str(tmp_path / "ckpt")])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, fragment", [
    (["--hidden", "66"], "--hidden 66 is not a multiple of --heads 4"),
    (["--vocab", "200"], "outside the embedding's vocab of 200"),
    (["--layers", "0"], "--layers 0 must be a positive integer"),
])
def test_bad_shapes_fail_in_one_line_before_writing(script, tmp_path, capsys, args, fragment):
    out = tmp_path / "ckpt"
    assert script.main(["--shape", "tiny", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fragment in err, err
    assert list(tmp_path.iterdir()) == []


# Imports once (transformers too, which the writer imports lazily), then forks a writer per depth:
# RUSAGE_CHILDREN after each is the largest peak so far.
RSS_PROBE = """
import importlib.util, os, resource, sys
import transformers, tokenizers
from transformers import AutoConfig, GenerationConfig, PreTrainedTokenizerFast, LlamaConfig
spec = importlib.util.spec_from_file_location("synthetic_checkpoint", sys.argv[1])
module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
peaks = []
for layers in (2, 8):
    pid = os.fork()
    if pid == 0:
        os._exit(module.main(["--shape", "tiny", "--hidden", "1024", "--intermediate", "4096", "--heads", "16",
                              "--kv-heads", "4", "--vocab", "1024", "--shard-gb", "0.04", "--layers", str(layers),
                              "--out", os.path.join(sys.argv[2], str(layers))]))
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    peaks.append(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
print(*peaks)
"""


def test_peak_memory_does_not_grow_with_depth(tmp_path):
    # 30 MB of bf16 weights per block: holding 8 blocks instead of 2 would add ~180 MB
    probe = subprocess.run([sys.executable, "-c", RSS_PROBE, str(SCRIPT), str(tmp_path)], capture_output=True,
                           text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr
    shallow, deep = (int(x) for x in probe.stdout.split()[-2:])
    written = sum(f.stat().st_size for f in (tmp_path / "8").glob("*.safetensors"))
    assert written > 240e6
    assert deep - shallow < 60e6, (shallow, deep)  # allocator noise measured up to ~30 MB
