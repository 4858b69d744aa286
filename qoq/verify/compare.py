"""Whole-model comparison of two engine backends on WikiText-2 test windows (teacher-forced logits).

    python -m qoq.verify.compare ARTIFACT --windows 8 --seq-len 2048 --backend-a reference --backend-b cupy \
        --json compare.json

Backend A is the reference, B the candidate; see `qoq.verify.backend_compare` for the protocol
and the metrics. The windows are the first N of qoq verify's (`qoq.verify.perplexity`).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from qoq.console import err, out, user_errors
from qoq.errors import QoqError, flags

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def _backend(flag: str, name: str, device):
    from qoq.runtime.backend import get_backend

    with flags({"backend": flag}):  # this command has two backend flags
        return get_backend(name, device)


def load_windows(art, data: str | None, seq_len: int, windows: int):
    """The first `windows` WikiText-2 test windows of `seq_len` tokens, tokenized with the artifact's tokenizer,
    and where the text came from."""
    from qoq.verify.perplexity import artifact_tokenizer, load_wikitext2, token_windows

    text, source = load_wikitext2(data)
    return token_windows(artifact_tokenizer(art), text, seq_len, windows), source


def _table(report: dict) -> Table:
    table = Table(title=f"{report['candidate']} vs {report['reference']} on {report['device']}: "
                        f"{len(report['windows'])} x {report['seq_len']} tokens, teacher-forced, last "
                        f"{report['decode_tokens']} decoded")
    for col in ("window", "frob. rel", "max rel", "pos. rel (mean)", "top-1 agree", "KL (mean)", "NLL A", "NLL B"):
        table.add_column(col, justify="right")

    def row(name, m):
        table.add_row(name, f"{m['frobenius_rel_error']:.2e}", f"{m['max_rel_error']:.2e}",
                      f"{m['position_rel_error_mean']:.2e}", f"{m['top1_agreement']:.4f}", f"{m['kl_mean']:.2e}",
                      f"{m['nll_reference']:.4f}", f"{m['nll_candidate']:.4f}")

    for i, m in enumerate(report["windows"]):
        row(str(i), m)
    row("[bold]all[/]", report["overall"])
    if "floor" in report:
        row("floor", report["floor"])
    return table


@app.command()
@user_errors
@flags({"device": "--device"})
def main(
    artifact: Path = typer.Argument(..., help="artifact folder written by qoq quantize"),
    windows: int = typer.Option(8, "--windows", help="number of WikiText-2 test windows (the first N)"),
    seq_len: int = typer.Option(2048, "--seq-len", help="tokens per window"),
    backend_a: str = typer.Option("reference", "--backend-a", help="reference side: reference | cupy"),
    backend_b: str = typer.Option("cupy", "--backend-b", help="candidate side: reference | cupy"),
    decode_tokens: int = typer.Option(8, "--decode-tokens", help="last tokens of each window decoded one by one"),
    floor: bool = typer.Option(True, "--floor/--no-floor", help="also the reference against itself (one prefill "
                               "of the whole window): the noise floor"),
    data: Optional[str] = typer.Option(None, "--data", help="local WikiText-2 wiki.test.raw (or its folder); "
                                       "default: $QOQ_WIKITEXT2, the hub, then $QOQ_DATA_DIR"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
    json_path: Optional[Path] = typer.Option(None, "--json", help="write the report as JSON here"),
):
    """Logits of backend B against backend A on WikiText-2 windows: relative errors, top-1, KL and NLL."""
    from qoq.formats.artifact import read_artifact
    from qoq.runtime.backend import resolve_device
    from qoq.verify.backend_compare import compare_backends

    if windows < 1:
        raise QoqError(f"--windows must be >= 1, got {windows}")
    if seq_len < 2:
        raise QoqError(f"--seq-len must be >= 2, got {seq_len}")
    if decode_tokens < 0 or decode_tokens >= seq_len:
        raise QoqError(f"--decode-tokens must be in [0, --seq-len), got {decode_tokens}")
    dev = resolve_device(device)
    a, b = _backend("--backend-a", backend_a, dev), _backend("--backend-b", backend_b, dev)
    art = read_artifact(artifact)
    ids, source = load_windows(art, data, seq_len, windows)
    err.print(f"WikiText-2 test from {source}: {ids.shape[0]} windows x {seq_len} tokens", highlight=False)
    report = compare_backends(art, ids, dev, candidate=b, reference=a, decode_tokens=decode_tokens,
                              floor=floor)
    report.update(artifact=str(art.path), data_source=source)
    screen = out if out.is_terminal else Console(width=160)  # logs: no truncated columns
    screen.print(_table(report))
    if "floor" in report:
        out.print("floor: the reference against itself, one prefill of each whole window instead of prefill + "
                  "decode (rounding-level differences flip quantizer codes: read B's figures against it)",
                  highlight=False)
    o = report["overall"]
    out.print(f"PPL A {o['ppl_reference']:.4f}, PPL B {o['ppl_candidate']:.4f} ({o['ppl_rel_diff']:+.3%}) on these "
              f"windows; {report['seconds']:.1f} s", highlight=False)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2) + "\n")
        out.print(f"wrote {json_path}", highlight=False)


if __name__ == "__main__":
    sys.exit(app(prog_name="python -m qoq.verify.compare"))
