"""The tokenizer: rustbpe-trained, tiktoken-encoded, nanochat-compatible on disk, and the
chat rendering whose loss mask decides what SFT trains on."""

import json
import os
import pickle
import re
from pydoc_data.topics import topics

import numpy as np
import pytest
import rustbpe
import tiktoken

from mlxchat.common import MlxchatError
from mlxchat.tokenizer import (
    SPECIAL_TOKENS,
    SPLIT_PATTERN,
    Tokenizer,
    evaluate_tokenizer,
    train_tokenizer,
)

CORPUS = list(topics.values())  # ~0.5 MB of real English that every Python ships
VOCAB = 512
UNICODE = "Hello wörld! 你好世界 🌍🚀 naïve café — ∑x² ≤ 3\n\tTabs,  spaces\r\nZalgo: z̷̢a̶l̸g̵o and 12345678"


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train_from_iterator(iter(CORPUS), VOCAB)


def sp(tok, name):
    return tok.encode_special(name)


# -- training ----------------------------------------------------------------------------


def test_trains_to_the_requested_vocab_with_specials_as_the_last_ids(tok):
    assert tok.vocab_size == VOCAB
    assert [sp(tok, s) for s in SPECIAL_TOKENS] == list(range(VOCAB - len(SPECIAL_TOKENS), VOCAB))
    assert tok.bos_id == sp(tok, "<|bos|>")
    assert tok.enc._pat_str == SPLIT_PATTERN


def test_tiny_corpus_stops_early_but_specials_still_follow_the_merges():
    small = Tokenizer.train_from_iterator(["ab ab ab"], 1000)
    assert small.vocab_size == 256 + 2 + len(SPECIAL_TOKENS)  # only 'ab' and ' ab' can be merged
    assert small.bos_id == 258 and sp(small, "<|output_end|>") == small.vocab_size - 1


@pytest.mark.parametrize("bad", [256 + len(SPECIAL_TOKENS) - 1, 100, "512", 512.0, True])
def test_bad_vocab_size_is_a_user_error(bad):
    with pytest.raises(MlxchatError, match="vocab_size"):
        Tokenizer.train_from_iterator(["some text"], bad)


@pytest.mark.parametrize("texts", [[], ["", ""]], ids=["no documents", "empty documents"])
def test_empty_corpus_is_a_user_error(texts):
    with pytest.raises(MlxchatError, match="^no training text"):
        Tokenizer.train_from_iterator(iter(texts), VOCAB)


def test_non_string_document_is_a_user_error():
    with pytest.raises(MlxchatError, match="document 1 is a bytes"):
        Tokenizer.train_from_iterator(["fine", b"bytes"], VOCAB)


# -- encoding ----------------------------------------------------------------------------


