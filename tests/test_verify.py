"""`qoq verify --ppl wikitext2` and `qoq generate`: end to end on a tiny model and on SmolLM2-135M, and
their answers to bad input."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from qoq.cli import app
from qoq.verify.perplexity import hf_text_from_raw

from conftest import assert_one_line_error  # noqa: E402

runner = CliRunner()


@pytest.fixture(scope="module")
def wikitext_dir() -> Path:
    import os

    root = os.environ.get("QOQ_DATA_DIR")
    root = Path(root) if root else Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
    folder = (root / "wikitext-2-raw-v1").resolve()
    if not (folder / "wiki.test.raw").is_file():
        pytest.skip(f"WikiText-2 not found under {root}; set QOQ_DATA_DIR")
    return folder


@pytest.fixture(scope="module")
def module_cache(tmp_path_factory):
    """A private QOQ_CACHE_DIR for the module's quantize runs (the last-artifact record goes there)."""
    cache = tmp_path_factory.mktemp("qoq-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QOQ_CACHE_DIR", str(cache))
        yield cache


@pytest.fixture(scope="module")
def tiny_artifact(tiny_model_dir, tmp_path_factory, module_cache) -> Path:
    """A tiny Llama quantized by the real pipeline (it has a tokenizer and a reloadable source)."""
    from conftest import TINY_CORPUS

    from qoq.pipeline import QuantizeOptions, quantize

    tmp = tmp_path_factory.mktemp("tiny-verify")
    calib = tmp / "calib.txt"
    calib.write_text("\n\n".join([TINY_CORPUS] * 8))
    res = quantize(QuantizeOptions(model=str(tiny_model_dir("llama")), calib=str(calib), calib_samples=4,
                                   calib_seqlen=32, output=tmp / "art", device="cpu"))
    return Path(res.path)


@pytest.fixture(autouse=True)
def cache_env(module_cache, monkeypatch):
    monkeypatch.setenv("QOQ_CACHE_DIR", str(module_cache))
    monkeypatch.delenv("QOQ_WIKITEXT2", raising=False)


def test_hf_text_from_raw(wikitext_dir):
    raw = (wikitext_dir / "wiki.test.raw").read_text(encoding="utf-8")
    text = hf_text_from_raw(raw)
    # HF rows: "", " = Robert Boulter = \n", "", " Robert Boulter is ...\n", ... joined with "\n\n"
    assert text.startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is")
    assert len(raw.splitlines()) == 4358 and text.endswith("Eddie Pelkey . \n\n\n")


