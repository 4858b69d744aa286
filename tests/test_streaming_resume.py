"""Streaming loads, incremental shards and `--resume`: memory changes, results do not."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from qoq.cli import app
from qoq.errors import QoqError
from qoq.formats.artifact import INDEX_FILE, read_artifact
from qoq.formats.resume import Checkpoints
from qoq.pipeline import QuantizeOptions, quantize

from conftest import TINY_CORPUS, assert_one_line_error, build_tiny_model  # noqa: E402
from recipe_tiny import one_thread  # noqa: E402

_one_thread = pytest.fixture(autouse=True)(one_thread)  # byte equality across runs: one summation order
SMALL_SHARDS = 120_000  # bytes: the tiny 4-block model then spans several shards
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model4(tmp_path_factory) -> Path:
    return build_tiny_model("llama", tmp_path_factory.mktemp("tiny4"), num_layers=4)


@pytest.fixture
def calib(tmp_path) -> Path:
    file = tmp_path / "calib.txt"
    file.write_text("\n\n".join([TINY_CORPUS] * 8))
    return file


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QOQ_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("QOQ_CHECKPOINT_SECONDS", "0")  # a resume point after every block


def options(model: Path, calib: Path, out: Path, **kw) -> QuantizeOptions:
    return QuantizeOptions(model=str(model), calib=str(calib), calib_samples=4, calib_seqlen=32, group_size=32,
                           output=out, device="cpu", **kw)


def weight_files(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir())
            if f.name.endswith(".safetensors") or f.name in (INDEX_FILE, "config.json")}


def partials(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.endswith(".partial")]


def test_shards_and_index_cover_every_tensor(model4, calib, tmp_path, monkeypatch):
    whole = quantize(options(model4, calib, tmp_path / "one"))
    monkeypatch.setattr("qoq.pipeline.SHARD_BYTES", SMALL_SHARDS)
    sharded = quantize(options(model4, calib, tmp_path / "many"))
    index = json.loads((sharded.path / INDEX_FILE).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    stored = {}
    for f in files:
        stored.update({name: (f, t) for name, t in load_file(sharded.path / f).items()})
    assert {n: f for n, (f, _) in stored.items()} == index["weight_map"]
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for _, t in stored.values())
    single = load_file(whole.path / "model.safetensors")
    assert set(single) == set(stored)
    assert all(torch.equal(single[n], stored[n][1]) for n in single)
    assert not list(sharded.path.glob("shard-*")) and not (sharded.path / "staging").exists()
    assert not (sharded.path / "resume").exists()
    read_artifact(sharded.path)  # the strict reader accepts the sharded layout


class _Stop(KeyboardInterrupt):
    pass


def test_interrupted_run_resumes_to_identical_artifact(model4, calib, tmp_path, monkeypatch):
    monkeypatch.setattr("qoq.pipeline.SHARD_BYTES", SMALL_SHARDS)
    reference = quantize(options(model4, calib, tmp_path / "ref"))

    out = tmp_path / "art"
    save = Checkpoints.save

    def stop_after_block_2(self, next_block, hidden, reports):
        save(self, next_block, hidden, reports)
        if next_block == 2:
            raise _Stop()

    monkeypatch.setattr(Checkpoints, "save", stop_after_block_2)
    with pytest.raises(KeyboardInterrupt):
        quantize(options(model4, calib, out))
    monkeypatch.setattr(Checkpoints, "save", save)
    [partial] = partials(tmp_path)

    with pytest.raises(QoqError, match="resume"):  # a stale resumable partial is named, not reused
        quantize(options(model4, calib, out))
    assert partial.exists()
    with pytest.raises(QoqError, match="different options.batch size"):
        quantize(options(model4, calib, out, resume=True, batch_size=2))
    assert partial.exists()

    resumed = quantize(options(model4, calib, out, resume=True))
    assert resumed.report["resumed_at_block"] == 2
    assert weight_files(resumed.path) == weight_files(reference.path)
    assert not partials(tmp_path)


def test_sigkill_mid_run_then_resume(model4, calib, tmp_path):
    """A run killed outright (no cleanup at all) continues from its last resume point."""
    reference = quantize(options(model4, calib, tmp_path / "ref"))
    out = tmp_path / "art"
    script = textwrap.dedent(f"""
        import os, signal, sys
        from pathlib import Path
        import torch
        torch.set_num_threads(1)
        from qoq.formats.resume import Checkpoints
        from qoq.pipeline import QuantizeOptions, quantize
        save = Checkpoints.save
        def save_then_die(self, next_block, hidden, reports):
            save(self, next_block, hidden, reports)
            if next_block == 3:
                os.kill(os.getpid(), signal.SIGKILL)
        Checkpoints.save = save_then_die
        quantize(QuantizeOptions(model={str(model4)!r}, calib={str(calib)!r}, calib_samples=4, calib_seqlen=32,
                                 group_size=32, output=Path({str(out)!r}), device="cpu"))
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO), "QOQ_CHECKPOINT_SECONDS": "0"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not out.exists() and len(partials(tmp_path)) == 1

    r = CliRunner().invoke(app, ["quantize", "--model", str(model4), "--calib", str(calib), "--calib-samples", "4",
                                 "--calib-seqlen", "32", "--group", "32", "--device", "cpu", "--output", str(out)])
    assert_one_line_error(r, "--resume")
    r = CliRunner().invoke(app, ["quantize", "--model", str(model4), "--calib", str(calib), "--calib-samples", "4",
                                 "--calib-seqlen", "32", "--group", "32", "--device", "cpu", "--output", str(out),
                                 "--resume"])
    assert r.exit_code == 0, r.output
    assert weight_files(out) == weight_files(reference.path)
    assert json.loads((out / "qoq_report.json").read_text())["resumed_at_block"] == 3


