"""Pretraining text sources: parquet shards with a `text` column, from the hub or from disk.

Every source looks the same to the loader: numbered shards, the last one held out for
validation, each made available by `local_path(i)` (blocking) and announced ahead with
`prefetch(i)`. The hub source streams nanochat's FineWeb-edu shards through a cache bounded in
GB (shards are fetched ahead of the loader and evicted behind it), so a 300 GB dataset trains
from a few GB of disk. A local directory — parquet used as-is, or text converted once — is an
equal source, and `prepare_smoke` builds the offline corpus (the documentation every Python
ships) that the smoke preset trains on without any network.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from mlxchat.common import (
    MlxchatError,
    atomic_write_json,
    get_logger,
    owned_temporary,
    read_json,
    sha256_file,
    sweep_temporaries,
)
from mlxchat.rundir import Home

log = get_logger()

HUB_REPO = "karpathy/fineweb-edu-100b-shuffle"
MAX_SHARD = 1822  # the hub's last shard, shard_01822.parquet, is its validation split

VAL_FRACTION = 0.1  # share of documents held out in the last shard of corpora we build
SHARD_CHARS = 250_000_000  # text per shard of a converted directory, as nanochat's shards
SMOKE_SHARD_CHARS = 400_000  # the smoke corpus (~1.5 MB) in a few shards, so shard changes get exercised
MAX_DOC_CHARS = 1_000_000  # a longer text file is split at blank lines into documents of at most this
MIN_DOCSTRING_CHARS = 200  # shorter docstrings are mostly signatures, not prose
SHUFFLE_SEED = 1234
DOWNLOAD_ATTEMPTS = 5
RETRY_BASE_S = 2.0  # backoff between download attempts: 2, 4, 8, 16 s
PREFETCH_WORKERS = 2

# Stdlib modules the smoke corpus does not import: side effects on import (a browser, a print,
# a Tk window), test suites, or one platform's own API (Linux and macOS corpora stay close).
SKIP_MODULES = (
    "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "lib2to3", "pydoc_data",
    "msvcrt", "winreg", "winsound", "msilib", "nt", "posix", "ossaudiodev", "spwd", "nis",
)  # fmt: skip


def shard_name(i: int) -> str:
    return f"shard_{i:05d}.parquet"


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _parquet_problem(path: Path) -> str | None:
    """Why `path` is not a readable text shard (its footer and schema), or None if it is."""
    try:
        with pq.ParquetFile(path) as pf:
            names = pf.schema_arrow.names
    except (OSError, pa.ArrowException) as e:
        return _one_line(e)
    return None if "text" in names else f"no 'text' column (columns: {names})"


def _check_parquet(path: Path, remedy: str) -> Path:
    if (problem := _parquet_problem(path)) is not None:
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
            self.dir = _convert_text_dir(src, Home.resolve(root).data(self.name))
            self.remedy = remedy or f"delete {self.dir} to rebuild it from {src}"
        self.paths = sorted(self.dir.glob("*.parquet"))
        self.root = root

    def num_shards(self) -> int:
        return len(self.paths)

    def local_path(self, i: int) -> Path:
        return _check_parquet(self.paths[i], self.remedy)

    def fingerprint(self) -> str:
        """The shards' names and content digests: another shard with the same name is other
        data. Re-hashed only where a shard's size or mtime changed (provenance.cached_digests)."""
        from mlxchat.provenance import cached_digests

        digests = cached_digests(self.paths, Home.resolve(self.root).digests)
        return _digest([[p.name, d] for p, d in zip(self.paths, digests)])


def _digest(items) -> str:
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