def test_verify_tiny_json_table_and_max_delta(tiny_artifact, wikitext_dir):
    args = ["verify", str(tiny_artifact), "--ppl", "wikitext2", "--data", str(wikitext_dir), "--seq-len", "64",
            "--max-windows", "2", "--device", "cpu"]
    r = runner.invoke(app, args + ["--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)  # stdout holds only the JSON
    assert report["windows"] == 2 and report["tokens"] == 2 * 63 and report["seq_len"] == 64
    assert math.isfinite(report["ppl_fp16"]) and math.isfinite(report["ppl_quantized"])
    assert report["delta"] == pytest.approx(report["ppl_quantized"] - report["ppl_fp16"])
    assert report["backend"] == "reference" and report["kernel_check"] is None
    assert any("kernel check skipped" in n for n in report["notes"])
    r = runner.invoke(app, args + ["--no-baseline"])
    assert r.exit_code == 0, r.output
    assert "PPL W4A8KV4" in r.stdout and f"{report['ppl_quantized']:.4f}" in r.stdout
    assert "PPL FP" not in r.stdout and "delta" not in r.stdout  # no empty baseline columns
    r = runner.invoke(app, args)
    assert r.exit_code == 0 and "PPL FP32" in r.stdout and f"{report['delta']:+.4f}" in r.stdout  # CPU baseline
    # --max-delta: a bound nobody meets fails with one line
    r = runner.invoke(app, args + ["--max-delta", "-1000000"])
    assert r.exit_code == 1 and "Traceback" not in r.output
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: quantized PPL") and "more than --max-delta" in last
    r = runner.invoke(app, args + ["--max-delta", "1000000", "--max-windows", "1"])
    assert r.exit_code == 0, r.output


def test_verify_defaults_to_the_last_quantized_artifact(tiny_artifact, wikitext_dir):
    r = runner.invoke(app, ["verify", "--ppl", "wikitext2", "--data", str(wikitext_dir), "--seq-len", "32",
                            "--max-windows", "1", "--no-baseline", "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    said = " ".join(r.stderr.split())  # the console wraps long lines
    assert f"artifact: {tiny_artifact} (written by the last `qoq quantize`; the current directory holds no qoq " \
           "artifact)" in said
    assert json.loads(r.stdout)["artifact"] == str(tiny_artifact)


def test_generate_streams_and_is_reproducible(tiny_artifact):
    args = ["generate", str(tiny_artifact), "-p", "The quick brown fox", "-n", "6", "--device", "cpu"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "tokens in" in r.stderr and "reference on cpu" in r.stderr
    sampled = [runner.invoke(app, args + ["--temperature", "0.9", "--seed", "3", "--no-chat-template"])
               for _ in range(2)]
    assert all(s.exit_code == 0 for s in sampled)
    assert sampled[0].stdout == sampled[1].stdout


def test_verify_missing_data(tiny_artifact, tmp_path, monkeypatch, hub_offline):
    monkeypatch.setenv("QOQ_DATA_DIR", str(tmp_path))
    r = runner.invoke(app, ["verify", str(tiny_artifact), "--ppl", "wikitext2", "--no-baseline", "--device", "cpu"])
    assert_one_line_error(r, "WikiText-2 is not available", "--data")


@pytest.mark.parametrize("case", ["missing-file", "folder-without-file", "empty-file"])
def test_verify_wrong_data_path(tiny_artifact, tmp_path, case):
    if case == "missing-file":
        data, fragment = tmp_path / "nope" / "wiki.test.raw", "does not exist"
    elif case == "folder-without-file":
        data, fragment = tmp_path, "without wiki.test.raw"
    else:
        data, fragment = tmp_path / "wiki.test.raw", "is empty"
        data.write_text("")
    r = runner.invoke(app, ["verify", str(tiny_artifact), "--ppl", "wikitext2", "--data", str(data), "--no-baseline",
                            "--device", "cpu"])
    assert_one_line_error(r, fragment)


@pytest.mark.parametrize("command", ["verify", "generate"])
def test_not_an_artifact(tmp_path, wikitext_dir, command):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    extra = ["--data", str(wikitext_dir)] if command == "verify" else ["-p", "hi"]
    r = runner.invoke(app, [command, str(tmp_path), *extra, "--device", "cpu"])
    assert_one_line_error(r, "not a qoq artifact")
    r = runner.invoke(app, [command, str(tmp_path / "missing"), *extra, "--device", "cpu"])
    assert_one_line_error(r, "does not exist")


@pytest.mark.parametrize("command", ["verify", "generate"])
def test_no_artifact_and_no_last_quantize(tmp_path, monkeypatch, command):
    monkeypatch.setenv("QOQ_CACHE_DIR", str(tmp_path / "empty-cache"))
    extra = ["--ppl", "wikitext2"] if command == "verify" else ["-p", "hi"]
    r = runner.invoke(app, [command, *extra])
    assert_one_line_error(r, "no ARTIFACT given", "qoq quantize")


@pytest.mark.parametrize("args,fragment", [
    (["--ppl", "c4"], "use --ppl wikitext2"),
    (["--backend", "cupy"], "cupy"),
    (["--backend", "fast"], "not one of"),
    (["--device", "tpu"], "not one of"),
    (["--seq-len", "1"], "--seq-len"),
    (["--max-delta", "0.5", "--no-baseline"], "drop --no-baseline"),
])
def test_verify_bad_options(tiny_artifact, wikitext_dir, args, fragment):
    r = runner.invoke(app, ["verify", str(tiny_artifact), "--data", str(wikitext_dir), "--device", "cpu", *args])
    assert_one_line_error(r, fragment)


# ---- SmolLM2-135M -----------------------------------------------------------------------------------------

SEQ, WINDOWS = 512, 2


@pytest.fixture(scope="module")
def smol_artifact(smollm2_gguf, shared_data_dir, tmp_path_factory, module_cache) -> Path:
    from qoq.pipeline import QuantizeOptions, quantize

    calib = shared_data_dir / "calibration" / "exllamav2-standard_cal_data" / "wiki.utf8"
    out = tmp_path_factory.mktemp("smol") / "art"
    return Path(quantize(QuantizeOptions(model=str(smollm2_gguf), calib=str(calib), calib_samples=4,
                                         calib_seqlen=256, recipe_name="rtn", output=out, device="cpu")).path)


def _nll_ppl(logits_fn, windows: torch.Tensor) -> float:
    nll, count = 0.0, 0
    for row in windows:
        ids = row[None]
        with torch.no_grad():
            logits = logits_fn(ids).float()
        nll += float(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
    return math.exp(nll / count)


def _fp_model_ppl(reload_spec: str, windows: torch.Tensor) -> float:
    """The FP model evaluated directly with transformers; it is freed on return."""
    from qoq.models.sources import load_model

    model = load_model(reload_spec, torch.float32).model
    return _nll_ppl(lambda ids: model(ids).logits, windows)


@pytest.mark.slow
def test_verify_smollm2_wikitext2(smol_artifact, wikitext_dir):
    from transformers import AutoTokenizer

    from qoq.formats.artifact import read_artifact
    from qoq.verify.lockstep import lockstep_compare
    from qoq.verify.simulated import simulated_model
    from qoq.verify.perplexity import load_wikitext2, token_windows

    r = runner.invoke(app, ["verify", str(smol_artifact), "--ppl", "wikitext2", "--data", str(wikitext_dir),
                            "--seq-len", str(SEQ), "--max-windows", str(WINDOWS), "--device", "cpu",
                            "--backend", "reference", "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    fp, q = report["ppl_fp16"], report["ppl_quantized"]
    assert report["tokens"] == WINDOWS * (SEQ - 1)
    assert math.isfinite(fp) and math.isfinite(q) and 1 < fp < 1000
    # measured 28.2 -> 64.9 (2.3x) for this RTN artifact of an already 4-bit model; a broken scale, zero
    # or packing lands in the hundreds
    assert fp * 0.98 <= q < fp * 3

    art = read_artifact(smol_artifact)
    tok = AutoTokenizer.from_pretrained(str(smol_artifact))
    windows = token_windows(tok, load_wikitext2(str(wikitext_dir))[0], SEQ, WINDOWS)
    # the FP model evaluated directly with transformers on the same windows: same fp32 arithmetic
    assert _fp_model_ppl(art.report["source"]["reload"], windows) == pytest.approx(fp, rel=1e-4)
    # the simulated-quantization model on the same windows. A free-running W4A8KV4 SmolLM2 is chaotic:
    # an fp32 rounding difference moves a quantizer code by one step now and then and the step grows over
    # 30 layers (perturbing the embeddings by 1e-7 moved a 1.5k-token PPL by 3%), so the PPLs agree
    # statistically; exactness is checked in lockstep below.
    sim = simulated_model(art)
    assert _nll_ppl(lambda ids: sim(ids).logits, windows) == pytest.approx(q, rel=0.08)
    errs, _, _ = lockstep_compare(art, windows[:1, :96], sim=sim)
    assert all(e < 1e-4 for e in errs.values()), errs
