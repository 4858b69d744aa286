"""Decode tokens/s of the runtime engine on a CUDA GPU: fast mode at batch 1 and 16 with CUDA graphs on
and off, the plain mode at batch 1 (64 decode steps after a 128-token prefill, CUDA events, median of 3),
plus the largest relative logits difference of each fast engine against the plain one (prefill_fp16 off,
the same tokens: it should be at fp16 rounding level).

    python scripts/engine_gpu_check.py --artifact PATH [--json OUT] [--backend auto]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

PREFILL, STEPS, REPEATS = 128, 64, 3


def decode_tokens_per_s(engine, batch: int, vocab: int) -> float:
    """Median over REPEATS of batch * STEPS / (time of STEPS greedy decode steps after a prefill)."""
    ids = torch.randint(0, vocab, (batch, PREFILL), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    runs = []
    for _ in range(REPEATS + 1):  # the first run warms up (kernel loads, graph capture)
        engine.reset(batch, PREFILL + STEPS + 1)
        tok = engine.prefill(ids).argmax(-1)
        t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0.record()
        for _ in range(STEPS):
            tok = engine.decode_step(tok).argmax(-1)
        t1.record()
        t1.synchronize()
        runs.append(batch * STEPS / (t0.elapsed_time(t1) / 1e3))
    return statistics.median(runs[1:])


def logits_rel_diff(engine, plain, vocab: int, batch: int = 4, steps: int = 8) -> float:
    """Largest max|fast - plain| / max|plain| over a prefill and `steps` teacher-forced decode steps."""
    ids = torch.randint(0, vocab, (batch, 64 + steps), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    worst = 0.0
    for e in (engine, plain):
        e.reset(batch, ids.shape[1])
    pairs = [(engine.prefill(ids[:, :64]), plain.prefill(ids[:, :64]))]
    for j in range(64, ids.shape[1]):
        pairs.append((engine.decode_step(ids[:, j]).clone(), plain.decode_step(ids[:, j])))
    for got, want in pairs:
        worst = max(worst, float((got - want).abs().max() / want.abs().max()))
    return worst


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", required=True)
    ap.add_argument("--json", dest="json_out")
    ap.add_argument("--backend", default="auto")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("engine_gpu_check: no CUDA GPU is visible; run it on a CUDA machine", file=sys.stderr)
        return 1
    from qoq.formats.artifact import read_artifact
    from qoq.runtime.engine import Engine

    art = read_artifact(args.artifact)
    vocab = int(art.config["vocab_size"])
    plain = Engine(art, device="cuda", backend=args.backend, fast=False)
    rows = []
    for graph in (True, False):
        fast = Engine(art, device="cuda", backend=args.backend, fast=True, cuda_graph=graph)
        fast.prefill_fp16 = False
        diff = logits_rel_diff(fast, plain, vocab)
        fast.prefill_fp16 = True  # generation speed: the serving configuration
        for batch in (1, 16):
            rows.append({"mode": "fast", "cuda_graph": fast.cuda_graph, "batch": batch,
                         "tokens_per_s": decode_tokens_per_s(fast, batch, vocab), "logits_rel_diff": diff,
                         "graph_error": fast.graph_error})
        del fast
        torch.cuda.empty_cache()
    rows.append({"mode": "plain", "cuda_graph": False, "batch": 1,
                 "tokens_per_s": decode_tokens_per_s(plain, 1, vocab), "logits_rel_diff": 0.0, "graph_error": None})
    print(f"{torch.cuda.get_device_name()}  backend {plain.backend.describe()}  "
          f"prefill {PREFILL}, {STEPS} decode steps, median of {REPEATS}")
    print(f"{'mode':<6} {'graph':<6} {'batch':>5} {'decode tok/s':>13} {'logits vs plain':>16}")
    for r in rows:
        print(f"{r['mode']:<6} {str(r['cuda_graph']):<6} {r['batch']:>5} {r['tokens_per_s']:>13.1f} "
              f"{r['logits_rel_diff']:>16.2e}" + (f"  graph error: {r['graph_error']}" if r["graph_error"] else ""))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "backend": plain.backend.describe(),
                       "prefill": PREFILL, "steps": STEPS, "repeats": REPEATS, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
