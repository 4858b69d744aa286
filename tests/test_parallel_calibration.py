"""Data-parallel calibration on the CPU: gloo ranks share the calibration samples and quantize like one process."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import typer
from typer.testing import CliRunner

import qoq.calibration.launch as launch
from qoq.calibration.parallel import SINGLE_PROCESS, DataParallelGroup, join_ranks
from qoq.cli import _rank_errors, app
from qoq.errors import QoqError
from qoq.formats.artifact import read_artifact
from qoq.recipe import RecipeOptions, quantize_decoder_blocks
from qoq.scheme.layout import unpack_group_params, unpack_weight

from conftest import REPO_ROOT, TINY_CORPUS, assert_one_line_error
from recipe_tiny import VOCAB, tiny_model

WORLD = 2
# per-group (reordering, smoothing search, GPTQ) and per-channel (GPTQ with the clip search on the Hessians)
CASES = {"g128-llama": ("llama", 128), "per-channel-qwen2": ("qwen2", -1)}
runner = CliRunner()


def calib_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (7, 40), generator=torch.Generator().manual_seed(5))


def recipe_options() -> RecipeOptions:
    # 7 samples on 2 ranks (3 + 4) in batches of 2: batch edges differ from one process's; the row sample
    # strides across samples and ranks, and the SmoothAttention samples span both ranks
    return RecipeOptions.preset("qoq", search_rows=64, attn_search_samples=5)


def quantize_case(name: str, parallel: DataParallelGroup) -> dict:
    arch, group = CASES[name]
    tensors, _, _ = quantize_decoder_blocks(tiny_model(arch), calib_ids(), group, recipe_options(),
                                            torch.device("cpu"), batch_size=2, parallel=parallel)
    return tensors


def collectives(group: DataParallelGroup) -> dict:
    rank = group.rank
    linear = torch.nn.Linear(2, 2)
    with torch.no_grad():
        linear.weight.fill_(rank + 1.0)
        linear.bias.fill_(-rank)
    group.align_to_first(linear)
    try:
        group.sum(torch.ones(2))
        float32_sum = "accepted"
    except ValueError:
        float32_sum = "refused"
    return {
        "sum": group.sum(torch.tensor([rank + 1.0, 0.25], dtype=torch.float64)),
        "count": group.sum_count(rank + 2),
        "max": group.max(torch.tensor([float(rank), -float(rank)])),
        "rows": group.gather_rows(torch.full((3 - 2 * rank, 2), float(rank))),
        "rows_one_empty": group.gather_rows(torch.ones(1 - rank, 2, 3)),
        "from_first": group.from_first(torch.tensor([10 + rank])),
        "first_shape": group.first_shape(torch.zeros(4 + rank, 3)),
        "aligned": (linear.weight.detach().clone(), linear.bias.detach().clone()),
        "slice": group.sample_range(7),
        "float32_sum": float32_sum,
    }


def _rank_main(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    group = DataParallelGroup(rank=rank, world=world)
    results = {"collectives": collectives(group), **{name: quantize_case(name, group) for name in CASES}}
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """What each of 2 gloo ranks computed, and the single-process results (computed while they run).

    The ranks are forked: they start with this process's imports instead of paying seconds for their own
    (one intra-op thread each, as DataLoader workers, so no OpenMP pool is needed after the fork)."""
    folder = tmp_path_factory.mktemp("ranks")
    ctx = mp.start_processes(_rank_main, args=(WORLD, str(folder / "init"), str(folder)), nprocs=WORLD, join=False,
                             start_method="fork")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = {name: quantize_case(name, SINGLE_PROCESS) for name in CASES}
    finally:
        torch.set_num_threads(threads)
    while not ctx.join():
        pass
    ranks = [torch.load(folder / f"rank{r}.pt") for r in range(WORLD)]
    return ranks, single


def test_collectives_across_two_ranks(two_ranks):
    ranks, _ = two_ranks
    for rank, results in enumerate(r["collectives"] for r in ranks):
        assert torch.equal(results["sum"], torch.tensor([3.0, 0.5], dtype=torch.float64))
        assert results["count"] == 5
        assert torch.equal(results["max"], torch.tensor([1.0, 0.0]))
        assert torch.equal(results["rows"], torch.tensor([[0.0, 0.0]] * 3 + [[1.0, 1.0]]))  # rank order
        assert torch.equal(results["rows_one_empty"], torch.ones(1, 2, 3))
        assert torch.equal(results["from_first"], torch.tensor([10]))
        assert results["first_shape"] == (4, 3)
        weight, bias = results["aligned"]
        assert torch.all(weight == 1.0) and torch.all(bias == 0.0)
        assert results["slice"] == [(0, 3), (3, 7)][rank]
        assert results["float32_sum"] == "refused"


@pytest.mark.parametrize("case", CASES)
def test_two_ranks_quantize_like_one_process(two_ranks, case):
    ranks, single = two_ranks
    assert_same_quantization(ranks[0][case], single[case])


@pytest.mark.parametrize("case", CASES)
def test_every_rank_holds_the_same_weights(two_ranks, case):
    ranks, _ = two_ranks
    first, second = ranks[0][case], ranks[1][case]
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def assert_same_quantization(got: dict, want: dict) -> None:
    """>= 99.99% of the 4-bit codes equal, every other tensor (scales, zeros, norms, biases) within 1e-6."""
    assert got.keys() == want.keys()
    equal = total = 0
    for key in want:
        a, b = got[key], want[key]
        assert a.shape == b.shape and a.dtype == b.dtype, key
        if key.endswith("qweight"):
            codes_a, codes_b = unpack_weight(a), unpack_weight(b)
            equal += int((codes_a == codes_b).sum())
            total += codes_b.numel()
            continue
        if key.endswith(("s2_scales", "s2_zeros")):
            a, b = unpack_group_params(a), unpack_group_params(b)
        a, b = a.double(), b.double()
        assert torch.all((a - b).abs() <= 1e-6 * b.abs()), key
    assert total and equal / total >= 0.9999, f"{total - equal} of {total} codes differ"


def test_one_process_is_a_no_op(monkeypatch):
    t = torch.randn(3, 2)
    group = SINGLE_PROCESS
    assert group.is_first and group.world == 1 and group.sample_range(5) == (0, 5)
    for op in (group.max, group.gather_rows, group.from_first):
        assert op(t) is t
    h = t.double()
    assert group.sum(h) is h and group.sum_count(7) == 7 and group.first_shape(t) == (3, 2)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    joined = join_ranks(torch.device("cpu"))
    assert joined.world == 1 and joined.rank == 0 and not dist.is_initialized()


def test_sample_slices_are_contiguous_and_balanced():
    for n, world in ((7, 2), (128, 8), (10, 3), (3, 3)):
        ranges = [DataParallelGroup(rank=r, world=world).sample_range(n) for r in range(world)]
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(ranges[:-1], ranges[1:], strict=True))
        sizes = [end - start for start, end in ranges]
        assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    with pytest.raises(QoqError, match="--calib-samples 4 or more"):
        DataParallelGroup(rank=0, world=4).sample_range(3)


@pytest.fixture
def calib_text(tmp_path):
    file = tmp_path / "calib.txt"
    file.write_text("\n\n".join([TINY_CORPUS] * 8))
    return file


def test_launched_ranks_write_what_one_process_writes(tiny_model_dir, calib_text, tmp_path, monkeypatch):
    """`qoq quantize` as 2 torchrun ranks (the `--gpus` launcher, on the CPU with gloo) writes the same artifact
    as one process, and only rank 0 reports."""
    monkeypatch.setenv("QOQ_CACHE_DIR", str(tmp_path / "cache"))
    args = ["quantize", "--model", str(tiny_model_dir("llama")), "--calib", str(calib_text), "--calib-samples", "5",
            "--calib-seqlen", "32", "--device", "cpu", "--batch-size", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    ranks = subprocess.Popen([sys.executable, "-c", "import sys; from qoq.calibration.launch import launch_ranks; "
                              "sys.exit(launch_ranks(2, sys.argv[1:]))", *args, "--output", str(tmp_path / "two")],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    one = runner.invoke(app, [*args, "--output", str(tmp_path / "one")])
    stdout, stderr = ranks.communicate(timeout=300)
    assert one.exit_code == 0, one.output
    assert ranks.returncode == 0, stderr
    assert stdout.count("wrote ") == 1 and "rank 1" not in stderr, stdout + stderr
    two, one = read_artifact(tmp_path / "two"), read_artifact(tmp_path / "one")
    assert_same_quantization(two.tensors, one.tensors)
    assert two.report["data_parallel"] == {"ranks": 2, "samples_per_rank": [2, 3]}
    assert "data_parallel" not in one.report


def test_gpus_errors_are_one_line_before_any_launch(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(launch, "launch_ranks", lambda n, argv: pytest.fail("launched"))
    monkeypatch.setattr(launch.torch.cuda, "device_count", lambda: 1)
    model = ["--model", str(tiny_model_dir("llama"))]
    assert_one_line_error(runner.invoke(app, ["quantize", *model, "--gpus", "2"]),
                          "--gpus 2 needs 2 CUDA GPUs but 1 is visible; pass --gpus 1")
    assert_one_line_error(runner.invoke(app, ["quantize", *model, "--gpus", "2", "--device", "cpu"]),
                          "drop --device cpu")
    assert_one_line_error(runner.invoke(app, ["quantize", *model, "--gpus", "0"]), "--gpus must be >= 1")
    monkeypatch.setattr(launch.torch.cuda, "device_count", lambda: 2)
    existing = tmp_path / "art"  # an earlier artifact
    existing.mkdir()
    (existing / "config.json").write_text('{"quantization_config": {"quant_method": "qoq"}}')
    assert_one_line_error(runner.invoke(app, ["quantize", *model, "--gpus", "2", "--output", str(existing)]),
                          "already exists")
    assert_one_line_error(runner.invoke(app, ["quantize", *model, "--gpus", "2", "--calib-samples", "1",
                                              "--output", str(tmp_path / "new")]), "--calib-samples 2 or more")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert_one_line_error(runner.invoke(app, ["quantize", *model, "--gpus", "2"]),
                          "the launcher started 3 processes")


def test_ranks_after_the_first_name_themselves_and_stop_quietly():
    with pytest.raises(QoqError, match="^rank 1: no calibration text$"):
        with _rank_errors(1):
            raise QoqError("no calibration text")
    with pytest.raises(QoqError, match="^no calibration text$"):
        with _rank_errors(0):
            raise QoqError("no calibration text")
    with pytest.raises(typer.Exit):
        with _rank_errors(1):
            raise KeyboardInterrupt
