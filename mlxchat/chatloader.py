"""Batches of conversations for mid-training and SFT, with exact resume.

Both read a conversation dataset (anything with `len()` and `[i]` giving `{"messages": ...}`,
e.g. an `mlxchat.conversations` mixture) and render each conversation with the tokenizer's chat
format. They differ as nanochat's scripts do:

- `PackedConversations` (mid_train): rendered conversations are concatenated into one token
  stream and cut into full B×T batches, every token trained, like pretraining text.
- `PaddedConversations` (chat_sft): one conversation per row, padded to the batch's longest;
  only the assistant's tokens (the render mask) are targets, the rest are -1 (ignored).

The stream does not depend on the number of ranks: data-parallel ranks take their micro-batches
of it (`distributed.RankShare`). `state_dict()` after a batch is everything needed to produce
the next one, so a checkpoint resumes the exact stream.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from mlxchat.common import MlxchatError

# SFT batches are padded to the next of a few widths, 64, 96, 128, 192, 256, … (powers of two and
# 1.5× them): the compiled training step is traced, and on a GPU its kernels are compiled, once per
# input shape. Each new width cost 18 s at d12 B32 on an H200 against a 0.03 s step
# (bench/results/gpu_loop_d12_b32_s3.json), so 11 widths up to 2,048 instead of the 32 multiples of
# 64, for at most 1.5× the longest row's length.
PAD_BASE = 64


def padded_width(longest: int, seq_len: int) -> int:
    width = PAD_BASE
    while width < longest:
        width = width * 3 // 2 if width & (width - 1) == 0 else width * 4 // 3
    return min(seq_len, width)


def _check(dataset, batch_size: int, seq_len: int) -> None:
    if len(dataset) == 0:
        raise MlxchatError("the conversation dataset is empty: check the mixture's source")
    if batch_size < 1 or seq_len < 1:
        raise MlxchatError(f"batch size and sequence length must be positive, got {batch_size} and {seq_len}")


class PackedConversations:
    """Endless B×T batches of packed conversations (nanochat's mid-training loader)."""

    def __init__(self, dataset, tokenizer, batch_size: int, seq_len: int, state: dict | None = None):
        _check(dataset, batch_size, seq_len)
        self.dataset, self.tokenizer = dataset, tokenizer
        self.batch_size, self.seq_len = batch_size, seq_len
        self.cursor = state["cursor"] if state else 0
        self.epoch = state["epoch"] if state else 0
        self.buffer: list[int] = list(state["buffer"]) if state else []

    def state_dict(self) -> dict:
        return {"cursor": self.cursor, "epoch": self.epoch, "buffer": list(self.buffer)}

    def __iter__(self) -> "PackedConversations":
        return self

    def __next__(self) -> tuple[mx.array, mx.array]:
        needed = self.batch_size * self.seq_len + 1
        while len(self.buffer) < needed:
            ids, _ = self.tokenizer.render_conversation(self.dataset[self.cursor])
            self.buffer.extend(ids)
            self.cursor += 1
            if self.cursor == len(self.dataset):
                self.cursor = 0
                self.epoch += 1
        tokens = np.array(self.buffer[:needed], dtype=np.int32)
        del self.buffer[:needed]
        shape = (self.batch_size, self.seq_len)
        return mx.array(tokens[:-1].reshape(shape)), mx.array(tokens[1:].reshape(shape))


def epoch_tokens(dataset, tokenizer) -> int:
    """Tokens in one pass over `dataset` as `PackedConversations` renders it: mid-training's
    horizon is one epoch of its mixture, known before the first step so the LR schedule and
    resume see a fixed number of steps."""
    return sum(len(tokenizer.render_conversation(dataset[i])[0]) for i in range(len(dataset)))


class PaddedConversations:
    """Endless batches of one conversation per row, targets masked to the assistant's tokens
    (nanochat's SFT loader). Conversations are cut to `seq_len + 1` tokens."""

    def __init__(self, dataset, tokenizer, batch_size: int, seq_len: int, state: dict | None = None):
        _check(dataset, batch_size, seq_len)
        self.dataset, self.tokenizer = dataset, tokenizer
        self.batch_size, self.seq_len = batch_size, seq_len
        self.position = state["position"] if state else 0
        self.pad_id = tokenizer.encode_special("<|assistant_end|>")

    def state_dict(self) -> dict:
        return {"position": self.position}

    def __iter__(self) -> "PaddedConversations":
        return self

    def __next__(self) -> tuple[mx.array, mx.array]:
        rows = []
        for _ in range(self.batch_size):
            index = self.position % len(self.dataset)
            self.position += 1
            rows.append(self.tokenizer.render_conversation(self.dataset[index], max_tokens=self.seq_len + 1))
        longest = max(len(ids) for ids, _ in rows) - 1
        width = padded_width(longest, self.seq_len)
        inputs = np.full((self.batch_size, width), self.pad_id, dtype=np.int32)
        targets = np.full((self.batch_size, width), -1, dtype=np.int32)
        for r, (ids, mask) in enumerate(rows):
            ids, mask = np.array(ids, dtype=np.int32), np.array(mask, dtype=bool)
            n = len(ids) - 1
            inputs[r, :n] = ids[:-1]
            targets[r, :n] = np.where(mask[1:], ids[1:], -1)
        return mx.array(inputs), mx.array(targets)
