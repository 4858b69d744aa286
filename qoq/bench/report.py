"""The `qoq bench` report: its JSON schema, speedups, the --min-speedup check, the table and the plot.

JSON schema ("qoq-bench/1"); every figure the run measured, with the device, versions and settings:

    {
      "schema": "qoq-bench/1",
      "created": "2026-01-01T12:00:00+00:00",              ISO time
      "device": {"name": str, "memory_gb": float, "sm_count": int, "capability": "9.0"},
      "profile": {"name": "h100", "full_name": str, "memory_gb", "mem_bw_gbs", "fp16_tflops", "int8_tops",
                  "fp8_tflops": float|null, "sm_count", "arch", "smem_per_sm_kb", "source",
                  "tiles": {"NxK": {"M": {"kernel": str, ...}}}},  the profile GPU's W4A8 GEMM launches
      "profile_matches_device": bool,                      false: profile roofline, measured elsewhere
      "versions": {"qoq", "python", "torch", "cuda", "transformers", "cupy": str|null},
      "settings": {"model": str, "shape": str|null, "group_size": int, "input_len": int, "output_len": int,
                   "batches": [int], "max_batch": "auto"|int, "backend": str, "engines": [str],
                   "skip_kernels": bool, "skip_hf": bool, "prefill_chunk_tokens": int,
                   "tokens_per_s": str (the definition)},
      "model": {"model_type", "layers", "hidden", "intermediate", "heads", "kv_heads", "head_dim", "vocab",
                "tied_embeddings", "linear_params", "kv4_bytes_per_token", "fp16_kv_bytes_per_token"},
      "memory": {"capacity_gb": float,                     what the engines could use on this device
                 "max_batch": {engine: int},               per engine, QServe's protocol
                 "plans": {engine: {"batch", "fixed_gb", "per_seq_mb", "capacity_gb", "probes": [[b, gb|null]]}},
                 "kv4_vs_fp16_kv": {"kv4_batch": int, "fp16_kv_batch": int, "gain": float} | null,
                 "profile_max_batch": {engine: int}},      the same plan on the profile's memory size
      "kernels": [ {...}, ... ] | null,                    rows of qoq.bench.gemm (null: skipped/unavailable)
      "kernels_note": str|null,
      "e2e": [ {"engine": "qoq-w4a8kv4"|"fp16-engine"|"fp8-engine"|"hf-fp16", "batch": int, "is_max_batch": bool,
                "input_len": int, "output_len": int, "tokens_per_s": float, "ttft_ms": float,
                "decode_ms_per_token": float, "total_s": float, "peak_mem_gb": float|null,
                "weights_gb": float, "kv_cache_gb": float, "roofline_fraction": float}
               | {"engine", "batch", "is_max_batch", "input_len", "output_len", "error": str} ],
      "engine_errors": {engine: str},                      engines that could not be built or run
      "engine_backends": {engine: str},                    what each engine ran (GEMMs, graphs, attention)
      "speedups": {"max_batch": {"vs_fp16_engine": float|null, "vs_fp8_engine": float|null,
                                 "vs_hf_fp16": float|null},
                   "by_batch": {"<batch>": {"vs_fp16_engine", "vs_fp8_engine", "vs_hf_fp16": float|null}}},
      "check": {"min_speedup": float|null, "passed": bool|null}
    }

Speedups are tokens/s ratios of qoq-w4a8kv4 over the baseline; "max_batch" compares each engine at its
own max batch (QServe's protocol), "by_batch" at equal batch sizes.
"""
from __future__ import annotations

import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path

from qoq.errors import QoqError

SCHEMA = "qoq-bench/1"
QOQ = "qoq-w4a8kv4"
BASELINES = {"fp16-engine": "vs_fp16_engine", "fp8-engine": "vs_fp8_engine", "hf-fp16": "vs_hf_fp16"}
ROW_NUMBERS = ("tokens_per_s", "ttft_ms", "decode_ms_per_token", "total_s", "weights_gb", "kv_cache_gb",
               "roofline_fraction")
PAPER_TOKENS_PER_S = {("l40s", "llama-3-8b"): 3656, ("a100", "llama-3-8b"): 3005}  # QServe README, W4A8KV4


