"""Is the FP16 baseline still the model the artifact was made from? Its sha256, computed the way
`load_model` computed the one qoq_report.json records, must match before its perplexity is reported.

Hashing a large model reads every weight byte, so hashes are cached in $QOQ_CACHE_DIR/sha256.json by
the files' paths, sizes and modification times.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from qoq.checks import sha256_of_files
from qoq.errors import QoqError
from qoq.state import cache_dir

_CACHE_FILE = "sha256.json"
_CACHE_ENTRIES = 256


def _signature(files: list[Path]) -> list:
    signature = []
    for f in files:
        st = f.stat()
        signature.append([str(f), st.st_size, st.st_mtime_ns])
    return signature


def _cache_file() -> Path:
    return cache_dir() / _CACHE_FILE


def _read_cache() -> dict:
    try:
        data = json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(cache: dict) -> None:
    file = _cache_file()
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(dict(list(cache.items())[-_CACHE_ENTRIES:])))
        os.replace(tmp, file)
    except OSError:
        pass  # a cache only: the next run hashes again


def cached_sha256(files: list[Path]) -> str:
    """sha256 of the files' concatenated contents (as the report records it), cached by path+size+mtime."""
    files = [Path(f).resolve() for f in files]
    key = json.dumps(_signature(files))
    cache = _read_cache()
    if isinstance(cache.get(key), str):
        return cache[key]
    sha = sha256_of_files(files)
    if _signature(files) == json.loads(key):  # unchanged while it was read
        cache.pop(key, None)
        cache[key] = sha
        _write_cache(cache)
    return sha


def source_files(reload_spec: str) -> list[Path] | None:
    """The weight files `load_model(reload_spec)` hashes, or None when they are only known after
    loading (a hub id); a QoqError when a recorded local path is gone."""
    from qoq.models import smollm2
    from qoq.models.sources import DEFAULT_ALIAS, _looks_like_path, _weight_files

    if reload_spec == DEFAULT_ALIAS:
        return [smollm2.default_gguf_path()]
    p = Path(reload_spec).expanduser()
    if p.is_dir():
        return _weight_files(p.resolve())
    if p.is_file():
        return [p.resolve()]
    if _looks_like_path(reload_spec):
        raise QoqError(f"the source model {reload_spec} recorded in qoq_report.json no longer exists; "
                       "restore it or pass --no-baseline")
    return None


def check_source_hash(artifact: Path, reload_spec: str, recorded: str | None, actual: str) -> None:
    if recorded and actual != recorded:
        raise QoqError(f"the source model {reload_spec} has sha256 {actual}, but {artifact}/qoq_report.json records "
                       f"{recorded}: it is not the model the artifact was made from; restore it or pass --no-baseline")


def check_source_before_loading(artifact: Path, reload_spec: str, recorded: str | None) -> bool:
    """Compare the source's hash with the recorded one now if its files are known; True when checked."""
    files = source_files(reload_spec)
    if files is None or not recorded:
        return False
    check_source_hash(artifact, reload_spec, recorded, cached_sha256(files))
    return True
