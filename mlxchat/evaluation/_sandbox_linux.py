"""The sandbox's Linux kernel layers, applied by `_sandbox_child.py` before the program runs.

Standard library and ctypes only: it is imported by the isolated child interpreter, which
cannot import mlxchat. Every layer is tried and, where the kernel refuses it, named with the
reason, so the evaluator (and the tests) can tell what holds on this machine:

- `namespaces`: new user, PID, network, mount, IPC and UTS namespaces. The program is PID 1
  of its own PID namespace, with a fresh /proc showing only itself, an unconnected network
  (loopback down, no route anywhere), and a root filesystem of its own: a tmpfs holding
  read-only binds of /usr, /lib*, /bin, /etc, Python's prefix and /dev/{null,zero,random,
  urandom}. The evaluator's files (its home directory, tokens, the run directory) are not
  there at all.
- `disk bound`: the work directory is a tmpfs of `disk_bytes` and a few thousand inodes;
  it disappears with the namespace, so nothing is left behind on the host's disk.
- `unprivileged uid`: when the evaluator is root the program runs as `nobody` (65534), so
  changing metadata or flags of any file it did not create fails; every capability is then
  dropped, so it is not even root inside its namespace.
- `Landlock`: filesystem changes only inside the work directory (and /dev/null), no TCP
  bind/connect (ABI 4), no signals or abstract unix sockets reaching outside (ABI 6).
- `seccomp`: an allow-list of the system calls CPython needs to run a test program; any
  other call fails with EPERM (io_uring, sockets, process creation, signals, ptrace,
  pidfd_*, chmod/chown/utime/xattrs, mount, bpf, reboot, clock setting, ...), and ioctl,
  fcntl and prlimit64 only with harmless arguments.
"""

import ctypes
import os
import sys
from typing import NoReturn

NOBODY = 65534

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]


def _fail(what: str) -> OSError:
    errno = ctypes.get_errno()
    return OSError(errno, f"{what}: {os.strerror(errno)}")


def _syscall(nr: int, *args) -> int:
    result = _libc.syscall(nr, *args)
    if result < 0:
        raise _fail(f"syscall {nr}")
    return result


# -- namespaces and the program's own root filesystem -------------------------------------

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
MNT_DETACH = 2
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}
SYS_MOUNT_SETATTR = 442  # the same number on every architecture
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID = 0x1, 0x2
AT_RECURSIVE = 0x8000
# What the program's root holds besides Python's own prefix: read-only, never the evaluator's home.
SYSTEM_DIRS = ("/usr", "/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin", "/etc")
DEVICES = ("null", "zero", "random", "urandom")


def _mount(source, target, fstype, flags, data=None) -> None:
    enc = lambda s: None if s is None else os.fsencode(s)  # noqa: E731
    if _libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)) != 0:
        raise _fail(f"mount {target}")


