"""Conversation batches for mid-training (packed) and SFT (padded, masked), and their exact resume."""

import mlx.core as mx
import numpy as np
import pytest

from mlxchat.chatloader import PackedConversations, PaddedConversations, epoch_tokens, padded_width
from mlxchat.common import MlxchatError
from mlxchat.tokenizer import Tokenizer

CONVERSATIONS = [
    {"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                  {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]}
    for i in range(23)
]


@pytest.fixture(scope="module")
def tok():
    text = " ".join(f"What is {i} plus {i}? {i} plus {i} is {2 * i}." for i in range(50))
    return Tokenizer.train_from_iterator([text] * 3, 300)


def _stream(tok):
    return [t for c in CONVERSATIONS for t in tok.render_conversation(c)[0]]


def test_packed_batches_are_the_rendered_stream_in_order_and_wrap_around(tok):
    stream = _stream(tok)
    loader = PackedConversations(CONVERSATIONS, tok, batch_size=2, seq_len=16)
    expected = stream * 4
    pos = 0
    for _ in range(len(stream) // 33 + 3):  # more than one epoch
        x, y = next(loader)
        flat = np.array(expected[pos : pos + 33])
        assert np.array_equal(np.array(x).ravel(), flat[:-1]) and np.array_equal(np.array(y).ravel(), flat[1:])
        pos += 33
    assert loader.epoch >= 1
    assert epoch_tokens(CONVERSATIONS, tok) == len(stream)


def test_packed_loader_resumes_exactly_from_its_state(tok):
    a = PackedConversations(CONVERSATIONS, tok, batch_size=2, seq_len=16)
    for _ in range(5):
        next(a)
    b = PackedConversations(CONVERSATIONS, tok, batch_size=2, seq_len=16, state=a.state_dict())
    for _ in range(8):
        (xa, ya), (xb, yb) = next(a), next(b)
        assert mx.array_equal(xa, xb) and mx.array_equal(ya, yb)


def test_padded_widths_are_few_and_at_most_half_again_the_longest_row():
    widths = {padded_width(n, 2048) for n in range(1, 2049)}
    assert sorted(widths) == [64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048]
    for n in range(1, 2049):
        assert n <= padded_width(n, 2048) <= max(64, 1.5 * n)
    assert padded_width(300, 256) == 256  # never past seq_len


def test_padded_rows_train_only_assistant_tokens_and_pad_to_a_bucket_width(tok):
    loader = PaddedConversations(CONVERSATIONS, tok, batch_size=3, seq_len=256)
    x, y = next(loader)
    longest = max(len(tok.render_conversation(c)[0]) for c in CONVERSATIONS[:3]) - 1
    assert x.shape[1] == padded_width(longest, 256) and x.shape == y.shape
    pad = tok.encode_special("<|assistant_end|>")
    for row, conversation in enumerate(CONVERSATIONS[:3]):
        ids, mask = tok.render_conversation(conversation)
        n = len(ids) - 1
        assert np.array(x[row, :n]).tolist() == ids[:-1]
        assert set(np.array(x[row, n:]).tolist()) <= {pad}
        targets = np.array(y[row]).tolist()
        assert targets[:n] == [t if m else -1 for t, m in zip(ids[1:], mask[1:])]
        assert set(targets[n:]) <= {-1}
        answer = tok.encode(conversation["messages"][1]["content"])
        trained = [t for t in targets if t >= 0]
        assert trained == answer + [pad]  # the answer and <|assistant_end|>, nothing from the user


def test_padded_loader_resumes_exactly(tok):
    a = PaddedConversations(CONVERSATIONS, tok, batch_size=4, seq_len=64)
    for _ in range(7):  # wraps past the 23 conversations
        next(a)
    b = PaddedConversations(CONVERSATIONS, tok, batch_size=4, seq_len=64, state=a.state_dict())
    for _ in range(3):
        (xa, ya), (xb, yb) = next(a), next(b)
        assert mx.array_equal(xa, xb) and mx.array_equal(ya, yb)


def test_long_conversations_are_cut_to_the_context(tok):
    long = [{"messages": [{"role": "user", "content": "What is 1 plus 1? " * 40},
                          {"role": "assistant", "content": "2."}]}]
    x, y = next(PaddedConversations(long, tok, batch_size=1, seq_len=32))
    assert x.shape == (1, 32)


def test_empty_dataset_is_a_clear_error(tok):
    with pytest.raises(MlxchatError, match="dataset is empty"):
        PackedConversations([], tok, batch_size=1, seq_len=8)
