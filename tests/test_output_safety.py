"""`qoq quantize` never destroys what it was not asked to write, fails before the work when it cannot write,
cleans up after SIGTERM and after killed runs; `qoq verify` checks that its FP16 baseline is the source."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qoq.cli import app
from qoq.output import OWNER_FILE, remove_stale_partials
from qoq.progress import Reporter

from conftest import REPO_ROOT, TINY_CORPUS, assert_one_line_error  # noqa: E402

runner = CliRunner()
FAST = ["--recipe", "rtn", "--calib-samples", "2", "--calib-seqlen", "16", "--device", "cpu"]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QOQ_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def workdir(tmp_path, monkeypatch, tiny_model_dir):
    """A current directory holding a copy of the tiny model (so a bug could only destroy the copy) and
    a calibration text."""
    work = tmp_path / "work"
    shutil.copytree(tiny_model_dir("llama"), work / "model")
    (work / "calib.txt").write_text("\n\n".join([TINY_CORPUS] * 4))
    monkeypatch.chdir(work)
    return work


def quantize_args(output: str, *extra: str) -> list[str]:
    return ["quantize", "--model", "model", "--calib", "calib.txt", *FAST, "--output", output, *extra]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its contents, to show nothing was removed, changed or left behind."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def squeeze(text: str) -> str:
    """Without whitespace: the console wraps long lines, even inside a path."""
    return "".join(text.split())


def partials(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.endswith(".partial") or p.name.endswith(".old")]


def make_artifact(workdir: Path, name: str) -> Path:
    r = runner.invoke(app, quantize_args(name))
    assert r.exit_code == 0, r.output
    return workdir / name


# ---- --overwrite ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("target,fragments", [
    ("precious", ["precious exists and is not a qoq artifact", "choose another --output"]),
    (".", ["current directory", "choose another --output"]),
    ("..", ["current directory", "choose another --output"]),
    ("model", ["source model model", "outside that folder"]),
    ("model/inner-artifact", ["source model model", "outside that folder"]),
    ("precious/notes.txt", ["is a file", "choose another --output"]),
])
def test_overwrite_replaces_only_artifacts(workdir, target, fragments):
    (workdir / "precious").mkdir()
    (workdir / "precious" / "notes.txt").write_text("irreplaceable")
    inner = workdir / "model" / "inner-artifact"  # an artifact, but inside the source model's folder
    inner.mkdir()
    (inner / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "qoq"}}))
    before = snapshot(workdir.parent)
    r = runner.invoke(app, quantize_args(target, "--overwrite"))
    assert_one_line_error(r, *fragments)
    assert snapshot(workdir.parent) == before


def test_overwrite_replaces_an_artifact_and_leaves_its_siblings(workdir):
    art = make_artifact(workdir, "art")
    (workdir / "sibling.txt").write_text("keep")
    r = runner.invoke(app, quantize_args("art", "--overwrite"))
    assert r.exit_code == 0, r.output
    assert (workdir / "sibling.txt").read_text() == "keep" and (art / "config.json").exists()
    assert not (art / OWNER_FILE).exists() and not partials(workdir)


# ---- checked before the work ---------------------------------------------------------------------------

def test_impossible_output_fails_before_the_model_is_loaded(workdir):
    (workdir / "a-file").write_text("x")
    before = snapshot(workdir)
    # the model does not exist either: the output's error wins, so it was checked first
    r = runner.invoke(app, ["quantize", "--model", "./no/such/model", *FAST, "--output", "a-file/art"])
    assert_one_line_error(r, "cannot create the folder", "a-file", "choose another --output")
    assert snapshot(workdir) == before and not partials(workdir)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_fails_before_the_model_is_loaded(workdir):
    (workdir / "ro").mkdir(mode=0o555)
    r = runner.invoke(app, ["quantize", "--model", "./no/such/model", *FAST, "--output", "ro/art"])
    assert_one_line_error(r, "cannot write into", "ro")
    assert not list((workdir / "ro").iterdir())


def test_failed_run_removes_its_partial_and_the_folders_it_created(workdir):
    before = snapshot(workdir)
    r = runner.invoke(app, ["quantize", "--model", "./no/such/model", *FAST, "--output", "new/deeper/art"])
    assert_one_line_error(r, "does not exist")
    assert not (workdir / "new").exists() and snapshot(workdir) == before and not partials(workdir)


# ---- signals and leftovers of killed runs ---------------------------------------------------------------

def start_quantize(workdir: Path, output: str) -> subprocess.Popen:
    """A real `qoq quantize` process, slow enough (data-free calibration) to be killed while it runs."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), QOQ_DEBUG="")
    cmd = [sys.executable, "-c", "from qoq.cli import main; main()", "quantize", "--model", "model",
           "--calib", "data-free", "--recipe", "rtn", "--calib-samples", "8", "--calib-seqlen", "128",
           "--device", "cpu", "--output", output]
    return subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_partial(proc: subprocess.Popen, folder: Path, name: str, timeout: float = 60) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [p for p in folder.glob(f".{name}.*.partial") if (p / OWNER_FILE).exists()]
        if found:
            return found[0]
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.kill()
    pytest.fail("no partial folder appeared")


def test_sigterm_removes_the_partial_folder(workdir):
    before = snapshot(workdir)
    proc = start_quantize(workdir, "art")
    wait_for_partial(proc, workdir, "art")
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1] == "terminated; nothing was written"
    assert snapshot(workdir) == before and not partials(workdir) and not (workdir / "art").exists()