def _stat_fingerprint(paths: list[Path], base: Path) -> str:
    return _digest([(p.relative_to(base).as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in paths])


def _convert_text_dir(src: Path, out: Path) -> Path:
    files = sorted(p for p in src.rglob("*") if p.suffix in (".txt", ".md") and p.is_file())
    if not files:
        raise MlxchatError(f"data directory {src} has no .parquet, .txt or .md files")
    stamp = _stat_fingerprint(files, src)
    manifest = out / "manifest.json"
    if manifest.exists() and read_json(manifest, "shard manifest").get("source_fingerprint") == stamp:
        return out
    log.info("converting %d text files from %s into parquet shards under %s", len(files), src, out)
    docs = [doc for f in files for doc in _file_documents(f)]
    _build_corpus(docs, out, SHARD_CHARS, {"source": str(src), "source_fingerprint": stamp})
    return out


def _file_documents(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise MlxchatError(f"{path} is not UTF-8 text ({_one_line(e)}); convert or remove it") from None
    return _split_sections(text, MAX_DOC_CHARS) if len(text) > MAX_DOC_CHARS else [text]


def _split_sections(text: str, max_chars: int) -> list[str]:
    """Pack blank-line-separated sections into documents of at most ~`max_chars` characters."""
    docs, current = [], ""
    for section in re.split(r"\n\s*\n", text):
        if current and len(current) + len(section) + 2 > max_chars:
            docs.append(current)
            current = ""
        current = f"{current}\n\n{section}" if current else section
    return docs + [current] if current else docs


# --------------------------------------------------------------------------- building corpora


def _build_corpus(docs: list[str], out: Path, shard_chars: int, meta: dict) -> dict:
    """Shuffle `docs` (fixed seed), hold out the last VAL_FRACTION as the last shard, and write
    the shards and a manifest into a temporary directory that replaces `out` only when complete."""
    if len(docs) < 2:
        raise MlxchatError(f"cannot build {out}: need at least 2 documents (one for validation), got {len(docs)}")
    docs = list(docs)
    random.Random(SHUFFLE_SEED).shuffle(docs)
    n_val = max(1, round(len(docs) * VAL_FRACTION))
    groups = _pack(docs[:-n_val], shard_chars) + [docs[-n_val:]]
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep_temporaries(out.parent)
    tmp = owned_temporary(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        shards = [_write_shard(tmp / shard_name(k), group) for k, group in enumerate(groups)]
        manifest = {**meta, "docs": len(docs), "chars": sum(s["chars"] for s in shards), "shards": shards}
        atomic_write_json(tmp / "manifest.json", manifest)
        _swap_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _pack(docs: list[str], shard_chars: int) -> list[list[str]]:
    """Consecutive documents grouped into shards of about `shard_chars` characters."""
    shards, current, chars = [], [], 0
    for doc in docs:
        current.append(doc)
        chars += len(doc)
        if chars >= shard_chars:
            shards.append(current)
            current, chars = [], 0
    return shards + [current] if current else shards


def _row_group_docs(n: int) -> int:
    """nanochat's 1024 documents per row group, but at least 8 groups in a small shard: nanochat's
    loader deals row groups to data-parallel ranks, so a one-group shard would starve all but one
    there (mlxchat's ranks share one stream instead)."""
    return min(1024, max(16, math.ceil(n / 8)))


def _write_shard(path: Path, docs: list[str]) -> dict:
    """Write one shard with nanochat's settings; deterministic bytes for the same documents."""
    table = pa.table({"text": pa.array(docs, type=pa.string())})
    pq.write_table(
        table, path, row_group_size=_row_group_docs(len(docs)), use_dictionary=False,
        compression="zstd", compression_level=3, write_statistics=False,
    )  # fmt: skip
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    return {"name": path.name, "docs": len(docs), "chars": sum(map(len, docs)), "sha256": sha}


def _swap_dir(new: Path, target: Path) -> None:
    """Put directory `new` in place of `target`; readers never see a half-written directory."""
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def prepare_smoke(root=None, force: bool = False) -> Path:
    """Build the offline smoke corpus under `<home>/data/smoke/` (a no-op if already built).

    Real English that every Python ships: the stdlib reference (`pydoc_data.topics`) and the
    stdlib's docstrings, deduplicated and shuffled with a fixed seed, so the same Python
    version builds byte-identical shards on every machine.
    """
    out = Home.resolve(root).data("smoke")
    if (out / "manifest.json").exists() and not force:
        damaged = _damaged_shard(out)
        if damaged is None:
            log.info("smoke corpus already prepared at %s", out)
            return out
        log.warning("smoke corpus: %s; rebuilding it", damaged)
    t0 = time.time()
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep_temporaries(out.parent)
    docs = _stdlib_documents(out.parent)
    meta = {"source": "python stdlib documentation and docstrings", "python": platform.python_version()}
    m = _build_corpus(docs, out, SMOKE_SHARD_CHARS, meta)
    log.info(
        "smoke corpus: %d documents, %.2f MB of text in %d shards (the last, %s, is validation) at %s in %.1fs",
        m["docs"], m["chars"] / 1e6, len(m["shards"]), m["shards"][-1]["name"], out, time.time() - t0,
    )  # fmt: skip
    return out


def _damaged_shard(corpus: Path) -> str | None:
    """Why a corpus we built no longer matches its manifest (a shard changed or is gone), or None."""
    from mlxchat.provenance import cached_digests

    shards = read_json(corpus / "manifest.json", "shard manifest").get("shards") or []
    paths = [corpus / s["name"] for s in shards]
    if missing := [p for p in paths if not p.exists()]:
        return f"{missing[0]} is missing"
    for p, want, got in zip(paths, shards, cached_digests(paths, Home(corpus.parent.parent).digests)):
        if got != want["sha256"]:
            return f"{p} does not match {corpus / 'manifest.json'}"
    return None


def _stdlib_documents(workdir: Path) -> list[str]:
    """Run `_collect_stdlib_docs` in a fresh interpreter without site-packages (`-I -S`):
    importing every stdlib module has side effects we keep out of this process, and
    third-party packages (e.g. setuptools' `distutils` shim) must not change the corpus."""
    code = inspect.getsource(_collect_stdlib_docs) + (
        "\nimport json, sys\n"
        "json.dump(_collect_stdlib_docs(*json.loads(sys.argv[2])), open(sys.argv[1], 'w', encoding='utf-8'))\n"
    )
    # The documents' JSON (megabytes) goes in a temporary beside the corpus, named for this
    # process, so a kill leaves it where the next build sweeps it, not in the system temp dir.
    with tempfile.TemporaryDirectory(prefix=".smoke-docs.", suffix=f".tmp-{os.getpid()}", dir=workdir) as tmp:
        out = Path(tmp) / "docs.json"
        args = json.dumps([list(SKIP_MODULES), MIN_DOCSTRING_CHARS])
        proc = subprocess.run(
            [sys.executable, "-I", "-S", "-W", "ignore", "-c", code, str(out), args],
            cwd=tmp, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True, timeout=600,
        )  # fmt: skip
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
            raise MlxchatError(f"collecting the stdlib documentation failed ({tail[0]}); run with a standard CPython")
        return json.loads(out.read_text(encoding="utf-8"))


def _collect_stdlib_docs(skip: list[str], min_chars: int) -> list[str]:
    """The pydoc topics, then the docstrings of every importable public stdlib module and of
    the classes, functions, methods and properties it defines, each text once, in sorted order.

    Runs in a child interpreter from its source text, so it imports what it needs itself.
    """
    import importlib
    import inspect
    import pkgutil
    import sys

    def skipped(name):
        parts = name.split(".")
        return parts[0] in skip or any(p.startswith("_") or p in ("test", "tests") for p in parts)

    def modules():
        todo = sorted(n for n in sys.stdlib_module_names if not skipped(n))
        while todo:
            name = todo.pop(0)
            try:
                module = importlib.import_module(name)
            except BaseException:  # missing C extension, other platform's module, SystemExit...
                continue
            yield module
            if hasattr(module, "__path__"):
                subs = sorted(f"{name}.{m.name}" for m in pkgutil.iter_modules(module.__path__))
                todo[:0] = [s for s in subs if not skipped(s)]

    def defined_here(obj, module_name):
        owner = getattr(obj, "__module__", None) or ""
        return owner == module_name or owner.startswith("_")  # C accelerators: _io, _collections...

    def docstrings(module):
        yield module.__doc__
        for _, obj in sorted(vars(module).items()):
            if not defined_here(obj, module.__name__):
                continue
            if inspect.isclass(obj):
                yield obj.__doc__
                for _, member in sorted(vars(obj).items()):
                    member = getattr(member, "__func__", member)  # classmethod, staticmethod
                    if inspect.isroutine(member) or isinstance(member, property):
                        yield member.__doc__
            elif inspect.isroutine(obj):
                yield obj.__doc__

    from pydoc_data.topics import topics

    texts = [topics[k] for k in sorted(topics)]
    texts += [d for module in modules() for d in docstrings(module) if isinstance(d, str)]
    cleaned = (inspect.cleandoc(t) for t in texts)
    return list(dict.fromkeys(t for t in cleaned if len(t) >= min_chars))


# --------------------------------------------------------------------------- the hub


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
                raise MlxchatError(f"cannot list the files of hub dataset {self.repo} ({_one_line(e)})") from None
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
        return _digest([self.repo, self.revision, self._indices()])

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
            log.warning("prefetching %s failed: %s", shard_name(i), _one_line(e))
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
                if (problem := _parquet_problem(path)) is None:
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
                raise MlxchatError(f"{path.name} is not in {where} ({_one_line(e)})") from None
            except OfflineModeIsEnabled:
                raise MlxchatError(f"{path.name} is not downloaded yet and HF_HUB_OFFLINE is set; unset it") from None
            except MlxchatError:
                raise
            except Exception as e:  # network errors come as many types (httpx, OSError, HTTP 5xx)
                if attempt == DOWNLOAD_ATTEMPTS:
                    raise MlxchatError(
                        f"cannot download {path.name} from hub dataset {self.repo} after {attempt} attempts "
                        f"({_one_line(e)}); check your network or HF_ENDPOINT and rerun: the download resumes"
                    ) from None
                delay = RETRY_BASE_S * 2 ** (attempt - 1)
                log.warning("downloading %s failed (%s); retrying in %.0fs", path.name, _one_line(e), delay)
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
            problem = _parquet_problem(partial)
        if problem is not None:
            partial.unlink()
            raise _Corrupt(problem)


def _endpoint() -> str | None:
    """HF_ENDPOINT as set now: huggingface_hub reads it only once, when first imported."""
    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or None



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
        repo = spec[4:] or HUB_REPO
        if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
            raise MlxchatError(f"invalid hub dataset {repo!r} in source {spec!r}: use hub:<owner>/<name>")
        return HubSource(repo, num_train=num_shards, root=root, cache_gb=cache_gb)
    if spec.startswith("dir:") and spec[4:]:
        return LocalDirSource(spec[4:], root=root)
    raise MlxchatError(f"unknown data source {spec!r}: use smoke, hub, hub:<owner>/<name> or dir:<path>")


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
            f"cannot read parquet shard {path} ({_one_line(e)}); replace it, or delete it if mlxchat made it"
        ) from None
