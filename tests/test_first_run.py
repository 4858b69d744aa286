"""The first run: calibration budget chosen and said up front, progress in logs, the closing summary."""
from __future__ import annotations

import io
import os
import json
import re

import pytest
from typer.testing import CliRunner

from qoq.calibration import data as calib_data
from qoq.calibration.data import DATA_FREE_CPU_BUDGET, PAPER_BUDGET, plan_calibration
from qoq.cli import app

runner = CliRunner()


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QOQ_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def no_local_text(monkeypatch):
    monkeypatch.delenv("QOQ_CALIB_DATA", raising=False)
    monkeypatch.delenv("QOQ_DATA_DIR", raising=False)


@pytest.fixture(scope="module")
def tiny4(tmp_path_factory):
    """A 4-block tiny Llama: enough blocks for progress lines during the block loop."""
    from conftest import build_tiny_model

    return build_tiny_model("llama", tmp_path_factory.mktemp("tiny4"), num_layers=4)


@pytest.fixture
def calib_text(tmp_path):
    from conftest import TINY_CORPUS

    file = tmp_path / "calib.txt"
    file.write_text("\n\n".join([TINY_CORPUS] * 8))
    return file


# ------------------------------------------------------------------------------------------ budget

def test_data_free_fallback_on_cpu_gets_the_small_budget(hub_offline, no_local_text):
    plan = plan_calibration(None, "cpu")
    assert (plan.source, plan.budget) == ("data-free", "data-free-cpu")
    assert (plan.n_samples, plan.seqlen) == DATA_FREE_CPU_BUDGET != PAPER_BUDGET
    lines = plan.message.splitlines()
    assert len(lines) == 2 and "data-free" in lines[0] and f"{plan.n_samples} x {plan.seqlen} tokens" in lines[0]
    assert "no Hugging Face hub and no local text" in lines[0] and "CPU" in lines[0]
    for fix in ("--calib pileval", "--calib PATH", f"--calib-samples {PAPER_BUDGET[0]}",
                f"--calib-seqlen {PAPER_BUDGET[1]}"):
        assert fix in lines[1]
    assert plan.record()["budget"] == "data-free-cpu"
    short = DATA_FREE_CPU_BUDGET[1] // 2 + 1
    assert plan_calibration("data-free", "cpu", context=short).seqlen == short - 1  # shortened to the context


def test_budget_stays_the_papers_elsewhere(hub_offline, no_local_text, calib_text):
    on_gpu = plan_calibration(None, "cuda")
    assert on_gpu.source == "data-free" and (on_gpu.n_samples, on_gpu.seqlen) == PAPER_BUDGET
    assert on_gpu.budget == "paper" and "--calib pileval" in on_gpu.message  # still says how to get real text
    text = plan_calibration(str(calib_text), "cpu")
    assert (text.source, text.budget, text.n_samples, text.seqlen) == ("local", "paper", *PAPER_BUDGET)
    assert "\n" not in text.message
    user = plan_calibration(None, "cuda", n_samples=7)
    assert (user.budget, user.n_samples, user.seqlen) == ("user", 7, PAPER_BUDGET[1])


def test_a_given_budget_flag_keeps_the_other_flags_default(hub_offline, no_local_text):
    assert (plan_calibration("data-free", "cpu", n_samples=7).n_samples,
            plan_calibration("data-free", "cpu", n_samples=7).seqlen) == (7, DATA_FREE_CPU_BUDGET[1])
    only_seqlen = plan_calibration("data-free", "cpu", seqlen=64)
    assert (only_seqlen.budget, only_seqlen.n_samples, only_seqlen.seqlen) == ("user", DATA_FREE_CPU_BUDGET[0], 64)
    assert plan_calibration("data-free", "cuda", seqlen=64).n_samples == PAPER_BUDGET[0]


def test_cli_data_free_fallback_says_so_first_and_records_it(tiny_model_dir, hub_offline, no_local_text, tmp_path,
                                                            monkeypatch):
    monkeypatch.setattr(calib_data, "DATA_FREE_CPU_BUDGET", (3, 16))  # the real one takes minutes
    out = tmp_path / "art"
    r = runner.invoke(app, ["quantize", "--model", str(tiny_model_dir("llama")), "--device", "cpu", "--recipe", "rtn",
                            "-o", str(out)])
    assert r.exit_code == 0, r.output
    err = r.stderr
    said = err.index("calibration: auto: no Hugging Face hub and no local text")
    assert said < err.index("calibration data: auto: hub unreachable")  # said before the data is built
    assert "--calib-samples 128 --calib-seqlen 1024" in err
    calib = json.loads((out / "qoq_report.json").read_text())["calibration"]
    assert ((calib["source"], calib["budget"], calib["samples"], calib["seqlen"])
            == ("data-free", "data-free-cpu", 3, 16))


# ---------------------------------------------------------------------------------------- progress

