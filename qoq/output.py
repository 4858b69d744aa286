"""Where `qoq quantize` and `qoq export` may write, checked before any work: what `--overwrite` may
replace, the hidden partial folder the output is written into (created up front, so an unwritable output
fails at once), and partial folders that killed runs left behind.

A folder counts as a qoq artifact when its config.json carries `quantization_config.quant_method: qoq`,
the same test `read_artifact` applies, and as a qoq export when it holds `qoq_export.json`. Each command
replaces only its own kind of folder (or an empty one), and never the current directory (or one above
it) or a protected folder: the source model, the artifact being exported (or one containing or inside it).
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from qoq.errors import QoqError, arg
from qoq.progress import Reporter
from qoq.scheme.schema import QUANT_METHOD
from qoq.signals import interrupts_deferred

PARTIAL_SUFFIX = ".partial"
OWNER_FILE = ".qoq-partial-owner.json"  # inside a partial folder: which process is writing it
RESUME_STATE = Path("resume") / "state.json"  # inside a partial folder: an interrupted run can continue
EXPORT_MARKER = "qoq_export.json"  # in a folder `qoq export` wrote: its format and the artifact it came from


def is_qoq_artifact(path: Path) -> bool:
    """A folder whose config.json says `quant_method: qoq`: the only kind `qoq quantize --overwrite` replaces."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    return isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD


def is_qoq_export(path: Path) -> bool:
    """A folder `qoq export` wrote (it holds EXPORT_MARKER): the only kind `qoq export --overwrite` replaces."""
    return (Path(path) / EXPORT_MARKER).is_file()


@dataclass(frozen=True)
class OutputKind:
    """What a command writes, and how an earlier output of it (the only thing --overwrite replaces) is known."""

    noun: str
    is_one: Callable[[Path], bool]
    mark: str  # what the test looks for, for the error message


ARTIFACT = OutputKind("qoq artifact", is_qoq_artifact, "no qoq quantization_config in its config.json")
EXPORT = OutputKind("qoq export", is_qoq_export, f"no {EXPORT_MARKER}")


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def local_model_path(spec: str | None) -> Path | None:
    """The resolved file or folder of a local `--model`; None for the default model and hub ids."""
    if spec is None or not str(spec).strip():
        return None
    p = Path(str(spec).strip()).expanduser()
    return p.resolve() if p.exists() else None


def check_output(output: Path, model: str | None, overwrite: bool, kind: OutputKind = ARTIFACT,
                 protected: dict[Path, str] | None = None) -> Path:
    """The resolved output path, or a one-line QoqError when writing there could destroy anything.

    `protected` maps folders (their resolved paths) to how the error names them: the output may neither be,
    contain nor lie inside one; the local source `model` is one. An empty folder is free to use."""
    resolved = Path(output).expanduser().resolve()
    if not resolved.exists():
        return resolved
    if not resolved.is_dir():
        raise QoqError(f"{arg('output')} {output} is a file; {arg('overwrite')} replaces only {kind.noun} folders, "
                       f"so choose another {arg('output')}")
    if _is_within(Path.cwd().resolve(), resolved):
        raise QoqError(f"{arg('output')} {output} is the current directory or contains it; {arg('overwrite')} never "
                       f"replaces that, so choose another {arg('output')}")
    protected = dict(protected or {})
    source = local_model_path(model)
    if source is not None:
        protected[source] = f"the source model {model}"
    for folder, label in protected.items():
        if _is_within(folder, resolved) or _is_within(resolved, folder):
            raise QoqError(f"{arg('output')} {output} is, contains or lies inside {label}; {arg('overwrite')} never "
                           f"replaces it, so choose an {arg('output')} outside that folder")
    if not any(resolved.iterdir()):
        return resolved
    if not kind.is_one(resolved):
        raise QoqError(f"{arg('output')} {output} exists and is not a {kind.noun} ({kind.mark}); "
                       f"{arg('overwrite')} replaces only those, so choose another {arg('output')}")
    if not overwrite:
        raise QoqError(f"output folder {output} already exists; pass {arg('overwrite', True)} or choose another "
                       f"{arg('output')}")
    return resolved


# ---- the partial folder -------------------------------------------------------------------------------

@dataclass
class PartialFolder:
    """A hidden `.<name>.<random>.partial` sibling of the output, owned by this process until renamed."""

    path: Path
    created_parents: list[Path] = field(default_factory=list)  # deepest first; removed again on failure
    adopted: bool = False  # an interrupted run's folder this process continues (`adopt_partial`)

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        _remove_if_empty(self.created_parents)


def _remove_if_empty(folders: list[Path]) -> None:
    for folder in folders:
        try:
            folder.rmdir()  # only while empty: never anything another process put there
        except OSError:
            break


def _partial_name_pattern(output: Path) -> re.Pattern:
    return re.compile(rf"^\.{re.escape(output.name)}\.[A-Za-z0-9_]+{re.escape(PARTIAL_SUFFIX)}$")


