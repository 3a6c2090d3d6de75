"""Shard sources: verified, resumable hub downloads through a bounded cache; local corpora."""

import hashlib
import io
import json
import shutil
import time

import huggingface_hub.constants
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mlxchat import corpus, dataset, hub_shards
from mlxchat.common import MlxchatError


def _shard_bytes(k: int, docs: int = 20) -> bytes:
    """A tiny shard in the hub's format; uncompressed, so every shard has the same size."""
    texts = [f"shard {k:05d} document {j:05d} " + "lorem ipsum " * 10 for j in range(docs)]
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": texts}), buf, row_group_size=8, compression="none")
    return buf.getvalue()


def _serve(hub, indices, repo=hub_shards.HUB_REPO) -> dict[int, bytes]:
    shards = {i: _shard_bytes(i) for i in indices}
    for i, data in shards.items():
        hub.add_file(repo, dataset.shard_name(i), data)
    return shards


def _one_line_error(excinfo, *fragments) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    for fragment in fragments:
        assert fragment in msg
    return msg


@pytest.fixture
def fast_retries(monkeypatch):
    monkeypatch.setattr(hub_shards, "RETRY_BASE_S", 0.0)


# --------------------------------------------------------------------------- hub


def test_hub_splits_follow_nanochat_without_network(tmp_path):
    src = dataset.get_source("hub", root=tmp_path, num_shards=3)
    assert dataset.shard_name(12) == "shard_00012.parquet"
    assert src.split_indices("train") == [0, 1, 2]
    assert src.split_indices("val") == [hub_shards.MAX_SHARD]
    assert src.num_shards() == 4
    with pytest.raises(MlxchatError, match="unknown split"):
        src.split_indices("test")


def test_download_fetches_train_and_val_shards_and_reuses_them(tmp_path, fake_hub):
    shards = _serve(fake_hub, [0, 1, hub_shards.MAX_SHARD])
    paths = hub_shards.download(2, root=tmp_path)
    assert [p.name for p in paths] == ["shard_00000.parquet", "shard_00001.parquet", "shard_01822.parquet"]
    assert all(p.read_bytes() == shards[int(p.name[6:11])] for p in paths)
    n_requests = len(fake_hub.requests)
    assert hub_shards.download(2, root=tmp_path) == paths
    assert len(fake_hub.requests) == n_requests  # present and readable: no network at all


