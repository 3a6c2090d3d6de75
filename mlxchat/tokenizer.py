"""The BPE tokenizer: rustbpe trains it, tiktoken encodes with it, as in nanochat.

rustbpe is a small, fast trainer that returns GPT-4-style mergeable ranks; tiktoken is the
fastest encoder for exactly that format. The trained tokenizer *is* a `tiktoken.Encoding`,
pickled as `tokenizer.pkl` byte-for-byte the way nanochat writes it, so tokenizers move
between nanochat and mlxchat in both directions.

Chat rendering lives here too because the loss mask (which tokens the assistant is trained
to produce) is defined token by token, by the same special tokens.
"""

from __future__ import annotations

import copy
import io
import pickle
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import tiktoken

from .common import MlxchatError, atomic_path, atomic_write_bytes, atomic_write_json, get_logger

SPECIAL_TOKENS = [
    "<|bos|>",  # starts every document; the document delimiter in pretraining
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",  # the assistant calls the python (calculator) tool
    "<|python_end|>",
    "<|output_start|>",  # the tool's output, written back into the assistant's turn
    "<|output_end|>",
]

# GPT-4's split pattern, except numbers split into runs of at most 2 digits (GPT-4: 3), as
# nanochat does, so that small vocabularies spend fewer merges on numbers.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)

MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
PICKLE_NAME = "tokenizer.pkl"
TOKEN_BYTES_NAME = "token_bytes.npy"


class _PickledEncoding:
    """Stands in for `tiktoken.core.Encoding` while unpickling and only records its state.

    A pickle can run arbitrary code, and tokenizer files do get downloaded (nanochat runs
    on the hub). Building the Encoding from the recorded state ourselves means loading a
    tokenizer.pkl executes nothing from it.
    """

    def __setstate__(self, state: object) -> None:
        self.state = state


class _EncodingUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) == ("tiktoken.core", "Encoding"):
            return _PickledEncoding
        raise pickle.UnpicklingError(f"unexpected object {module}.{name} (only a tiktoken Encoding is allowed)")


def _unpickle_encoding(data: bytes) -> tiktoken.Encoding:
    obj = _EncodingUnpickler(io.BytesIO(data)).load()
    state = getattr(obj, "state", None)
    keys = ("name", "pat_str", "mergeable_ranks", "special_tokens")
    if not isinstance(state, dict) or any(k not in state for k in keys):
        raise pickle.UnpicklingError("not a pickled custom tiktoken Encoding")
    return tiktoken.Encoding(**{k: state[k] for k in keys})


