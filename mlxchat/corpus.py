"""Building corpora: text turned into parquet shards of the shard format (dataset.py), written
atomically with a manifest — a directory of .txt/.md files converted once, and the offline smoke
corpus (`prepare_smoke`: the documentation every Python ships) that the smoke preset trains on
without any network.
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
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from mlxchat.common import (
    MlxchatError,
    atomic_write_json,
    get_logger,
    owned_temporary,
    read_json,
    sweep_temporaries,
)
from mlxchat.dataset import one_line, shard_name, stat_fingerprint
from mlxchat.rundir import Home

log = get_logger()

VAL_FRACTION = 0.1  # share of documents held out in the last shard of corpora we build
SHARD_CHARS = 250_000_000  # text per shard of a converted directory, as nanochat's shards
SMOKE_SHARD_CHARS = 400_000  # the smoke corpus (~1.5 MB) in a few shards, so shard changes get exercised
MAX_DOC_CHARS = 1_000_000  # a longer text file is split at blank lines into documents of at most this
MIN_DOCSTRING_CHARS = 200  # shorter docstrings are mostly signatures, not prose
SHUFFLE_SEED = 1234

# Stdlib modules the smoke corpus does not import: side effects on import (a browser, a print,
# a Tk window), test suites, or one platform's own API (Linux and macOS corpora stay close).
SKIP_MODULES = (
    "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "lib2to3", "pydoc_data",
    "msvcrt", "winreg", "winsound", "msilib", "nt", "posix", "ossaudiodev", "spwd", "nis",
)  # fmt: skip


def convert_text_dir(src: Path, out: Path) -> Path:
    files = sorted(p for p in src.rglob("*") if p.suffix in (".txt", ".md") and p.is_file())
    if not files:
        raise MlxchatError(f"data directory {src} has no .parquet, .txt or .md files")
    stamp = stat_fingerprint(files, src)
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
        raise MlxchatError(f"{path} is not UTF-8 text ({one_line(e)}); convert or remove it") from None
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
