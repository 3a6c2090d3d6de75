"""Causal attention through cuDNN with a top-left causal mask: an MLX extension, built on first use.

Why: on MLX's CUDA backend `mx.fast.scaled_dot_product_attention(mask="causal")` asks cuDNN for a
bottom-right aligned mask. When queries and keys have the same length that is the same mask as
torch's top-left one, but cuDNN's flash backward runs 1.6x longer with it (3.36 against 2.07 ms
at d20's shape on an H200, the same engine and kernel; `bench/attention_backward.py`), which is
most of what the training step loses to nanochat there. No option of MLX selects the other mask,
so `cudnn_attention.cpp` defines the same two cuDNN graphs as MLX (forward with its softmax
statistics, backward) with the top-left mask, as MLX primitives run on MLX's stream.

The extension is compiled with the C++ compiler (`CXX`, else `g++`) against the headers of the
installed mlx, nanobind, cuDNN and its frontend (`pip install 'mlxchat[cuda]'`; any missing
header directory can be given through `CPATH`), once per source and mlx version, into
`$XDG_CACHE_HOME/mlxchat`, else `~/.cache/mlxchat` (`MLXCHAT_CACHE` overrides). Where any of that is missing, or off CUDA, or with
MLXCHAT_CUDNN_ATTENTION=0, `available()` is False and `gpt.attend` keeps MLX's attention: the
same arithmetic. A failed build says why once, in the log.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import shlex
import shutil
import subprocess
import sysconfig
import tempfile
from pathlib import Path

import mlx.core as mx

log = logging.getLogger(__name__)

ENV = "MLXCHAT_CUDNN_ATTENTION"  # "0" turns it off: MLX's own causal attention runs
SOURCE = Path(__file__).with_name("cudnn_attention.cpp")
SHIM = Path(__file__).with_name("cudnn_attention_include")  # fmt/format.h, which MLX's headers include
NAME = "_mlxchat_cudnn_attention"
FLAGS = ["-std=c++20", "-O2", "-fPIC", "-fvisibility=hidden", "-DNDEBUG", "-DNB_DOMAIN=mlx",
         "-DNV_CUDNN_FRONTEND_USE_DYNAMIC_LOADING"]


def fits(q: mx.array, k: mx.array, v: mx.array) -> bool:
    """Whether this attention takes these arrays: (B, H, T, D) bf16/fp16 with D a multiple of 8 up to
    128, as many keys as queries, and T a multiple of 128 (MLX's own cuDNN backward needs that too)."""
    return (q.ndim == 4 and q.dtype in (mx.bfloat16, mx.float16) and k.dtype == q.dtype == v.dtype
            and q.shape[-1] % 8 == 0 and q.shape[-1] <= 128 and v.shape[-1] == q.shape[-1]
            and k.shape[2] == q.shape[2] and q.shape[2] % 128 == 0 and q.shape[1] % k.shape[1] == 0)


def available() -> bool:
    """True where the extension runs: MLX's CUDA backend as the default device, built and loaded."""
    if os.environ.get(ENV, "1") == "0" or not mx.cuda.is_available() or mx.default_device() != mx.gpu:
        return False
    return _extension() is not None


def runs_for(q: mx.array, k: mx.array, v: mx.array) -> bool:
    """Whether causal attention over these arrays goes through the extension (else MLX's runs)."""
    return fits(q, k, v) and available()


def causal(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    """softmax(q kᵀ · scale, causal) v for (B, H, T, D) arrays whose last axis is contiguous."""
    return _extension().causal_attention(q, k, v, scale)


def include_dirs() -> list[Path]:
    """The header directories the build needs, where the installed packages keep them."""
    nanobind = _nanobind()

    mlx_root = Path(mx.__file__).resolve().parent
    dirs = [Path(nanobind.include_dir()), Path(nanobind.source_dir()).parent / "ext" / "robin_map" / "include",
            Path(sysconfig.get_paths()["include"]), mlx_root / "include", SHIM]
    # (distribution, a header as the sources include it): the directory it is included from
    for dist, header in (("nvidia-cudnn-frontend", "cudnn_frontend.h"), ("nvidia-cudnn-cu13", "cudnn.h"),
                         ("nvidia-cuda-runtime", "cuda_runtime.h"), ("nvidia-cuda-crt", "crt/host_defines.h"),
                         ("nvidia-cuda-cccl", "nv/target")):
        try:
            files = importlib.metadata.files(dist) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        suffix = "include/" + header
        dirs += [Path(str(f.locate())[:-len(header)]) for f in files if f.as_posix().endswith(suffix)]
    return dirs


def _nanobind():
    """nanobind, or the line naming the install that brings it (only the `cuda` extra does)."""
    try:
        import nanobind
    except ImportError:
        raise RuntimeError("nanobind is not installed: pip install 'mlxchat[cuda]'") from None
    return nanobind


def build(target: Path) -> None:
    """Compile the extension to `target` (atomically: a half-written library is never loaded)."""
    nanobind = _nanobind()

    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise RuntimeError("no C++ compiler (set CXX or install g++)")
    mlx_lib = Path(mx.__file__).resolve().parent / "lib"
    target.parent.mkdir(parents=True, exist_ok=True)
    includes = [f"-I{d}" for d in include_dirs()]
    flags = [*FLAGS, *shlex.split(os.environ.get("CXXFLAGS", ""))]
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        objects = []
        jobs = []
        for src in (SOURCE, Path(nanobind.source_dir()) / "nb_combined.cpp"):
            obj = Path(tmp) / f"{src.stem}.o"
            jobs.append(subprocess.Popen([cxx, *flags, *includes, "-c", str(src), "-o", str(obj)],
                                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
            objects.append(obj)
        for job in jobs:
            output, _ = job.communicate()
            if job.returncode:
                raise RuntimeError(f"compiling {job.args[-3]} failed:\n{output[-4000:]}")
        partial = Path(tmp) / target.name
        subprocess.run([cxx, "-shared", *map(str, objects), f"-L{mlx_lib}", "-lmlx", f"-Wl,-rpath,{mlx_lib}",
                        *shlex.split(os.environ.get("LDFLAGS", "")), "-o", str(partial)], check=True, capture_output=True, text=True)
        os.replace(partial, target)


def build_once(target: Path) -> None:
    """Build `target` unless another process is doing so or has done it: each rank of a
    data-parallel run (`mlx.launch`) loads the extension on its first step, and N compilers at once
    would take N times the memory for one result. The first holds the lock while the others wait."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.exists():
            log.info("building the cuDNN causal attention extension (once per mlx version)")
            build(target)


def library() -> Path:
    """Where the built extension lives: one directory per (source, mlx version, Python ABI, flags),
    so a change to any of them rebuilds."""
    made_from = [mx.__version__, sysconfig.get_config_var("EXT_SUFFIX"), os.environ.get("CXXFLAGS", ""),
                 os.environ.get("LDFLAGS", "")]
    key = hashlib.sha256(SOURCE.read_bytes() + "\0".join(made_from).encode()).hexdigest()[:16]
    xdg = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    root = Path(os.environ.get("MLXCHAT_CACHE") or xdg / "mlxchat")
    return root / "cudnn_attention" / key / f"{NAME}{sysconfig.get_config_var('EXT_SUFFIX')}"


def _share_libstdcxx():
    """Make the loaded libstdc++ resolve symbols for the extension.

    Why: Python loads extensions with RTLD_LOCAL, so libstdc++ is outside the global scope, and the
    extension's own copies of template statics (a facet's `std::locale::id`, instantiated by the
    cuDNN frontend's headers) would bind to themselves instead of libstdc++'s: the first
    `std::stringstream << long` then called a codecvt facet where num_put was meant, and crashed
    (seen on the H200). Promoting the already loaded library to RTLD_GLOBAL makes every copy
    resolve to the one libstdc++ registered its facets with."""
    try:
        ctypes.CDLL("libstdc++.so.6", mode=os.RTLD_NOLOAD | os.RTLD_GLOBAL)
    except OSError:
        ctypes.CDLL("libstdc++.so.6", mode=os.RTLD_GLOBAL)


@functools.cache
def _extension():
    """The loaded module, building it first if needed; None (logged once) where it cannot be."""
    try:
        target = library()
        if not target.exists():
            build_once(target)
        _share_libstdcxx()
        spec = importlib.util.spec_from_file_location(NAME, target)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    except Exception as e:  # noqa: BLE001 - any failure leaves MLX's attention in place
        log.warning("cuDNN causal attention unavailable, MLX's runs instead: %s", e)
        return None
