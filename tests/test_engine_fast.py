"""The runtime engine's fast mode (qoq.runtime.fast) on the CPU, where it runs without CUDA graphs: with
`prefill_fp16` off it gives the plain engine's logits on tiny random Llama/Qwen2 artifacts, continues a
cache like a full prefill, fills row slices, and resets to a new batch size."""
from __future__ import annotations

import pytest
import torch
from test_runtime import VOCAB, rel_fro, tiny_hf_model, write_tiny_artifact

from qoq.errors import QoqError
from qoq.formats.artifact import read_artifact
from qoq.runtime.engine import Engine

CASES = [("llama", 128), ("llama", 32), ("qwen2", -1)]
EXACT = 1e-6  # the same integers; only fp32 rounding of the float epilogue may differ


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    built = {}

    def make(arch: str, group: int):
        if (arch, group) not in built:
            path = tmp_path_factory.mktemp(f"fast-{arch}-{group}") / "a"
            built[arch, group] = read_artifact(write_tiny_artifact(tiny_hf_model(arch), group, path))
        return built[arch, group]
    return make


def engines(art):
    plain = Engine(art, device="cpu", backend="reference")
    fast = Engine(art, device="cpu", backend="reference", fast=True)
    fast.prefill_fp16 = False  # attend over the KV4 cache, like the plain engine
    return plain, fast


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_modes_default_by_device(artifact):
    plain, fast = engines(artifact("llama", 128))
    assert not plain.fast and not plain.cuda_graph and not plain.prefill_fp16
    assert all(layer.qkv is None and layer.gate_up is None for layer in plain.layers)
    assert fast.fast and not fast.cuda_graph  # no CUDA graphs on the CPU
    assert all(layer.qkv is not None and layer.gate_up is not None for layer in fast.layers)
    assert Engine(artifact("llama", 128), device="cpu", backend="reference", fast=True).prefill_fp16


@pytest.mark.parametrize("arch,group", CASES)
def test_fast_mode_gives_the_plain_logits(artifact, arch, group):
    plain, fast = engines(artifact(arch, group))
    ids = torch.randint(0, VOCAB, (3, 24), generator=torch.Generator().manual_seed(5))
    assert rel(fast.logits(ids), plain.logits(ids)) < EXACT
    tok = plain.prefill(ids[:, :1]).argmax(-1)  # both caches continue after the full prompt
    fast.prefill(ids[:, :1])
    for step in range(4):
        want, got = plain.decode_step(tok), fast.decode_step(tok)
        assert rel(got, want) < EXACT, step
        tok = want.argmax(-1)
    assert fast.lengths.tolist() == plain.lengths.tolist() == [29, 29, 29]
    assert fast._host_len.tolist() == [29, 29, 29]


@pytest.mark.parametrize("arch,group", [("llama", 128), ("qwen2", -1)])
def test_fast_prefill_then_decode_equals_full_prefill(artifact, arch, group):
    plain, fast = engines(artifact(arch, group))
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(2))
    full = fast.logits(ids)

    def chunked(engine):
        engine.reset(2, 8)  # small on purpose: the cache grows
        parts = [engine.prefill(ids[:, :30], all_logits=True), engine.prefill(ids[:, 30:33], all_logits=True)]
        parts += [engine.decode_step(ids[:, j])[:, None] for j in range(33, 40)]
        assert engine.lengths.tolist() == [40, 40] and engine.capacity >= 40
        return torch.cat(parts, 1)

    got = chunked(fast)
    assert rel(got, chunked(plain)) < EXACT  # the same schedule: the same numbers in both modes
    assert rel_fro(got, full) < 1e-2  # vs one prefill: equal up to quantizer boundary flips


def test_rows_prefill_and_reset_to_a_new_batch(artifact):
    plain, fast = engines(artifact("qwen2", -1))
    ids = torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(7))
    plain.reset(3, 20)
    want = plain.prefill(ids)
    for engine in (fast, plain):  # rows= works in both modes
        engine.reset(3, 20)
        got = torch.cat([engine.prefill(ids[:2], rows=slice(0, 2)), engine.prefill(ids[2:], rows=slice(2, 3))])
        assert rel(got, want) < EXACT
        assert engine.lengths.tolist() == [12, 12, 12] and engine._host_len.tolist() == [12, 12, 12]

    cache = fast.cache[0].k
    fast.reset(3, 20)  # the same shape: the cache is kept, the lengths zeroed
    assert fast.cache[0].k is cache and fast.lengths.tolist() == [0, 0, 0]
    fast.reset(5, 16)  # a new batch size: a new cache
    assert fast.cache[0].k.shape[0] == 5 and fast.lengths.tolist() == [0] * 5
    with pytest.raises(QoqError, match="reset"):
        fast.prefill(ids)
    more = torch.randint(0, VOCAB, (5, 9), generator=torch.Generator().manual_seed(8))
    plain.reset(5, 16)
    assert rel(fast.prefill(more), plain.prefill(more)) < EXACT
    tok = more[:, -1]
    assert rel(fast.decode_step(tok), plain.decode_step(tok)) < EXACT
    assert fast._host_len.tolist() == [10] * 5