class Tokenizer:
    """A tiktoken Encoding plus nanochat's special tokens and chat rendering.

    `enc` is public so that interop code (exporting to other formats) can read the ranks.
    """

    def __init__(self, enc: tiktoken.Encoding, source: str = "tokenizer"):
        missing = [s for s in SPECIAL_TOKENS if s not in enc.special_tokens_set]
        if missing:
            raise MlxchatError(f"{source} lacks the special tokens {missing}; it is not a nanochat/mlxchat tokenizer")
        self.enc = enc
        self._special = {s: enc.encode_single_token(s) for s in SPECIAL_TOKENS}
        self.vocab_size: int = enc.n_vocab
        self.bos_id: int = self._special["<|bos|>"]

    # -- training, saving, loading -------------------------------------------------------

    @classmethod
    def train_from_iterator(cls, texts: Iterable[str], vocab_size: int) -> "Tokenizer":
        """Train the merges with rustbpe and put the special tokens right after them.

        rustbpe stops early when the corpus has no pair left to merge, so on a tiny corpus
        the result's `vocab_size` is smaller than asked; the special tokens still take the
        last ids, which is what nanochat does and what a nanochat checkpoint expects.
        """
        import rustbpe

        _check_vocab_size(vocab_size)
        counted = _CountingIterator(texts)
        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(counted, vocab_size - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
        if counted.chars == 0:
            raise MlxchatError(
                f"no training text: the text iterator yielded {counted.docs} documents and 0 characters"
            )
        mergeable_ranks = {bytes(k): v for k, v in trainer.get_mergeable_ranks()}
        offset = len(mergeable_ranks)
        enc = tiktoken.Encoding(
            name="rustbpe",
            pat_str=trainer.get_pattern(),
            mergeable_ranks=mergeable_ranks,
            special_tokens={name: offset + i for i, name in enumerate(SPECIAL_TOKENS)},
        )
        return cls(enc)

    @classmethod
    def load(cls, directory: Path) -> "Tokenizer":
        """Read `<directory>/tokenizer.pkl` (ours or nanochat's: the same pickled Encoding)."""
        path = Path(directory) / PICKLE_NAME
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise MlxchatError(
                f"no tokenizer at {path}; run: mlxchat tokenizer train --run {_run_name(path)}"
            ) from None
        except OSError as e:
            raise MlxchatError(f"cannot read tokenizer {path}: {e.strerror}") from None
        try:
            enc = _unpickle_encoding(data)
        except Exception as e:  # any malformed pickle: truncated, foreign object, bad ranks
            raise MlxchatError(
                f"tokenizer {path} is corrupt ({type(e).__name__}: {e}); delete it and retrain the tokenizer"
            ) from None
        return cls(enc, source=str(path))

    def save(self, directory: Path) -> None:
        """Write tokenizer.pkl and token_bytes.npy, each atomically (never half-written).

        The pickle uses pickle's default protocol, as nanochat does, so nanochat loads it too.
        """
        directory = Path(directory)
        with atomic_path(directory / TOKEN_BYTES_NAME) as tmp:
            with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to a name
                np.save(f, self.token_bytes())
        atomic_write_bytes(directory / PICKLE_NAME, pickle.dumps(self.enc))

    # -- encoding ------------------------------------------------------------------------

    def encode_special(self, name: str) -> int:
        try:
            return self._special[name]
        except KeyError:
            raise MlxchatError(f"unknown special token {name!r}; known: {', '.join(SPECIAL_TOKENS)}") from None

    def encode(
        self,
        text: str | list[str],
        prepend: int | str | None = None,
        append: int | str | None = None,
        num_threads: int = 8,
    ) -> list[int] | list[list[int]]:
        """Encode text as ordinary text: a string that looks like a special token is not one.

        Special tokens enter only through `prepend`/`append` (an id or a special token's
        name) or chat rendering, so no document can forge a turn boundary. A list is
        encoded in parallel by tiktoken's batch encoder.
        """
        prefix = [] if prepend is None else [self._token_id(prepend)]
        suffix = [] if append is None else [self._token_id(append)]
        if isinstance(text, str):
            return prefix + self.enc.encode_ordinary(text) + suffix
        if isinstance(text, list):
            rows = self.enc.encode_ordinary_batch(text, num_threads=num_threads)
            return [prefix + row + suffix for row in rows] if prefix or suffix else rows
        raise TypeError(f"encode takes a str or a list of str, not {type(text).__name__}")

    def _token_id(self, token: int | str) -> int:
        return token if isinstance(token, int) else self.encode_special(token)

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode(ids)

    def token_bytes(self) -> np.ndarray:
        """Bytes of text each token id stands for (int32, one per id); 0 for special tokens.

        Bits-per-byte divides the summed loss by the bytes the tokens cover, so the count
        must come from the raw token bytes: decoding a token that holds part of a UTF-8
        character to str would count a 3-byte replacement character instead.
        """
        out = np.zeros(self.vocab_size, dtype=np.int32)
        specials = set(self._special.values())
        for i in range(self.vocab_size):
            if i not in specials:
                out[i] = len(self.enc.decode_single_token_bytes(i))
        return out

    # -- chat ----------------------------------------------------------------------------

    def render_conversation(self, conversation: dict, max_tokens: int = 2048) -> tuple[list[int], list[int]]:
        """Token ids of a conversation and the loss mask (1 where the assistant is trained).

        The mask is 1 on what the model must produce: the assistant's text, its python tool
        calls (with their delimiters) and <|assistant_end|> (so it learns to stop). It is 0
        on everything it is given: <|bos|>, user turns, <|assistant_start|>, and tool output,
        which at inference time comes from the tool, not the model. A leading system message
        is merged into the first user message (there is no system token). Output is cut to
        `max_tokens` to bound memory.
        """
        messages = _chat_messages(conversation)
        ids: list[int] = []
        mask: list[int] = []

        def add(tokens: int | list[int], trained: int) -> None:
            tokens = [tokens] if isinstance(tokens, int) else tokens
            ids.extend(tokens)
            mask.extend([trained] * len(tokens))

        sp = self._special
        add(self.bos_id, 0)
        for i, message in enumerate(messages):
            content = message.get("content")
            if message["role"] == "user":
                if not isinstance(content, str):
                    raise MlxchatError(f"message {i}: user content must be a string, got {type(content).__name__}")
                add(sp["<|user_start|>"], 0)
                add(self.encode(content), 0)
                add(sp["<|user_end|>"], 0)
                continue
            add(sp["<|assistant_start|>"], 0)
            if isinstance(content, str):
                add(self.encode(content), 1)
            elif isinstance(content, list):
                for part in content:
                    kind = part.get("type") if isinstance(part, dict) else None
                    text = part.get("text") if isinstance(part, dict) else None
                    if not isinstance(text, str):
                        raise MlxchatError(f"message {i}: every assistant part needs a string 'text', got {part!r:.80}")
                    if kind == "text":
                        add(self.encode(text), 1)
                    elif kind == "python":
                        add(sp["<|python_start|>"], 1)
                        add(self.encode(text), 1)
                        add(sp["<|python_end|>"], 1)
                    elif kind == "python_output":
                        add(sp["<|output_start|>"], 0)
                        add(self.encode(text), 0)
                        add(sp["<|output_end|>"], 0)
                    else:
                        raise MlxchatError(
                            f"message {i}: unknown part type {kind!r} (expected text, python or python_output)"
                        )
            else:
                raise MlxchatError(
                    f"message {i}: assistant content must be a string or a list of parts, got {type(content).__name__}"
                )
            add(sp["<|assistant_end|>"], 1)
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation: dict) -> list[int]:
        """The prompt that asks for the last assistant message: the conversation without it,
        then <|assistant_start|>. Used to sample an answer to compare with the reference."""
        messages = conversation.get("messages") if isinstance(conversation, dict) else None
        if not messages or not isinstance(messages[-1], dict) or messages[-1].get("role") != "assistant":
            raise MlxchatError("render_for_completion needs a conversation whose last message is from the assistant")
        ids, _ = self.render_conversation({**conversation, "messages": messages[:-1]})
        return ids + [self._special["<|assistant_start|>"]]