def enter_namespaces() -> tuple[int, int] | str:
    """Move into new namespaces: in the process that returns, with the (uid, gid) outside
    that `become` will take once the root filesystem is built (until then it keeps the
    evaluator's uid, to reach Python under a private home directory); or return why not,
    nothing changed.

    The returning process is PID 1 of the new PID namespace, two forks down: the calling
    process (the "outer") writes the new user namespace's uid/gid maps, which only a process
    outside it may do with privileges (mapping root's namespace to `nobody`), and waits; the
    middle one unshared, forks the program's process and waits. Both pass on how it ended.
    """
    uid, gid = (NOBODY, NOBODY) if os.geteuid() == 0 else (os.geteuid(), os.getegid())
    if os.geteuid() == 0:
        os.setgroups([])  # root's supplementary groups would follow it into the namespace
    unshared_r, unshared_w = os.pipe()
    mapped_r, mapped_w = os.pipe()
    middle = os.fork()
    if middle == 0:
        os.close(unshared_r)
        os.close(mapped_w)
        flags = CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS
        if _libc.unshare(flags) != 0:
            os.write(unshared_w, os.strerror(ctypes.get_errno()).encode() or b"?")
            os._exit(0)
        os.write(unshared_w, b"")
        os.close(unshared_w)
        if os.read(mapped_r, 1) != b"1":
            os._exit(SETUP_FAILED_STATUS)
        os.close(mapped_r)
        program = os.fork()
        if program == 0:
            return uid, gid
        _exit_as(program)
    os.close(unshared_w)
    os.close(mapped_r)
    why_not = os.read(unshared_r, 256)
    os.close(unshared_r)
    if why_not:
        os.waitpid(middle, 0)
        os.close(mapped_w)
        return f"unshare refused: {why_not.decode()}"
    try:
        if os.geteuid() != 0:
            _write(f"/proc/{middle}/setgroups", "deny")  # required before an unprivileged gid_map
        _write(f"/proc/{middle}/uid_map", f"0 {uid} 1")
        _write(f"/proc/{middle}/gid_map", f"0 {gid} 1")
        os.write(mapped_w, b"1")
    except OSError as e:
        print(f"sandbox: could not map the user namespace ({e})", file=sys.stderr)
    os.close(mapped_w)
    _exit_as(middle)


SETUP_FAILED_STATUS = 2  # the child's SETUP_FAILED; repeated so this module stands alone


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _exit_as(pid: int) -> NoReturn:
    """Wait for `pid` and end this process the same way (a signal as 128 + its number)."""
    status = os.waitpid(pid, 0)[1]
    os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))


