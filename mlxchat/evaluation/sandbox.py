"""Run untrusted Python (model-written HumanEval completions) without risking the evaluator.

Semantics follow nanochat's `execution.py`: one process per program, a wall-clock timeout,
a 256 MB memory limit, a fresh temporary directory as cwd (removed afterwards), destructive
functions disabled as its `reliability_guard` does, stdout/stderr captured, and any
exception (SystemExit included) counted a failure.

Each program runs in a fresh interpreter, `sys.executable -I`, not a forked or spawned
copy of the evaluator: a fork of a process that holds MLX/BLAS threads can deadlock, a
spawn re-imports the evaluator's modules (slow, and they become reachable from the
program), and `-I` ignores PYTHON* variables, the user's site directory and the current
directory, so nothing of the evaluator leaks in. The environment is reduced to a few
variables. What confines the program (see `_sandbox_child.py` for the layers):

- the kernel: rlimits on address space, data, file size, CPU time, process count and core
  dumps; on Linux, Landlock confining every filesystem change to the workdir, and a
  seccomp filter that fails process creation, exec, signals to other processes and
  sockets. These hold whatever the program does in Python or ctypes;
- the parent: the program runs in its own session (process group); at the deadline, and
  in every case once it has ended, the whole group is killed, so nothing it started lives
  on. stdout and stderr go to unnamed temporary files bounded by RLIMIT_FSIZE, so a flood
  of output costs neither the evaluator's memory nor a pipe that could block;
- Python-level guards (nanochat's): they turn accidental damage (os.remove, shutil.rmtree,
  os.system, a write outside the directory) into a PermissionError. They can be bypassed
  (ctypes, `_io`, `posix`) and are not a security boundary.

Not covered, as in nanochat: this is no container. Reads anywhere the evaluator's user can
read are possible, and disk use is bounded per file (RLIMIT_FSIZE) and by the timeout, not
in total. Where the kernel lacks Landlock or seccomp (macOS; old or locked-down
Linux: the child then says so on stderr), writes, the network and process creation are
stopped only at the Python level (plus RLIMIT_NPROC, which binds non-root users). Run
evaluations of untrusted models inside a container or VM.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal

from mlxchat.common import MlxchatError
from mlxchat.evaluation._sandbox_child import RAISED

CHILD = Path(__file__).with_name("_sandbox_child.py")


@dataclass(frozen=True)
class Result:
    """The outcome of one program. `status`: "passed" (ran to its end), "failed" (raised:
    a failed assert, MemoryError, a refused call, output past the size limit), "timeout"
    (wall clock or CPU time ran out), "error" (killed by a signal, e.g. a segfault, the
    sandbox could not be set up, or it exited other than through the sandbox). stdout/stderr are cut to `max_output_chars`."""

    status: Literal["passed", "failed", "timeout", "error"]
    stdout: str
    stderr: str
    duration: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def run_program(
    code: str,
    timeout_s: float = 5.0,
    memory_mb: int = 256,
    output_mb: int = 16,
    max_output_chars: int = 10_000,
) -> Result:
    """Run `code` in a sandboxed child process and report how it ended.

    `timeout_s` is wall-clock time from start (nanochat's default, 5 s); `memory_mb` bounds
    the address space; `output_mb` bounds each file the program writes, stdout and stderr
    included.
    """
    if timeout_s <= 0 or memory_mb <= 0 or output_mb <= 0:
        raise MlxchatError(
            f"sandbox limits must be positive: timeout_s={timeout_s}, memory_mb={memory_mb}, output_mb={output_mb}"
        )
    base = Path(tempfile.mkdtemp(prefix="mlxchat-sandbox-"))
    try:
        workdir = base / "work"
        workdir.mkdir()
        program = base / "program.py"
        program.write_text(code, encoding="utf-8")
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            command = [
                sys.executable, "-I", "-X", "utf8", str(CHILD), str(program), str(workdir),
                str(memory_mb << 20), str(output_mb << 20), str(int(timeout_s) + 1),
            ]
            start = time.monotonic()
            proc = subprocess.Popen(
                command,
                cwd=workdir,
                env=_child_env(workdir),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
            timed_out = _wait_then_kill_group(proc, start + timeout_s)
            duration = time.monotonic() - start
            stdout, stderr = _read(out, max_output_chars), _read(err, max_output_chars)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return Result(_status(proc.returncode, timed_out), stdout, stderr, duration)


def run_programs(codes: Iterable[str], workers: int = 2, **kwargs) -> list[Result]:
    """`run_program` over many programs, `workers` at a time, results in input order.

    Threads suffice: each one only waits on its child process.
    """
    if workers < 1:
        raise MlxchatError(f"workers must be >= 1, got {workers}")
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda code: run_program(code, **kwargs), codes))


def _child_env(workdir: Path) -> dict[str, str]:
    """A minimal environment: temporary files and HOME inside the workdir, one thread per
    numeric library, nothing of the evaluator's (tokens, LD_PRELOAD, proxies)."""
    return {
        "HOME": str(workdir),
        "TMPDIR": str(workdir),
        "LANG": "C.UTF-8",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "PATH": os.defpath,
    }


def _wait_then_kill_group(proc: subprocess.Popen, deadline: float) -> bool:
    """Wait for the child until `deadline`, then kill its whole process group; return
    whether the deadline was reached.

    Where os.waitid exists (Linux; macOS from Python 3.13) the child is polled with WNOWAIT,
    which leaves it unreaped: while it is a zombie its pid (the group's id) cannot be
    reused, so killing the group cannot hit a stranger. Elsewhere `poll` reaps it first,
    which leaves an instant in which an already empty group's id could be reused (an id is
    never reused while any member of the group lives): a theoretical risk, accepted there.
    """
    delay = 0.001
    timed_out = False
    try:
        while not _exited(proc):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.02)
    finally:  # also when the evaluator is interrupted: nothing may outlive it
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # the group is already empty
        proc.wait()
    return timed_out


def _exited(proc: subprocess.Popen) -> bool:
    if hasattr(os, "waitid"):
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    return proc.poll() is not None


def _status(returncode: int, timed_out: bool) -> str:
    if timed_out or returncode == -signal.SIGXCPU:
        return "timeout"
    if returncode == 0:
        return "passed"
    if returncode == RAISED:
        return "failed"
    return "error"


def _read(f, max_chars: int) -> str:
    """The start of a captured stream, decoded leniently, with a note if it was cut."""
    size = f.seek(0, os.SEEK_END)
    f.seek(0)
    text = f.read(max_chars * 4).decode("utf-8", errors="replace")
    if len(text) > max_chars or size > max_chars * 4:
        return text[:max_chars] + f"\n[... output cut: {size} bytes in all]"
    return text
