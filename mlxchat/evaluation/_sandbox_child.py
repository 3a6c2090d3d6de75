"""The sandbox's child process: confine itself, disable what is destructive, run one program.

Started by `sandbox.run_program` as `python -I <this file> <program> <workdir> <staging>
<limits...> <token fd> <verdict fd> <namespaces 0/1>` in a new session. Standard library only (it runs in an
isolated interpreter, not with mlxchat importable), and everything happens before the
program's first line runs, so the program inherits limits it cannot lift.

Layers, strongest first:
1. On Linux, the kernel layers of `_sandbox_linux.py`: namespaces and a root filesystem of
   the program's own (the evaluator's processes and files are not there), a size-bounded
   tmpfs as the work directory, `nobody` instead of root and no capabilities, Landlock
   (writes, TCP, signals), and last a seccomp allow-list. Each one the kernel refuses is
   named with its reason in the layers report.
2. Resource limits (address space, data, file size, CPU seconds, processes, no core dumps),
   soft = hard so the program cannot raise them.
3. nanochat's `reliability_guard`: destructive functions of os, shutil, subprocess and
   builtins replaced by ones that raise, `resource`/`psutil`/... unimportable, and writes
   refused outside the workdir. Python-level, so a determined program gets around them
   (ctypes, `_io`, `posix`); they turn accidents into clear errors, the kernel holds malice.

What the parent learns comes through the verdict pipe, not the exit status: first a JSON line,
the layers report (written before the program runs, so the program cannot change it), then,
only once the program has run to its end, the token the parent sent over the token pipe
(read and closed before the program starts). A program that stops early with exit status 0
(`posix._exit(0)` before a failing assert) writes no token, so it has not passed.
Exit status: 0 ran to its end, 1 raised (SystemExit and SyntaxError included, as nanochat
counts any exception a failure), 2 the sandbox could not be set up, 128 + N killed by signal N.
"""

import builtins
import faulthandler
import json
import linecache
import os
import resource
import shutil
import signal
import subprocess
import sys
import traceback

# Exit statuses besides 0 (the program ran to its end); sandbox.py reads them.
RAISED = 1
SETUP_FAILED = 2


def set_limits(memory_bytes: int, fsize_bytes: int, cpu_seconds: int) -> None:
    """Kernel limits; soft and hard equal, so the program cannot raise them back."""
    limits = [
        (resource.RLIMIT_AS, memory_bytes),
        (resource.RLIMIT_DATA, memory_bytes),
        (resource.RLIMIT_FSIZE, fsize_bytes),
        (resource.RLIMIT_CPU, cpu_seconds),
        (resource.RLIMIT_CORE, 0),
        (resource.RLIMIT_NPROC, 0),
    ]
    for which, value in limits:
        hard = resource.getrlimit(which)[1]
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)  # a stricter limit the caller already has stays in force
        try:
            resource.setrlimit(which, (value, value))
        except (ValueError, OSError):
            if sys.platform != "darwin":
                raise
            # macOS refuses some limits (RLIMIT_AS), which is why nanochat sets none there;
            # the others and the parent's wall-clock kill still apply.
    # Past RLIMIT_FSIZE a write fails with EFBIG (an exception the program sees) instead of
    # SIGXFSZ killing the process, so a flood of output reads as the program failing.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def _refuse(name: str):
    def refused(*args, **kwargs):
        raise PermissionError(f"{name} is disabled in the sandbox")

    refused.__name__ = name.rsplit(".", 1)[-1]
    return refused


def reliability_guard(workdir: str) -> None:
    """nanochat's guard (destructive calls disabled) plus writes confined to `workdir`.

    Disabled functions raise PermissionError naming themselves rather than being None
    (nanochat's choice), so a failing program's stderr says what it tried.
    """
    faulthandler.disable()
    os.environ["OMP_NUM_THREADS"] = "1"

    for name in [
        "kill", "killpg", "system", "popen", "removedirs", "fchdir", "chdir",
        "setuid", "setgid", "setsid", "fork", "forkpty", "renames", "ftruncate", "fchmod", "fchown", "chmod", "chown", "chroot", "lchflags", "lchmod",
        "lchown", "execv", "execve", "execvp", "execvpe", "execl", "execle", "execlp", "execlpe",
        "spawnv", "spawnve", "spawnvp", "spawnvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe",
        "posix_spawn", "posix_spawnp", "_exit",
    ]:
        if hasattr(os, name):
            setattr(os, name, _refuse(f"os.{name}"))
    for name in ["rmtree", "move", "chown", "copytree"]:
        setattr(shutil, name, _refuse(f"shutil.{name}"))
    for name in ["Popen", "run", "call", "check_call", "check_output", "getoutput", "getstatusoutput"]:
        setattr(subprocess, name, _refuse(f"subprocess.{name}"))
    for name in ["exit", "quit", "help"]:
        setattr(builtins, name, _refuse(name))
    for name in ["ipdb", "joblib", "resource", "psutil", "tkinter"]:
        sys.modules[name] = None  # `import name` now raises ImportError

    _confine_writes(os.path.realpath(workdir))


