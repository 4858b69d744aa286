"""How user-facing errors name the caller's arguments: Python spellings by default, the CLI's flags inside
`flags(...)`, and every flag a command declares is one it has."""
from __future__ import annotations

import pytest
import typer

from qoq import cli
from qoq.errors import QoqError, arg, flags


def test_python_spelling_by_default():
    assert arg("device") == "device"
    assert arg("device", "cpu") == "device='cpu'"
    assert arg("overwrite", True) == "overwrite=True"
    assert arg("n_samples", 0) == "n_samples=0"


def test_flag_spelling_inside_and_restored_after():
    with flags({"device": "--device", "overwrite": "--overwrite"}):
        assert arg("device") == "--device" and arg("device", "cpu") == "--device cpu"
        assert arg("overwrite", True) == "--overwrite"
        assert arg("backend", "cupy") == "backend='cupy'"  # not a flag of this front end
        with flags({"backend": "--backend-b"}):
            assert arg("backend", "cupy") == "--backend-b cupy" and arg("device") == "--device"
        assert arg("backend") == "backend"
    assert arg("device") == "device"


def test_spelling_is_restored_when_the_error_leaves():
    @flags({"device": "--device"})
    def command():
        raise QoqError(f"use {arg('device', 'cpu')}")

    with pytest.raises(QoqError, match="^use --device cpu$"):
        command()
    assert arg("device", "cpu") == "device='cpu'"


@pytest.mark.parametrize("command,spelling", [
    ("quantize", cli.QUANTIZE_FLAGS), ("verify", cli.RUNTIME_FLAGS), ("export", cli.EXPORT_FLAGS),
    ("generate", cli.GENERATE_FLAGS), ("bench", cli.BENCH_FLAGS)])
def test_cli_spells_arguments_with_flags_it_has(command, spelling):
    group = typer.main.get_command(cli.app)
    own = {o for p in group.commands[command].params for o in p.opts if o.startswith("-")}
    quantize_own = {o for p in group.commands["quantize"].params for o in p.opts if o.startswith("-")}
    for name, flag in spelling.items():
        if flag.startswith("qoq quantize "):  # a value the user sets when quantizing
            assert flag.removeprefix("qoq quantize ") in quantize_own, (command, name)
        else:
            assert flag in own, (command, name, flag)


def test_a_bug_is_one_line_exit_2_naming_qoq_debug(monkeypatch):
    from typer.testing import CliRunner

    import qoq.formats.artifact

    def broken(*a, **k):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.delenv("QOQ_DEBUG", raising=False)
    monkeypatch.setattr(qoq.formats.artifact, "read_artifact", broken)
    r = CliRunner().invoke(cli.app, ["inspect", "some-artifact"])
    assert r.exit_code == 2 and isinstance(r.exception, SystemExit)
    text = r.output.strip()
    assert len(text.splitlines()) == 1, text
    assert "internal error: RuntimeError: boom second line" in text and "QOQ_DEBUG=1" in text
    monkeypatch.setenv("QOQ_DEBUG", "1")
    r = CliRunner().invoke(cli.app, ["inspect", "some-artifact"])
    assert isinstance(r.exception, RuntimeError)  # the traceback is there for whoever asked for it
