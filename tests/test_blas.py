"""On Linux, `mlxchat` runs MLX on OpenBLAS without the user typing LD_PRELOAD, and says so in
one line when OpenBLAS is missing."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mlxchat import blas, pipeline

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or blas.bundled_reference_blas() is None,
                                reason="only Linux's mlx[cpu] wheel bundles a reference BLAS")


def _fresh_env(**extra) -> dict:
    """The environment of a user who typed no LD_PRELOAD."""
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", blas.OPENBLAS_ENV, blas.REEXEC_ENV)}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def test_training_started_without_ld_preload_runs_on_openblas(smoke_root, tmp_path):
    if blas.find_openblas() is None:
        pytest.fail(f"no Debian OpenBLAS installed: {blas.INSTALL_HINT} (./setup.sh does it)")
    shutil.copytree(smoke_root / "data", tmp_path / "data")
    pipeline.train_tokenizer("r", vocab_size=512, max_chars=300_000, root=tmp_path)
    cmd = [sys.executable, "-m", "mlxchat.cli", "--home", str(tmp_path), "train", "base", "--run", "r", "--depth", "2",
           "--seq-len", "64", "--device-batch-size", "4", "--total-batch-size", "256", "--max-steps", "100000",
           "--eval-every", "0", "--checkpoint-every", "0", "--dtype", "float32"]
    proc = subprocess.Popen(cmd, env=_fresh_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = tmp_path / "runs" / "r" / "base" / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 300  # a bound on waiting, not a speed assertion
        while proc.poll() is None and time.monotonic() < deadline and not (metrics.exists() and metrics.read_text()):
            time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        maps = Path(f"/proc/{proc.pid}/maps").read_text()  # same pid: the re-exec replaced the process
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert metrics.read_text(), "training never took a step"
    assert re.search(r"/openblas-[a-z]+/libopenblas[^/]*\.so", maps), "MLX trained without OpenBLAS"
    assert "warning" not in proc.stderr.read().decode()


def test_without_openblas_one_warning_line_names_the_install_command():
    cmd = [sys.executable, "-m", "mlxchat.cli", "--help"]
    out = subprocess.run(cmd, env=_fresh_env(**{blas.OPENBLAS_ENV: "/nonexistent/libopenblas.so.0"}),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "usage: mlxchat" in out.stdout
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: MLX is running on its slow reference BLAS")
    assert blas.INSTALL_HINT in lines[0]
    off = subprocess.run(cmd, env=_fresh_env(**{blas.OPENBLAS_ENV: "off"}), capture_output=True, text=True, timeout=120)
    assert off.returncode == 0 and off.stderr == ""


def test_numpys_own_openblas_is_not_taken_for_debians():
    assert not blas.openblas_loaded("7f00 r-xp /venv/numpy.libs/libscipy_openblas64_-32a4b2a6.so\n")
    assert blas.openblas_loaded("7f00 r-xp /usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblasp-r0.3.21.so\n")