def versions() -> dict:
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    from qoq.version import __version__

    out["qoq"] = __version__
    for mod in ("transformers", "cupy"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            out[mod] = None
    return out


def _row_tps(rows: list[dict], engine: str, batch: int | None = None, max_batch: bool = False) -> float | None:
    for r in rows:
        if r["engine"] != engine or r.get("error") or r.get("tokens_per_s") is None:
            continue
        if max_batch and r.get("is_max_batch"):
            return r["tokens_per_s"]
        if not max_batch and r["batch"] == batch:
            return r["tokens_per_s"]
    return None


def speedups(rows: list[dict]) -> dict:
    """qoq tokens/s over each baseline's, at the max batch of each and at equal batch sizes."""
    def ratio(a, b):
        return None if a is None or b is None or b <= 0 else a / b

    out = {"max_batch": {key: ratio(_row_tps(rows, QOQ, max_batch=True), _row_tps(rows, eng, max_batch=True))
                         for eng, key in BASELINES.items()}, "by_batch": {}}
    for b in sorted({r["batch"] for r in rows if r["engine"] == QOQ}):
        out["by_batch"][str(b)] = {key: ratio(_row_tps(rows, QOQ, b), _row_tps(rows, eng, b))
                                   for eng, key in BASELINES.items()}
    return out


def check_min_speedup(report: dict, min_speedup: float | None) -> tuple[bool | None, str]:
    """(passed, one line) for --min-speedup: qoq over the FP16 engine, each at its max batch."""
    if min_speedup is None:
        return None, ""
    s = report.get("speedups", {}).get("max_batch", {}).get("vs_fp16_engine")
    if s is None:
        return False, (f"--min-speedup {min_speedup:g}: no end-to-end speedup over the FP16 engine at the max batch "
                       "was measured (see engine_errors / e2e errors in the report)")
    if s < min_speedup:
        return False, (f"end-to-end speedup over the FP16 engine at the max batch is {s:.2f}x, below "
                       f"--min-speedup {min_speedup:g}")
    return True, f"end-to-end speedup over the FP16 engine at the max batch is {s:.2f}x (>= {min_speedup:g})"


def build_report(*, device: dict, profile: dict, profile_matches_device: bool, settings: dict, model: dict,
                 memory: dict, kernels: list | None, kernels_note: str | None, rows: list[dict],
                 engine_errors: dict, min_speedup: float | None, engine_backends: dict | None = None) -> dict:
    report = {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "profile": profile,
        "profile_matches_device": profile_matches_device,
        "versions": versions(),
        "settings": settings,
        "model": model,
        "memory": memory,
        "kernels": kernels,
        "kernels_note": kernels_note,
        "e2e": rows,
        "engine_errors": engine_errors,
        "engine_backends": engine_backends or {},
        "speedups": speedups(rows),
    }
    passed, _ = check_min_speedup(report, min_speedup)
    report["check"] = {"min_speedup": min_speedup, "passed": passed}
    return report


# ---- validation (the schema above, as code) ----------------------------------------------------------

_TOP = {"schema": str, "created": str, "device": dict, "profile": dict, "profile_matches_device": bool,
        "versions": dict, "settings": dict, "model": dict, "memory": dict, "kernels": (list, type(None)),
        "kernels_note": (str, type(None)), "e2e": list, "engine_errors": dict, "speedups": dict, "check": dict}
_DEVICE = {"name": str, "memory_gb": (int, float), "sm_count": int, "capability": str}
_PROFILE = {"name": str, "full_name": str, "memory_gb": (int, float), "mem_bw_gbs": (int, float),
            "fp16_tflops": (int, float), "int8_tops": (int, float), "fp8_tflops": (int, float, type(None)),
            "sm_count": int, "arch": str, "source": str, "tiles": dict}
_SETTINGS = {"model": str, "shape": (str, type(None)), "group_size": int, "input_len": int, "output_len": int,
             "batches": list, "max_batch": (str, int), "backend": str, "engines": list, "skip_kernels": bool,
             "skip_hf": bool, "prefill_chunk_tokens": int, "tokens_per_s": str}
_VERSIONS = ("qoq", "python", "torch", "cuda", "transformers", "cupy")
_MEMORY = {"capacity_gb": (int, float), "max_batch": dict, "plans": dict, "kv4_vs_fp16_kv": (dict, type(None)),
           "profile_max_batch": dict}
_ROW = {"engine": str, "batch": int, "is_max_batch": bool, "input_len": int, "output_len": int}
_ENGINES = (QOQ, *BASELINES)


def validate_report(report: dict) -> list[str]:
    """Problems with `report` against the schema above (empty when it conforms)."""
    problems: list[str] = []

    def check(obj, spec, where):
        if not isinstance(obj, dict):
            problems.append(f"{where} is not an object")
            return
        for key, typ in spec.items():
            if key not in obj:
                problems.append(f"{where}.{key} is missing")
            elif not isinstance(obj[key], typ) or (typ is int and isinstance(obj[key], bool)):
                problems.append(f"{where}.{key} has type {type(obj[key]).__name__}")

    check(report, _TOP, "report")
    if problems:
        return problems
    if report["schema"] != SCHEMA:
        problems.append(f"report.schema is {report['schema']!r}, not {SCHEMA!r}")
    check(report["device"], _DEVICE, "device")
    check(report["profile"], _PROFILE, "profile")
    check(report["settings"], _SETTINGS, "settings")
    check(report["memory"], _MEMORY, "memory")
    for v in _VERSIONS:
        if v not in report["versions"]:
            problems.append(f"versions.{v} is missing")
    for i, row in enumerate(report["e2e"]):
        where = f"e2e[{i}]"
        check(row, _ROW, where)
        if not isinstance(row, dict):
            continue
        if row.get("engine") not in _ENGINES:
            problems.append(f"{where}.engine {row.get('engine')!r} is not one of {_ENGINES}")
        if "error" in row:
            if not isinstance(row["error"], str):
                problems.append(f"{where}.error is not a string")
            continue
        for key in ROW_NUMBERS:
            if not isinstance(row.get(key), (int, float)) or isinstance(row.get(key), bool):
                problems.append(f"{where}.{key} is missing or not a number")
        if "peak_mem_gb" not in row or not isinstance(row["peak_mem_gb"], (int, float, type(None))):
            problems.append(f"{where}.peak_mem_gb is missing or not a number/null")
    for part in ("max_batch", "by_batch"):
        if not isinstance(report["speedups"].get(part), dict):
            problems.append(f"speedups.{part} is missing")
    for key in ("min_speedup", "passed"):
        if key not in report["check"]:
            problems.append(f"check.{key} is missing")
    return problems


def write_json(report: dict, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, path)


# ---- terminal and plot ------------------------------------------------------------------------------

def e2e_table(report: dict):
    from rich.table import Table

    dev, prof = report["device"]["name"], report["profile"]["name"]
    s = report["settings"]
    table = Table(title=f"end to end on {dev} (profile {prof}): {s['model']}, "
                        f"in {s['input_len']} / out {s['output_len']}")
    for col in ("engine", "batch", "tok/s", "TTFT ms", "decode ms/tok", "peak GB", "weights GB", "KV GB", "roofline"):
        table.add_column(col, justify="left" if col == "engine" else "right")
    for r in report["e2e"]:
        batch = f"{r['batch']}{' (max)' if r.get('is_max_batch') else ''}"
        if r.get("error"):
            table.add_row(r["engine"], batch, f"[red]{r['error']}[/]", "", "", "", "", "", "")
            continue
        table.add_row(r["engine"], batch, f"{r['tokens_per_s']:,.0f}", f"{r['ttft_ms']:,.1f}",
                      f"{r['decode_ms_per_token']:.2f}", _num(r.get("peak_mem_gb"), 1), f"{r['weights_gb']:.2f}",
                      f"{r['kv_cache_gb']:.2f}", f"{r['roofline_fraction']:.0%}")
    return table


GEMM_IMPLS = ("fp16", "int8", "fp8", "w4a8_g128", "w4a8_pc")


def kernels_table(report: dict, max_rows: int = 60):
    """GEMM rows of qoq.bench.gemm pivoted to one line per (N x K, M) with µs per implementation and our
    speedups; attention rows after them. Rows of another shape are shown generically."""
    from rich.table import Table

    rows = report.get("kernels") or []
    if not rows:
        return None
    gemm = [r for r in rows if r.get("bench") == "gemm" and {"n", "k", "m", "impl", "us"} <= set(r)]
    if not gemm:
        cols = list(dict.fromkeys(k for r in rows for k in r))
        table = Table(title="kernels (qoq.bench.gemm)")
        for c in cols:
            table.add_column(str(c), justify="right")
        for r in rows[:max_rows]:
            table.add_row(*(_cell(r.get(c)) for c in cols))
        return table
    impls = [i for i in GEMM_IMPLS if any(r["impl"] == i for r in gemm)]
    ours = [i for i in impls if i.startswith("w4a8")]
    ratios = ["vs_fp8"] * any(r.get("vs_fp8") is not None for r in gemm) + ["vs_fp16", "vs_int8"]
    table = Table(title=f"kernels on {report['device']['name']}: µs per call (qoq.bench.gemm)")
    table.add_column("N x K", justify="left")
    table.add_column("M", justify="right")
    for i in impls:
        table.add_column(i, justify="right")
    for i in ours:
        for ratio in ratios:
            table.add_column(f"{i.removeprefix('w4a8_')} {ratio.replace('_', ' ')}", justify="right")
    keys = list(dict.fromkeys((r["n"], r["k"], r["m"]) for r in gemm))
    by = {(r["n"], r["k"], r["m"], r["impl"]): r for r in gemm}
    for n, k, m in keys[:max_rows]:
        cells = [f"{n}x{k}", str(m)]
        cells += [_num(by.get((n, k, m, i), {}).get("us"), 1) for i in impls]
        for i in ours:
            r = by.get((n, k, m, i), {})
            cells += [_ratio(r.get(ratio)) for ratio in ratios]
        table.add_row(*cells)
    width = 2 + len(impls) + len(ratios) * len(ours)
    for r in rows:
        if r.get("bench") == "attention":
            label = f"attention B={r.get('batch')} ctx={r.get('ctx')}"
            cells = [label, r.get("impl", ""), _num(r.get("us"), 1)] + [""] * (len(impls) - 1)
            cells += [_ratio(r.get("vs_sdpa"))] + [""] * width
            table.add_row(*cells[:width])
        elif r.get("bench") == "rows":  # ratio: against one CTA per row
            label = f"{r.get('kernel')} M={r.get('m')} K={r.get('k')}"
            cells = [label, f"cluster {r.get('cluster')}", _num(r.get("us"), 1)] + [""] * (len(impls) - 1)
            cells += [_ratio(r.get("vs_one_cta"))] + [""] * width
            table.add_row(*cells[:width])
    return table


def _ratio(x) -> str:
    return "-" if x is None else f"{x:.2f}x"


def summary_lines(report: dict) -> list[str]:
    mem, sp = report["memory"], report["speedups"]["max_batch"]
    lines = []
    mb = mem.get("max_batch", {})
    if mb:
        lines.append("max batch: " + ", ".join(f"{e} {b}" for e, b in mb.items()))
    kv = mem.get("kv4_vs_fp16_kv")
    if kv:
        lines.append(f"KV4 vs FP16 KV at the same memory (qoq weights): batch {kv['kv4_batch']} vs "
                     f"{kv['fp16_kv_batch']} ({kv['gain']:.2f}x)")
    parts = [f"{v:.2f}x {k.removeprefix('vs_').replace('_', '-')}" for k, v in sp.items() if v is not None]
    if parts:
        lines.append("qoq speedup at max batch: " + ", ".join(parts))
    paper = PAPER_TOKENS_PER_S.get((report["profile"]["name"], report["settings"].get("shape")))
    if paper:
        lines.append(f"QServe paper, {report['profile']['name'].upper()}: {paper} tok/s")
    for eng, msg in report.get("engine_errors", {}).items():
        lines.append(f"{eng} not measured: {msg}")
    return lines


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise QoqError("--plot needs matplotlib, which is not installed; pip install matplotlib") from None


def plot_throughput(report: dict, path: Path) -> None:
    """Tokens/s vs batch, one line per engine (PNG)."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for eng in _ENGINES:
        pts = sorted((r["batch"], r["tokens_per_s"]) for r in report["e2e"]
                     if r["engine"] == eng and not r.get("error"))
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=eng)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch")
    ax.set_ylabel("output tokens/s")
    s = report["settings"]
    ax.set_title(f"{s['model']} on {report['device']['name']} (in {s['input_len']} / out {s['output_len']})")
    ax.grid(True, alpha=0.3)
    ax.legend()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _num(x, digits: int) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return "" if v is None else str(v)
