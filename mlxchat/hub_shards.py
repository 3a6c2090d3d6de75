"""The hub as a text source: nanochat's FineWeb-edu shards (`karpathy/fineweb-edu-100b-shuffle`)
downloaded with huggingface_hub (resumable, retried, size verified) through an LRU cache bounded in
GB — shards are fetched ahead of the loader and evicted behind it, so a 300 GB dataset trains from
a few GB of disk.
"""

from __future__ import annotations

import math
import os
import re
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mlxchat.common import (
    MlxchatError,
    get_logger,
    sha256_file,
)
from mlxchat.dataset import ShardSource, digest, one_line, parquet_problem, shard_name
from mlxchat.rundir import Home

log = get_logger()

HUB_REPO = "karpathy/fineweb-edu-100b-shuffle"
MAX_SHARD = 1822  # the hub's last shard, shard_01822.parquet, is its validation split
DOWNLOAD_ATTEMPTS = 5
RETRY_BASE_S = 2.0  # backoff between download attempts: 2, 4, 8, 16 s
PREFETCH_WORKERS = 2




class _ShardCache:
    """Which shards of one cache directory are in use, and in which order the rest were
    released; shared by every HubSource of this process on that directory."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.lock = threading.Lock()
        self.pinned: set[int] = set()
        self.released: OrderedDict[int, None] = OrderedDict()  # least recently released first
        self.reserved: dict[int, int] = {}  # shards being downloaded -> their size

    def pin(self, i: int) -> None:
        with self.lock:
            self.pinned.add(i)
            self.released.pop(i, None)

    def release(self, i: int) -> None:
        with self.lock:
            self.pinned.discard(i)
            self.released[i] = None

    def make_room(self, i: int, size: int, budget: float) -> None:
        """Evict released shards, least recently released first (files this process never
        used before those), until shard `i` fits in `budget` bytes; never a pinned shard."""
        with self.lock:
            self.reserved[i] = size
            files = self._files()
            used = sum(nbytes for _, nbytes, _ in files.values()) + sum(self.reserved.values())
            order = {k: n for n, k in enumerate(self.released)}
            victims = sorted(
                (k for k in files if k not in self.pinned and k not in self.reserved),
                key=lambda k: (order.get(k, -1), files[k][2]),
            )
            for k in victims:
                if used <= budget:
                    break
                path, nbytes, _ = files[k]
                path.unlink(missing_ok=True)
                used -= nbytes
                self.released.pop(k, None)
                log.info("evicted %s from the shard cache", path.name)
            if used > budget:
                bound = "shard cache %s needs %.2f GB for shards in use, over its %.2f GB bound"
                log.warning(bound, self.dir, used / 1e9, budget / 1e9)

    def _files(self) -> dict[int, tuple[Path, int, float]]:
        """Shard index -> (path, size, mtime) of the complete shards on disk."""
        files = {}
        for path in self.dir.glob("shard_[0-9][0-9][0-9][0-9][0-9].parquet"):
            try:
                st = path.stat()
            except FileNotFoundError:  # evicted meanwhile by another process
                continue
            files[int(path.name[6:11])] = (path, st.st_size, st.st_mtime)
        return files

    def done(self, i: int) -> None:
        with self.lock:
            self.reserved.pop(i, None)


_CACHES: dict[Path, _ShardCache] = {}
_CACHES_LOCK = threading.Lock()


def _shard_cache(directory: Path) -> _ShardCache:
    with _CACHES_LOCK:
        return _CACHES.setdefault(directory, _ShardCache(directory))


class _Corrupt(Exception):
    """A downloaded file failed verification (size, sha256 or parquet footer)."""


class HubSource(ShardSource):
    """Shards of a hub dataset, downloaded on demand into `<home>/data/<name>/`.

    A shard on disk is always complete and verified: downloads go to a hidden `.incomplete`
    file (resumed by the next attempt, even in a later process), are checked against the hub's
    size and sha256 (its LFS ETag) and for a readable parquet footer, and only then renamed in.
    """

    def __init__(
        self, repo: str = HUB_REPO, num_train: int | None = None, root=None,
        cache_gb: float = 8.0, revision: str = "main",
    ):  # fmt: skip
        self.repo, self.revision, self.num_train = repo, revision, num_train
        self.name = repo.replace("/", "--")
        self.dir = Home.resolve(root).data(self.name)
        self.budget = cache_gb * 1e9
        self._cache = _shard_cache(self.dir)
        self._last: int | None = MAX_SHARD if repo == HUB_REPO else None
        self._prefetching: set[int] = set()
        self._slots = threading.BoundedSemaphore(PREFETCH_WORKERS)
        self._lock = threading.Lock()

    # -- which shards ----------------------------------------------------------------------------
    def _last_shard(self) -> int:
        """The validation shard: known for nanochat's dataset, else the repo's highest shard."""
        if self._last is None:
            from huggingface_hub import HfApi

            try:
                api = HfApi(endpoint=_endpoint())
                files = api.list_repo_files(self.repo, repo_type="dataset", revision=self.revision)
            except Exception as e:
                raise MlxchatError(f"cannot list the files of hub dataset {self.repo} ({one_line(e)})") from None
            found = [int(m.group(1)) for f in files if (m := re.fullmatch(r"shard_(\d{5})\.parquet", f))]
            if len(found) < 2:
                raise MlxchatError(f"hub dataset {self.repo} has {len(found)} shard_NNNNN.parquet files; needs 2+")
            self._last = max(found)
        return self._last

    def _indices(self) -> list[int]:
        last = self._last_shard()
        n = last if self.num_train is None else self.num_train
        if not 0 < n <= last:
            raise MlxchatError(f"hub dataset {self.repo} has {last} training shards; asked for {n}")
        return list(range(n)) + [last]

    def num_shards(self) -> int:
        return len(self._indices())

    def fingerprint(self) -> str:
        return digest([self.repo, self.revision, self._indices()])

    # -- the cache -------------------------------------------------------------------------------
    def local_path(self, i: int) -> Path:
        self._cache.pin(i)
        return self._ensure(i)

    def prefetch(self, i: int) -> None:
        """Fetch shard `i` on a background daemon thread (at most PREFETCH_WORKERS at once):
        daemon, so Ctrl-C never waits for a download; its partial file resumes next time."""
        with self._lock:
            if i in self._prefetching:
                return
            self._prefetching.add(i)
        self._cache.pin(i)
        threading.Thread(target=self._prefetch, args=(i,), name=f"prefetch-{shard_name(i)}", daemon=True).start()

    def _prefetch(self, i: int) -> None:
        try:
            with self._slots:
                self._ensure(i)
        except Exception as e:  # the loader's local_path(i) retries and reports it
            log.warning("prefetching %s failed: %s", shard_name(i), one_line(e))
        finally:
            with self._lock:
                self._prefetching.discard(i)

    def release(self, i: int) -> None:
        self._cache.release(i)

    def _ensure(self, i: int) -> Path:
        """Shard `i` on disk and readable; one process and thread at a time per shard."""
        from filelock import FileLock

        path = self.dir / shard_name(i)
        self.dir.mkdir(parents=True, exist_ok=True)
        with FileLock(self.dir / f".{path.name}.lock"):
            if path.exists():
                if (problem := parquet_problem(path)) is None:
                    return path
                log.warning("cached %s is corrupt (%s); downloading it again", path, problem)
                path.unlink()
            self._download_verified(i, path)
        return path

    # -- downloading -----------------------------------------------------------------------------
    def _download_verified(self, i: int, path: Path) -> None:
        """Download and verify; a corrupt download is fetched once more, then reported."""
        for attempt in (1, 2):
            try:
                return self._download(i, path)
            except _Corrupt as e:
                if attempt == 2:
                    raise MlxchatError(
                        f"{path} is corrupt after downloading it twice from {self.repo} ({e}); "
                        "check your network or HF_ENDPOINT and rerun"
                    ) from None
                log.warning("downloaded %s is corrupt (%s); downloading it again", path.name, e)

    def _download(self, i: int, path: Path) -> None:
        """Download with retries and exponential backoff, resuming the partial file each time."""
        from huggingface_hub.errors import (
            EntryNotFoundError,
            OfflineModeIsEnabled,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )  # fmt: skip

        partial = path.with_name(f".{path.name}.incomplete")
        for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
            try:
                meta = self._metadata(path.name)
                self._cache.make_room(i, meta.size, self.budget)
                try:
                    self._fetch(meta, partial, path.name)
                finally:
                    self._cache.done(i)
                break
            except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError) as e:
                where = f"hub dataset {self.repo}@{self.revision}"
                raise MlxchatError(f"{path.name} is not in {where} ({one_line(e)})") from None
            except OfflineModeIsEnabled:
                raise MlxchatError(f"{path.name} is not downloaded yet and HF_HUB_OFFLINE is set; unset it") from None
            except MlxchatError:
                raise
            except Exception as e:  # network errors come as many types (httpx, OSError, HTTP 5xx)
                if attempt == DOWNLOAD_ATTEMPTS:
                    raise MlxchatError(
                        f"cannot download {path.name} from hub dataset {self.repo} after {attempt} attempts "
                        f"({one_line(e)}); check your network or HF_ENDPOINT and rerun: the download resumes"
                    ) from None
                delay = RETRY_BASE_S * 2 ** (attempt - 1)
                log.warning("downloading %s failed (%s); retrying in %.0fs", path.name, one_line(e), delay)
                time.sleep(delay)
        self._verify(partial, meta)
        os.replace(partial, path)

    def _metadata(self, filename: str):
        """The hub's size, ETag and download location for a file (one HEAD request)."""
        from huggingface_hub import get_hf_file_metadata, hf_hub_url

        url = hf_hub_url(self.repo, filename, repo_type="dataset", revision=self.revision, endpoint=_endpoint())
        meta = get_hf_file_metadata(url)
        if meta.size is None:
            raise MlxchatError(f"the hub gave no size for {url}; cannot verify the download")
        return meta

    def _fetch(self, meta, partial: Path, filename: str) -> None:
        """GET the file into `partial`, continuing from the bytes already there (HTTP Range)."""
        from huggingface_hub.file_download import http_get
        from huggingface_hub.utils import build_hf_headers

        done = partial.stat().st_size if partial.exists() else 0
        if done > meta.size:
            partial.unlink()
            done = 0
        if done:
            log.info("resuming %s at %.1f of %.1f MB", filename, done / 1e6, meta.size / 1e6)
        # A redirect to another host (a CDN) is a signed URL: the hub token stays home.
        same_host = meta.location.startswith(_endpoint() or "https://huggingface.co")
        headers = build_hf_headers(token=None if same_host else False)
        with open(partial, "ab") as f:
            http_get(
                meta.location, f, resume_size=done, headers=headers,
                expected_size=meta.size, displayed_filename=filename,
            )  # fmt: skip

    def _verify(self, partial: Path, meta) -> None:
        """Size, sha256 (the hub's ETag of an LFS file) and parquet footer, or delete and raise."""
        size = partial.stat().st_size
        if size != meta.size:
            problem = f"{size} bytes, the hub says {meta.size}"
        elif re.fullmatch(r"[0-9a-f]{64}", meta.etag or "") and sha256_file(partial) != meta.etag:
            problem = f"sha256 differs from the hub's {meta.etag[:12]}..."
        else:
            problem = parquet_problem(partial)
        if problem is not None:
            partial.unlink()
            raise _Corrupt(problem)


def _endpoint() -> str | None:
    """HF_ENDPOINT as set now: huggingface_hub reads it only once, when first imported."""
    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or None


def download(num_shards: int, root=None, repo: str = HUB_REPO) -> list[Path]:
    """Download the first `num_shards` training shards and the validation shard, in parallel.

    Explicitly asked for, so they are kept: the cache bound does not apply.
    """
    source = HubSource(repo, num_train=num_shards, root=root, cache_gb=math.inf)
    indices = source.split_indices("train") + source.split_indices("val")
    with ThreadPoolExecutor(PREFETCH_WORKERS * 2) as pool:
        paths = list(pool.map(source.local_path, indices))
    log.info("%d shards of %s in %s", len(paths), repo, source.dir)
    return paths
