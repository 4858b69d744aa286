"""scripts/sglang_check.py on its tiny shape (CPU, reference backend): the export reads back byte for byte,
the engine runs the exported tensors, and a corrupted export makes the check fail."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from qoq.bench import synthetic

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "sglang_check.py"
ARGS = ["--shape", "tiny", "--batch", "2", "--prompt-len", "24", "--decode-steps", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("sglang_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def report_of(script, tmp_path, *extra) -> tuple[int, dict | None]:
    rc = script.main([*ARGS, "--out", str(tmp_path), *extra])
    out = tmp_path / "sglang_check.json"
    return rc, json.loads(out.read_text()) if out.exists() else None


def test_tiny_export_runs_as_the_artifact(script, tmp_path, capsys):
    shapes_before = dict(synthetic.SHAPES)
    rc, report = report_of(script, tmp_path)
    assert rc == 0 and report["ok"], capsys.readouterr().out
    assert synthetic.SHAPES == shapes_before  # the tiny shape was registered for the run only
    assert report["layers"] == 2 and report["device"] == "cpu"
    by_format = {r["format"]: r for r in report["formats"]}
    assert set(by_format) == {"g128", "per-channel"}
    for fmt, r in by_format.items():
        assert r["bytes_identical"] and r["export_problems"] == [], fmt
        assert r["tensors"] == 3 + 2 * (2 + 7 * (4 if fmt == "g128" else 3))  # embed, norm, head; per block
        assert r["prefill_same_semantics"] == {"max_abs": 0.0, "rel": 0.0, "top1": 1.0}
        assert r["decode"]["rel"] > 0  # FP16 KV against KV4: a real difference, reported
    assert by_format["g128"]["prefill"]["rel"] == 0.0  # sglang's conventions change nothing for group 128
    assert 0 < by_format["per-channel"]["prefill"]["rel"] < 0.5  # the activation-sum convention
    table = capsys.readouterr().out
    assert "export, sglang semantics, prefill" in table and "all checks passed" in table


def test_a_corrupted_export_fails_the_check(script, tmp_path, monkeypatch, capsys):
    read_export = script.read_export

    def flip_one_byte(folder):
        config, tensors = read_export(folder)
        t = tensors["model.layers.1.mlp.down_proj.qweight"]
        t.view(-1)[0] ^= 1
        return config, tensors

    monkeypatch.setattr(script, "read_export", flip_one_byte)
    rc, report = report_of(script, tmp_path)
    assert rc == 1 and not report["ok"]
    for r in report["formats"]:
        assert not r["bytes_identical"] and "prefill" not in r
        assert "1 tensors differ from the artifact byte for byte, e.g. model.layers.1.mlp.down_proj.qweight" in \
            r["export_problems"]
    assert "CHECK FAILED" in capsys.readouterr().out


def test_sglang_config_is_checked(script, tmp_path, monkeypatch):
    read_export = script.read_export

    def per_group_64(folder):
        config, tensors = read_export(folder)
        config["quantization_config"]["group_size"] = 64
        return config, tensors

    monkeypatch.setattr(script, "read_export", per_group_64)
    rc, report = report_of(script, tmp_path)
    assert rc == 1
    assert any("quantization_config is" in p for r in report["formats"] for p in r["export_problems"])


def test_bad_input_is_one_line(script, tmp_path, capsys):
    assert script.main(["--shape", "tiny", "--layers", "3", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --layers 3 must be between 1 and 2 (the blocks of tiny)"
    assert script.main(["--shape", "llama-9b", "--out", str(tmp_path)]) == 2
    assert "--shape 'llama-9b' is not one of" in capsys.readouterr().err
    assert not (tmp_path / "sglang_check.json").exists()
    assert torch.cuda.is_available() or script.main([*ARGS, "--device", "cuda", "--out", str(tmp_path)]) == 2
