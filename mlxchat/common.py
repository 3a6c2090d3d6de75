"""Shared plumbing: the run directory, user-facing errors, atomic writes, logging, seeding.

Every stage reads and writes through the run directory so that stages can be chained by
paths alone (by Prefect or by hand) and a crash never leaves a half-written file where a
later stage would read it: all writes go to a temporary file in the same directory and are
renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

HOME_ENV = "MLXCHAT_HOME"


class MlxchatError(RuntimeError):
    """An error caused by the user's input or environment.

    Its message is one line that names the file or value at fault and what to do; the CLI
    prints it without a traceback.
    """


def home(override: str | os.PathLike | None = None) -> Path:
    """The run-directory root: `override`, else `$MLXCHAT_HOME`, else `./artifacts`."""
    root = override or os.environ.get(HOME_ENV) or "artifacts"
    return Path(root).expanduser().resolve()


RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def check_run_name(run: str) -> str:
    """A run name is also a directory and part of Prefect artifact keys: 1-64 letters, digits,
    '-' or '_' (starting with a letter or digit)."""
    if not isinstance(run, str) or not RUN_NAME.fullmatch(run):
        shown = run if not isinstance(run, str) or len(run) <= 40 else f"{run[:40]}... ({len(run)} characters)"
        raise MlxchatError(f"invalid run name {shown!r}: use 1-64 letters, digits, '-' or '_'")
    return run


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def owned_temporary(path: str | os.PathLike, kind: str = "tmp") -> Path:
    """A hidden name beside `path` that carries this process's PID (`.NAME.tmp-PID`), so a
    sweep can tell a crashed writer's leftovers from a live writer's work in progress."""
    path = Path(path)
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}")


def owner_pid(path: str | os.PathLike) -> int | None:
    """The PID a temporary's name carries, or None for a name that is not a temporary."""
    tail = Path(path).name.rsplit("-", 1)
    return int(tail[1]) if len(tail) == 2 and tail[1].isdigit() and Path(path).name.startswith(".") else None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def sweep_temporaries(directory: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """Remove the temporaries (`.*.tmp-PID`) in `directory` whose writer is gone; never a live
    process's. Returns what it removed."""
    import shutil

    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for path in (directory.rglob if recursive else directory.glob)(".*.tmp-*"):
        pid = owner_pid(path)
        if pid is None or pid_alive(pid):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.
    The file gets the permissions the user's umask gives (mkstemp alone would make it 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp-{os.getpid()}", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_current_umask())
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """Read JSON, turning a missing or corrupt file into a one-line user error."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise MlxchatError(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MlxchatError(f"{what} {path} is corrupt ({e}); delete it and rerun the stage that writes it") from None


def _hash_file(h, path: Path) -> None:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 of a file, read in 1 MiB chunks (downloads are verified against it)."""
    h = hashlib.sha256()
    _hash_file(h, Path(path))
    return h.hexdigest()


def fingerprint_files(paths: list[Path]) -> str:
    """A content hash of files (names and bytes), used as a stage output's identity."""
    h = hashlib.sha256()
    for p in sorted(Path(p) for p in paths):
        h.update(p.name.encode())
        _hash_file(h, p)
    return h.hexdigest()[:16]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and MLX so initialisation and sampling are reproducible."""
    import mlx.core as mx

    random.seed(seed)
    np.random.seed(seed)
    mx.random.seed(seed)


def default_dtype() -> str:
    """bfloat16 on GPUs (Metal, CUDA), float32 on CPU, as nanochat does per device."""
    import mlx.core as mx

    return "bfloat16" if mx.default_device() == mx.gpu else "float32"


def device_name() -> str:
    import mlx.core as mx

    if mx.default_device() == mx.gpu:
        try:
            return mx.device_info().get("device_name", "gpu")
        except Exception:
            return "gpu"
    return "cpu"


def hardware() -> dict:
    """What the run ran on, for the report card: chip, cores, memory, and MLX's device (a GPU's
    name and memory when MLX uses one)."""
    import platform
    import subprocess
    import sys

    import mlx.core as mx

    chip = platform.processor() or platform.machine()
    try:
        if sys.platform == "darwin":
            chip = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                  timeout=5).stdout.strip() or chip
        else:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    chip = line.split(":", 1)[1].strip()
                    break
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = 0
    info = {"chip": chip, "cpu cores": os.cpu_count(), "memory": f"{memory / 2**30:.1f} GiB" if memory else "unknown",
            "MLX device": device_name()}
    if mx.default_device() == mx.gpu:
        try:
            info["GPU memory"] = f"{mx.device_info()['memory_size'] / 2**30:.1f} GiB"
        except (KeyError, RuntimeError):
            pass
    return info


def get_logger(name: str = "mlxchat") -> logging.Logger:
    """A plain stderr logger; Prefect tasks attach their own handler to the same name."""
    logger = logging.getLogger(name)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
    return logger
