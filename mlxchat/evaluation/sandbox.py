"""Run untrusted Python (model-written HumanEval completions) without risking the evaluator.

Semantics follow nanochat's `execution.py`: one process per program, a wall-clock timeout,
a 256 MB memory limit, a fresh temporary directory as cwd (removed afterwards), destructive
functions disabled as its `reliability_guard` does, stdout/stderr captured, and any
exception (SystemExit included) counted a failure.

Each program runs in a fresh interpreter, `sys.executable -I`, not a forked or spawned
copy of the evaluator: a fork of a process that holds MLX/BLAS threads can deadlock, a
spawn re-imports the evaluator's modules (slow, and they become reachable from the
program), and `-I` ignores PYTHON* variables, the user's site directory and the current
directory. The environment is a handful of variables, never the evaluator's. What confines
the program, layer by layer (`_sandbox_child.py`, `_sandbox_linux.py`):

- Linux: namespaces (its own PID 1, /proc, network and root filesystem, where the
  evaluator's processes and files do not exist), a size-bounded tmpfs work directory,
  `nobody` instead of root, Landlock and a default-deny seccomp allow-list. Each layer the
  kernel refuses is named with its reason in `Result.layers`.
- macOS: a `sandbox-exec` profile (`SANDBOX_PROFILE`) denying the network, process
  creation, writes outside the work directory and /dev/null, and signals or process
  information of other processes. The Linux layers are reported as not in force there.
- Everywhere: rlimits (memory, file size, CPU time, processes), nanochat's Python-level
  guard, the program in its own session whose whole group is killed at the deadline and
  in every case once it ended, and stdout/stderr in unnamed files bounded by RLIMIT_FSIZE.

Passing is the harness's verdict, not the exit status: the parent sends a random token
over a pipe the child reads and closes before the program starts, and the child writes it
back only once the program has run to its end without raising. `posix._exit(0)` halfway is
a failure. (A program that dug the token out of its own interpreter's memory, knowing
this harness, could still forge it; the checks must run in the program's process.)
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal

from mlxchat.common import MlxchatError, get_logger
from mlxchat.evaluation._sandbox_child import RAISED

CHILD = Path(__file__).with_name("_sandbox_child.py")
NOBODY = 65534
log = get_logger()


@dataclass(frozen=True)
class Result:
    """The outcome of one program. `status`: "passed" (ran to its end: the harness wrote the
    token back), "failed" (raised: a failed assert, MemoryError, a refused call, output past
    the size limit; or ended early without the harness's token), "timeout" (wall clock or
    CPU time ran out), "error" (killed by a signal, e.g. a segfault, or the sandbox could not
    be set up). stdout/stderr are cut to `max_output_chars`. `layers`: each confinement
    layer, None where it was in force, else why not (empty if setup never got that far).
    `leftover`: what of the temporary directory could not be removed (logged too)."""

    status: Literal["passed", "failed", "timeout", "error"]
    stdout: str
    stderr: str
    duration: float
    layers: dict = field(default_factory=dict)
    leftover: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def run_program(
    code: str,
    timeout_s: float = 5.0,
    memory_mb: int = 256,
    output_mb: int = 16,
    disk_mb: int = 64,
    max_output_chars: int = 10_000,
    namespaces: bool = True,
) -> Result:
    """Run `code` in a sandboxed child process and report how it ended.

    `timeout_s` is wall-clock time from start (nanochat's default, 5 s); `memory_mb` bounds
    the address space; `output_mb` bounds each file the program writes, stdout and stderr
    included; `disk_mb` bounds all it writes in its work directory together (where the
    kernel allows a mount namespace; `Result.layers["disk bound"]` says). `namespaces=False`
    leaves them out (a kernel where they misbehave; the tests, to show the other layers hold
    on their own).
    """
    if timeout_s <= 0 or memory_mb <= 0 or output_mb <= 0 or disk_mb <= 0:
        raise MlxchatError(f"sandbox limits must be positive: timeout_s={timeout_s}, memory_mb={memory_mb}, "
                           f"output_mb={output_mb}, disk_mb={disk_mb}")
    base = Path(tempfile.mkdtemp(prefix="mlxchat-sandbox-"))
    token = secrets.token_hex(16).encode()
    try:
        workdir, staging = base / "work", base / "root"
        workdir.mkdir()
        staging.mkdir()
        if os.geteuid() == 0:  # without namespaces the child runs as nobody in this very directory
            base.chmod(0o711)
            os.chown(workdir, NOBODY, NOBODY)
        program = base / "program.py"
        program.write_text(code, encoding="utf-8")
        token_r, token_w = os.pipe()
        verdict_r, verdict_w = os.pipe()
        os.write(token_w, token)
        os.close(token_w)
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            command = [
                sys.executable, "-I", "-X", "utf8", str(CHILD), str(program), str(workdir), str(staging),
                str(memory_mb << 20), str(output_mb << 20), str(int(timeout_s) + 1), str(disk_mb << 20),
                str(token_r), str(verdict_w), str(int(namespaces)),
            ]
            command, profile_missing = _confined(command, workdir)
            start = time.monotonic()
            try:
                proc = subprocess.Popen(
                    command, cwd=workdir, env=_child_env(workdir), stdin=subprocess.DEVNULL,
                    stdout=out, stderr=err, start_new_session=True, pass_fds=(token_r, verdict_w),
                )
            finally:
                os.close(token_r)
                os.close(verdict_w)
            try:
                timed_out = _wait_then_kill_group(proc, start + timeout_s)
                os.set_blocking(verdict_r, False)
                verdict = _read_pipe(verdict_r)
            finally:
                os.close(verdict_r)
            duration = time.monotonic() - start
            stdout, stderr = _read(out, max_output_chars), _read(err, max_output_chars)
    finally:
        leftover = remove_tree(base)
    layers_line, _, rest = verdict.partition(b"\n")
    try:
        layers = json.loads(layers_line) if layers_line else {}
    except ValueError:
        layers = {}
    if sys.platform == "darwin":
        layers["sandbox-exec profile"] = profile_missing
    finished = token in rest.split(b"\n")
    status = _status(proc.returncode, timed_out, finished)
    if status == "failed" and proc.returncode == 0:
        stderr += "\n[sandbox: the program stopped before its end (exit status 0, but the harness never got there)]"
    return Result(status, stdout, stderr, duration, layers, leftover)


def run_programs(codes: Iterable[str], workers: int = 2, **kwargs) -> list[Result]:
    """`run_program` over many programs, `workers` at a time, results in input order.

    Threads suffice: each one only waits on its child process.
    """
    if workers < 1:
        raise MlxchatError(f"workers must be >= 1, got {workers}")
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda code: run_program(code, **kwargs), codes))


# macOS: what the Linux layers promise, in Seatbelt's language. `(allow default)` keeps the
# Python installation and system libraries working; the denials are the promises: no network,
# no processes, writes only in the work directory, nothing read from the evaluator's home
# directory but Python itself and the harness, no other process's information or signals.
SANDBOX_PROFILE = """(version 1)
(allow default)
(deny network*)
(deny system-socket)
(deny process-fork)
(deny process-exec (require-not (require-any (literal {python}) (subpath {prefix}))))
(deny file-write* (require-not (require-any (subpath {workdir}) (literal "/dev/null"))))
(deny file-read* (require-all (subpath {home}) (require-not (require-any {readable}))))
(deny process-info* (require-not (target self)))
(deny signal (require-not (target self)))
"""
SANDBOX_EXEC = "/usr/bin/sandbox-exec"


def sandbox_profile(workdir: Path) -> str:
    """The `sandbox-exec` profile for a program whose work directory is `workdir`."""
    real = os.path.realpath
    readable = {real(p) for p in (sys.base_prefix, sys.prefix, CHILD.parent, workdir.parent)}
    return SANDBOX_PROFILE.format(
        python=_sbpl(real(sys.executable)), prefix=_sbpl(real(sys.base_prefix)), workdir=_sbpl(real(workdir)),
        home=_sbpl(real(os.path.expanduser("~"))), readable=" ".join(f"(subpath {_sbpl(p)})" for p in sorted(readable)),
    )


def _sbpl(path: str) -> str:
    """A path as a Seatbelt (Scheme) string literal."""
    return '"' + path.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _confined(command: list[str], workdir: Path) -> tuple[list[str], str | None]:
    """On macOS, the command under the sandbox-exec profile; with why not, where it cannot be."""
    if sys.platform != "darwin":
        return command, None
    if not os.path.exists(SANDBOX_EXEC):
        return command, f"{SANDBOX_EXEC} not found: only the rlimits and the Python-level guard hold"
    return [SANDBOX_EXEC, "-p", sandbox_profile(workdir), *command], None


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


def _read_pipe(fd: int, limit: int = 1 << 16) -> bytes:
    """What the child left in the verdict pipe (it has ended, so nothing more will come)."""
    chunks, size = [], 0
    while size < limit:
        try:
            chunk = os.read(fd, limit - size)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def remove_tree(path: Path) -> tuple[str, ...]:
    """Remove `path` whatever the program left in it (read-only directories, immutable or
    append-only flags where the sandbox could not stop them); return, and log, what could
    still not be removed."""
    def unblock(_func, failed, _exc):
        for target in {failed, os.path.dirname(failed)}:
            clear_locking_flags(target)
            try:
                os.chmod(target, 0o700, follow_symlinks=False)
            except OSError:
                pass

    for _ in range(3):
        if not os.path.lexists(path):
            return ()
        shutil.rmtree(path, onerror=unblock)
    left = tuple(str(p) for p in ([path] + sorted(path.rglob("*"))) if os.path.lexists(p))
    log.warning("sandbox: could not remove %d path(s) under %s: %s", len(left), path, ", ".join(left[:5]))
    return left


# FS_IMMUTABLE_FL | FS_APPEND_FL: the inode flags that keep a file from being removed.
LOCKING_FLAGS = 0x10 | 0x20


def clear_locking_flags(path: str) -> None:
    """Clear a file's immutable and append-only flags, where permitted, and only those: ext4
    refuses (EPERM) to clear its own extents flag, so setting all flags to 0 fails on a file that
    has no locking flag and clears them on one that has only by the kernel's order of checks."""
    if sys.platform != "linux" or os.path.islink(path):
        return
    import fcntl  # POSIX only: imported where the platform check has passed

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError:
        return
    try:
        flags = struct.unpack("i", fcntl.ioctl(fd, 0x80086601, bytes(4)))[0]  # FS_IOC_GETFLAGS
        if flags & LOCKING_FLAGS:
            fcntl.ioctl(fd, 0x40086602, struct.pack("i", flags & ~LOCKING_FLAGS))  # FS_IOC_SETFLAGS
    except OSError:
        pass
    finally:
        os.close(fd)


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


def _status(returncode: int, timed_out: bool, finished: bool) -> str:
    if timed_out or returncode in (-signal.SIGXCPU, 128 + signal.SIGXCPU):
        return "timeout"
    if returncode == 0:
        return "passed" if finished else "failed"
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