def build_root(staging: str, workdir: str, disk_bytes: int) -> dict[str, str | None]:
    """In the new mount namespace: a root of its own at `staging`, with the work directory a
    size-bounded tmpfs at its usual path; pivot into it. Returns the optional layers' reasons."""
    notes: dict[str, str | None] = {}
    # Opened with the evaluator's uid, which can reach Python under a private home directory;
    # then root of the namespace (`nobody` or the user outside), whose files tmpfs can hold.
    prefixes = {os.path.realpath(p) for p in (sys.base_prefix, sys.base_exec_prefix)}
    sources = {}
    for path in [*SYSTEM_DIRS, *sorted(prefixes), *(f"/dev/{name}" for name in DEVICES)]:
        if os.path.islink(path) and path in SYSTEM_DIRS:
            sources[path] = os.readlink(path)  # /lib -> usr/lib on merged-/usr systems
        elif os.path.exists(path):
            sources[path] = os.open(path, os.O_PATH | os.O_CLOEXEC)
    become_namespace_root()
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing mounted here propagates to the host
    _mount("tmpfs", staging, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,nr_inodes=1024,mode=0755")
    os.makedirs(staging + "/dev")
    for path, source in sources.items():
        inside = staging + path
        if isinstance(source, str):
            os.symlink(source, inside)
            continue
        if not os.path.exists(inside):  # a prefix under /usr is there already
            if os.path.isdir(f"/proc/self/fd/{source}"):
                os.makedirs(inside)
            else:
                open(inside, "w").close()
            _mount(f"/proc/self/fd/{source}", inside, None, MS_BIND | MS_REC)
        os.close(source)
    for path in ("/proc", workdir, "/.old"):
        os.makedirs(staging + path, exist_ok=True)
    attr = (ctypes.c_uint64 * 4)(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID, 0, 0, 0)  # struct mount_attr
    if _libc.syscall(SYS_MOUNT_SETATTR, -100, os.fsencode(staging), AT_RECURSIVE, attr, 32) != 0:  # AT_FDCWD
        notes["read-only root"] = f"mount_setattr refused: {os.strerror(ctypes.get_errno())}"
    else:
        notes["read-only root"] = None
    _mount("tmpfs", staging + workdir, "tmpfs", MS_NOSUID | MS_NODEV,
           f"size={max(disk_bytes >> 10, 4)}k,nr_inodes=4096,mode=0700,uid=0,gid=0")
    notes["disk bound"] = None
    try:
        _mount("proc", staging + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        notes["fresh /proc"] = None
    except OSError as e:  # a container hiding parts of its /proc forbids a new one: /proc stays empty
        notes["fresh /proc"] = f"{e}; /proc is left empty"
    _syscall(SYS_PIVOT_ROOT[os.uname().machine], os.fsencode(staging), os.fsencode(staging + "/.old"))
    os.chdir("/")
    if _libc.umount2(b"/.old", MNT_DETACH) != 0:
        raise _fail("umount /.old")
    os.chdir(workdir)
    return notes


def become_namespace_root() -> None:
    """Take uid/gid 0 of the new namespace (`nobody` or the user outside), leaving the
    evaluator's uid, which outside the namespace owns what the evaluator owns."""
    if os.geteuid() != 0:  # the evaluator's uid, unmapped, reads as the overflow uid
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)
        _libc.prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE, reset by the uid change: /proc/self/fd stays ours


def become(uid: int, gid: int, in_namespace: bool) -> str | None:
    """Give up privileges: outside a namespace, when root, switch to `uid`/`gid` (inside one
    the namespace's map already made root `nobody`); then drop every capability, so the
    program is not even root of its namespace. Returns why the uid stayed, or None."""
    why = None
    if not in_namespace and os.geteuid() == 0:
        why = _unreadable_by_others(sys.base_prefix)
        if why is None:
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
    data = (ctypes.c_uint32 * 6)()
    if _libc.capset(header, data) != 0:
        raise _fail("capset")
    return why


def _unreadable_by_others(path: str) -> str | None:
    """Why `nobody` could not import from Python's prefix (it lies under a private home
    directory, say), or None: then switching uid would break the program's imports."""
    path = os.path.realpath(path)
    while True:
        if not os.stat(path).st_mode & 0o001:
            return f"Python's prefix is under {path}, which others cannot enter"
        if path == "/":
            return None
        path = os.path.dirname(path)


# -- Landlock -------------------------------------------------------------------------------

SYS_LANDLOCK_CREATE_RULESET, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def landlock(workdir: str) -> dict[str, str | None]:
    """Filesystem changes only under `workdir` (and /dev/null); from ABI 4 no TCP bind or
    connect; from ABI 6 no signals and no abstract unix sockets beyond this process's domain.
    Returns each part's reason for not being in force, or None."""
    abi = _libc.syscall(SYS_LANDLOCK_CREATE_RULESET, None, 0, 1)  # LANDLOCK_CREATE_RULESET_VERSION
    if abi < 1:
        why = f"Landlock unavailable: {os.strerror(ctypes.get_errno())}"
        return {"Landlock filesystem": why, "Landlock network": why, "Landlock scoping": why}
    # WRITE_FILE, REMOVE_DIR, REMOVE_FILE, MAKE_{CHAR,DIR,REG,SOCK,FIFO,BLOCK,SYM}; REFER
    # (ABI 2), TRUNCATE (ABI 3), IOCTL_DEV (ABI 5).
    fs = (1 << 1) | sum(1 << b for b in range(4, 13))
    fs |= (1 << 13 if abi >= 2 else 0) | (1 << 14 if abi >= 3 else 0) | (1 << 15 if abi >= 5 else 0)
    net = 0b11 if abi >= 4 else 0  # BIND_TCP, CONNECT_TCP, with no port allowed
    scoped = 0b11 if abi >= 6 else 0  # ABSTRACT_UNIX_SOCKET, SIGNAL
    attr = (ctypes.c_uint64 * 3)(fs, net, scoped)
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    ruleset = _syscall(SYS_LANDLOCK_CREATE_RULESET, attr, size, 0)
    try:
        for path, rights in ((workdir, fs), (os.devnull, fs & ((1 << 1) | (1 << 14) | (1 << 15)))):
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                _syscall(SYS_LANDLOCK_ADD_RULE, ruleset, 1, ctypes.byref(_PathBeneath(rights, fd)), 0)
            finally:
                os.close(fd)
        _no_new_privs()
        _syscall(SYS_LANDLOCK_RESTRICT_SELF, ruleset, 0)
    finally:
        os.close(ruleset)
    return {"Landlock filesystem": None,
            "Landlock network": None if net else f"Landlock ABI {abi} < 4 has no network rules",
            "Landlock scoping": None if scoped else f"Landlock ABI {abi} < 6 has no signal scoping"}


def _no_new_privs() -> None:
    if _libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        raise _fail("prctl(PR_SET_NO_NEW_PRIVS)")


# -- seccomp --------------------------------------------------------------------------------

AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
# name: (x86_64, aarch64) numbers, None where the architecture has no such call. What a CPython
# test program needs: file I/O confined by Landlock to the work directory, memory, time,
# signals to itself (handlers, masks), identity queries, exit.
ALLOWED = {
    "read": (0, 63), "write": (1, 64), "readv": (19, 65), "writev": (20, 66), "pread64": (17, 67),
    "pwrite64": (18, 68), "preadv": (295, 69), "pwritev": (296, 70), "lseek": (8, 62), "close": (3, 57),
    "close_range": (436, 436), "open": (2, None), "openat": (257, 56), "openat2": (437, 437),
    "stat": (4, None), "fstat": (5, 80), "lstat": (6, None), "newfstatat": (262, 79), "statx": (332, 291),
    "fstatfs": (138, 44), "statfs": (137, 43), "access": (21, None), "faccessat": (269, 48),
    "faccessat2": (439, 439), "readlink": (89, None), "readlinkat": (267, 78), "getdents": (78, None),
    "getdents64": (217, 61), "getcwd": (79, 17), "chdir": (80, 49), "fchdir": (81, 50), "mkdir": (83, None),
    "mkdirat": (258, 34), "rmdir": (84, None), "unlink": (87, None), "unlinkat": (263, 35),
    "rename": (82, None), "renameat": (264, 38), "renameat2": (316, 276), "symlink": (88, None),
    "symlinkat": (266, 36), "link": (86, None), "linkat": (265, 37), "umask": (95, 166),
    "ftruncate": (77, 46), "truncate": (76, 45), "fallocate": (285, 47), "fsync": (74, 82),
    "fdatasync": (75, 83), "dup": (32, 23), "dup2": (33, None), "dup3": (292, 24), "pipe": (22, None),
    "pipe2": (293, 59), "poll": (7, None), "ppoll": (271, 73), "select": (23, None), "pselect6": (270, 72),
    "sendfile": (40, 71), "copy_file_range": (326, 285), "mmap": (9, 222), "munmap": (11, 215),
    "mremap": (25, 216), "madvise": (28, 233), "mprotect": (10, 226), "brk": (12, 214), "msync": (26, 227),
    "futex": (202, 98), "set_robust_list": (273, 99), "get_robust_list": (274, 100), "rseq": (334, 293),
    "rt_sigaction": (13, 134), "rt_sigprocmask": (14, 135), "rt_sigreturn": (15, 139),
    "sigaltstack": (131, 132), "restart_syscall": (219, 128), "nanosleep": (35, 101),
    "clock_nanosleep": (230, 115), "clock_gettime": (228, 113), "clock_getres": (229, 114),
    "gettimeofday": (96, 169), "time": (201, None), "getpid": (39, 172), "getppid": (110, 173),
    "gettid": (186, 178), "getuid": (102, 174), "geteuid": (107, 175), "getgid": (104, 176),
    "getegid": (108, 177), "getgroups": (115, 158), "getresuid": (118, 148), "getresgid": (120, 150),
    "getpgrp": (111, None), "getpgid": (121, 155), "getsid": (124, 156), "uname": (63, 160),
    "sysinfo": (99, 179), "sched_yield": (24, 124), "sched_getaffinity": (204, 123),
    "getrandom": (318, 278), "getrlimit": (97, 163), "getrusage": (98, 165), "times": (100, 153),
    "exit": (60, 93), "exit_group": (231, 94),
}
# Calls allowed only with some values of one argument: (x86_64, aarch64), argument index, values.
ALLOWED_IF = {
    # TCGETS, TIOCGWINSZ (isatty, terminal size), FIONREAD, FIONBIO, FIONCLEX, FIOCLEX; never
    # FS_IOC_SETFLAGS (immutable files) nor a terminal's TIOCSTI.
    "ioctl": ((16, 29), 1, (0x5401, 0x5413, 0x541B, 0x5421, 0x5450, 0x5451)),
    # F_DUPFD, F_GETFD, F_SETFD, F_GETFL, F_SETFL, F_DUPFD_CLOEXEC; never F_SETOWN/F_SETSIG
    # (SIGIO at another process), leases or notifications.
    "fcntl": ((72, 25), 1, (0, 1, 2, 3, 4, 1030)),
    # resource.getrlimit's prlimit64(0, which, NULL, old): reading limits, never setting them.
    "prlimit64": ((302, 261), 2, (0,)),
}

_LD_W_ABS, _JEQ_K, _JGE_K, _RET_K = 0x20, 0x15, 0x35, 0x06
_RET_ALLOW, _RET_EPERM = 0x7FFF0000, 0x00050000 | 1  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO | EPERM


def seccomp_program(arch: str) -> list[tuple[int, int, int, int]]:
    """The allow-list as classic BPF over struct seccomp_data (nr at 0, arch at 4, args from
    16, 8 bytes each, little-endian). Every jump is local (a test then `ret`), so the 8-bit
    jump offsets never overflow however long the list grows."""
    index = 0 if arch == "x86_64" else 1
    prog = [(_LD_W_ABS, 0, 0, 4), (_JEQ_K, 1, 0, AUDIT_ARCH[arch]), (_RET_K, 0, 0, _RET_EPERM), (_LD_W_ABS, 0, 0, 0)]
    if arch == "x86_64":
        prog += [(_JGE_K, 0, 1, 0x40000000), (_RET_K, 0, 0, _RET_EPERM)]  # the x32 ABI's numbers
    for numbers in ALLOWED.values():
        if numbers[index] is not None:
            prog += [(_JEQ_K, 0, 1, numbers[index]), (_RET_K, 0, 0, _RET_ALLOW)]
    for numbers, arg, values in ALLOWED_IF.values():
        low, high = 16 + 8 * arg, 16 + 8 * arg + 4
        block = [(_LD_W_ABS, 0, 0, high), (_JEQ_K, 1, 0, 0), (_RET_K, 0, 0, _RET_EPERM), (_LD_W_ABS, 0, 0, low)]
        for value in values:
            block += [(_JEQ_K, 0, 1, value), (_RET_K, 0, 0, _RET_ALLOW)]
        block.append((_RET_K, 0, 0, _RET_EPERM))
        prog += [(_JEQ_K, 0, len(block), numbers[index]), *block]
    prog.append((_RET_K, 0, 0, _RET_EPERM))
    return prog


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def seccomp() -> str | None:
    """Load the allow-list; return why not, or None. The last layer: nothing after it needs
    more than the list allows."""
    arch = os.uname().machine
    if arch not in AUDIT_ARCH:
        return f"no seccomp allow-list for {arch}"
    program = seccomp_program(arch)
    filters = (_SockFilter * len(program))(*[_SockFilter(*insn) for insn in program])
    _no_new_privs()
    if _libc.prctl(22, 2, ctypes.byref(_SockFprog(len(program), filters)), 0, 0) != 0:  # SECCOMP_MODE_FILTER
        return f"prctl(PR_SET_SECCOMP) refused: {os.strerror(ctypes.get_errno())}"
    return None
