"""Where one decode step's time goes: `python -m qoq.bench.decode_profile --shape llama-3-8b --batches 1,64`.

For each batch the qoq engine (fast mode, synthetic weights) holds `--ctx` cached tokens per sequence; then
- the CUDA-graph step (what serving runs) is timed by replaying it, median of `--steps`;
- the same step runs once eagerly under torch.profiler and its GPU kernels are summed by name.
The graph step minus the kernels' sum is the time the GPU sits between kernels (launch latency, tails).
"""
from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict

import torch

from qoq.bench.e2e import DEFAULT_PREFILL_CHUNK_TOKENS


def kernel_times(fn) -> dict[str, tuple[int, float]]:
    """{kernel name: (calls, total µs)} of the GPU kernels `fn` launches."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    out: dict[str, list] = defaultdict(lambda: [0, 0.0])
    for ev in prof.events():
        if ev.device_type.name != "CUDA":
            continue
        name = short_name(ev.name)
        out[name][0] += 1
        out[name][1] += ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
    return {k: (int(v[0]), float(v[1])) for k, v in out.items()}


def short_name(name: str) -> str:
    """A kernel's name without template arguments or parameter lists (one row per kernel family)."""
    for sep in ("<", "("):
        name = name.split(sep)[0]
    return name.strip()[:60]


def graph_step_us(engine, tokens: torch.Tensor, steps: int) -> float:
    """Median µs of one CUDA-graph decode step (the lengths are restored, so the cache never fills)."""
    saved = engine.save_lengths()
    engine.decode_step(tokens)  # captures
    times = []
    for _ in range(steps):
        engine.restore_lengths(saved)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        engine.decode_step(tokens)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    engine.restore_lengths(saved)
    return statistics.median(times)


def prefill_in_chunks(engine, batch: int, ctx: int, chunk_tokens: int = DEFAULT_PREFILL_CHUNK_TOKENS) -> None:
    """Fill every sequence's cache with `ctx` random prompt tokens, at most `chunk_tokens` tokens per prefill call
    (as `qoq bench` does), so a max-size batch fits beside its cache."""
    rows = max(1, chunk_tokens // max(ctx, 1))
    for r0 in range(0, batch, rows):
        r1 = min(batch, r0 + rows)
        engine.prefill(torch.randint(0, engine.vocab, (r1 - r0, ctx), device=engine.device), rows=slice(r0, r1))


def profile_batch(engine, batch: int, ctx: int, steps: int) -> dict:
    engine.reset(batch, ctx + 8)
    prefill_in_chunks(engine, batch, ctx)
    vocab, dev = engine.vocab, engine.device
    tokens = torch.randint(0, vocab, (batch,), device=dev)
    step_us = graph_step_us(engine, tokens, steps)
    saved = engine.save_lengths()

    def eager():
        engine.lm_logits(engine.hidden_states(tokens.reshape(-1, 1))[:, -1])

    eager()  # warm
    engine.restore_lengths(saved)
    kernels = kernel_times(eager)
    engine.restore_lengths(saved)
    total = sum(t for _, t in kernels.values())
    return {"batch": batch, "ctx": ctx, "graph_step_us": round(step_us, 1), "kernel_sum_us": round(total, 1),
            "kernels": sorted(({"name": n, "calls": c, "us": round(t, 1)} for n, (c, t) in kernels.items()),
                              key=lambda r: -r["us"])}


def main(argv=None) -> int:
    from qoq.bench.synthetic import SHAPE_CHOICES, build_synthetic_artifact
    from qoq.runtime.engine import Engine

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama-3-8b", choices=SHAPE_CHOICES)
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--ctx", type=int, default=1024)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--json", help="write the rows to this file")
    o = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: the decode profile needs a CUDA GPU")
        return 2
    dev = torch.device("cuda")
    engine = Engine(build_synthetic_artifact(o.shape, dev, o.group), device=dev)
    rows = []
    print(f"device: {torch.cuda.get_device_name(0)}, shape {o.shape}, g{o.group}, ctx {o.ctx}")
    for b in (int(x) for x in o.batches.split(",")):
        r = profile_batch(engine, b, o.ctx, o.steps)
        rows.append(r)
        print(f"batch {b}: graph step {r['graph_step_us']:.1f} us, kernels {r['kernel_sum_us']:.1f} us "
              f"(gaps {r['graph_step_us'] - r['kernel_sum_us']:.1f} us)")
        for k in r["kernels"]:
            print(f"  {k['us']:9.1f} us  {k['calls']:5d} x  {k['name']}")
    if o.json:
        with open(o.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(0), "shape": o.shape, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
