"""On the CPU, split each training micro-batch, and each evaluation forward, across CPU streams,
one per core.

Why: MLX's CPU backend runs every kernel but the BLAS GEMMs on one thread, its stream's (the
softcapped loss's exp and tanh, the norms, relu², attention's softmax, the optimizer's
elementwise passes), so on a 2-core machine one core idled through most of a d4 step. MLX runs
each CPU stream on a thread of its own: rows of the batch differentiated on separate streams
run side by side, and their gradients are summed in the same compiled graph. Evaluation forwards
(CORE's losses, bpb's sums) are split the same way; their rows are independent.

The loss stays nanochat's mean over the batch's valid targets: each shard returns its loss sum
over that count, so the shards add up to it. One shard (a GPU, `world_size` > 1, or a 1-core
machine) is the unsharded computation, op for op.

BLAS: OpenBLAS serves concurrent callers from one thread pool, so two shards' 2-thread GEMMs
queue behind each other; while sharded steps or evaluations run (`OneBlasThreadPerShard`), each
GEMM gets one thread (bench/README.md, seventeenth session: the d4 step ~1.19× faster than with
two; eighteenth: the smoke CORE evaluation 1.3× faster sharded).
"""

from __future__ import annotations

import functools
import os
from typing import Callable

import mlx.core as mx

from mlxchat import blas
from mlxchat.common import MlxchatError
from mlxchat.gpt import valid_target_count
from mlxchat.optim import add_gradients, streams_or_default

SHARDS_ENV = "MLXCHAT_CPU_SHARDS"  # how many shards (1 turns sharding off); default: one per core


def cores() -> int:
    """The cores this process may run on (its affinity, where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def shard_count(world_size: int) -> int:
    """How many shards the training step splits a micro-batch into: one per core on the CPU,
    `$MLXCHAT_CPU_SHARDS` if set; 1 on a GPU and across ranks (each rank is its own process, and
    `mlx.launch` puts several on one machine's cores)."""
    if mx.default_device() != mx.cpu or world_size > 1:
        return 1
    forced = os.environ.get(SHARDS_ENV, "")
    if not forced:
        return cores()
    if not forced.isdigit() or int(forced) < 1:
        raise MlxchatError(f"{SHARDS_ENV}={forced!r}: expected a whole number >= 1 (or unset for one per core)")
    return int(forced)


def shard_streams(world_size: int) -> list:
    """The streams a batch's shards run on, the default one first."""
    return [mx.default_stream(mx.default_device()), *_extra_cpu_streams(shard_count(world_size) - 1)]


@functools.cache
def _extra_cpu_streams(count: int) -> tuple:
    """Made once a process: each CPU stream is a thread that lives as long as the process, and
    every stage (and test) builds a TrainStep of its own."""
    return tuple(mx.new_stream(mx.cpu) for _ in range(count))


class OneBlasThreadPerShard:
    """Inside it, OpenBLAS runs each GEMM on one thread while there are several shards (see the
    module's docstring); as before outside it, so later stages in the same process keep every
    thread for their GEMMs. Nested, it changes nothing: a training loop's evaluations (bpb's sums,
    sharded too) run inside the loop's at its count. Queued work on every stream is waited for at
    each change: a GEMM in flight must not see the count change under it."""

    def __init__(self, streams: list):
        self.streams = streams
        self.previous = None

    def _set(self, threads: int) -> None:
        for stream in self.streams:
            mx.synchronize(stream)
        blas.set_openblas_threads(threads)

    def __enter__(self):
        self.previous = blas.openblas_threads() if len(self.streams) > 1 else None
        if self.previous not in (None, 1):
            self._set(1)
        return self

    def __exit__(self, *exc):
        if self.previous not in (None, 1):
            self._set(self.previous)


def on_row_shards(fn: Callable, arrays: tuple, streams: list | None) -> list:
    """`fn(*shard)` for each shard of `arrays`' rows, each on its stream (None: the default
    stream alone), in row order.

    Shards are contiguous rows, the first ones a row longer where the rows do not divide evenly;
    there are never more shards than rows. One shard is `fn(*arrays)` itself, op for op."""
    streams = streams_or_default(streams)
    rows = arrays[0].shape[0]
    shards = min(len(streams), rows)
    if shards == 1:
        return [fn(*arrays)]
    base, extra = divmod(rows, shards)
    outputs, start = [], 0
    for i, stream in enumerate(streams[:shards]):
        stop = start + base + (i < extra)
        with mx.stream(stream):
            outputs.append(fn(*(a[start:stop] for a in arrays)))
        start = stop
    return outputs


def sharded_loss_and_grad(loss_and_grad: Callable, x: mx.array, y: mx.array, streams: list):
    """(mean loss over y's valid targets, its gradients) of the batch (x, y), its rows split over
    `streams`: `loss_and_grad(x, y, count)` gives a shard's loss sum / count and its gradients.
    The shards' gradients are summed in fp32 (`optim.add_gradients`: the block matrices' arrive
    in the compute dtype)."""
    count = valid_target_count(y)
    parts = on_row_shards(lambda x, y: loss_and_grad(x, y, count), (x, y), streams)
    if len(parts) == 1:
        return parts[0]
    total = None
    for _, grads in parts:
        total = add_gradients(total, grads)
    losses = [loss for loss, _ in parts]
    return sum(losses[1:], losses[0]), total