def test_partial_of_a_killed_run_is_removed_by_the_next_run(workdir):
    proc = start_quantize(workdir, "art")
    stale = wait_for_partial(proc, workdir, "art")
    proc.kill()
    proc.wait(timeout=30)
    assert stale.exists()
    # a concurrent, live run's partial folder of the same output is never touched
    live = workdir / ".art.live0.partial"
    live.mkdir()
    (live / OWNER_FILE).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    r = runner.invoke(app, quantize_args("art"))
    assert r.exit_code == 0, r.output
    said = f"removed {stale}: a partial artifact left by a qoq run that was killed (pid {proc.pid})"
    assert squeeze(said) in squeeze(r.output)
    assert not stale.exists() and live.exists() and (workdir / "art" / "config.json").exists()
    assert partials(workdir) == [live]


def test_partial_without_owner_record_is_only_mentioned(tmp_path):
    orphan = tmp_path / ".art.abc123.partial"
    orphan.mkdir()
    said = []

    class Collect(Reporter):
        def info(self, message):
            said.append(message)

    assert remove_stale_partials(tmp_path / "art", Collect()) == [] and orphan.exists()
    assert len(said) == 1 and str(orphan) in said[0] and "records no owner" in said[0]


# ---- permissions ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_artifact_modes_follow_the_umask(workdir, umask):
    previous = os.umask(umask)
    try:
        art = make_artifact(workdir, "art")
    finally:
        os.umask(previous)
    assert (art.stat().st_mode & 0o777) == 0o777 & ~umask
    files = [p for p in art.iterdir() if p.is_file()]
    assert files and all((p.stat().st_mode & 0o777) == 0o666 & ~umask for p in files), \
        {p.name: oct(p.stat().st_mode & 0o777) for p in files}


# ---- verify: the baseline must be the source; which artifact a bare verify takes -------------------------

def test_verify_refuses_a_changed_source_model(workdir):
    art = make_artifact(workdir, "art")
    recorded = json.loads((art / "qoq_report.json").read_text())["source"]["sha256"]
    weights = workdir / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x01")
    actual = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert actual != recorded
    r = runner.invoke(app, ["verify", "art", "--data", "calib.txt", "--seq-len", "16", "--device", "cpu"])
    assert_one_line_error(r, actual, recorded, "--no-baseline")


def test_verify_refuses_artifact_weights_changed_since_they_were_written(workdir):
    from safetensors.torch import load_file, save_file

    art = make_artifact(workdir, "art")
    recorded = json.loads((art / "qoq_report.json").read_text())["weights_sha256"]
    assert list(recorded) == ["model.safetensors"]
    assert recorded["model.safetensors"] == hashlib.sha256((art / "model.safetensors").read_bytes()).hexdigest()
    tensors = load_file(art / "model.safetensors")
    name = next(n for n in tensors if n.endswith(".qweight"))
    tensors[name].view(-1)[0] ^= 0x11  # still a valid, finite artifact: only the hash tells
    save_file(tensors, art / "model.safetensors", metadata={"format": "pt"})
    r = runner.invoke(app, ["verify", "art", "--data", "calib.txt", "--seq-len", "16", "--device", "cpu"])
    assert_one_line_error(r, "model.safetensors is not the file qoq quantize wrote", "re-run qoq quantize")


def test_source_hash_is_cached_by_path_size_and_mtime(workdir, monkeypatch):
    from qoq.verify import source_check
    from qoq.verify.source_check import check_source_before_loading

    art = make_artifact(workdir, "art")
    recorded = json.loads((art / "qoq_report.json").read_text())["source"]["sha256"]
    assert check_source_before_loading(art, str(workdir / "model"), recorded)
    monkeypatch.setattr(source_check, "sha256_of_files", lambda files: pytest.fail("hashed again"))
    assert check_source_before_loading(art, str(workdir / "model"), recorded)


def test_bare_verify_prefers_the_newest_artifact_in_the_current_directory(workdir, tmp_path):
    older, newer = make_artifact(workdir, "older"), make_artifact(workdir, "newer")
    os.utime(older / "config.json", (time.time() + 60,) * 2)  # "older" was written last
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(newer, elsewhere)
    from qoq.state import remember_last_artifact
    remember_last_artifact(elsewhere)  # what a concurrent run in another folder recorded
    args = ["verify", "--data", "calib.txt", "--seq-len", "16", "--max-windows", "1", "--no-baseline",
            "--device", "cpu", "--json"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert squeeze(f"artifact: {older} (the newest qoq artifact in the current directory)") in squeeze(r.stderr)
    assert json.loads(r.stdout)["artifact"] == str(older)
    r = runner.invoke(app, ["inspect"])  # the same choice
    assert r.exit_code == 0 and str(older) in squeeze(r.stdout), r.output
    assert squeeze(f"artifact: {older} (the newest qoq artifact in the current directory)") in squeeze(r.stderr)
    (tmp_path / "empty").mkdir()
    os.chdir(tmp_path / "empty")  # no artifact here: the recorded one, and it says why
    r = runner.invoke(app, [*args[:2], str(workdir / "calib.txt"), *args[3:]])
    assert r.exit_code == 0, r.output
    assert squeeze(f"artifact: {elsewhere} (written by the last `qoq quantize`; the current directory holds no "
                   "qoq artifact)") in squeeze(r.stderr)