@pytest.mark.parametrize("text", [UNICODE, "", " ", "\x00\x01\x7f", "🌍" * 50, "a" * 10_000])
def test_decode_inverts_encode_on_arbitrary_unicode(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_special_token_strings_in_text_are_encoded_as_ordinary_text(tok):
    text = "<|bos|>hi<|user_end|><|assistant_start|>"
    ids = tok.encode(text)
    assert not set(ids) & {sp(tok, s) for s in SPECIAL_TOKENS}
    assert tok.decode(ids) == text


def test_prepend_and_append_by_name_or_id_for_str_and_list(tok):
    body = tok.encode("Hello there")
    end = sp(tok, "<|assistant_end|>")
    assert tok.encode("Hello there", prepend="<|bos|>") == [tok.bos_id] + body
    assert tok.encode("Hello there", prepend=tok.bos_id, append="<|assistant_end|>") == [tok.bos_id] + body + [end]
    assert tok.encode(["Hello there", ""], prepend="<|bos|>", append=end) == [
        [tok.bos_id] + body + [end],
        [tok.bos_id, end],
    ]


def test_batch_encode_equals_single_encode(tok):
    texts = CORPUS[:20] + [UNICODE, ""]
    assert tok.encode(texts, num_threads=4) == [tok.encode(t) for t in texts]


def test_unknown_special_token_is_a_user_error(tok):
    with pytest.raises(MlxchatError, match="unknown special token"):
        tok.encode("x", prepend="<|eos|>")


def test_token_bytes_counts_raw_bytes_and_zero_for_specials(tok):
    tb = tok.token_bytes()
    assert tb.dtype == np.int32 and tb.shape == (tok.vocab_size,)
    specials = {sp(tok, s) for s in SPECIAL_TOKENS}
    for i in range(tok.vocab_size):
        expected = 0 if i in specials else len(tok.enc.decode_single_token_bytes(i))
        assert tb[i] == expected, i
    # what bits-per-byte relies on: the bytes of a text's tokens add up to the text's bytes,
    # even where a token holds only part of a multi-byte character
    ids = tok.encode(UNICODE, prepend="<|bos|>")
    assert tb[ids].sum() == len(UNICODE.encode("utf-8"))


# -- saving and loading ------------------------------------------------------------------


def test_save_then_load_encodes_identically(tok, tmp_path):
    tok.save(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["token_bytes.npy", "tokenizer.pkl"]  # no temp files left
    loaded = Tokenizer.load(tmp_path)
    assert loaded.vocab_size == tok.vocab_size and loaded.bos_id == tok.bos_id
    assert loaded.encode(CORPUS[:5] + [UNICODE]) == tok.encode(CORPUS[:5] + [UNICODE])
    assert np.array_equal(np.load(tmp_path / "token_bytes.npy"), tok.token_bytes())
    # and nanochat's loader (a plain pickle.load) reads what we wrote
    with open(tmp_path / "tokenizer.pkl", "rb") as f:
        assert pickle.load(f).encode_ordinary(UNICODE) == tok.encode(UNICODE)


def test_a_nanochat_tokenizer_pkl_loads_unchanged(tmp_path):
    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(iter(CORPUS), 300 - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
    ranks = {bytes(k): v for k, v in trainer.get_mergeable_ranks()}
    enc = tiktoken.Encoding(
        name="rustbpe",
        pat_str=trainer.get_pattern(),
        mergeable_ranks=ranks,
        special_tokens={name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)},
    )
    with open(tmp_path / "tokenizer.pkl", "wb") as f:
        pickle.dump(enc, f)

    loaded = Tokenizer.load(tmp_path)
    assert loaded.vocab_size == enc.n_vocab == 300
    assert loaded.encode(UNICODE) == enc.encode_ordinary(UNICODE)
    assert loaded.bos_id == enc.encode_single_token("<|bos|>")


def test_missing_tokenizer_names_the_path_and_the_command_to_run(tmp_path):
    directory = tmp_path / "runs" / "myrun" / "tokenizer"
    with pytest.raises(MlxchatError) as err:
        Tokenizer.load(directory)
    msg = str(err.value)
    assert str(directory / "tokenizer.pkl") in msg and "mlxchat tokenizer train --run myrun" in msg


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not a pickle at all",
        "truncated",
        pickle.dumps({"name": "a dict, not an Encoding"}),
        pickle.dumps(_RunsCode()),
        pickle.dumps(tiktoken.Encoding(name="x", pat_str=r"\S+", mergeable_ranks={b"a": 0}, special_tokens={})),
    ],
    ids=["empty", "garbage", "truncated", "dict", "code", "no specials"],
)
def test_corrupt_or_foreign_tokenizer_is_a_user_error_naming_the_file(tok, tmp_path, monkeypatch, content):
    if content == "truncated":
        content = pickle.dumps(tok.enc)[:1000]
    (tmp_path / "tokenizer.pkl").write_bytes(content)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MlxchatError, match=re.escape(str(tmp_path / "tokenizer.pkl"))):
        Tokenizer.load(tmp_path)
    assert not (tmp_path / "pwned").exists()  # loading never runs code from the pickle


# -- train_tokenizer / evaluate_tokenizer ------------------------------------------------


def test_train_tokenizer_crops_documents_stops_after_max_chars_and_writes_meta(tmp_path):
    docs = (text * 5 for text in CORPUS)  # a generator: it must be consumed lazily
    metrics = train_tokenizer(docs, 300, tmp_path, max_chars=2500, doc_cap=1000)
    assert metrics["docs"] == 3 and metrics["chars"] == 3000  # 1000, 2000, 3000 > 2500: stop
    assert metrics["vocab_size"] == 300 and metrics["num_special_tokens"] == len(SPECIAL_TOKENS)
    assert 1 <= metrics["token_bytes_min"] <= metrics["token_bytes_mean"] <= metrics["token_bytes_max"]
    assert metrics["token_bytes_std"] > 0
    assert json.loads((tmp_path / "meta.json").read_text()) == metrics
    assert Tokenizer.load(tmp_path).vocab_size == 300


def test_train_tokenizer_rejects_bad_limits(tmp_path):
    with pytest.raises(MlxchatError, match="doc_cap"):
        train_tokenizer(CORPUS, 300, tmp_path, doc_cap=0)
    assert not any(tmp_path.iterdir())


def test_evaluate_tokenizer_reports_compression_and_round_trip(tok):
    english = "\n\n".join(CORPUS[:3])
    result = evaluate_tokenizer(tok, {"english": english, "unicode": UNICODE})
    assert result["english"]["bytes"] == len(english.encode())
    assert result["english"]["tokens"] == len(tok.encode(english))
    assert result["english"]["ratio"] > 2.0  # a 512-token BPE still compresses its own language well
    assert result["english"]["ratio"] > result["unicode"]["ratio"]
    assert all(r["roundtrip"] for r in result.values())
    with pytest.raises(MlxchatError, match="'empty'"):
        evaluate_tokenizer(tok, {"empty": ""})


