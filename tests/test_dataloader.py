"""The loader streams BOS-prefixed documents and resumes on exactly the next token."""

import numpy as np
import pytest

from mlxchat.common import MlxchatError
from mlxchat.dataloader import DataLoader
from mlxchat.dataset import get_source
from mlxchat.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(smoke_root):
    from mlxchat.dataset import iter_texts

    return Tokenizer.train_from_iterator(iter_texts(get_source("smoke", root=smoke_root), "train", max_chars=300_000), 512)


def _take(loader, n):
    return [tuple(np.array(a) for a in next(loader)) for _ in range(n)]


def test_batches_are_shifted_windows_starting_with_bos(smoke_root, tok):
    loader = DataLoader(get_source("smoke", root=smoke_root), tok, 2, 16, "train")
    x, y = next(loader)
    assert x.shape == (2, 16) and y.shape == (2, 16)
    assert x[0, 0].item() == tok.bos_id
    np.testing.assert_array_equal(np.array(x).reshape(-1)[1:], np.array(y).reshape(-1)[:-1])


def test_resume_from_state_dict_continues_with_the_same_tokens(smoke_root, tok):
    src = get_source("smoke", root=smoke_root)
    uninterrupted = DataLoader(src, tok, 4, 64, "train")
    expected = _take(uninterrupted, 30)
    first = DataLoader(src, tok, 4, 64, "train")
    _take(first, 13)
    state = first.state_dict()
    resumed = DataLoader(src, tok, 4, 64, "train", state=state)
    for (ex, ey), (gx, gy) in zip(expected[13:], _take(resumed, 17)):
        np.testing.assert_array_equal(ex, gx)
        np.testing.assert_array_equal(ey, gy)


def test_val_split_loops_over_its_single_shard(smoke_root, tok):
    loader = DataLoader(get_source("smoke", root=smoke_root), tok, 8, 256, "val")
    _take(loader, 40)  # more tokens than the validation shard holds: it loops instead of ending
    assert loader.state_dict()["cursor"][0] >= 1


def test_unreadable_shard_is_a_one_line_error(tmp_path, tok):
    (tmp_path / "corpus").mkdir()
    for i in range(2):
        (tmp_path / "corpus" / f"shard_{i:05d}.parquet").write_bytes(b"not parquet")
    with pytest.raises(MlxchatError, match="shard_00000.parquet"):
        next(DataLoader(get_source(f"dir:{tmp_path / 'corpus'}", root=tmp_path), tok, 1, 8, "train"))
