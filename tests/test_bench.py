"""CPU tests of `qoq bench`: arguments, GPU profiles, the JSON schema, --min-speedup, the no-GPU error,
the max-batch plan, the roofline, synthetic shapes and the FP16 baseline engine."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from typer.testing import CliRunner

from qoq.bench import capacity, e2e, profiles, report, roofline, runners, suite, synthetic
from qoq.bench.profiles import DeviceInfo
from qoq.cli import app
from qoq.errors import QoqError

TINY = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=300, rope_theta=10000.0, max_position_embeddings=512,
            rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)
H100 = DeviceInfo(name="NVIDIA H100 80GB HBM3", memory_bytes=85_520_809_984, sm_count=132, capability=(9, 0))


@pytest.fixture
def tiny_shapes(monkeypatch):
    shapes = dict(synthetic.SHAPES)
    shapes["tiny"] = TINY
    shapes["tiny-qwen2"] = {**TINY, "model_type": "qwen2", "use_sliding_window": False}
    shapes["tiny-tied"] = {**TINY, "tie_word_embeddings": True}
    monkeypatch.setattr(synthetic, "SHAPES", shapes)
    monkeypatch.setattr(synthetic, "SHAPE_CHOICES", tuple(shapes))
    monkeypatch.setattr(suite, "SHAPE_CHOICES", tuple(shapes))
    return shapes


def one_line_error(result) -> str:
    text = result.output.strip()
    assert result.exit_code == 1, text
    assert "\n" not in text, text
    assert "Traceback" not in text
    return text


# ---- CLI: arguments and the no-GPU error --------------------------------------------------------------

@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize("args", [[], ["--gpu", "l40s"], ["--shape", "llama-3-8b", "--gpu", "h100", "--json", "x.json"],
                                  ["--gpu", "auto", "--min-speedup", "1.5", "--skip-hf"]])
def test_no_gpu_is_one_line_and_exit_1(no_gpu, args, tmp_path, monkeypatch):
    monkeypatch.setenv("QOQ_CACHE_DIR", str(tmp_path))  # no earlier quantize: the GPU error still comes first
    text = one_line_error(CliRunner().invoke(app, ["bench", *args]))
    assert text == "error: qoq bench needs an NVIDIA GPU (none visible); run it on a GPU machine"


@pytest.mark.parametrize("args, needle", [
    (["--gpu", "v100"], "--gpu 'v100' is not one of l40s, a100, h100, h200, auto"),
    (["--shape", "llama-9b"], "--shape 'llama-9b' is not one of"),
    (["--batches", "1,x"], "--batches '1,x'"),
    (["--batches", "0,8"], "--batches '0,8'"),
    (["--max-batch", "lots"], "--max-batch 'lots'"),
    (["--max-batch", "0"], "--max-batch '0'"),
    (["--output-len", "1"], "--output-len >= 2"),
    (["--min-speedup", "-1"], "--min-speedup -1 must be a positive number"),
    (["--min-speedup", "nan"], "--min-speedup nan must be a positive number"),
    (["--min-speedup", "inf"], "--min-speedup inf must be a positive number"),
    (["--json", "."], "--json . is a folder"),
    (["--json", "README.md/bench.json"], "README.md is a file"),
    (["--group", "48", "--shape", "llama-3-8b"], "--group 48"),
    (["--backend", "triton"], "--backend 'triton'"),
    (["--min-speedup", "1.5", "--skip-hf"], None),  # valid: reaches the GPU check
    (["some/artifact", "--shape", "llama-3-8b"], "either ARTIFACT or --shape"),
])
def test_argument_errors_are_one_line(no_gpu, args, needle):
    text = one_line_error(CliRunner().invoke(app, ["bench", *args]))
    assert (needle or "needs an NVIDIA GPU") in text


def test_plot_without_matplotlib_names_the_install(no_gpu, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *a, **k):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("no matplotlib")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    text = one_line_error(CliRunner().invoke(app, ["bench", "--plot", "t.png"]))
    assert "pip install matplotlib" in text


def test_parse_helpers():
    assert suite.parse_batches("64, 1,8,8") == (1, 8, 64)
    assert suite.parse_max_batch("AUTO") == "auto"
    assert suite.parse_max_batch("256") == 256
    assert suite.parse_max_batch("none") == "none"
    o = suite.validate_options(suite.BenchOptions(skip_hf=True))
    assert o.engines == ("qoq-w4a8kv4", "fp16-engine", "fp8-engine")
    with pytest.raises(QoqError, match="both must run"):
        suite.validate_options(suite.BenchOptions(engines=("qoq-w4a8kv4",), min_speedup=1.5))


# ---- profiles --------------------------------------------------------------------------------------------

def test_profiles_have_every_figure():
    assert set(profiles.PROFILES) == {"l40s", "a100", "h100", "h200"}
    for p in profiles.PROFILES.values():
        assert p.mem_bw_gbs > 0 and p.fp16_tflops > 0 and p.int8_tops >= 2 * p.fp16_tflops * 0.99
        assert p.memory_gb > 0 and p.sm_count > 0 and p.arch.startswith("sm_") and p.source
        d = p.as_dict()
        assert "match" not in d and d["tiles"] == p.tiles
        json.dumps(d)
    # datasheet figures the issue names
    assert profiles.PROFILES["l40s"].mem_bw_gbs == 864 and profiles.PROFILES["l40s"].memory_gb == 48
    assert profiles.PROFILES["a100"].mem_bw_gbs == 2039 and profiles.PROFILES["a100"].int8_tops == 624
    assert profiles.PROFILES["h100"].mem_bw_gbs == 3350 and profiles.PROFILES["h100"].int8_tops == 1979
    assert profiles.PROFILES["h200"].mem_bw_gbs == 4800 and profiles.PROFILES["h200"].memory_gb == 141
    assert profiles.PROFILES["a100"].fp8_tflops is None


@pytest.mark.parametrize("name, expected", [("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA L40S", "l40s"),
                                            ("NVIDIA A100-SXM4-80GB", "a100"), ("NVIDIA H200", "h200"),
                                            ("Tesla T4", None)])
def test_profile_detection_by_name(name, expected):
    p = profiles.profile_for_device_name(name)
    assert (p.name if p else None) == expected


def test_resolve_profile_auto_named_and_mismatch():
    p, detected, note = profiles.resolve_profile("auto", H100)
    assert p.name == "h100" and detected is p and note is None
    p, detected, note = profiles.resolve_profile("h100", H100)
    assert p.name == "h100" and note is None
    p, detected, note = profiles.resolve_profile("l40s", H100)
    assert p.name == "l40s" and detected.name == "h100"
    assert "detected NVIDIA H100 80GB HBM3, not NVIDIA L40S" in note and "\n" not in note
    rtx = DeviceInfo(name="NVIDIA GeForce RTX 4090", memory_bytes=24 * 2**30, sm_count=128, capability=(8, 9))
    p, detected, note = profiles.resolve_profile("auto", rtx)
    assert p.name == "l40s" and detected is None and "nearest" in note
    with pytest.raises(QoqError, match="not one of"):
        profiles.resolve_profile("v100", H100)


def test_profile_tiles_are_the_dispatchers_choices():
    """The profile's "tiles" are what gemm.choose_config launches on that GPU: GEMV at small M everywhere, the sm_90a
    two-pass TMA path at large M on H100 / H200, dequant + _int_mm on A100 / L40S."""
    from qoq.runtime_kernels import gemm

    for name, large in (("h100", "TmaConfig"), ("h200", "TmaConfig"), ("a100", "IntMMConfig"),
                        ("l40s", "IntMMConfig")):
        t = profiles.PROFILES[name].tiles
        assert set(t) == {"6144x4096", "4096x4096", "28672x4096", "4096x14336"}
        assert t["4096x4096"]["1"]["kernel"] == "GemvConfig" and t["4096x4096"]["16"]["tb"] == 2
        assert t["4096x4096"]["4096"]["kernel"] == large
    h100 = profiles.PROFILES["h100"].tiles["28672x4096"]["1024"]
    assert h100 == {"kernel": "TmaConfig", **dataclasses.asdict(gemm.choose_config(1024, 28672, 4096, 132, cc=90))}


# ---- JSON schema, speedups, --min-speedup ------------------------------------------------------------

def fake_row(engine, batch, tps, is_max=False, **extra):
    return {"engine": engine, "batch": batch, "is_max_batch": is_max, "input_len": 1024, "output_len": 512,
            "tokens_per_s": tps, "ttft_ms": 100.0, "decode_ms_per_token": 10.0, "total_s": batch * 512 / tps,
            "peak_mem_gb": 20.0, "weights_gb": 5.0, "kv_cache_gb": 1.0, "roofline_fraction": 0.5, **extra}


def fake_report(rows, min_speedup=None):
    rows = [dict(r) for r in rows]
    dims = synthetic.ModelDims.from_config(synthetic.shape_config("llama-3-8b"))
    settings = {"model": "synthetic:llama-3-8b", "shape": "llama-3-8b", "group_size": 128, "input_len": 1024,
                "output_len": 512, "batches": [1, 8, 32, 64], "max_batch": "auto", "backend": "cupy",
                "engines": list(e2e.ENGINES), "skip_kernels": False, "skip_hf": False, "prefill_chunk_tokens": 16384,
                "tokens_per_s": e2e.TOKENS_PER_S_DEFINITION}
    memory = {"capacity_gb": 80.0, "max_batch": {"qoq-w4a8kv4": 900, "fp16-engine": 300, "hf-fp16": 150},
              "plans": {}, "kv4_vs_fp16_kv": {"kv4_batch": 900, "fp16_kv_batch": 260, "gain": 900 / 260},
              "profile_max_batch": {"qoq-w4a8kv4": 900}}
    return report.build_report(device=H100.as_dict(), profile=profiles.PROFILES["h100"].as_dict(),
                               profile_matches_device=True, settings=settings, model=dims.as_dict(), memory=memory,
                               kernels=KERNEL_ROWS, kernels_note=None, rows=rows,
                               engine_errors={}, min_speedup=min_speedup)


KERNEL_ROWS = [
    {"bench": "gemm", "n": 4096, "k": 4096, "m": 1, "impl": "fp16", "us": 40.0, "vs_fp16": 1.0, "vs_int8": None},
    {"bench": "gemm", "n": 4096, "k": 4096, "m": 1, "impl": "w4a8_g128", "us": 10.0, "vs_fp16": 4.0, "vs_int8": None},
    {"bench": "gemm", "n": 4096, "k": 4096, "m": 1024, "impl": "fp16", "us": 50.0, "vs_fp16": 1.0, "vs_int8": 0.6},
    {"bench": "gemm", "n": 4096, "k": 4096, "m": 1024, "impl": "int8", "us": 30.0, "vs_fp16": 1.67, "vs_int8": 1.0},
    {"bench": "gemm", "n": 4096, "k": 4096, "m": 1024, "impl": "fp8", "us": 25.0, "vs_fp16": 2.0, "vs_int8": 1.2},
    {"bench": "gemm", "n": 4096, "k": 4096, "m": 1024, "impl": "w4a8_g128", "us": 33.0, "vs_fp16": 1.52,
     "vs_int8": 0.91, "vs_fp8": 0.76},
    {"bench": "attention", "batch": 64, "ctx": 1024, "impl": "kv4", "us": 60.0, "vs_sdpa": 2.5},
    {"bench": "rows", "kernel": "silu_mul_quant", "m": 1, "k": 14336, "cluster": 8, "us_one_cta": 7.2, "us": 2.4,
     "vs_one_cta": 3.0},
]
ROWS = [fake_row("qoq-w4a8kv4", 900, 6000.0, True), fake_row("qoq-w4a8kv4", 1, 150.0),
        fake_row("qoq-w4a8kv4", 64, 3000.0),
        fake_row("fp16-engine", 300, 3000.0, True), fake_row("fp16-engine", 1, 60.0),
        fake_row("fp16-engine", 64, 2000.0),
        fake_row("fp8-engine", 400, 4000.0, True), fake_row("fp8-engine", 1, 100.0),
        fake_row("hf-fp16", 150, 1500.0, True), fake_row("hf-fp16", 1, 30.0),
        {"engine": "hf-fp16", "batch": 64, "is_max_batch": False, "input_len": 1024, "output_len": 512,
         "error": "out of memory"}]


def test_report_conforms_to_schema_and_round_trips(tmp_path):
    rep = fake_report(ROWS, min_speedup=1.5)
    assert report.validate_report(rep) == []
    path = tmp_path / "out" / "bench.json"
    report.write_json(rep, path)
    back = json.loads(path.read_text())
    assert report.validate_report(back) == []
    assert back["schema"] == "qoq-bench/1"
    for key in ("qoq", "python", "torch", "cuda", "transformers", "cupy"):
        assert key in back["versions"]
    assert back["device"]["name"] == H100.name and back["profile"]["name"] == "h100"
    assert back["speedups"]["max_batch"] == {"vs_fp16_engine": 2.0, "vs_fp8_engine": 1.5, "vs_hf_fp16": 4.0}
    assert back["speedups"]["by_batch"]["1"] == {"vs_fp16_engine": 2.5, "vs_fp8_engine": 1.5, "vs_hf_fp16": 5.0}
    assert back["speedups"]["by_batch"]["64"] == {"vs_fp16_engine": 1.5, "vs_fp8_engine": None, "vs_hf_fp16": None}
    assert back["check"] == {"min_speedup": 1.5, "passed": True}


def test_schema_violations_are_named():
    rep = fake_report(ROWS)
    del rep["device"]["name"]
    rep["e2e"][0]["tokens_per_s"] = "fast"
    rep["e2e"][1]["engine"] = "vllm"
    problems = report.validate_report(rep)
    assert "device.name is missing" in problems
    assert any("e2e[0].tokens_per_s" in p for p in problems)
    assert any("e2e[1].engine" in p for p in problems)
    assert report.validate_report({"schema": "x"})  # everything else missing


@pytest.mark.parametrize("threshold, passed", [(1.5, True), (2.0, True), (2.01, False), (3.0, False)])
def test_min_speedup_logic(threshold, passed):
    rep = fake_report(ROWS, min_speedup=threshold)
    ok, line = report.check_min_speedup(rep, threshold)
    assert ok is passed and rep["check"]["passed"] is passed
    assert "2.00x" in line and "\n" not in line
    assert (suite.min_speedup_error(rep, threshold) is None) == passed


def test_min_speedup_without_fp16_max_row_fails_and_none_passes():
    rows = [r for r in ROWS if r["engine"] != "fp16-engine"]
    ok, line = report.check_min_speedup(fake_report(rows), 1.0)
    assert ok is False and "no end-to-end speedup" in line
    assert report.check_min_speedup(fake_report(rows), None) == (None, "")
    assert suite.min_speedup_error(fake_report(rows), None) is None


def test_table_summary_and_plot(tmp_path):
    from rich.console import Console

    rep = fake_report(ROWS)
    console = Console(record=True, width=160)
    console.print(report.e2e_table(rep))
    console.print(report.kernels_table(rep))
    text = console.export_text()
    assert "4096x4096" in text and "0.91x" in text and "4.00x" in text and "2.50x" in text and "3.00x" in text
    assert "g128 vs fp8" in text and "0.76x" in text
    assert "silu_mul_quant M=1" in text and "cluster 8" in text
    assert "qoq-w4a8kv4" in text and "900 (max)" in text and "out of memory" in text and "6,000" in text
    lines = report.summary_lines(rep)
    assert any("2.00x fp16-engine" in line for line in lines)
    assert any("KV4 vs FP16 KV" in line and "3.46x" in line for line in lines)
    pytest.importorskip("matplotlib")
    report.plot_throughput(rep, tmp_path / "t.png")
    assert (tmp_path / "t.png").stat().st_size > 1000


def test_paper_figures_are_named_by_gpu():
    rep = fake_report(ROWS)
    rep["profile"]["name"] = "a100"
    assert any("QServe paper, A100: 3005 tok/s" in line for line in report.summary_lines(rep))


# ---- max batch and roofline --------------------------------------------------------------------------

def test_plan_max_batch_fits_and_backs_off():
    gib = 2**30
    fixed, per_seq, cap = 20 * gib, 50e6, 70 * gib
    truth = int((cap - fixed) // per_seq)
    calls = []

    def probe(b):
        calls.append(b)
        if fixed + per_seq * b > cap:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return int(fixed + per_seq * b)

    plan = capacity.plan_max_batch(probe, cap, 16, 32)
    assert plan.batch == truth and calls == [16, 32, truth]
    assert plan.per_seq_bytes == pytest.approx(per_seq, rel=1e-6)

    # the probes underestimate (e.g. fragmentation): the confirmation backs off until it fits
    def probe_tight(b):
        if fixed + 1.2 * per_seq * b > cap:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return int(fixed + per_seq * b) if b <= 32 else int(fixed + 1.2 * per_seq * b)

    plan = capacity.plan_max_batch(probe_tight, cap, 16, 32)
    assert 0 < plan.batch <= (cap - fixed) / (1.2 * per_seq)
    assert any(p is None for _, p in plan.probes)
    assert capacity.plan_max_batch(probe, cap, 16, 32, limit=100).batch == 100
    assert plan.as_dict()["per_seq_mb"] == pytest.approx(50.0, rel=1e-3)


def test_kv4_lets_the_batch_grow():
    dims = synthetic.ModelDims.from_config(synthetic.shape_config("llama-3-8b"))
    assert dims.kv_bytes_per_token(16) == 32 * 2 * 8 * 128 * 2  # 128 KiB per token
    assert dims.kv_bytes_per_token(4) == 32 * 2 * 8 * (64 + 4)
    assert dims.kv_bytes_per_token(16) / dims.kv_bytes_per_token(4) > 3.7
    assert dims.linear_params == 32 * (2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 14336 * 4096)


def test_roofline():
    dims = synthetic.ModelDims.from_config(synthetic.shape_config("llama-3-8b"))
    h100 = profiles.PROFILES["h100"]

    def tokens_per_s(kind, kv_bits, batch):
        return batch * 512 / roofline.roofline_seconds(dims, kind, kv_bits, batch, 1024, 512, h100)

    # batch 1 decode is bound by the weight bytes: W4 reads ~3.5x fewer bytes than FP16 (lm_head stays fp16)
    w4 = tokens_per_s("w4a8", 4, 1)
    f16 = tokens_per_s("fp16", 16, 1)
    assert 2.5 < w4 / f16 < 4
    # decode at batch 1: about bandwidth / weight bytes per token
    assert f16 == pytest.approx(h100.mem_bw_gbs * 1e9 / roofline.weight_bytes_streamed(dims, "fp16"), rel=0.15)
    # large batches approach the tensor-core peak: tokens/s grows with batch, sublinearly
    big = tokens_per_s("w4a8", 4, 256)
    assert w4 < big < 256 * w4


# ---- synthetic models and the engines on CPU ---------------------------------------------------------

def test_synthetic_artifact_has_the_artifact_layout(tiny_shapes):
    from qoq.formats.artifact import expected_shapes

    art = synthetic.build_synthetic_artifact("tiny", "cpu", 32)
    modules = art.qconfig["modules"]
    assert len(modules) == 2 * 7
    for name, (n, k) in modules.items():
        for tname, (shape, dtype) in expected_shapes(name, n, k, 32).items():
            assert tuple(art.tensors[tname].shape) == shape and art.tensors[tname].dtype == dtype
    assert art.tensors["lm_head.weight"].dtype == torch.float16
    assert art.qconfig["recipe"]["synthetic"] is True
    qwen = synthetic.build_synthetic_artifact("tiny-qwen2", "cpu", -1)
    assert "model.layers.0.self_attn.q_proj.bias" in qwen.tensors
    assert "model.layers.0.self_attn.q_proj.s1_szeros" in qwen.tensors
    with pytest.raises(QoqError, match="--shape"):
        synthetic.shape_config("nope")


@pytest.mark.parametrize("shape", synthetic.SHAPE_CHOICES)
def test_published_shapes_build_hf_configs(shape):
    from qoq.runtime.engine import hf_config

    cfg = synthetic.shape_config(shape)
    c = hf_config(cfg)
    dims = synthetic.ModelDims.from_config(cfg)
    assert c.num_hidden_layers == dims.layers and c.hidden_size == dims.hidden
    assert dims.heads % dims.kv_heads == 0


@pytest.mark.parametrize("shape", ["tiny", "tiny-qwen2", "tiny-tied"])
def test_fp16_engine_matches_transformers(tiny_shapes, shape):
    """The FP16 baseline engine computes the same function as HF on the FP16 twin (chunked prefill + decode)."""
    art = synthetic.build_synthetic_artifact(shape, "cpu", 32)
    cfg = {k: v for k, v in art.config.items() if k != "quantization_config"}
    dims = synthetic.ModelDims.from_config(cfg)
    twin = synthetic.fp16_twin(art, "cpu")
    hf = runners.HFRunner(cfg, dims, torch.device("cpu"))
    hf.model.load_state_dict({k: v.float() for k, v in twin.items()}, strict=False)
    fp16 = runners.FP16EngineRunner(cfg, dict(twin), dims, torch.device("cpu"), prefill_chunk_tokens=16)
    ids = torch.randint(0, TINY["vocab_size"], (3, 12))
    nxt = torch.randint(0, TINY["vocab_size"], (3,))
    with torch.no_grad():
        ref = hf.model(ids).logits[:, -1]
        ref2 = hf.model(torch.cat([ids, nxt[:, None]], 1)).logits[:, -1]
        fp16._reset(3, 20)
        got = fp16._prefill(ids)  # chunks of one sequence
        got2 = fp16._decode(nxt)
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-4)
    assert torch.allclose(got2, ref2, rtol=1e-4, atol=1e-4)


def test_qoq_runner_chunked_prefill_matches_the_engine(tiny_shapes):
    art = synthetic.build_synthetic_artifact("tiny", "cpu", 32)
    dims = synthetic.ModelDims.from_config(art.config)
    runner = runners.QoqRunner(art, dims, torch.device("cpu"), "reference", prefill_chunk_tokens=8)
    ids = torch.randint(0, TINY["vocab_size"], (3, 8))
    runner._reset(3, 12)
    chunked = runner._prefill(ids)  # one sequence per chunk
    nxt = chunked.argmax(-1)
    step = runner._decode(nxt)
    runner.eng.reset(3, 12)
    whole = runner.eng.prefill(ids)
    step_whole = runner.eng.decode_step(nxt)
    assert torch.allclose(chunked, whole, atol=1e-5)
    assert torch.allclose(step, step_whole, atol=1e-5)


def test_whole_bench_on_cpu_produces_a_valid_report(tiny_shapes, tmp_path):
    """The orchestration end to end on CPU (tiny shape, no max-batch search, which needs CUDA)."""
    cpu = DeviceInfo(name="NVIDIA H100 80GB HBM3", memory_bytes=80 * 2**30, sm_count=132, capability=(9, 0))
    o = suite.BenchOptions(shape="tiny", gpu="l40s", input_len=8, output_len=3, batches=(1, 2), max_batch="none",
                           skip_kernels=True, group_size=32, backend="reference", json_path=tmp_path / "c.json")
    rep = suite.run_bench(o, device_override=(cpu, torch.device("cpu")))
    checkpoint = json.loads((tmp_path / "c.json").read_text())  # written after the last baseline engine
    assert report.validate_report(checkpoint) == [] and {r["engine"] for r in checkpoint["e2e"]} == {
        "qoq-w4a8kv4", "fp16-engine", "fp8-engine"}
    assert set(rep["engine_backends"]) == set(e2e.ENGINES)
    assert "FP8" in rep["engine_backends"]["fp8-engine"] and "SDPA" in rep["engine_backends"]["fp16-engine"]
    assert report.validate_report(rep) == [], report.validate_report(rep)
    assert rep["engine_errors"] == {}
    assert {(r["engine"], r["batch"]) for r in rep["e2e"]} == {(e, b) for e in e2e.ENGINES for b in (1, 2)}
    # the strongest Hopper baseline runs right after qoq, so a run cut short keeps it
    assert list(dict.fromkeys(r["engine"] for r in rep["e2e"]))[:3] == ["qoq-w4a8kv4", "fp8-engine", "fp16-engine"]
    assert rep["profile"]["name"] == "l40s" and rep["profile_matches_device"] is False
    assert rep["kernels"] is None and "skipped" in rep["kernels_note"]
    assert set(rep["speedups"]["by_batch"]) == {"1", "2"}
    for r in rep["e2e"]:
        assert r["tokens_per_s"] > 0 and r["ttft_ms"] > 0 and r["kv_cache_gb"] > 0 and r["weights_gb"] > 0
    qoq_w = next(r["weights_gb"] for r in rep["e2e"] if r["engine"] == "qoq-w4a8kv4")
    fp_w = next(r["weights_gb"] for r in rep["e2e"] if r["engine"] == "fp16-engine")
    assert qoq_w < fp_w
    report.write_json(rep, tmp_path / "b.json")
    assert report.validate_report(json.loads((tmp_path / "b.json").read_text())) == []


def test_max_batch_row_backs_off_when_the_full_run_runs_out_of_memory(monkeypatch):
    """A batch that passed the probes can still run out of memory over the whole generation (HF at its
    max batch did on the H100): the max-batch row is retried 10% smaller, twice."""
    class FakeRunner:
        engine = "hf-fp16"
        device = torch.device("cpu")
        dims = synthetic.ModelDims.from_config(synthetic.shape_config("llama-3-8b"))

        def chunk_rows(self, input_len):
            return 2

        def release(self):
            pass

    plan = capacity.MaxBatchPlan(batch=100, fixed_bytes=1e9, per_seq_bytes=1e8, capacity_bytes=20 * 10**9,
                            probes=[(2, 1), (4, 2)])
    monkeypatch.setattr(capacity, "usable_capacity", lambda device: (20 * 10**9, 21 * 10**9))
    monkeypatch.setattr(capacity, "plan_max_batch", lambda *a, **k: plan)
    measured = []

    def fake_measure(runner, b, input_len, output_len, profile, clock):
        measured.append(b)
        row = {"engine": runner.engine, "batch": b, "input_len": input_len, "output_len": output_len}
        return {**row, "error": "out of memory"} if b > 85 else fake_row(runner.engine, b, 100.0)

    monkeypatch.setattr(e2e, "measure", fake_measure)
    memory = {"capacity_gb": 0.0, "max_batch": {}, "plans": {}, "kv4_vs_fp16_kv": None, "profile_max_batch": {}}
    o = suite.BenchOptions(batches=(1, 64))
    rows = suite._engine_rows(FakeRunner(), o, profiles.PROFILES["h100"], None, suite.Reporter(), memory)
    assert measured == [100, 90, 81, 1, 64]
    assert rows[0]["batch"] == 81 and rows[0]["is_max_batch"] and "error" not in rows[0]
    assert memory["max_batch"]["hf-fp16"] == 81
    assert [p[1] for p in memory["plans"]["hf-fp16"]["probes"][-2:]] == [None, None]