def _check_vocab_size(vocab_size: object) -> None:
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool):
        raise MlxchatError(f"vocab_size must be an integer, got {vocab_size!r}")
    if vocab_size < MIN_VOCAB_SIZE:
        raise MlxchatError(
            f"vocab_size {vocab_size} is too small: it needs 256 byte tokens + {len(SPECIAL_TOKENS)} special "
            f"tokens, at least {MIN_VOCAB_SIZE}"
        )


class _CountingIterator:
    """Passes texts through to rustbpe while counting them and checking they are strings,
    so an empty corpus or a wrong element type is a clear error, not a silent 256-token
    tokenizer (rustbpe accepts an empty iterator) or a Rust type error."""

    def __init__(self, texts: Iterable[str]):
        self._texts = iter(texts)
        self.docs = 0
        self.chars = 0

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        text = next(self._texts)
        if not isinstance(text, str):
            raise MlxchatError(f"training texts must be strings; document {self.docs} is a {type(text).__name__}")
        self.docs += 1
        self.chars += len(text)
        return text


def _chat_messages(conversation: dict) -> list[dict]:
    """The messages to render: system merged into the first user message, roles checked.

    Conversations come from datasets, so a malformed one is a user error naming the fault.
    """
    messages = conversation.get("messages") if isinstance(conversation, dict) else None
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise MlxchatError("a conversation must be a dict with a non-empty list of message dicts under 'messages'")
    if messages[0].get("role") == "system":
        if len(messages) < 2 or messages[1].get("role") != "user":
            raise MlxchatError("a system message must be followed by a user message")
        if not isinstance(messages[0].get("content"), str) or not isinstance(messages[1].get("content"), str):
            raise MlxchatError("a system message and the user message after it must be strings")
        merged = copy.deepcopy(messages[1])  # never mutate the caller's conversation
        merged["content"] = messages[0]["content"] + "\n\n" + messages[1]["content"]
        messages = [merged] + messages[2:]
    for i, message in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if message.get("role") != expected:
            raise MlxchatError(
                f"message {i} is from {message.get('role')!r} but should be from {expected!r} "
                "(conversations alternate user, assistant, ...; an optional system message comes first)"
            )
    return messages


