"""User-facing errors: one line, naming the fix. The CLI prints them without a traceback.

A message that names an argument of the caller does so through `arg`: as the Python API spells it
(`device`, `device='cpu'`) unless the caller runs under `flags`, which the CLI does with its own spelling
(`--device`, `--device cpu`). The library says what is wrong in terms of the value it was given; the
front end decides how its user wrote that value.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from types import MappingProxyType
from typing import Iterator, Mapping


class QoqError(Exception):
    """An error the user can fix; its message is a single line that says how."""


def one_line(obj, limit: int = 500) -> str:
    """str(obj) on one line (whitespace runs collapsed), cut to `limit` characters: for quoting a library's
    message inside ours."""
    s = " ".join(str(obj).split())
    return s if len(s) <= limit else s[: limit - 1] + "…"


_FLAGS: ContextVar[Mapping[str, str]] = ContextVar("qoq_flags", default=MappingProxyType({}))
_NO_VALUE = object()


def arg(name: str, value=_NO_VALUE) -> str:
    """The argument `name` (set to `value`) as the caller writes it: `name` / `name='value'` in Python,
    `--flag` / `--flag value` (`--flag` alone for True) under `flags({name: "--flag"})`."""
    flag = _FLAGS.get().get(name)
    if flag is None:
        return name if value is _NO_VALUE else f"{name}={value!r}"
    if value is _NO_VALUE or value is True:
        return flag
    return f"{flag} {value}"


@contextmanager
def flags(spelling: Mapping[str, str]) -> Iterator[None]:
    """Within (or, as a decorator, during a call): `arg` spells these API arguments as these CLI flags."""
    token = _FLAGS.set({**_FLAGS.get(), **spelling})
    try:
        yield
    finally:
        _FLAGS.reset(token)
