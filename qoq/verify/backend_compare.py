"""Whole-model comparison of two backends (the protocol behind `python -m qoq.verify.compare`).

Two independent engines (no lockstep: each runs on its own from the token ids up) see the same windows,
teacher-forced: one prefill of the first T - decode_tokens tokens, then the last tokens decoded one by one
(as qoq.verify.kernel_check splits them). Since a quantizer boundary flip now and then changes one value a lot,
the worst single logit (max_rel) says little on its own; the Frobenius, per-position, top-1, KL and NLL figures
say how close the two models are as a whole.
"""
from __future__ import annotations

import math
import time

import torch

from qoq.formats.artifact import Artifact
from qoq.runtime.backend import Backend
from qoq.runtime.engine import Engine


def _plain_engine(art: Artifact, device, backend) -> Engine:
    """An engine without the fast paths (one backend call per op)."""
    return Engine(art, device=device, backend=backend, fast=False)


def _teacher_forced_logits(engine, ids: torch.Tensor, split: int) -> torch.Tensor:
    """Logits [T, V] (fp32) of one window ids [1, T]: prefill ids[:, :split], then decode the rest."""
    engine.reset(1, ids.shape[1])
    out = [engine.prefill(ids[:, :split], all_logits=True)[0]]
    out += [engine.decode_step(ids[:, j]) for j in range(split, ids.shape[1])]
    return torch.cat(out, 0).float()


def logits_metrics(r: torch.Tensor, c: torch.Tensor, ids: torch.Tensor) -> dict:
    """Metrics of candidate logits c against reference logits r ([T, V]) of the window ids [T]. Sums are kept
    (`*_sum`, `positions`, `tokens`) so that windows aggregate exactly."""
    r, c = r.float(), c.float()
    d = c - r
    diff_sq = float(torch.linalg.vector_norm(d, dtype=torch.float64) ** 2)
    ref_sq = float(torch.linalg.vector_norm(r, dtype=torch.float64) ** 2)
    pos_rel = torch.linalg.vector_norm(d, dim=-1) / torch.linalg.vector_norm(r, dim=-1).clamp_min(1e-30)
    log_r, log_c = torch.log_softmax(r, -1), torch.log_softmax(c, -1)
    kl = (log_r.exp() * (log_r - log_c)).sum(-1).clamp_min(0)  # KL(softmax(r) || softmax(c)) per position
    targets = ids[1:].to(r.device)
    nll_r = float(-log_r[:-1].gather(-1, targets[:, None]).sum())
    nll_c = float(-log_c[:-1].gather(-1, targets[:, None]).sum())
    return {
        "frobenius_rel_error": (diff_sq / max(ref_sq, 1e-300)) ** 0.5,
        "max_rel_error": float(d.abs().max() / r.abs().max().clamp_min(1e-30)),
        "position_rel_error_mean": float(pos_rel.mean()),
        "top1_agreement": float((r.argmax(-1) == c.argmax(-1)).float().mean()),
        "kl_mean": float(kl.mean()),
        "nll_reference": nll_r / targets.numel(), "nll_candidate": nll_c / targets.numel(),
        "diff_sq_sum": diff_sq, "ref_sq_sum": ref_sq, "position_rel_error_sum": float(pos_rel.sum()),
        "top1_agree_count": int((r.argmax(-1) == c.argmax(-1)).sum()), "kl_sum": float(kl.sum()),
        "nll_reference_sum": nll_r, "nll_candidate_sum": nll_c,
        "positions": int(r.shape[0]), "tokens": int(targets.numel()),
    }


def aggregate_metrics(rows: list[dict]) -> dict:
    """The metrics of `logits_metrics` over every position of every window (max_rel: the worst window)."""
    s = {k: sum(row[k] for row in rows) for k in ("diff_sq_sum", "ref_sq_sum", "position_rel_error_sum",
                                                  "top1_agree_count", "kl_sum", "nll_reference_sum",
                                                  "nll_candidate_sum", "positions", "tokens")}
    n, t = max(s["positions"], 1), max(s["tokens"], 1)
    ppl_r, ppl_c = math.exp(s["nll_reference_sum"] / t), math.exp(s["nll_candidate_sum"] / t)
    return {
        "frobenius_rel_error": (s["diff_sq_sum"] / max(s["ref_sq_sum"], 1e-300)) ** 0.5,
        "max_rel_error": max((row["max_rel_error"] for row in rows), default=0.0),
        "position_rel_error_mean": s["position_rel_error_sum"] / n,
        "top1_agreement": s["top1_agree_count"] / n,
        "kl_mean": s["kl_sum"] / n,
        "nll_reference": s["nll_reference_sum"] / t, "nll_candidate": s["nll_candidate_sum"] / t,
        "ppl_reference": ppl_r, "ppl_candidate": ppl_c, "ppl_rel_diff": ppl_c / ppl_r - 1,
        "positions": s["positions"], "tokens": s["tokens"], "windows": len(rows),
    }


@torch.no_grad()
def compare_backends(art: Artifact, windows: torch.Tensor, device, candidate: str | Backend,
                     reference: str | Backend, decode_tokens: int = 8, floor: bool = True) -> dict:
    """Whole-model logits of `candidate` against `reference` on `windows` [N, T], teacher-forced (see above):
    {"reference", "candidate", "decode_tokens", "seconds", "windows": [per-window metrics], "overall": {...}}.
    NLLs are per predicted token (tokens 1..T-1 of each window), so PPL = exp(nll).
    `floor`: also "floor" / "floor_windows": the reference against itself run another valid way (one prefill of
    the whole window, no decode). Rounding-level differences (other GEMM shapes, decode vs prefill attention)
    flip quantizer codes there too, so this is the noise floor the candidate's figures are to be read against."""
    t0 = time.perf_counter()
    ref_engine = _plain_engine(art, device, reference)
    cand_engine = _plain_engine(art, device, candidate)
    keep = ("frobenius_rel_error", "max_rel_error", "position_rel_error_mean", "top1_agreement", "kl_mean",
            "nll_reference", "nll_candidate", "positions", "tokens")
    rows, floor_rows = [], []
    for row in windows:
        ids = row[None].to(ref_engine.device)
        split = max(1, ids.shape[1] - decode_tokens)
        r = _teacher_forced_logits(ref_engine, ids, split)
        c = _teacher_forced_logits(cand_engine, ids, split)
        rows.append(logits_metrics(r, c, ids[0]))
        del c
        if floor:
            floor_rows.append(logits_metrics(r, _teacher_forced_logits(ref_engine, ids, ids.shape[1]), ids[0]))
        del r
    report = {
        "reference": ref_engine.backend.describe(), "candidate": cand_engine.backend.describe(),
        "device": str(ref_engine.device), "decode_tokens": decode_tokens, "seq_len": int(windows.shape[1]),
        "windows": [{k: row[k] for k in keep} for row in rows],
        "overall": aggregate_metrics(rows),
    }
    if floor:
        report["floor_windows"] = [{k: row[k] for k in keep} for row in floor_rows]
        report["floor"] = aggregate_metrics(floor_rows)
    report["seconds"] = time.perf_counter() - t0
    return report