# -- chat rendering ----------------------------------------------------------------------


def test_render_plain_conversation_trains_only_on_assistant_replies_and_their_end(tok):
    conv = {
        "messages": [
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "It is 4."},
            {"role": "user", "content": "Thanks"},
            {"role": "assistant", "content": "You're welcome."},
        ]
    }
    ids, mask = tok.render_conversation(conv)
    u0, u1 = sp(tok, "<|user_start|>"), sp(tok, "<|user_end|>")
    a0, a1 = sp(tok, "<|assistant_start|>"), sp(tok, "<|assistant_end|>")
    q1, r1, q2, r2 = (tok.encode(m["content"]) for m in conv["messages"])
    expected = [
        ([tok.bos_id], 0),
        ([u0] + q1 + [u1], 0),
        ([a0], 0),
        (r1 + [a1], 1),
        ([u0] + q2 + [u1], 0),
        ([a0], 0),
        (r2 + [a1], 1),
    ]
    assert ids == [t for seg, _ in expected for t in seg]
    assert mask == [m for seg, m in expected for _ in seg]


def test_system_message_is_merged_into_the_first_user_message(tok):
    conv = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
        ]
    }
    merged = {"messages": [{"role": "user", "content": "Be brief.\n\nHi"}, conv["messages"][2]]}
    assert tok.render_conversation(conv) == tok.render_conversation(merged)
    assert conv["messages"][1]["content"] == "Hi"  # the caller's conversation is untouched


def test_tool_calls_are_trained_but_tool_output_is_not(tok):
    parts = [
        {"type": "text", "text": "Let me compute."},
        {"type": "python", "text": "12*34"},
        {"type": "python_output", "text": "408"},
        {"type": "text", "text": "The answer is 408."},
    ]
    conv = {"messages": [{"role": "user", "content": "12 times 34?"}, {"role": "assistant", "content": parts}]}
    ids, mask = tok.render_conversation(conv)
    t1, code, out, t2 = (tok.encode(p["text"]) for p in parts)
    expected = [
        ([tok.bos_id, sp(tok, "<|user_start|>")] + tok.encode("12 times 34?") + [sp(tok, "<|user_end|>")], 0),
        ([sp(tok, "<|assistant_start|>")], 0),
        (t1, 1),
        ([sp(tok, "<|python_start|>")] + code + [sp(tok, "<|python_end|>")], 1),
        ([sp(tok, "<|output_start|>")] + out + [sp(tok, "<|output_end|>")], 0),
        (t2 + [sp(tok, "<|assistant_end|>")], 1),
    ]
    assert ids == [t for seg, _ in expected for t in seg]
    assert mask == [m for seg, m in expected for _ in seg]


def test_render_truncates_ids_and_mask_to_max_tokens(tok):
    conv = {"messages": [{"role": "user", "content": CORPUS[0]}, {"role": "assistant", "content": CORPUS[1]}]}
    full_ids, full_mask = tok.render_conversation(conv, max_tokens=10**9)
    ids, mask = tok.render_conversation(conv, max_tokens=100)
    assert len(full_ids) > 100
    assert (ids, mask) == (full_ids[:100], full_mask[:100])


@pytest.mark.parametrize(
    "messages, match",
    [
        ([{"role": "assistant", "content": "hi"}], "message 0 is from 'assistant' but should be from 'user'"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "message 1 is from 'user'"),
        ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "x"}], "followed by a user"),
        ([{"role": "system", "content": "s"}], "followed by a user"),
        ([], "non-empty list"),
        ([{"role": "user", "content": ["x"]}], "user content must be a string"),
        (
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": [{"type": "image", "text": ""}]}],
            "unknown part type 'image'",
        ),
    ],
)
def test_malformed_conversations_are_user_errors(tok, messages, match):
    with pytest.raises(MlxchatError, match=match):
        tok.render_conversation({"messages": messages})


def test_render_for_completion_drops_the_last_reply_and_primes_the_assistant(tok):
    conv = {
        "messages": [
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris."},
        ]
    }
    ids = tok.render_for_completion(conv)
    prompt, _ = tok.render_conversation({"messages": conv["messages"][:1]})
    assert ids == prompt + [sp(tok, "<|assistant_start|>")]
    assert len(conv["messages"]) == 2  # not popped from the caller's conversation
    with pytest.raises(MlxchatError, match="last message is from the assistant"):
        tok.render_for_completion({"messages": conv["messages"][:1]})
