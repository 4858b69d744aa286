"""`qoq verify --semantics sglang`: sglang's conventions differ from ours only by the FP16 KV cache and, for
per-channel weights, by the zero point applied to the sum of the unquantized activations."""
from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from qoq.scheme.progressive import quantize_weight
from qoq.cli import app
from qoq.formats.artifact import quantized_tensors, read_artifact
from qoq.scheme import ops
from qoq.runtime.backend import reference_backend
from qoq.runtime.engine import Engine
from qoq.runtime.sglang_semantics import sglang_backend
from qoq.verify.lockstep import LINEAR_ORDER, QUANT_OF_LINEAR, record_engine, rel_err
from qoq.scheme.fakequant import fake_kv4
from qoq.verify.simulated import simulated_model

from conftest import TINY_CORPUS  # noqa: E402
from test_runtime import VOCAB, tiny_hf_model, write_tiny_artifact  # noqa: E402

runner = CliRunner()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    built = {}

    def make(group_size: int):
        if group_size not in built:
            path = tmp_path_factory.mktemp(f"sglang-sem-{group_size}") / "a"
            built[group_size] = read_artifact(write_tiny_artifact(tiny_hf_model("qwen2"), group_size, path))
        return built[group_size]
    return make


def test_per_channel_linear_differs_by_the_activation_sum_term_only():
    torch.manual_seed(0)
    weight, x = torch.randn(64, 96) * 0.1, torch.randn(5, 96) + 0.5  # K = 96 is padded to 128
    sg = sglang_backend(reference_backend())
    for group in (-1, 128):
        w = ops.QLinear.from_tensors(quantized_tensors("l", quantize_weight(weight, group)), "l", 64, 96, group)
        ours = ops.w4a8_linear(ops.quantize_act(x, w.padded_in, w.per_channel), w, torch.float32)
        a = sg.quantize_act(x, w.padded_in, w.per_channel)
        theirs = sg.w4a8_linear(a, w, torch.float32)
        if group == 128:
            assert torch.equal(theirs, ours)
            continue
        # sglang's epilogue (sgl-kernel qserve_w4a8_per_chn_gemm): acc * s1 * s_a - s1_szeros * sum(x)
        acc = ops.int_matmul(a.q, ops.int8_weight(w)).float()[:, :64]
        want = acc * w.s1.float()[None, :64] * a.scale[:, None] - w.szeros.float()[None, :64] * x.sum(1)[:, None]
        assert torch.allclose(theirs, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
        assert float((theirs - ours).abs().max()) > 1e-3 * float(ours.abs().max())


@torch.no_grad()
def lockstep_errors(art, ids: torch.Tensor, sglang: bool, twin_fp16_kv: bool, twin_sum_term: bool) -> dict:
    """The engine (ours, or sglang's semantics) against the artifact's floating-point twin (W_hat, fake INT8
    activations) in lockstep: every quantizer input and linear output of the twin is checked against the
    engine's recorded one, then replaced by it, so nothing accumulates. The twin's attention reads the
    post-RoPE K/V unquantized (`twin_fp16_kv`) or through fake KV4; `twin_sum_term` adds sglang's per-channel
    convention, s1_szeros * (sum(x_hat) - sum(x)), to each per-channel linear output."""
    backend = sglang_backend(reference_backend()) if sglang else reference_backend()
    engine = Engine(art, device="cpu", backend=backend, fast=False)
    engine.prefill_fp16 = sglang  # sglang: attention over the window's own K/V, as an FP16 cache holds them
    rec = record_engine(engine)
    got = engine.logits(ids)
    twin = simulated_model(art, act_quant=False, kv_quant=False)
    errs = {"quantizer inputs": 0.0, "linear outputs": 0.0}
    for i, layer in enumerate(twin.model.layers):
        for k, name in enumerate(LINEAR_ORDER):
            part = ("self_attn." if k < 4 else "mlp.") + name
            szeros = art.quantized_weight(f"model.layers.{i}.{part}").szeros
            j = QUANT_OF_LINEAR[name]

            def pre(_m, args, i=i, j=j):
                err = rel_err(args[0], rec.pre[(i, j)].view_as(args[0]))
                errs["quantizer inputs"] = max(errs["quantizer inputs"], err)
                return (rec.deq[(i, j)].view_as(args[0]),)

            def post(_m, _args, y, i=i, j=j, k=k, szeros=szeros):
                if twin_sum_term and szeros is not None:
                    delta = rec.deq[(i, j)].sum(-1) - rec.pre[(i, j)].sum(-1)
                    y = y + szeros.float()[: y.shape[-1]] * delta.view(y.shape[:-1])[..., None]
                ref = rec.linear[(i, k)].view_as(y)
                errs["linear outputs"] = max(errs["linear outputs"], rel_err(y, ref))
                return ref

            layer.get_submodule(part).register_forward_pre_hook(pre)
            layer.get_submodule(part).register_forward_hook(post)
        layer.self_attn.qoq_kv_hook = (lambda idx, key, value: rec.kv[idx]) if twin_fp16_kv else \
            (lambda idx, key, value: (fake_kv4(rec.kv[idx][0]), fake_kv4(rec.kv[idx][1])))
    errs["logits"] = rel_err(got, twin(ids).logits)
    return errs


TIGHT = 2e-5  # fp32 rounding, relative to the largest element


@pytest.mark.parametrize("group", [128, -1])
def test_sglang_semantics_run_the_same_in_the_engines_fast_mode(artifacts, group):
    """Fast mode (the default on CUDA) fuses the residual add into the norm's quantizer: it must carry
    sglang's activation sum too."""
    art = artifacts(group)
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(2))
    logits = {}
    for fast in (False, True):
        engine = Engine(art, device="cpu", backend=sglang_backend(reference_backend()), fast=fast)
        engine.prefill_fp16 = True
        logits[fast] = engine.logits(ids)
    assert rel_err(logits[True], logits[False]) < TIGHT