def _make_parents(folder: Path) -> list[Path]:
    missing = []
    for p in (folder, *folder.parents):
        if p.exists():
            break
        missing.append(p)
    folder.mkdir(parents=True, exist_ok=True)
    return missing


def create_partial(output: Path) -> PartialFolder:
    """Create the partial folder now (plain mkdir: it honours the umask) and record its owner inside."""
    output = Path(output)
    parent = output.parent
    try:
        created = _make_parents(parent)
    except OSError as e:
        raise QoqError(f"cannot create the folder {parent} for {arg('output')} {output} ({e.strerror or e}); "
                       f"choose another {arg('output')}") from None
    for _ in range(100):
        path = parent / f".{output.name}.{secrets.token_hex(4)}{PARTIAL_SUFFIX}"
        try:
            os.mkdir(path)
            break
        except FileExistsError:
            continue
        except OSError as e:
            _remove_if_empty(created)
            raise QoqError(f"cannot write into {parent} for {arg('output')} {output} ({e.strerror or e}); choose "
                           f"another {arg('output')} or fix the folder's permissions") from None
    else:
        raise QoqError(f"cannot create a partial folder in {parent}; remove its .{output.name}.*.partial folders")
    partial = PartialFolder(path, created)
    try:
        (path / OWNER_FILE).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    except OSError as e:
        partial.discard()
        raise QoqError(f"cannot write into {parent} for {arg('output')} {output} ({e.strerror or e}); choose "
                       f"another {arg('output')}") from None
    return partial


def commit_partial(folder: Path, output: Path) -> None:
    """Make the written partial `folder` the `output` folder: plain file modes, then one rename (two when
    an earlier output is replaced), with Ctrl-C and SIGTERM held off until the renames are done."""
    _plain_modes(folder)
    with interrupts_deferred():
        _replace_folder(folder, output)
        drop_owner_record(output)


def _replace_folder(new: Path, output: Path) -> None:
    if output.exists():
        old = output.with_name(f".{output.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(output, old)
        os.replace(new, output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, output)


def _plain_modes(folder: Path) -> None:
    """The files a library created private (mkstemp-style 0600) get the modes a plain write would give."""
    mask = _umask()
    for p in folder.rglob("*"):
        if p.is_file() and not p.is_symlink():
            os.chmod(p, 0o666 & ~mask)
        elif p.is_dir() and not p.is_symlink():
            os.chmod(p, 0o777 & ~mask)


def drop_owner_record(folder: Path) -> None:
    (Path(folder) / OWNER_FILE).unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


# ---- leftovers of killed runs -------------------------------------------------------------------------

def _owner(partial: Path) -> dict | None:
    try:
        owner = json.loads((partial / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) else None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def remove_stale_partials(output: Path, reporter: Reporter | None = None) -> list[Path]:
    """Remove partial folders of `output` whose writing process is gone (same host); say so for each.

    A partial folder whose owner is alive, on another host, or unrecorded is left alone, and so is one
    holding a resume point (`resumable_partials`).
    """
    reporter = reporter or Reporter()
    removed = []
    for p in _partial_folders(output):
        if _resumable(p):
            continue
        owner = _owner(p)
        if owner is None:
            reporter.info(f"note: {p} looks like an interrupted qoq write but records no owner; "
                          "delete it if no qoq run is writing it")
            continue
        if owner.get("host") != socket.gethostname() or _process_alive(owner["pid"]):
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
        reporter.info(f"removed {p}: a partial artifact left by a qoq run that was killed (pid {owner['pid']})")
    return removed


def _partial_folders(output: Path) -> list[Path]:
    """The hidden `.<name>.<random>.partial` folders beside `output` (none when its parent is unreadable)."""
    output = Path(output)
    pattern = _partial_name_pattern(output)
    try:
        siblings = list(output.parent.iterdir())
    except OSError:
        return []
    return [p for p in siblings if pattern.match(p.name) and not p.is_symlink() and p.is_dir()]


def _resumable(partial: Path) -> bool:
    return (partial / RESUME_STATE).is_file()


def resumable_partials(output: Path) -> list[Path]:
    """Partial folders of `output` that an interrupted run left with a resume point, newest first."""
    found = []
    for p in _partial_folders(output):
        if not _resumable(p):
            continue
        owner = _owner(p)
        if owner is not None and owner.get("host") == socket.gethostname() and _process_alive(owner["pid"]):
            continue  # a run is still writing it
        found.append(p)
    return sorted(found, key=lambda p: (p / RESUME_STATE).stat().st_mtime, reverse=True)


def adopt_partial(partial: Path) -> PartialFolder:
    """Continue writing an interrupted run's partial folder: this process becomes its owner."""
    (partial / OWNER_FILE).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    return PartialFolder(partial, [], adopted=True)
