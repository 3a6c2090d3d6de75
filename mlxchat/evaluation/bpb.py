"""Bits per byte: the vocabulary-independent loss nanochat reports.

Sum of per-token losses in nats over target tokens that are real text (special tokens and
ignored targets excluded), divided by ln 2 times the number of UTF-8 bytes those targets
stand for. Comparable across tokenizers, unlike the mean token loss. On the CPU each batch's
rows are split over the cores (`cpu_shards`) and their sums added.
"""

from __future__ import annotations

import math
from typing import Iterable

import mlx.core as mx

from mlxchat import cpu_shards
from mlxchat.distributed import RankShare, my_share, sum_over_ranks, world


def bpb_sums(model, x: mx.array, y: mx.array, token_bytes: mx.array) -> tuple[mx.array, mx.array]:
    """(nats, bytes) of one batch, as lazy scalars."""
    losses = model(x, y, reduction="none")
    nbytes = mx.where(y >= 0, token_bytes[mx.maximum(y, 0)], 0)
    return (losses * (nbytes > 0)).sum(), nbytes.sum()


def evaluate_bpb(model, batches: Iterable, steps: int, token_bytes) -> float:
    """bpb over the first `steps` batches of `batches`; data-parallel ranks each take every
    world-th of them and the sums are combined, giving one process's number."""
    token_bytes = mx.array(token_bytes)
    nats, nbytes = _sums(lambda x, y: bpb_sums(model, x, y, token_bytes), model, batches, steps)
    return nats / (math.log(2) * max(nbytes, 1))


def evaluate_loss(model, batches: Iterable, steps: int) -> float:
    """Mean token loss over the targets of the first `steps` batches (ignored targets
    excluded), across ranks as `evaluate_bpb`: SFT's validation metric, whose targets are only
    the assistant's tokens."""
    loss, count = _sums(lambda x, y: (model(x, y, reduction="none").sum(), (y >= 0).sum()), model, batches, steps)
    return loss / max(count, 1)


def _sums(sums, model, batches: Iterable, steps: int) -> tuple[float, float]:
    """The two sums `sums(x, y)` gives per batch, over this rank's share of `steps` batches,
    then over every rank; compiled, each batch's rows split over this process's shard streams."""
    streams = cpu_shards.shard_streams(world().size())

    def sharded(x, y):
        a, b = zip(*cpu_shards.on_row_shards(sums, (x, y), streams))
        return sum(a[1:], a[0]), sum(b[1:], b[0])

    step_fn = mx.compile(sharded, inputs=model.state)
    total_a, total_b = mx.array(0.0), mx.array(0)
    mine = RankShare(iter(batches))
    with cpu_shards.OneBlasThreadPerShard(streams):
        for _ in my_share(max(1, steps)):
            a, b = step_fn(*next(mine))
            total_a, total_b = total_a + a, total_b + b
            mx.eval(total_a, total_b)
    return tuple(sum_over_ranks([total_a.item(), total_b.item()]))