def test_resume_without_interrupted_run_starts_fresh(model4, calib, tmp_path):
    res = quantize(options(model4, calib, tmp_path / "art", resume=True))
    assert res.report["resumed_at_block"] is None and read_artifact(res.path)


def test_report_records_memory(model4, calib, tmp_path):
    res = quantize(options(model4, calib, tmp_path / "art"))
    saved = json.loads((res.path / "qoq_report.json").read_text())
    assert saved["memory"]["peak_host_rss_bytes"] > 10 * 2**20
    assert saved["memory"]["peak_gpu_bytes"] is None  # CPU run
    assert saved["source"]["streamed"] is True


def test_reader_casts_big_tensors_a_block_of_rows_at_a_time(tmp_path):
    from safetensors.torch import save_file

    from qoq.models.streaming import CheckpointReader

    stored = {"w": torch.randn(37, 5, dtype=torch.bfloat16), "b": torch.randn(3), "s": torch.tensor([2.0]),
              "row": torch.randn(1, 4, dtype=torch.bfloat16)}
    save_file(stored, tmp_path / "model.safetensors")
    reader = CheckpointReader(tmp_path, torch.float16, chunk_bytes=30)  # 3 rows of "w" per read
    for name, t in stored.items():
        read = reader.tensor(name)
        assert read.dtype == torch.float16 and torch.equal(read, t.to(torch.float16)), name
    same = CheckpointReader(tmp_path, torch.bfloat16, chunk_bytes=30)  # read straight into the result
    assert torch.equal(same.tensor("w"), stored["w"]) and same.tensor("s").dtype == torch.bfloat16
    reader.require_finite()
    stored["w"][4, 1] = float("nan")
    stored["w"][30, 0] = 1e6  # finite in bfloat16, Inf once cast to float16
    save_file(stored, tmp_path / "model.safetensors")
    with pytest.raises(QoqError, match="tensor w has 2 NaN/Inf"):
        reader.tensor("w")
    with pytest.raises(QoqError, match="tensor w has 2 NaN/Inf"):
        reader.require_finite()
    with pytest.raises(QoqError, match="tensor w has 1 NaN/Inf"):
        CheckpointReader(tmp_path, torch.bfloat16, chunk_bytes=30).require_finite()


def test_shard_writer_keeps_units_whole_and_restores_its_state(tmp_path):
    from qoq.formats.shards import ShardWriter

    unit = lambda i: {f"u{i}.a": torch.full((10,), float(i)), f"u{i}.b": torch.full((5,), float(i))}  # 60 bytes
    writer = ShardWriter(tmp_path, shard_bytes=130, stage_units=True)
    for i in range(3):
        writer.add(unit(i))
    assert [s["units"] for s in writer.shards] == [[0, 1]]  # unit 2 would not fit: never split
    state = writer.state()
    writer.add(unit(3))
    writer.make_room(100)  # a big unit is coming: the pending shard (units 2, 3) goes now
    assert [s["units"] for s in writer.shards] == [[0, 1], [2, 3]]

    restored = ShardWriter.restore(tmp_path, state, shard_bytes=130)  # as if killed before the next state
    assert [s["units"] for s in restored.shards] == [[0, 1]] and restored.units == 3
    assert sorted(f.name for f in tmp_path.glob("shard-*")) == ["shard-00001.partial.safetensors"]
    restored.add(unit(3))
    names = restored.finish()
    assert names == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    second = load_file(tmp_path / names[1])
    assert set(second) == {"u2.a", "u2.b", "u3.a", "u3.b"} and torch.equal(second["u3.a"], unit(3)["u3.a"])
    assert not (tmp_path / "staging").exists()


def test_ctrl_c_that_keeps_a_resume_point_says_so(model4, calib, tmp_path, monkeypatch):
    save = Checkpoints.save

    def interrupt_after_block_1(self, next_block, hidden, reports):
        save(self, next_block, hidden, reports)
        if next_block == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(Checkpoints, "save", interrupt_after_block_1)
    r = CliRunner().invoke(app, ["quantize", "--model", str(model4), "--calib", str(calib), "--calib-samples", "4",
                                 "--calib-seqlen", "32", "--group", "32", "--device", "cpu",
                                 "--output", str(tmp_path / "art")])
    assert r.exit_code == 130 and len(partials(tmp_path)) == 1
    lines = r.stderr.strip().splitlines()
    assert "1 finished block kept" in lines[-2] and "--resume" in lines[-2], lines
    assert lines[-1] == "interrupted; the finished blocks are kept (above)"
