"""Linux CPU speed: run MLX on OpenBLAS instead of the reference BLAS its `mlx[cpu]` wheel bundles.

The wheel links a netlib reference BLAS (`mlx_cpu.libs/libblas-*.so`): correct, but matmuls
run ~20x slower than on OpenBLAS (a smoke base-train: ~140 vs ~1,500 tok/s on 2 cores).
OpenBLAS exports the same symbols, so preloading it makes MLX use it. A process cannot preload
a library into itself, so the entry points (`mlxchat`, the flows, the test suite) call
`ensure_fast_blas()` first thing: it re-executes the same command line once with Debian's
OpenBLAS in `LD_PRELOAD` (children inherit it), or, where none is installed, prints one
warning line with the command that installs it. macOS (Accelerate) and a machine without the
bundled reference BLAS are left alone.

Imports nothing heavy: it runs before MLX, NumPy or Prefect are loaded.
"""

from __future__ import annotations

import ctypes
import glob
import importlib.util
import os
import re
import sys
from pathlib import Path

OPENBLAS_ENV = "MLXCHAT_OPENBLAS"  # a libopenblas.so to preload instead of Debian's, or "off"
REEXEC_ENV = "_MLXCHAT_BLAS_REEXEC"  # set on the re-executed process, so it never loops
# Debian/Ubuntu's OpenBLAS builds, the pthread one first (what libopenblas0-pthread installs).
DEBIAN_OPENBLAS = ("/usr/lib/*-linux-gnu/openblas-pthread/libopenblas.so.0",
                   "/usr/lib/*-linux-gnu/openblas-openmp/libopenblas.so.0",
                   "/usr/lib/*-linux-gnu/openblas-serial/libopenblas.so.0")
INSTALL_HINT = "sudo apt-get install libopenblas0-pthread"
_LOADED = re.compile(r"/libopenblas[^/]*\.so")  # not NumPy's own libscipy_openblas64_


def bundled_reference_blas() -> Path | None:
    """The reference BLAS that the installed MLX wheel links, if it is one that bundles it."""
    spec = importlib.util.find_spec("mlx")
    if spec is None or not spec.submodule_search_locations:
        return None
    site = Path(list(spec.submodule_search_locations)[0]).parent
    found = sorted(glob.glob(str(site / "mlx*.libs" / "libblas*.so*")))
    return Path(found[0]) if found else None


def openblas_loaded(maps: str | None = None) -> bool:
    """Whether a libopenblas is mapped into this process (`maps`: /proc/self/maps' text)."""
    if maps is None:
        try:
            maps = Path("/proc/self/maps").read_text()
        except OSError:
            return False
    return bool(_LOADED.search(maps))


def find_openblas() -> Path | None:
    """`$MLXCHAT_OPENBLAS` if set, else the first Debian OpenBLAS installed."""
    override = os.environ.get(OPENBLAS_ENV)
    if override:
        return Path(override) if Path(override).is_file() else None
    for pattern in DEBIAN_OPENBLAS:
        found = sorted(glob.glob(pattern))
        if found:
            return Path(found[0])
    return None


def slow_blas() -> bool:
    """Whether MLX in this process would run on its bundled reference BLAS."""
    if not sys.platform.startswith("linux") or os.environ.get(OPENBLAS_ENV) == "off":
        return False
    return not openblas_loaded() and bundled_reference_blas() is not None


def warning_line(reason: str) -> str:
    return (f"warning: MLX is running on its slow reference BLAS ({reason}); matmuls are ~20x slower: "
            f"{INSTALL_HINT} (or run ./setup.sh)")


def _openblas_function(name: str):
    """A function of the OpenBLAS loaded in this process, or None (macOS's Accelerate, MLX's
    reference BLAS, or one loaded without its symbols in the global namespace)."""
    if not openblas_loaded():
        return None
    return getattr(ctypes.CDLL(None), name, None)


def openblas_threads() -> int | None:
    """How many threads the loaded OpenBLAS runs a GEMM on; None where none is loaded."""
    getter = _openblas_function("openblas_get_num_threads")
    return getter() if getter else None


def set_openblas_threads(threads: int) -> None:
    """Set the loaded OpenBLAS's thread count; nothing where none is loaded."""
    setter = _openblas_function("openblas_set_num_threads")
    if setter:
        setter(threads)


def ensure_fast_blas() -> None:
    """Re-execute this process with OpenBLAS preloaded when MLX would run on its reference BLAS.

    Returns (doing nothing) off Linux, with `MLXCHAT_OPENBLAS=off`, when OpenBLAS is already
    loaded or MLX bundles no reference BLAS; prints the one-line warning when no OpenBLAS is
    installed; otherwise does not return (`os.execve` replaces the process, same pid)."""
    reexecuted = os.environ.pop(REEXEC_ENV, None)  # children start afresh (and inherit LD_PRELOAD)
    if not slow_blas():
        return
    lib = find_openblas()
    if lib is None:
        override = os.environ.get(OPENBLAS_ENV)
        print(warning_line(f"{OPENBLAS_ENV}={override} is not a file" if override else "no OpenBLAS installed"),
              file=sys.stderr)
        return
    if reexecuted:
        print(warning_line(f"preloading {lib} did not take effect"), file=sys.stderr)
        return
    preload = " ".join(p for p in (str(lib), os.environ.get("LD_PRELOAD", "")) if p)
    env = {**os.environ, "LD_PRELOAD": preload, REEXEC_ENV: "1"}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


if __name__ == "__main__":
    # `python -m mlxchat.blas`: the LD_PRELOAD value this Python needs (empty if none), for
    # ./setup.sh to run a command (the test suite) that cannot re-execute itself.
    print((find_openblas() or "") if slow_blas() else "")
