"""One writer per run directory: a second one stops at once, naming the holder."""

import subprocess
import sys
import time

import pytest

from mlxchat.common import MlxchatError
from mlxchat.runlock import run_lock

HOLD = """
import sys, time
from mlxchat.runlock import run_lock
with run_lock("r", sys.argv[1], command="mlxchat train base --run r"):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_second_writer_is_refused_naming_the_holder_and_the_lock_dies_with_it(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        with pytest.raises(MlxchatError, match=rf"run 'r' is in use by PID {holder.pid} \(mlxchat train base --run r\)"):
            with run_lock("r", tmp_path):
                pass
        assert time.monotonic() - t0 < 10  # refused at once, not after waiting for the holder
    finally:
        holder.kill()
        holder.wait()
    with run_lock("r", tmp_path):  # the kernel dropped the dead holder's lock: nothing to clean by hand
        pass


def test_taking_the_lock_sweeps_dead_writers_temporaries_only(tmp_path):
    run = tmp_path / "runs" / "r"
    (run / "base").mkdir(parents=True)
    dead = run / "base" / ".metrics.jsonl.abc.tmp-999999999"
    live = run / "eval" / f".bpb.json.xyz.tmp-{subprocess.os.getppid()}"
    live.parent.mkdir()
    dead.write_text("x")
    live.write_text("y")
    with run_lock("r", tmp_path):
        assert not dead.exists() and live.exists()


def test_commands_that_write_a_run_take_its_lock(tmp_path, capsys):
    from mlxchat.cli import main

    (tmp_path / "runs" / "r").mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["--home", str(tmp_path), "eval", "bpb", "--run", "r"]) == 2
        assert f"in use by PID {holder.pid}" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
