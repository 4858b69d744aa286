"""Remembers the artifact the last `qoq quantize` wrote, so `qoq verify` and `qoq bench` can default to it."""
from __future__ import annotations

import json
import os
from pathlib import Path

from qoq.errors import QoqError


def cache_dir() -> Path:
    """qoq's cache folder: `$QOQ_CACHE_DIR` (`~` expanded; empty means unset), else `~/.cache/qoq`."""
    return Path(os.environ.get("QOQ_CACHE_DIR") or "~/.cache/qoq").expanduser()


def _state_file() -> Path:
    return cache_dir() / "last_artifact.json"


def remember_last_artifact(path: Path) -> None:
    file = _state_file()
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")  # concurrent runs must not share it
    tmp.write_text(json.dumps({"path": str(Path(path).resolve())}))
    os.replace(tmp, file)


def last_artifact() -> Path:
    """The folder the last `qoq quantize` wrote; a QoqError when there is none or it is gone."""
    try:
        path = Path(json.loads(_state_file().read_text())["path"])
    except (OSError, ValueError, KeyError):
        raise QoqError("no ARTIFACT given and no earlier `qoq quantize` is recorded; run qoq quantize first "
                       "or pass the artifact folder") from None
    if not path.is_dir():
        raise QoqError(f"the last `qoq quantize` wrote {path}, which no longer exists; pass an artifact folder")
    return path


def newest_artifact_in(folder: Path) -> Path | None:
    """The qoq artifact among `folder`'s subfolders whose config.json was written last."""
    from qoq.output import is_qoq_artifact

    try:
        candidates = [p for p in folder.iterdir() if not p.name.startswith(".") and p.is_dir() and is_qoq_artifact(p)]
    except OSError:
        return None
    return max(candidates, key=lambda p: (p / "config.json").stat().st_mtime_ns, default=None)


def resolve_artifact(path: str | Path | None, reporter=None) -> Path:
    """The given artifact; else the newest one in the current directory (the shared last-artifact record
    may be another, concurrent run's); else the last one `qoq quantize` wrote. Says which it took and why."""
    if path is not None:
        return Path(path)
    found = newest_artifact_in(Path.cwd())
    if found is not None:
        why = "the newest qoq artifact in the current directory"
    else:
        found = last_artifact()
        why = "written by the last `qoq quantize`; the current directory holds no qoq artifact"
    if reporter is not None:
        reporter.info(f"artifact: {found} ({why})")
    return found
