"""Streaming pretraining batches with exact resume.

As nanochat's `tokenizing_distributed_data_loader`: documents are read from parquet row groups,
tokenized in batches with BOS prepended, and packed into a token stream; each batch takes the
next B·T+1 tokens and yields inputs (B, T) and targets shifted by one. The stream is the same
for any number of ranks (nanochat deals row groups to ranks, which makes the data depend on
the world size); data-parallel ranks take their micro-batches of it (`distributed.RankShare`).

The loader's position is a cursor — (epoch, shard, row group, document) of the first
document not fully consumed plus the number of its tokens already used — so
`state_dict()` is a few integers, and a resumed loader re-tokenizes that one document and
continues with exactly the tokens the uninterrupted run would have seen.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Iterator

import mlx.core as mx
import numpy as np
import pyarrow.parquet as pq

from mlxchat.common import MlxchatError


@dataclass(frozen=True, order=True)
class Cursor:
    epoch: int = 0
    shard: int = 0  # position in the split's shard list
    row_group: int = 0
    doc: int = 0


class DataLoader:
    def __init__(
        self,
        source,
        tokenizer,
        batch_size: int,
        seq_len: int,
        split: str = "train",
        tokenizer_batch_size: int = 128,
        state: dict | None = None,
    ):
        self.source, self.tokenizer = source, tokenizer
        self.B, self.T, self.split = batch_size, seq_len, split
        self.tokenizer_batch_size = tokenizer_batch_size
        self.shards = source.split_indices(split)
        if not self.shards:
            raise MlxchatError(f"source {source.name!r} has no {split} shards; prepare or download data first")
        start, skip = Cursor(), 0
        if state is not None:
            if state.get("split") != split:
                raise MlxchatError(f"loader state is for split {state.get('split')!r}, not {split!r}")
            start, skip = Cursor(*state["cursor"]), int(state["offset"])
        # Each entry: [cursor, tokens, offset of the first unconsumed token].
        self._buffer: deque[list] = deque()
        self._buffered = 0
        self._docs = self._documents(start)
        self._fill(1)
        if skip:
            self._buffer[0][2] = skip
            self._buffered -= skip

    def state_dict(self) -> dict:
        self._fill(1)
        cursor, _, offset = self._buffer[0]
        return {"split": self.split, "cursor": list(cursor.__dict__.values()), "offset": offset}

    def __iter__(self) -> "DataLoader":
        return self

    def __next__(self) -> tuple[mx.array, mx.array]:
        needed = self.B * self.T + 1
        self._fill(needed)
        pieces, remaining = [], needed
        while remaining:
            entry = self._buffer[0]
            _, tokens, offset = entry
            take = min(remaining, len(tokens) - offset)
            pieces.append(tokens[offset : offset + take])
            remaining -= take
            if offset + take == len(tokens):
                self._buffer.popleft()
            else:
                entry[2] = offset + take
        self._buffered -= needed
        window = np.concatenate(pieces)
        inputs = mx.array(window[:-1].reshape(self.B, self.T))
        targets = mx.array(window[1:].reshape(self.B, self.T))
        return inputs, targets

    def _fill(self, needed: int) -> None:
        """Tokenize documents (a batch at a time) until the buffer holds `needed` tokens."""
        while self._buffered < needed:
            batch = [next(self._docs) for _ in range(self.tokenizer_batch_size)]
            ids = self.tokenizer.encode([text for _, text in batch], prepend=self.tokenizer.bos_id)
            for (cursor, _), toks in zip(batch, ids):
                self._buffer.append([cursor, np.asarray(toks, dtype=np.int32), 0])
                self._buffered += len(toks)

    def _documents(self, start: Cursor) -> Iterator[tuple[Cursor, str]]:
        """Every document of the split from `start` on, looping over epochs."""
        epoch = start.epoch
        first = True
        while True:
            yielded = False
            for pos in range(start.shard if first else 0, len(self.shards)):
                shard = self.shards[pos]
                path = self.source.local_path(shard)
                if pos + 1 < len(self.shards):
                    self.source.prefetch(self.shards[pos + 1])
                try:
                    pf = pq.ParquetFile(path)
                    for rg in range(pf.num_row_groups):
                        if first and (pos, rg) < (start.shard, start.row_group):
                            continue
                        texts = pf.read_row_group(rg, columns=["text"]).column("text").to_pylist()
                        for d, text in enumerate(texts):
                            if first and (pos, rg, d) < (start.shard, start.row_group, start.doc):
                                continue
                            yielded = True
                            yield Cursor(epoch, pos, rg, d), text
                except (OSError, KeyError, ValueError) as e:
                    raise MlxchatError(f"cannot read shard {path} ({e}); delete it so it is fetched or rebuilt again") from None
                first = False
                self.source.release(shard)
            if not yielded:
                raise MlxchatError(f"the {self.split} shards of {self.source.name!r} hold no documents: rebuild or re-download them")
            first = False
            epoch += 1