def test_fast_generate_follows_the_plain_engine(artifact):
    plain, fast = engines(artifact("llama", 32))
    prompt = torch.randint(0, VOCAB, (10,), generator=torch.Generator().manual_seed(3))
    assert list(fast.generate(prompt, max_new_tokens=6)) == list(plain.generate(prompt, max_new_tokens=6))


def test_perplexity_runs_a_fast_engine_on_the_kv4_path(artifact):
    from qoq.verify.perplexity import engine_perplexity

    plain, fast = engines(artifact("llama", 128))
    fast.prefill_fp16 = True  # as constructed for generation: engine_perplexity turns it off for the run
    windows = torch.randint(0, VOCAB, (3, 32), generator=torch.Generator().manual_seed(4))
    got, want = engine_perplexity(fast, windows, batch=2), engine_perplexity(plain, windows, batch=2)
    assert abs(got.nll_sum - want.nll_sum) < 1e-5 * abs(want.nll_sum) and got.tokens == want.tokens
    assert fast.prefill_fp16


def test_lengths_bookkeeping_decode_graphs_rely_on(artifact):
    """What DecodeGraphs does around a capture and a replay, on the CPU: save, step, restore; a replayed step
    (device lengths advanced by the graph) moves the host mirror along; the cache grows before a step."""
    _, fast = engines(artifact("llama", 128))
    fast.reset(2, 16)
    assert fast.longest_sequence() == 0
    fast.prefill(torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3)))
    assert fast.longest_sequence() == 16 and fast.capacity == 16
    saved = fast.save_lengths()
    lengths_tensor = fast.lengths
    fast.ensure_capacity(fast.longest_sequence() + 1)
    assert fast.capacity >= 17
    fast.hidden_states(torch.zeros(2, 1, dtype=torch.long), graph_len=fast.capacity)
    assert fast.lengths.tolist() == [17, 17] and fast.longest_sequence() == 17
    fast.restore_lengths(saved)
    assert fast.lengths is lengths_tensor and fast.lengths.tolist() == [16, 16] and fast.longest_sequence() == 16
    fast.lengths.add_(1)  # as a replayed graph does on the device
    fast.count_replayed_step()
    assert fast._host_len.tolist() == fast.lengths.tolist() == [17, 17]
    fast.restore_lengths(saved)
    assert saved[1].tolist() == [16, 16]  # restoring twice works: the saved copy is never advanced


@pytest.mark.parametrize("shape", ["llama-3-8b", "qwen2-7b"])
def test_rope_table_rows_are_the_rotary_embeddings_bits(shape):
    from qoq.bench.synthetic import shape_config
    from qoq.runtime.engine import hf_config, rotary_embedding
    from qoq.runtime.fast import RopeTable

    rotary = rotary_embedding(hf_config(shape_config(shape)))
    assert RopeTable.applies(rotary)
    table = RopeTable(rotary)
    positions = torch.tensor([[0, 5, 1023], [4000, 17, 3]])
    cos, sin = table.lookup(positions, 4096)
    want_cos, want_sin = rotary(torch.zeros(1), positions)
    assert torch.equal(cos, want_cos) and torch.equal(sin, want_sin)
    table.lookup(positions[:, :1], 8192)  # grows with the cache
    assert table.table.shape[0] == 8192


def test_rope_table_refuses_position_dependent_frequencies():
    from qoq.runtime.fast import RopeTable

    class Dynamic(torch.nn.Module):
        rope_type = "dynamic"

    assert not RopeTable.applies(Dynamic())


def test_decode_profile_prefills_a_batch_in_row_chunks(artifact):
    from qoq.bench.decode_profile import prefill_in_chunks

    fast = Engine(artifact("llama", 128), device="cpu", backend="reference", fast=True)
    fast.reset(5, 20)
    prefill_in_chunks(fast, 5, 12, chunk_tokens=24)  # two rows per call: 2 + 2 + 1
    assert fast.lengths.tolist() == [12] * 5 and fast._host_len.tolist() == [12] * 5
