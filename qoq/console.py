"""The terminal side of every command: the rich consoles (`out` for results, `err` for messages) and
`user_errors`, which turns a QoqError, Ctrl-C or SIGTERM into one line and a non-zero exit."""
from __future__ import annotations

import os
from functools import wraps

import typer
from rich.console import Console

from qoq.errors import QoqError, one_line
from qoq.signals import Terminated, sigterm_as_interrupt

out = Console()
err = Console(stderr=True)


def user_errors(fn):
    """Turn QoqError (and Ctrl-C or SIGTERM) into one line on stderr and a non-zero exit, never a traceback."""
    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            with sigterm_as_interrupt():
                return fn(*args, **kwargs)
        except QoqError as e:
            err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt as e:
            kept = "the finished blocks are kept (above)" if getattr(e, "resume_point", None) else \
                "nothing was written"
            err.print(f"[bold red]{'terminated' if isinstance(e, Terminated) else 'interrupted'}[/]; {kept}")
            raise typer.Exit(getattr(e, "exit_code", 130)) from None
        except (typer.Exit, typer.Abort):
            raise
        except Exception as e:  # a bug: still one line, with the way to get the traceback
            if os.environ.get("QOQ_DEBUG"):
                raise
            msg = one_line(e, 300)
            err.print(f"[bold red]internal error:[/] {type(e).__name__}: {msg} (set QOQ_DEBUG=1 for the traceback)",
                      highlight=False, soft_wrap=True)
            raise typer.Exit(2) from e
    return wrapper
