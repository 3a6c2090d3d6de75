"""The sandbox's child process: limit itself, disable what is destructive, run one program.

Started by `sandbox.run_program` as `python -I <this file> <program> <workdir> <limits...>`
in a new session whose cwd is `<workdir>`. Standard library only (it runs in an isolated
interpreter, not with mlxchat importable), and everything happens before the program's
first line runs, so the program inherits limits it cannot lift.

Layers, strongest first:
1. Resource limits (address space, data, file size, CPU seconds, processes, no core dumps):
   enforced by the kernel, soft = hard so an unprivileged program cannot raise them.
2. On Linux, Landlock (5.13+): the kernel refuses to create, write, truncate, remove,
   rename or link anything outside the workdir (and /dev/null), whatever Python or ctypes
   the program uses.
3. On Linux (x86_64, aarch64), a seccomp filter that fails the system calls which would
   leave this process: creating processes or threads (clone, clone3, fork, vfork), execve,
   signalling other processes (kill, tkill, tgkill), sockets (no network), raising rlimits,
   ptrace, namespaces and mounts. Kernel-enforced, so it holds against ctypes too, and
   it is what stops a fork bomb when the evaluator runs as root (RLIMIT_NPROC does not
   bind root).
4. nanochat's `reliability_guard`: destructive functions of os, shutil, subprocess and
   builtins replaced by ones that raise, `resource`/`psutil`/... unimportable, and writes
   (open for writing, os.open with write flags, mkdir, links, and unlink/rename/truncate,
   which nanochat disables outright) refused outside the workdir, so the program's own
   temporary files (tempfile) work.
   These are Python-level and a determined program can get around them (ctypes, `_io`,
   `posix`); they exist to turn accidents into clear errors, not to contain malice.

Exit status tells the parent what happened: 0 the program ran to its end, 1 it raised
(SystemExit and SyntaxError included, as nanochat counts any exception a failure), 2 the
sandbox could not be set up; anything else, or a signal, means it was stopped from
outside the Python level.
"""

import builtins
import faulthandler
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

# seccomp: syscall numbers of what the filter refuses, per audit arch.
_BLOCKED_SYSCALLS = {
    "x86_64": (
        0xC000003E,
        # clone fork vfork execve execveat clone3 kill tkill tgkill socket socketpair
        # setrlimit prlimit64 ptrace unshare setns mount chroot
        [56, 57, 58, 59, 322, 435, 62, 200, 234, 41, 53, 160, 302, 101, 272, 308, 165, 161],
    ),
    "aarch64": (
        0xC00000B7,
        # clone execve execveat clone3 kill tkill tgkill socket socketpair
        # setrlimit prlimit64 ptrace unshare setns mount chroot
        [220, 221, 281, 435, 129, 130, 131, 198, 199, 164, 261, 117, 97, 268, 40, 51],
    ),
}


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


def install_seccomp() -> str | None:
    """Load the filter described in the module docstring; return why not, or None."""
    if sys.platform != "linux":
        return None  # no seccomp: the rlimits and Python guards are what remains
    arch = os.uname().machine
    if arch not in _BLOCKED_SYSCALLS:
        return f"no seccomp syscall table for {arch}"
    import ctypes

    audit_arch, blocked = _BLOCKED_SYSCALLS[arch]

    class SockFilter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]

    load, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_JMP|JGE|K, BPF_RET|K
    allow, deny = 0x7FFF0000, 0x00050000 | 1  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO | EPERM
    # seccomp_data: nr at offset 0, arch at offset 4. Jump targets are relative to the next
    # instruction; the last two instructions are "allow" then "deny".
    body = [(load, 0, 0, 4), (jeq, 1, 0, audit_arch), (ret, 0, 0, deny), (load, 0, 0, 0)]
    if arch == "x86_64":
        body.append((jge, None, 0, 0x40000000))  # the x32 ABI: the same calls under other numbers
    body += [(jeq, None, 0, nr) for nr in blocked]
    n = len(body) + 2
    program = [(c, (n - 1 - (i + 1)) if jt is None else jt, jf, k) for i, (c, jt, jf, k) in enumerate(body)]
    program += [(ret, 0, 0, allow), (ret, 0, 0, deny)]
    filters = (SockFilter * n)(*[SockFilter(*insn) for insn in program])
    prog = SockFprog(n, filters)
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_no_new_privs, pr_set_seccomp, seccomp_mode_filter = 38, 22, 2
    if libc.prctl(pr_set_no_new_privs, 1, 0, 0, 0) != 0 or libc.prctl(
        pr_set_seccomp, seccomp_mode_filter, ctypes.byref(prog), 0, 0
    ) != 0:
        return f"prctl failed: {os.strerror(ctypes.get_errno())}"
    return None


