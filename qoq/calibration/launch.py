"""`qoq quantize --gpus N`: the same command line run again as N torchrun ranks, one per GPU of this machine.

It is exactly `torchrun --standalone --nproc-per-node N -m qoq quantize ...`: each rank finds WORLD_SIZE
set and joins the others (`calibration.parallel.join_ranks`) instead of launching again. Every rank prints
its own errors; the launcher adds nothing but the exit status of the first rank that failed.
"""
from __future__ import annotations

import logging
import os

import torch

from qoq.errors import QoqError

# torchrun's agent logs each rank it stops and each failure, with tracebacks; the ranks already said why
_LAUNCHER_LOGGERS = ("torch.distributed.run", "torch.distributed.elastic", "torch.distributed.launcher")


def under_launcher() -> bool:
    """Whether this process is a rank torchrun (or `--gpus`) started."""
    return "WORLD_SIZE" in os.environ


def require_gpus(n: int, device: str) -> None:
    """One line before anything is loaded when `--gpus N` cannot run here."""
    if device == "cpu":
        raise QoqError("--gpus runs one process per CUDA GPU; drop --device cpu (or --gpus)")
    visible = torch.cuda.device_count()
    if visible < n:
        fix = f"pass --gpus {visible}" if visible else "drop --gpus"
        raise QoqError(f"--gpus {n} needs {n} CUDA GPUs but {visible} {'is' if visible == 1 else 'are'} visible; {fix}")


def require_launched_as(n: int) -> None:
    """Under torchrun, `--gpus` (when given) must agree with the number of ranks it started."""
    world = int(os.environ["WORLD_SIZE"])
    if n != world:
        raise QoqError(f"--gpus {n} but the launcher started {world} processes; drop --gpus under torchrun")


def launch_ranks(n: int, argv: list[str]) -> int:
    """Run `python -m qoq *argv` as `n` ranks on this machine and wait; the exit status (0 when every rank
    succeeded, else that of the first rank that failed)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # torchrun would set 1 thread per rank (and warn): share the cores instead
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    for name in _LAUNCHER_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        run(parse_args(["--standalone", f"--nproc-per-node={n}", "--module", "qoq", *argv]))
    except ChildFailedError as e:
        _rank, failure = e.get_first_failure()
        return failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode  # -N: killed by signal N
    except SignalException as e:  # Ctrl-C or SIGTERM reached the launcher: the ranks were stopped
        return 128 + int(e.sigval)
    return 0