def _confine_writes(workdir: str) -> None:
    """Refuse any write whose target, symlinks resolved, is outside `workdir` (or /dev/null).

    Paths are resolved before the check, so a symlink in the workdir that points outside
    cannot be written through (nor, erring on the safe side, removed)."""
    realpath = os.path.realpath

    def check(path, what: str) -> None:
        if isinstance(path, int):
            return  # an already-open descriptor: it was checked when opened
        target = realpath(os.fsdecode(os.fspath(path)))
        if target != workdir and not target.startswith(workdir + os.sep) and target != os.devnull:
            raise PermissionError(f"{what} outside the sandbox's directory is not allowed: {target}")

    real_open = builtins.open

    def guarded_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            check(file, "writing")
        return real_open(file, mode, *args, **kwargs)

    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    real_os_open = os.open

    def guarded_os_open(path, flags, *args, **kwargs):
        if flags & write_flags:
            check(path, "writing")
        return real_os_open(path, flags, *args, **kwargs)

    def guard_paths(name: str, *indices: int):
        real = getattr(os, name)

        def guarded(*args, **kwargs):
            for i in indices:
                check(args[i], f"os.{name}")
            return real(*args, **kwargs)

        setattr(os, name, guarded)

    import io

    builtins.open = io.open = guarded_open
    os.open = guarded_os_open
    for name in ["mkdir", "mkfifo", "remove", "unlink", "rmdir", "truncate"]:
        guard_paths(name, 0)
    for name in ["symlink", "link"]:
        guard_paths(name, 1)
    for name in ["rename", "replace"]:
        guard_paths(name, 0, 1)


def confine(workdir: str, staging: str, disk_bytes: int, limits: tuple[int, int, int], namespaces: bool) -> dict:
    """Apply every layer; return {layer: None if in force, else why not}."""
    if sys.platform != "linux":
        set_limits(*limits)
        why = f"{sys.platform}: no such kernel layer; the sandbox-exec profile holds the same promises"
        return {layer: why for layer in LINUX_LAYERS}
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _sandbox_linux as kernel

    del sys.path[0]
    was_root = os.geteuid() == 0
    entered = kernel.enter_namespaces() if namespaces else "left out by the caller"
    layers: dict[str, str | None] = {}
    if isinstance(entered, str):
        uid, gid = (kernel.NOBODY, kernel.NOBODY) if was_root else (os.getuid(), os.getgid())
        why = f"no namespaces ({entered})"
        layers.update({"namespaces": why, "read-only root": why, "fresh /proc": why,
                       "disk bound": f"{why}: each file is bounded (RLIMIT_FSIZE), not their total"})
    else:
        uid, gid = entered
        layers["namespaces"] = None
        try:
            layers.update(kernel.build_root(staging, workdir, disk_bytes))
        except OSError as e:  # e.g. a kernel that grants no capability in a new user namespace
            kernel.become_namespace_root()
            why = f"could not build the program's own root ({e})"
            layers.update({"read-only root": why, "fresh /proc": why, "disk bound": why})
    kept_uid = kernel.become(uid, gid, in_namespace=not isinstance(entered, str))
    layers["unprivileged uid"] = kept_uid if was_root else None
    layers.update(kernel.landlock(workdir))
    set_limits(*limits)
    layers["seccomp"] = kernel.seccomp()
    return layers


LINUX_LAYERS = ("namespaces", "read-only root", "fresh /proc", "disk bound", "unprivileged uid",
                "Landlock filesystem", "Landlock network", "Landlock scoping", "seccomp")


def main() -> None:
    # Kept before the guard or the program can replace them: the harness's own way out.
    exit_now, write = os._exit, os.write
    try:
        program_path, workdir, staging = sys.argv[1:4]
        memory_bytes, fsize_bytes, cpu_seconds, disk_bytes, token_fd, verdict_fd, namespaces = (
            int(a) for a in sys.argv[4:11])
        token = os.read(token_fd, 64)
        os.close(token_fd)
        with open(program_path, encoding="utf-8") as f:
            source = f.read()
        linecache.cache[program_path] = (len(source), None, source.splitlines(True), program_path)
        layers = confine(workdir, staging, disk_bytes, (memory_bytes, fsize_bytes, cpu_seconds), bool(namespaces))
        write(verdict_fd, json.dumps(layers).encode() + b"\n")
        bytearray(1 << 20)  # limits that leave no megabyte to run in are a setup error, not the program's
        reliability_guard(workdir)
    except BaseException:
        traceback.print_exc()
        exit_now(SETUP_FAILED)
    status = 0
    try:
        # Compiled under the limits: a pathological source is the program's failure too.
        exec(compile(source, program_path, "exec"), {})  # fresh globals, as nanochat: not __main__
    except BaseException:
        status = RAISED
        traceback.print_exc()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except OSError:
            status = RAISED  # output past the file-size limit: the program's output was cut
    if status == 0:
        write(verdict_fd, token + b"\n")
    exit_now(status)


if __name__ == "__main__":
    main()