def test_cli_progress_lines_in_a_log_and_the_summary(tiny4, calib_text, tmp_path, monkeypatch):
    monkeypatch.setenv("QOQ_PROGRESS_INTERVAL", "0.02")
    out = tmp_path / "art"
    r = runner.invoke(app, ["quantize", "--model", str(tiny4), "--calib", str(calib_text), "--calib-samples", "8",
                            "--calib-seqlen", "64", "--device", "cpu", "-o", str(out)])
    assert r.exit_code == 0, r.output
    blocks = [line for line in r.stderr.splitlines() if line.startswith("quantizing blocks")]
    assert re.fullmatch(r"quantizing blocks… \([0-4]/4\)", blocks[0])
    assert re.fullmatch(r"quantizing blocks: done \(4, (?:[\d.]+ m?s|\d+ min \d+ s)\)", blocks[-1])
    periodic = blocks[1:-1]
    assert periodic and all(
        re.fullmatch(r"quantizing blocks: [0-4]/4 \(\d+%\), (?:[\d.]+ m?s|\d+ min \d+ s)(, eta .+)?", line)
        for line in periodic)
    assert any(", eta " in line for line in periodic)  # once a block is done the ETA shows
    assert "\x1b[" not in r.stderr  # plain text, no live display escapes
    stdout = " ".join(r.stdout.split())
    assert re.search(r"time: load (?:[\d.]+ m?s|\d+ min \d+ s), calibration data (?:[\d.]+ m?s|\d+ min \d+ s), "
                     r"block loop (?:[\d.]+ m?s|\d+ min \d+ s), write (?:[\d.]+ m?s|\d+ min \d+ s) "
                     r"\(total (?:[\d.]+ m?s|\d+ min \d+ s)\)", stdout)
    assert re.search(r"peak host memory [\d.]+ (MiB|GiB), artifact [\d.]+ MiB on disk", stdout)
    assert f"next: qoq verify {out} --ppl wikitext2" in stdout


def test_plain_progress_is_periodic_not_a_line_per_update():
    import time

    from rich.console import Console

    from qoq.progress import RichReporter

    buf = io.StringIO()
    reporter = RichReporter(Console(file=buf, width=200), interval=0.2)
    for _ in reporter.track(range(200), "work"):
        time.sleep(0.005)  # ~1 s in all: a handful of lines, not 200
    lines = buf.getvalue().splitlines()
    assert 3 <= len(lines) <= 12, lines
    assert re.fullmatch(r"work… \(\d+/200\)", lines[0]) and re.fullmatch(r"work: done \(200, .+\)", lines[-1])
    assert all(re.fullmatch(r"work: \d+/200 \(\d+%\), .+", line) for line in lines[1:-1])
    buf.truncate(0)
    assert sum(1 for _ in RichReporter(Console(file=buf), interval=10).track(range(500), "quick")) == 500
    assert buf.getvalue() == ""  # a step that ends at once prints nothing


def test_third_party_output_is_quiet_unless_verbose():
    from transformers.utils import logging as hf_logging

    from qoq.progress import quiet_third_party

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    with quiet_third_party():
        assert hf_logging.get_verbosity() == hf_logging.ERROR and not hf_logging.is_progress_bar_enabled()
    assert (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()) == (level, bars)
    with quiet_third_party(verbose=True):
        assert (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()) == (level, bars)


# ---------------------------------------------------------------------------------------- generate

def test_generate_reports_load_prefill_and_decode_separately(tiny_model_dir, calib_text, tmp_path):
    from qoq.pipeline import QuantizeOptions, quantize
    from qoq.runtime.engine import generate_text

    art = quantize(QuantizeOptions(model=str(tiny_model_dir("llama")), calib=str(calib_text), calib_samples=2,
                                   calib_seqlen=16, recipe_name="rtn", output=tmp_path / "art", device="cpu")).path
    stats = generate_text(art, "The quick brown fox", max_new_tokens=5, device="cpu")
    assert stats["load_s"] > 0 and stats["prefill_s"] > 0
    assert stats["decode_steps"] in (stats["new_tokens"] - 1, stats["new_tokens"])  # max reached / EOS sampled
    r = runner.invoke(app, ["generate", str(art), "-p", "The quick brown fox", "-n", "5", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    said = " ".join(r.stderr.split())
    assert re.search(r"load (?:[\d.]+ m?s|\d+ min \d+ s), "
                     r"prefill \d+ tokens in (?:[\d.]+ m?s|\d+ min \d+ s) \([\d,.]+ tokens/s\), "
                     r"(decode \d+ tokens in (?:[\d.]+ m?s|\d+ min \d+ s) \([\d,.]+ tokens/s\)|decode: none)",
                     said), said


def test_data_free_sampling_reports_every_token(tiny_model_dir):
    from contextlib import contextmanager

    from qoq.calibration.data import load_calibration
    from qoq.models import load_model
    from qoq.progress import Reporter, Task

    class Counting(Reporter):
        tasks: list[Task] = []

        @contextmanager
        def task(self, description, total=None, unit=""):
            task = Task(total)
            self.tasks.append(task)
            yield task

    lm = load_model(str(tiny_model_dir("llama")))
    reporter = Counting()
    cs = load_calibration("data-free", lm.tokenizer, n_samples=5, seqlen=9, model=lm.model, reporter=reporter)
    assert cs.input_ids.shape == (5, 9)
    assert [(t.total, t.completed) for t in reporter.tasks] == [(45, 45)]
    assert lm.tokenizer.eos_token_id not in cs.input_ids  # min_new_tokens: EOS is never sampled


def test_gguf_conversion_bar_obeys_the_transformers_switch():
    """transformers draws the GGUF dequantization bar with raw tqdm; it must go quiet with the other bars."""
    gguf_utils = pytest.importorskip("transformers.modeling_gguf_pytorch_utils")
    from transformers.utils import logging as hf_logging

    from qoq.models.sources import _gguf_bar_follows_transformers

    original = gguf_utils.tqdm
    was_enabled = hf_logging.is_progress_bar_enabled()
    try:
        hf_logging.disable_progress_bar()
        with _gguf_bar_follows_transformers():
            assert gguf_utils.tqdm(range(3)).disable
        hf_logging.enable_progress_bar()
        with _gguf_bar_follows_transformers():
            assert not gguf_utils.tqdm(range(3), file=open(os.devnull, "w")).disable
        assert gguf_utils.tqdm is original
    finally:
        (hf_logging.enable_progress_bar if was_enabled else hf_logging.disable_progress_bar)()