@pytest.mark.parametrize("group", [128, 32, -1])
def test_sglang_semantics_differ_from_ours_only_by_fp16_kv_and_the_sum_term(artifacts, group):
    art = artifacts(group)
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    per_channel = group == -1
    # ours is the KV4 twin; sglang's is the FP16-KV twin with, for per-channel weights, the sum term
    assert max(lockstep_errors(art, ids, False, False, False).values()) < TIGHT
    assert max(lockstep_errors(art, ids, True, True, per_channel).values()) < TIGHT
    # each convention is needed: without it the lockstep sees the difference
    assert lockstep_errors(art, ids, True, False, per_channel)["quantizer inputs"] > 1e-3
    if per_channel:
        assert lockstep_errors(art, ids, True, True, False)["linear outputs"] > 1e-3


def test_verify_semantics_sglang_cli(tmp_path, monkeypatch):
    from conftest import build_tiny_model

    from qoq.pipeline import QuantizeOptions, quantize

    monkeypatch.setenv("QOQ_CACHE_DIR", str(tmp_path / "cache"))
    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join([TINY_CORPUS] * 8))
    data = tmp_path / "wiki.test.raw"
    data.write_text("\n".join(f" {line} \n" for line in TINY_CORPUS.splitlines() * 6))
    res = quantize(QuantizeOptions(model=str(build_tiny_model("llama", tmp_path / "m")), calib=str(calib),
                                   calib_samples=4, calib_seqlen=32, group_size=-1, recipe_name="rtn",
                                   output=tmp_path / "art", device="cpu"))
    args = ["verify", str(res.path), "--data", str(data), "--seq-len", "48", "--max-windows", "2", "--device", "cpu",
            "--no-baseline", "--json"]
    reports = {}
    for semantics in ("qoq", "sglang"):
        r = runner.invoke(app, args + ["--semantics", semantics])
        assert r.exit_code == 0, r.output
        reports[semantics] = json.loads(r.stdout)
    sg = reports["sglang"]
    assert sg["semantics"] == "sglang" and math.isfinite(sg["ppl_quantized"])
    assert any("FP16 KV cache" in n and "unquantized activations" in n for n in sg["notes"])
    assert sg["ppl_quantized"] != reports["qoq"]["ppl_quantized"]
    r = runner.invoke(app, args + ["--semantics", "vllm"])
    assert r.exit_code != 0 and "--semantics 'vllm'" in r.output and len(r.output.strip().splitlines()) == 1
