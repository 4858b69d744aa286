"""Whole-model backend comparison (qoq.verify.backend_compare.compare_backends, python -m qoq.verify.compare) on CPU."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from qoq.verify.compare import app
from qoq.verify.backend_compare import aggregate_metrics, compare_backends, logits_metrics

from conftest import TINY_CORPUS, assert_one_line_error  # noqa: E402

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_art(tiny_model_dir, tmp_path_factory) -> Path:
    from qoq.pipeline import QuantizeOptions, quantize

    tmp = tmp_path_factory.mktemp("tiny-compare")
    calib = tmp / "calib.txt"
    calib.write_text("\n\n".join([TINY_CORPUS] * 8))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QOQ_CACHE_DIR", str(tmp / "cache"))
        res = quantize(QuantizeOptions(model=str(tiny_model_dir("llama")), calib=str(calib), calib_samples=4,
                                       calib_seqlen=32, recipe_name="rtn", output=tmp / "art", device="cpu"))
    return Path(res.path)


@pytest.fixture
def wiki_file(tmp_path) -> Path:
    f = tmp_path / "wiki.test.raw"
    f.write_text("\n".join(TINY_CORPUS.splitlines() * 6) + "\n")
    return f


def test_reference_against_itself_is_exact(tiny_art):
    from qoq.formats.artifact import read_artifact

    art = read_artifact(tiny_art)
    windows = torch.randint(0, art.config["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(0))
    rep = compare_backends(art, windows, torch.device("cpu"), "reference", "reference", decode_tokens=5)
    assert len(rep["windows"]) == 2 and rep["decode_tokens"] == 5
    o = rep["overall"]
    assert o["frobenius_rel_error"] == 0 and o["max_rel_error"] == 0 and o["position_rel_error_mean"] == 0
    assert o["top1_agreement"] == 1 and o["kl_mean"] == pytest.approx(0, abs=1e-6)
    assert o["nll_reference"] == o["nll_candidate"] and o["ppl_rel_diff"] == 0
    assert o["positions"] == 80 and o["tokens"] == 78 and o["windows"] == 2
    f = rep["floor"]  # the reference against its own whole-window prefill: close, same tokens
    assert len(rep["floor_windows"]) == 2 and f["positions"] == 80 and f["top1_agreement"] > 0.9
    assert f["frobenius_rel_error"] < 0.05 and f["nll_reference"] == o["nll_reference"]


def test_a_wrong_candidate_is_measured_as_wrong(tiny_art):
    """The candidate engine really runs the candidate backend: a GEMM off by 5% shows in every figure."""
    from qoq.formats.artifact import read_artifact
    from qoq.runtime.backend import Backend, reference_backend

    ref = reference_backend()
    bad = Backend("bad", {**ref.fns, "w4a8_linear": lambda a, w, out_dtype=torch.float16:
                          ref.w4a8_linear(a, w, out_dtype) * 1.05})
    art = read_artifact(tiny_art)
    windows = torch.randint(0, art.config["vocab_size"], (1, 24), generator=torch.Generator().manual_seed(0))
    rep = compare_backends(art, windows, torch.device("cpu"), bad, "reference", decode_tokens=4, floor=False)
    o = rep["overall"]
    assert o["frobenius_rel_error"] > 1e-3 and o["max_rel_error"] > 1e-3 and o["kl_mean"] > 0
    assert o["nll_candidate"] != o["nll_reference"]


def test_metrics_of_a_known_difference():
    torch.manual_seed(0)
    r = torch.randn(6, 11)
    c = r.clone()
    c[2] = r[2].flip(0)  # one position changed completely
    ids = torch.randint(0, 11, (6,))
    m = logits_metrics(r, c, ids)
    assert m["frobenius_rel_error"] == pytest.approx(float((c - r).norm() / r.norm()), rel=1e-5)
    assert m["position_rel_error_mean"] == pytest.approx(float((c[2] - r[2]).norm() / r[2].norm()) / 6, rel=1e-5)
    assert m["top1_agreement"] == pytest.approx(5 / 6)
    assert m["kl_mean"] > 0
    agg = aggregate_metrics([m, logits_metrics(r, r, ids)])
    assert agg["frobenius_rel_error"] == pytest.approx(m["frobenius_rel_error"] / 2 ** 0.5, rel=1e-5)
    assert agg["top1_agreement"] == pytest.approx(11 / 12) and agg["windows"] == 2


def test_cli_reference_vs_reference(tiny_art, wiki_file, tmp_path):
    path = tmp_path / "out" / "compare.json"
    r = runner.invoke(app, [str(tiny_art), "--windows", "2", "--seq-len", "32", "--backend-a", "reference",
                            "--backend-b", "reference", "--device", "cpu", "--data", str(wiki_file),
                            "--json", str(path)])
    assert r.exit_code == 0, r.output
    rep = json.loads(path.read_text())
    assert rep["overall"]["frobenius_rel_error"] == 0 and rep["overall"]["top1_agreement"] == 1
    assert rep["seq_len"] == 32 and len(rep["windows"]) == 2 and rep["data_source"] == str(wiki_file)


def test_cli_missing_artifact(tmp_path):
    r = runner.invoke(app, [str(tmp_path / "missing"), "--backend-b", "reference", "--device", "cpu"])
    assert_one_line_error(r, "does not exist")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
@pytest.mark.parametrize("device", ["auto", "cpu", "cuda"])
def test_cli_cupy_without_cuda(tiny_art, device):
    r = runner.invoke(app, [str(tiny_art), "--backend-b", "cupy", "--device", device])
    assert_one_line_error(r, "cuda" if device == "cuda" else "--backend-b cupy")


@pytest.mark.parametrize("args,fragment", [
    (["--windows", "0"], "--windows"),
    (["--seq-len", "1"], "--seq-len"),
    (["--decode-tokens", "64", "--seq-len", "64"], "--decode-tokens"),
    (["--backend-a", "fast"], "--backend-a 'fast' is not one of"),
])
def test_cli_bad_options(tiny_art, args, fragment):
    r = runner.invoke(app, [str(tiny_art), "--backend-b", "reference", "--device", "cpu", *args])
    assert_one_line_error(r, fragment)
