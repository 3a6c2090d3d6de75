"""One writer per run directory.

Two processes writing one run (two flows, a flow and `mlxchat train`) would resume, prune and
log over each other. Whatever writes a run holds `runs/<run>/.lock` (an advisory `flock`,
which the kernel releases when the holder dies, so a crash never leaves a stale lock); a
second writer stops at once with the holder's PID and command. Taking the lock also sweeps
temporaries that writers who are gone left in the run directory.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from mlxchat.common import MlxchatError, sweep_temporaries
from mlxchat.rundir import run_dir


def _holder(path: Path) -> dict:
    """Who holds the lock, as it wrote itself into the file (briefly empty while it starts)."""
    for _ in range(20):
        try:
            holder = json.loads(path.read_text() or "null")
        except (OSError, json.JSONDecodeError):
            holder = None
        if isinstance(holder, dict):
            return holder
        time.sleep(0.05)
    return {}


@contextmanager
def run_lock(run: str, root=None, command: str | None = None, create: bool = True) -> Iterator[None]:
    """Hold the run's lock for the block, or raise a one-line MlxchatError naming the holder.
    With `create=False` a run that does not exist yet is not created (the command itself then
    says the run is unknown)."""
    rdir = run_dir(run, root)
    if not rdir.path.is_dir():
        if not create:
            yield
            return
        rdir.path.mkdir(parents=True, exist_ok=True)
    path = rdir.lock
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        holder = _holder(path)
        raise MlxchatError(
            f"run {run!r} is in use by PID {holder.get('pid', '?')} ({holder.get('command', 'unknown command')}); "
            f"wait for it to finish (or stop it), then rerun"
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "command": command or " ".join(sys.argv)}).encode())
        sweep_temporaries(rdir.path, recursive=True)
        yield
    finally:
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
