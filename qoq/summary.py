"""The closing lines of `qoq quantize` and `qoq generate`: where the time went and what to type next."""
from __future__ import annotations

from pathlib import Path

from qoq.progress import format_duration

QUANTIZE_PHASES = (("load", "load_model_s"), ("calibration data", "calibration_data_s"),
                   ("block loop", "quantize_s"), ("write", "write_s"))


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def quantize_summary(path: Path, report: dict) -> list[str]:
    timings = report.get("timings", {})
    phases = [f"{name} {format_duration(timings[key])}" for name, key in QUANTIZE_PHASES if key in timings]
    total = sum(timings.get(key, 0.0) for _, key in QUANTIZE_PHASES)
    mem = report.get("memory", {})
    peak, gpu = mem.get("peak_host_rss_bytes"), mem.get("peak_gpu_bytes")
    memory = (f"peak host memory {_size(peak)}, " if peak else "") + (f"peak GPU memory {_size(gpu)}, " if gpu else "")
    return [f"time: {', '.join(phases)} (total {format_duration(total)})",
            f"{memory}artifact {_size(folder_bytes(path))} on disk",
            f"next: qoq verify {path} --ppl wikitext2"]


def generate_summary(stats: dict) -> str:
    prefill = (f"prefill {stats['prompt_tokens']} tokens in {format_duration(stats['prefill_s'])} "
               f"({_rate(stats['prompt_tokens'], stats['prefill_s'])})")
    steps = stats["decode_steps"]
    decode = (f"decode {steps} tokens in {format_duration(stats['decode_s'])} ({_rate(steps, stats['decode_s'])})"
              if steps else "decode: none (the first token ended the answer)")
    return (f"{stats['new_tokens']} new tokens; load {format_duration(stats['load_s'])}, {prefill}, {decode}; "
            f"{stats['backend']} on {stats['device']}")


def _rate(tokens: int, seconds: float) -> str:
    return f"{tokens / seconds:,.1f} tokens/s" if seconds > 0 else "- tokens/s"


def _size(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"
