"""Pretraining text sources: numbered parquet shards with a `text` column, the last one held out
for validation.

Every source looks the same to the loader: each shard made available by `local_path(i)`
(blocking) and announced ahead with `prefetch(i)`. A local directory (parquet used as-is, or
text converted once: corpus.py) and the hub (hub_shards.py: FineWeb-edu streamed through a cache
bounded in GB) are equal sources; `get_source` picks one by name.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from mlxchat.common import (
    MlxchatError,
    get_logger,
)
from mlxchat.rundir import Home

log = get_logger()


def shard_name(i: int) -> str:
    return f"shard_{i:05d}.parquet"


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def parquet_problem(path: Path) -> str | None:
    """Why `path` is not a readable text shard (its footer and schema), or None if it is."""
    try:
        with pq.ParquetFile(path) as pf:
            names = pf.schema_arrow.names
    except (OSError, pa.ArrowException) as e:
        return one_line(e)
    return None if "text" in names else f"no 'text' column (columns: {names})"


def check_parquet(path: Path, remedy: str) -> Path:
    if (problem := parquet_problem(path)) is not None:
        raise MlxchatError(f"cannot read parquet shard {path} ({problem}); {remedy}")
    return path


class ShardSource:
    """Numbered parquet shards of documents; the last one is the validation split."""

    name: str

    def num_shards(self) -> int:
        raise NotImplementedError

    def _indices(self) -> list[int]:
        """Every shard index of this source in order, validation last."""
        return list(range(self.num_shards()))

    def split_indices(self, split: str) -> list[int]:
        indices = self._indices()
        if split == "train":
            return indices[:-1]
        if split == "val":
            return indices[-1:]
        raise MlxchatError(f"unknown split {split!r}: use 'train' or 'val'")

    def local_path(self, i: int) -> Path:
        """Shard `i` on local disk, complete and verified (fetched first if needed)."""
        raise NotImplementedError

    def prefetch(self, i: int) -> None:
        """Start making shard `i` local in the background, so `local_path(i)` finds it ready."""

    def release(self, i: int) -> None:
        """The reader is done with shard `i`: a bounded cache may now evict it."""

    def fingerprint(self) -> str:
        """Identity of the content, for the cache keys of the stages that read this source."""
        raise NotImplementedError


# --------------------------------------------------------------------------- local directories


class LocalDirSource(ShardSource):
    """A directory of parquet shards used as-is (sorted by name), or of .txt/.md files.

    Text files become documents — one per file, a huge file split at blank lines — written
    once as parquet shards under `<home>/data/<name>/`, rebuilt only when the files change.
    """

    def __init__(self, path: str | os.PathLike, name: str | None = None, root=None, remedy: str | None = None):
        src = Path(path).expanduser().resolve()
        if not src.is_dir():
            raise MlxchatError(f"data directory {src} does not exist")
        self.name = name or f"dir-{src.name}-{hashlib.sha256(str(src).encode()).hexdigest()[:8]}"
        if any(src.glob("*.parquet")):
            self.dir, self.remedy = src, remedy or f"replace or remove it from {src}"
        else:
            from mlxchat.corpus import convert_text_dir

            self.dir = convert_text_dir(src, Home.resolve(root).data(self.name))
            self.remedy = remedy or f"delete {self.dir} to rebuild it from {src}"
        self.paths = sorted(self.dir.glob("*.parquet"))
        self.root = root

    def num_shards(self) -> int:
        return len(self.paths)

    def local_path(self, i: int) -> Path:
        return check_parquet(self.paths[i], self.remedy)

    def fingerprint(self) -> str:
        """The shards' names and content digests: another shard with the same name is other
        data. Re-hashed only where a shard's size or mtime changed (provenance.cached_digests)."""
        from mlxchat.provenance import cached_digests

        digests = cached_digests(self.paths, Home.resolve(self.root).digests)
        return digest([[p.name, d] for p, d in zip(self.paths, digests)])


def digest(items) -> str:
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


def stat_fingerprint(paths: list[Path], base: Path) -> str:
    return digest([(p.relative_to(base).as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in paths])


# --------------------------------------------------------------------------- entry points


def get_source(spec: str, root=None, cache_gb: float = 8.0, num_shards: int | None = None) -> ShardSource:
    """A source from its name: `smoke`, `hub`, `hub:<owner/name>` or `dir:<path>`.

    For the hub, `num_shards` is how many training shards to use (default: all of them); the
    validation shard is always the dataset's last.
    """
    if spec == "smoke":
        smoke = Home.resolve(root).data("smoke")
        if not (smoke / "manifest.json").exists():
            raise MlxchatError(f"the smoke corpus is not prepared ({smoke} is missing): run mlxchat data prepare-smoke")
        return LocalDirSource(smoke, name="smoke", remedy="rebuild the corpus: mlxchat data prepare-smoke --force")
    if spec == "hub" or spec.startswith("hub:"):
        from mlxchat.hub_shards import HUB_REPO, HubSource

        repo = spec[4:] or HUB_REPO
        if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
            raise MlxchatError(f"invalid hub dataset {repo!r} in source {spec!r}: use hub:<owner>/<name>")
        return HubSource(repo, num_train=num_shards, root=root, cache_gb=cache_gb)
    if spec.startswith("dir:") and spec[4:]:
        return LocalDirSource(spec[4:], root=root)
    raise MlxchatError(f"unknown data source {spec!r}: use smoke, hub, hub:<owner>/<name> or dir:<path>")


def iter_texts(source: ShardSource, split: str, max_chars: int | None = None) -> Iterator[str]:
    """The documents of a split in order, stopping once `max_chars` characters were yielded."""
    indices = source.split_indices(split)
    held: set[int] = set()  # shards we pinned and must release: the one read, the one prefetched
    total = 0
    try:
        for k, i in enumerate(indices):
            held.add(i)
            path = source.local_path(i)
            if k + 1 < len(indices):
                held.add(indices[k + 1])
                source.prefetch(indices[k + 1])
            for text in _read_texts(path):
                yield text
                total += len(text)
                if max_chars is not None and total >= max_chars:
                    return
            held.discard(i)
            source.release(i)
    finally:
        for i in sorted(held):
            source.release(i)


def _read_texts(path: Path) -> Iterator[str]:
    try:
        with pq.ParquetFile(path) as pf:
            for rg in range(pf.num_row_groups):
                yield from pf.read_row_group(rg, columns=["text"]).column("text").to_pylist()
    except (OSError, pa.ArrowException) as e:
        raise MlxchatError(
            f"cannot read parquet shard {path} ({one_line(e)}); replace it, or delete it if mlxchat made it"
        ) from None
