"""Content digests of a stage's outputs that stay cheap to check again.

A stage records each file it made in a small manifest, `{path: {size, mtime_ns, sha256}}`,
once, when it makes it. Checking the file again later costs one `stat`: same size and mtime
→ trusted without reading it; mtime moved → re-hashed and compared; size changed or file
gone → damaged. A truncated, emptied, rewritten or deleted output is therefore caught on the
next run without re-hashing gigabytes of checkpoints every time. The digests also name the
outputs: a stage's inputs are the digests of what it read, so its identity (and cache key)
changes exactly when the content it was made from does.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from mlxchat.common import sha256_file


def file_entry(path: str | os.PathLike) -> dict:
    """Size, mtime and sha256 of one file, as a manifest stores it."""
    path = Path(path)
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256_file(path)}


def manifest(paths, base: Path | None = None) -> dict:
    """Entries for `paths`, keyed by their path relative to `base` (absolute without one)."""
    return {(Path(p).relative_to(base).as_posix() if base else str(p)): file_entry(p) for p in paths}


def problem(entries: dict, base: Path | None = None) -> str | None:
    """Why the files of a manifest no longer hold what it records (one line), or None."""
    for name, want in entries.items():
        path = Path(base) / name if base else Path(name)
        try:
            st = path.stat()
        except FileNotFoundError:
            return f"{path} is missing"
        if st.st_size != want["size"]:
            return f"{path} is {st.st_size} bytes, {want['size']} when it was written"
        if st.st_mtime_ns != want["mtime_ns"] and sha256_file(path) != want["sha256"]:
            return f"{path} was changed after it was written"
    return None


def fingerprint(entries: dict) -> str:
    """One short name for the content of a manifest's files."""
    return digest(sorted((Path(name).name, e["sha256"]) for name, e in entries.items()))


def digest(obj) -> str:
    """A short stable hash of JSON-able data (identities, lists of digests)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cached_digests(paths, cache_file: Path) -> list[str]:
    """sha256 of each file, re-hashing only those whose size or mtime changed since the last
    call (remembered in `cache_file`): data shards can be gigabytes, checked on every run."""
    from mlxchat.common import atomic_write_json, read_json

    try:
        cache = read_json(cache_file) if cache_file.exists() else {}
    except Exception:  # a damaged cache only costs re-hashing
        cache = {}
    out, changed = [], False
    for p in map(Path, paths):
        st, key = p.stat(), str(Path(p).resolve())
        hit = cache.get(key)
        if not (isinstance(hit, dict) and hit.get("size") == st.st_size and hit.get("mtime_ns") == st.st_mtime_ns):
            hit, changed = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256_file(p)}, True
            cache[key] = hit
        out.append(hit["sha256"])
    if changed:
        atomic_write_json(cache_file, cache)
    return out