def restrict_writes_with_landlock(workdir: str) -> str | None:
    """Make the kernel refuse every filesystem change outside `workdir` (and /dev/null):
    creating, writing, truncating, removing, renaming, linking. Reads stay allowed.
    Landlock (Linux 5.13+) needs no privileges; return why it is not in force, or None."""
    if sys.platform != "linux":
        return None  # no Landlock: the Python-level write guard is what remains
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    create_ruleset, add_rule, restrict_self = 444, 445, 446  # the same numbers on every arch
    abi = libc.syscall(create_ruleset, None, 0, 1)  # LANDLOCK_CREATE_RULESET_VERSION
    if abi < 1:
        return f"Landlock unavailable: {os.strerror(ctypes.get_errno())}"
    # WRITE_FILE, REMOVE_DIR, REMOVE_FILE, MAKE_{CHAR,DIR,REG,SOCK,FIFO,BLOCK,SYM}; REFER
    # (rename/link across directories) from ABI 2; TRUNCATE from ABI 3.
    handled = (1 << 1) | sum(1 << b for b in range(4, 13))
    if abi >= 2:
        handled |= 1 << 13
    if abi >= 3:
        handled |= 1 << 14
    file_rights = handled & ((1 << 1) | (1 << 14))  # the rights a rule on a file may carry

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

    attr = ctypes.c_uint64(handled)  # struct landlock_ruleset_attr, first field only
    ruleset = libc.syscall(create_ruleset, ctypes.byref(attr), ctypes.sizeof(attr), 0)
    if ruleset < 0:
        return f"landlock_create_ruleset failed: {os.strerror(ctypes.get_errno())}"
    try:
        for path, rights in ((workdir, handled), (os.devnull, file_rights)):
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                rule = PathBeneath(rights, fd)
                if libc.syscall(add_rule, ruleset, 1, ctypes.byref(rule), 0) != 0:  # PATH_BENEATH
                    return f"landlock_add_rule({path}) failed: {os.strerror(ctypes.get_errno())}"
            finally:
                os.close(fd)
        if libc.prctl(38, 1, 0, 0, 0) != 0 or libc.syscall(restrict_self, ruleset, 0) != 0:  # NO_NEW_PRIVS
            return f"landlock_restrict_self failed: {os.strerror(ctypes.get_errno())}"
    finally:
        os.close(ruleset)
    return None


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


def main() -> None:
    exit_now = os._exit  # kept before the guard refuses it, for the final exit
    try:
        program_path, workdir = sys.argv[1], sys.argv[2]
        memory_bytes, fsize_bytes, cpu_seconds = (int(a) for a in sys.argv[3:6])
        with open(program_path, encoding="utf-8") as f:
            source = f.read()
        linecache.cache[program_path] = (len(source), None, source.splitlines(True), program_path)
        set_limits(memory_bytes, fsize_bytes, cpu_seconds)
        for layer, why_not in [
            ("Landlock write restriction", restrict_writes_with_landlock(workdir)),
            ("seccomp filter", install_seccomp()),
        ]:
            if why_not:
                print(f"sandbox: {layer} not in force ({why_not})", file=sys.stderr)
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
    exit_now(status)


if __name__ == "__main__":
    main()
