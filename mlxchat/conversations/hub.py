"""The one loader for every hub dataset the chat stages use (SmolTalk, MMLU, GSM8K, ARC,
HumanEval): parquet or JSONL files of a dataset repo, fetched with `huggingface_hub`.

Files go to huggingface_hub's own cache, placed under the run home at
`<home>/data/hub-datasets/` (`snapshot_download(cache_dir=...)`). Its cache already does what
a dataset download needs — resuming partial files, a lock per file between processes,
checking sizes and hashes, reusing a complete snapshot offline (HF_HUB_OFFLINE=1) — and under
the run home it moves with `MLXCHAT_HOME` and is deleted with it, like every other download.
(The pretraining shards have their own cache in dataset.py because they need eviction within
a GB budget; these datasets are small enough to keep.)

Rows stay in a pyarrow table and become Python dicts one at a time when read, so SmolTalk's
460K conversations cost their Arrow bytes, not 460K dicts.
"""

from __future__ import annotations

import fnmatch
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mlxchat.common import MlxchatError
from mlxchat.rundir import Home

SHUFFLE_SEED = 42  # nanochat shuffles every hub dataset with datasets' shuffle(seed=42)


def _endpoint() -> str | None:
    """HF_ENDPOINT as set now (huggingface_hub reads it only when first imported)."""
    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or None


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) < 200 else text[:197] + "..."


def download(repo_id: str, patterns: str | list[str], root=None) -> list[Path]:
    """The files of hub dataset `repo_id` matching `patterns` (fnmatch, e.g.
    "data/train-*.parquet"), downloaded once into the cache, sorted by path (the order
    `datasets` concatenates a split's shards in)."""
    from huggingface_hub import snapshot_download

    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    try:
        folder = Path(snapshot_download(
            repo_id, repo_type="dataset", allow_patterns=patterns, cache_dir=Home.resolve(root).hub_cache, endpoint=_endpoint(),
        ))  # fmt: skip
    except Exception as e:  # network, offline mode, missing repo: many types, one remedy
        raise MlxchatError(
            f"cannot get {', '.join(patterns)} of hub dataset {repo_id} ({_one_line(e.__cause__ or e)}); check your network or "
            "HF_ENDPOINT, or work offline: --source smoke to train, the eval pack (mlxchat data prepare-evals) to evaluate"
        ) from None
    files = sorted(
        p for p in folder.rglob("*")
        if p.is_file() and any(fnmatch.fnmatch(p.relative_to(folder).as_posix(), pat) for pat in patterns)
    )  # fmt: skip
    if not files:
        raise MlxchatError(f"hub dataset {repo_id} has no files matching {', '.join(patterns)}")
    return files


def read_table(files: list[Path]) -> pa.Table:
    """One table from parquet or JSONL files, in order."""
    tables = []
    for path in files:
        try:
            if path.suffix == ".parquet":
                tables.append(pq.read_table(path))
            else:
                rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
                tables.append(pa.Table.from_pylist(rows))
        except (pa.ArrowException, OSError, ValueError) as e:
            raise MlxchatError(f"cannot read {path} ({_one_line(e)}); delete it and rerun to download it again") from None
    try:
        return pa.concat_tables(tables, promote_options="default")
    except pa.ArrowException as e:
        raise MlxchatError(f"the files {files[0].parent} do not share one schema ({_one_line(e)})") from None


class Rows:
    """Rows of a pyarrow table (or a list of dicts) by index, as dicts, optionally in a fixed
    shuffled order."""

    def __init__(self, table: pa.Table | list[dict], shuffle_seed: int | None = None):
        self.table = table
        # np.random.default_rng(seed).permutation(n) is exactly datasets' Dataset.shuffle(seed),
        # so example i is the row nanochat's task would give at index i.
        self.order = None if shuffle_seed is None else np.random.default_rng(shuffle_seed).permutation(len(self))

    def __len__(self) -> int:
        return len(self.table) if isinstance(self.table, list) else self.table.num_rows

    def __getitem__(self, index: int) -> dict:
        row = int(self.order[index]) if self.order is not None else index
        if isinstance(self.table, list):
            return self.table[row]
        return self.table.slice(row, 1).to_pylist()[0]


def load_rows(repo_id: str, patterns: str | list[str], root=None, shuffle_seed: int | None = SHUFFLE_SEED) -> Rows:
    """Download (once) and open the rows of a hub dataset's files, in nanochat's shuffled order."""
    return Rows(read_table(download(repo_id, patterns, root)), shuffle_seed)


def read_jsonl(path: Path, what: str) -> list[dict]:
    """The rows of an eval-pack JSONL file; a missing one says how to build the pack."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MlxchatError(f"{what} eval file {path} not found: build the eval pack with `mlxchat data prepare-evals`") from None
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise MlxchatError(f"{path}:{number} is not JSON ({e}); rebuild it with `mlxchat data prepare-evals`") from None
    return rows


def pack_dir(root=None) -> Path:
    """Where the offline chat eval pack lives: `<home>/evals/chat/`."""
    return Home.resolve(root).chat_evals