def test_dropped_connection_resumes_with_a_range_request(tmp_path, fake_hub, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 1024)  # real shards: 10 MB chunks
    shards = _serve(fake_hub, [0, hub_shards.MAX_SHARD])
    fake_hub.inject("shard_00000.parquet", "drop")
    path = dataset.get_source("hub", root=tmp_path, num_shards=1).local_path(0)
    assert path.read_bytes() == shards[0]
    first, resumed = fake_hub.gets("shard_00000.parquet")
    assert first is None and resumed in {f"bytes={n}-" for n in range(1024, len(shards[0]) // 2 + 1, 1024)}


def test_partial_file_of_a_killed_run_is_resumed(tmp_path, fake_hub, fast_retries):
    shards = _serve(fake_hub, [0, hub_shards.MAX_SHARD])
    src = dataset.get_source("hub", root=tmp_path, num_shards=1)
    half = len(shards[0]) // 2
    src.dir.mkdir(parents=True)
    (src.dir / ".shard_00000.parquet.incomplete").write_bytes(shards[0][:half])
    assert src.local_path(0).read_bytes() == shards[0]
    assert fake_hub.gets("shard_00000.parquet") == [f"bytes={half}-"]


def test_corrupt_download_is_fetched_again(tmp_path, fake_hub):
    shards = _serve(fake_hub, [0, hub_shards.MAX_SHARD])
    fake_hub.inject("shard_00000.parquet", "corrupt")
    path = dataset.get_source("hub", root=tmp_path, num_shards=1).local_path(0)
    assert path.read_bytes() == shards[0]
    assert len(fake_hub.gets("shard_00000.parquet")) == 2


def test_always_corrupt_download_is_a_one_line_error_and_never_kept(tmp_path, fake_hub):
    _serve(fake_hub, [0, hub_shards.MAX_SHARD])
    fake_hub.inject("shard_00000.parquet", "corrupt", times=None)
    src = dataset.get_source("hub", root=tmp_path, num_shards=1)
    with pytest.raises(MlxchatError) as excinfo:
        src.local_path(0)
    _one_line_error(excinfo, "shard_00000.parquet", "corrupt", "sha256")
    assert not list(src.dir.glob("shard_00000.parquet")) + list(src.dir.glob(".shard_00000.parquet.incomplete"))


def test_corrupt_cached_shard_is_downloaded_again(tmp_path, fake_hub):
    shards = _serve(fake_hub, [0, hub_shards.MAX_SHARD])
    src = dataset.get_source("hub", root=tmp_path, num_shards=1)
    path = src.local_path(0)
    path.write_bytes(shards[0][:-100])  # truncated on disk: the parquet footer is gone
    assert src.local_path(0).read_bytes() == shards[0]
    assert len(fake_hub.gets("shard_00000.parquet")) == 2


def test_transient_server_errors_are_retried(tmp_path, fake_hub, fast_retries):
    shards = _serve(fake_hub, [0, hub_shards.MAX_SHARD])
    fake_hub.inject("shard_00000.parquet", "error", times=2)
    assert dataset.get_source("hub", root=tmp_path, num_shards=1).local_path(0).read_bytes() == shards[0]


def test_persistent_server_errors_give_a_one_line_error(tmp_path, fake_hub, fast_retries):
    _serve(fake_hub, [0, hub_shards.MAX_SHARD])
    fake_hub.inject("shard_00000.parquet", "error", times=None)
    with pytest.raises(MlxchatError) as excinfo:
        dataset.get_source("hub", root=tmp_path, num_shards=1).local_path(0)
    _one_line_error(excinfo, "shard_00000.parquet", f"after {hub_shards.DOWNLOAD_ATTEMPTS} attempts")
    assert len(fake_hub.gets("shard_00000.parquet")) == hub_shards.DOWNLOAD_ATTEMPTS


def test_missing_shard_is_a_one_line_error(tmp_path, fake_hub):
    _serve(fake_hub, [hub_shards.MAX_SHARD])
    with pytest.raises(MlxchatError) as excinfo:
        dataset.get_source("hub", root=tmp_path, num_shards=1).local_path(0)
    _one_line_error(excinfo, "shard_00000.parquet", "not in hub dataset")


def test_lru_eviction_keeps_the_bound_and_never_evicts_unreleased_shards(tmp_path, fake_hub):
    shards = _serve(fake_hub, range(6))
    size = len(shards[0])
    assert all(len(s) == size for s in shards.values())
    src = hub_shards.HubSource(num_train=5, root=tmp_path, cache_gb=2.5 * size / 1e9)

    def cached():
        return sorted(int(p.name[6:11]) for p in src.dir.glob("shard_*.parquet"))

    src.local_path(0), src.local_path(1)
    src.release(1), src.release(0)
    src.local_path(2)
    assert cached() == [0, 2]  # 1 was released before 0: least recently released goes first
    src.local_path(3)
    assert cached() == [2, 3]
    src.local_path(4)
    assert cached() == [2, 3, 4]  # over the bound rather than evict a shard still in use
    src.release(3)
    src.local_path(0)
    assert cached() == [0, 2, 4]


def test_prefetch_downloads_in_the_background(tmp_path, fake_hub):
    shards = _serve(fake_hub, [0, 1, hub_shards.MAX_SHARD])
    src = dataset.get_source("hub", root=tmp_path, num_shards=2)
    src.prefetch(1)
    deadline = time.time() + 10
    while not (src.dir / "shard_00001.parquet").exists() and time.time() < deadline:
        time.sleep(0.01)
    assert src.local_path(1).read_bytes() == shards[1]
    src.prefetch(0)
    src.local_path(0)  # racing the prefetch of the same shard: one download between them
    assert len(fake_hub.gets("shard_00000.parquet")) == len(fake_hub.gets("shard_00001.parquet")) == 1


def test_other_hub_dataset_takes_its_last_shard_for_validation(tmp_path, fake_hub):
    shards = _serve(fake_hub, [0, 1, 2], repo="someone/tiny-corpus")
    fake_hub.add_file("someone/tiny-corpus", "README.md", b"# tiny\n")
    src = dataset.get_source("hub:someone/tiny-corpus", root=tmp_path)
    assert (src.split_indices("train"), src.split_indices("val")) == ([0, 1], [2])
    texts = list(dataset.iter_texts(src, "val"))
    assert texts == pq.read_table(io.BytesIO(shards[2])).column("text").to_pylist()


# --------------------------------------------------------------------------- local sources


def test_smoke_source_before_preparing_is_a_one_line_error(tmp_path):
    with pytest.raises(MlxchatError) as excinfo:
        dataset.get_source("smoke", root=tmp_path)
    _one_line_error(excinfo, "mlxchat data prepare-smoke")


def test_unknown_source_spec_is_a_one_line_error(tmp_path):
    with pytest.raises(MlxchatError) as excinfo:
        dataset.get_source("s3://bucket", root=tmp_path)
    _one_line_error(excinfo, "smoke, hub")


def test_prepare_smoke_is_deterministic_and_a_no_op_when_built(smoke_root, tmp_path, monkeypatch):
    monkeypatch.setenv("MLXCHAT_HOME", str(tmp_path))
    fresh = corpus.prepare_smoke()
    assert fresh == tmp_path / "data" / "smoke"
    first = json.loads((smoke_root / "data" / "smoke" / "manifest.json").read_text())
    assert json.loads((fresh / "manifest.json").read_text()) == first
    for shard in first["shards"]:
        assert hashlib.sha256((fresh / shard["name"]).read_bytes()).hexdigest() == shard["sha256"]
    stamp = (fresh / "manifest.json").stat().st_mtime_ns
    corpus.prepare_smoke()
    assert (fresh / "manifest.json").stat().st_mtime_ns == stamp
    (fresh.parent / ".smoke.tmp-999999999").mkdir()  # what builds killed mid-way leave
    (fresh.parent / ".smoke-docs.x1y2.tmp-999999999").mkdir()
    (fresh.parent / ".smoke-docs.x1y2.tmp-999999999" / "docs.json").write_text("[]")
    corpus.prepare_smoke(force=True)
    assert (fresh / "manifest.json").stat().st_mtime_ns != stamp
    assert not [p for p in fresh.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_changed_shard_content_changes_the_fingerprint_and_a_damaged_smoke_corpus_rebuilds(smoke_root, tmp_path):
    shutil.copytree(smoke_root / "data", tmp_path / "data")
    fingerprint = dataset.get_source("smoke", root=tmp_path).fingerprint()
    shard = tmp_path / "data" / "smoke" / "shard_00001.parquet"
    good = shard.read_bytes()
    shard.write_bytes(good[:100] + bytes(255 - b for b in good[100:200]) + good[200:])  # same name, same size
    assert dataset.get_source("smoke", root=tmp_path).fingerprint() != fingerprint
    corpus.prepare_smoke(root=tmp_path)  # no longer what its manifest says: rebuilt
    assert shard.read_bytes() == good
    assert dataset.get_source("smoke", root=tmp_path).fingerprint() == fingerprint


def test_smoke_corpus_is_real_prose_with_a_held_out_last_shard(smoke_root):
    src = dataset.get_source("smoke", root=smoke_root)
    manifest = json.loads((src.dir / "manifest.json").read_text())
    assert src.split_indices("val") == [src.num_shards() - 1] and len(src.split_indices("train")) >= 3
    assert manifest["chars"] > 1_000_000
    assert 0.05 <= manifest["shards"][-1]["docs"] / manifest["docs"] <= 0.11
    train, val = list(dataset.iter_texts(src, "train")), list(dataset.iter_texts(src, "val"))
    assert len(train) + len(val) == manifest["docs"] == len(set(train) | set(val))
    assert min(map(len, train)) >= corpus.MIN_DOCSTRING_CHARS
    assert any(t.startswith("Serialize ``obj`` to a JSON formatted ``str``") for t in train + val)  # json.dumps
    assert any(t.startswith('The "if" statement\n***') for t in train + val)  # a pydoc topic


def test_iter_texts_stops_at_max_chars(smoke_root):
    texts = list(dataset.iter_texts(dataset.get_source("smoke", root=smoke_root), "train", max_chars=5000))
    assert sum(map(len, texts)) >= 5000 > sum(map(len, texts[:-1]))


def test_corrupt_local_parquet_is_a_one_line_error_naming_the_file(tmp_path):
    (tmp_path / "a.parquet").write_bytes(_shard_bytes(0))
    (tmp_path / "b.parquet").write_bytes(b"not a parquet file at all")
    src = dataset.get_source(f"dir:{tmp_path}", root=tmp_path / "home")
    assert src.local_path(0).name == "a.parquet"
    with pytest.raises(MlxchatError) as excinfo:
        src.local_path(1)
    _one_line_error(excinfo, str(tmp_path / "b.parquet"), "replace or remove")
    with pytest.raises(MlxchatError, match="b.parquet"):
        list(dataset.iter_texts(src, "val"))


def test_text_directory_is_converted_once_and_rebuilt_when_it_changes(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "MAX_DOC_CHARS", 100)
    notes = tmp_path / "notes"
    (notes / "sub").mkdir(parents=True)
    docs = {f"n{k}.txt": f"note number {k}" for k in range(8)}
    for name, text in docs.items():
        (notes / name).write_text(text)
    (notes / "sub" / "long.md").write_text("\n\n".join(f"paragraph {k} " + "x" * 30 for k in range(4)))
    src = dataset.get_source(f"dir:{notes}", root=tmp_path / "home")
    texts = list(dataset.iter_texts(src, "train")) + list(dataset.iter_texts(src, "val"))
    assert set(docs.values()) <= set(texts) and len(texts) == len(docs) + 2  # the long file: two sections
    manifest, fingerprint = src.dir / "manifest.json", src.fingerprint()
    stamp = manifest.stat().st_mtime_ns
    assert dataset.get_source(f"dir:{notes}", root=tmp_path / "home").fingerprint() == fingerprint
    assert manifest.stat().st_mtime_ns == stamp
    (notes / "n0.txt").write_text("an edited note")
    assert dataset.get_source(f"dir:{notes}", root=tmp_path / "home").fingerprint() != fingerprint
    assert "an edited note" in dataset.iter_texts(src, "train") or "an edited note" in dataset.iter_texts(src, "val")