def tokenizer_fingerprint(directory: Path) -> str:
    """The content digest of `<directory>/tokenizer.pkl`: what a model trained with it records."""
    from mlxchat.common import sha256_file

    path = Path(directory) / PICKLE_NAME
    if not path.exists():
        raise MlxchatError(f"no tokenizer at {path}; run: mlxchat tokenizer train --run {_run_name(path)}")
    return sha256_file(path)[:16]


def _run_name(pickle_path: Path) -> str:
    """The run a tokenizer path belongs to (`runs/<run>/tokenizer/tokenizer.pkl`), for hints."""
    parts = pickle_path.resolve().parts
    return parts[-3] if len(parts) >= 4 and parts[-4] == "runs" else "<run>"


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    out_dir: Path,
    max_chars: int = 10**10,
    doc_cap: int = 10_000,
) -> dict:
    """Train on a corpus the way nanochat's tok_train does, save into `out_dir`, report.

    Each document is cropped to `doc_cap` characters (a few huge documents must not
    dominate the pair counts) and training stops once more than `max_chars` characters were
    read. The metrics are returned and written to `out_dir/meta.json`; vocab_size there is
    the size reached, which on a tiny corpus can be below the requested one.
    """
    _check_vocab_size(vocab_size)
    for name, value in (("max_chars", max_chars), ("doc_cap", doc_cap)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise MlxchatError(f"{name} must be a positive integer, got {value!r}")
    counts = {"docs": 0, "chars": 0}

    def cropped() -> Iterator[str]:
        for doc in texts:
            if not isinstance(doc, str):
                raise MlxchatError(
                    f"training texts must be strings; document {counts['docs']} is a {type(doc).__name__}"
                )
            doc = doc[:doc_cap]
            counts["docs"] += 1
            counts["chars"] += len(doc)
            yield doc
            if counts["chars"] > max_chars:
                return

    t0 = time.perf_counter()
    tok = Tokenizer.train_from_iterator(cropped(), vocab_size)
    train_time = time.perf_counter() - t0
    tok.save(out_dir)

    tb = tok.token_bytes()
    nonzero = tb[tb > 0].astype(np.float64)
    metrics = {
        "train_time_s": round(train_time, 3),
        "docs": counts["docs"],
        "chars": counts["chars"],
        "max_chars": max_chars,
        "doc_cap": doc_cap,
        "requested_vocab_size": vocab_size,
        "vocab_size": tok.vocab_size,
        "num_special_tokens": len(SPECIAL_TOKENS),
        "token_bytes_min": int(nonzero.min()),
        "token_bytes_max": int(nonzero.max()),
        "token_bytes_mean": float(nonzero.mean()),
        "token_bytes_std": float(nonzero.std(ddof=1)),  # sample std, as nanochat's torch .std()
    }
    atomic_write_json(Path(out_dir) / "meta.json", metrics)
    log = get_logger()
    if tok.vocab_size < vocab_size:
        log.warning(
            "tokenizer reached vocab size %d of the %d requested: the corpus (%d chars) ran out of pairs to merge",
            tok.vocab_size, vocab_size, counts["chars"],
        )
    log.info(
        "trained tokenizer: vocab %d on %d chars in %.1fs -> %s", tok.vocab_size, counts["chars"], train_time, out_dir
    )
    return metrics


def evaluate_tokenizer(tok: Tokenizer, texts: dict[str, str]) -> dict:
    """Compression per named text, as nanochat's tok_eval: bytes, tokens, bytes per token.

    Also whether decode(encode(text)) gives the text back: a tokenizer that loses text
    would corrupt every stage after it, so the caller can fail on `roundtrip: false`.
    """
    results = {}
    for name, text in texts.items():
        if not isinstance(text, str) or not text:
            raise MlxchatError(f"evaluation text {name!r} is empty or not a string")
        ids = tok.encode(text)
        n_bytes = len(text.encode("utf-8"))
        results[name] = {
            "bytes": n_bytes,
            "tokens": len(ids),
            "ratio": n_bytes / len(ids),
            "roundtrip": tok.decode(ids) == text,
        }
    return results
