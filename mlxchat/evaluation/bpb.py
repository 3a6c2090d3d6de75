"""Bits per byte: the vocabulary-independent loss nanochat reports.

Sum of per-token losses in nats over target tokens that are real text (special tokens and
ignored targets excluded), divided by ln 2 times the number of UTF-8 bytes those targets
stand for. Comparable across tokenizers, unlike the mean token loss.
"""

from __future__ import annotations

import math
from typing import Iterable

import mlx.core as mx


def bpb_sums(model, x: mx.array, y: mx.array, token_bytes: mx.array) -> tuple[mx.array, mx.array]:
    """(nats, bytes) of one batch, as lazy scalars."""
    losses = model(x, y, reduction="none")
    nbytes = mx.where(y >= 0, token_bytes[mx.maximum(y, 0)], 0)
    return (losses * (nbytes > 0)).sum(), nbytes.sum()


def evaluate_bpb(model, batches: Iterable, steps: int, token_bytes) -> float:
    """bpb over `steps` batches of `batches`, summed across distributed ranks."""
    token_bytes = mx.array(token_bytes)
    step_fn = mx.compile(lambda x, y: bpb_sums(model, x, y, token_bytes), inputs=model.state)
    total_nats, total_bytes = mx.array(0.0), mx.array(0)
    it = iter(batches)
    for _ in range(max(1, steps)):
        x, y = next(it)
        nats, nbytes = step_fn(x, y)
        total_nats, total_bytes = total_nats + nats, total_bytes + nbytes
        mx.eval(total_nats, total_bytes)
    group = mx.distributed.init()
    if group.size() > 1:
        total_nats, total_bytes = mx.distributed.all_sum(total_nats), mx.distributed.all_sum(total_bytes)
    return total_nats.item() / (math.log(2) * max(total_bytes.item(), 1))


def evaluate_loss(model, batches: Iterable, steps: int) -> float:
    """Mean token loss over the targets of `steps` batches (ignored targets excluded), across
    ranks: SFT's validation metric, whose targets are only the assistant's tokens."""
    step_fn = mx.compile(lambda x, y: (model(x, y, reduction="none").sum(), (y >= 0).sum()), inputs=model.state)
    total, count = mx.array(0.0), mx.array(0)
    it = iter(batches)
    for _ in range(max(1, steps)):
        loss, n = step_fn(*next(it))
        total, count = total + loss, count + n
        mx.eval(total, count)
    if mx.distributed.init().size() > 1:
        total, count = mx.distributed.all_sum(total), mx.distributed.all_sum(count)
    return total.item() / max(count.item(), 1)
