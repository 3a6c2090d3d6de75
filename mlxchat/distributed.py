"""Data parallelism on MLX's own engine: which rank this process is, and what its share is.

A process started by `mlx.launch` (ring, JACCL, MPI or NCCL) joins its group through
`mx.distributed.init()`; a plain process is a group of one, so every function here is a no-op
there. The rule every stage follows: the *global* work (a training step's micro-batches, the
evaluation's batches or examples) is what one process would do, and rank r takes every
world-th piece of it starting at r. Results are then combined with `mx.distributed.all_sum`,
so N ranks compute the numbers one process would (up to float summation order).
"""

from __future__ import annotations

import functools
import logging

import mlx.core as mx

from mlxchat.common import MlxchatError, get_logger


@functools.cache
def world() -> mx.distributed.Group:
    """This process's group. Ranks other than 0 log warnings only: one rank tells the story."""
    group = mx.distributed.init()
    if group.rank() > 0:
        get_logger().setLevel(logging.WARNING)
    return group


def is_main() -> bool:
    """Rank 0: the only one that writes checkpoints, metrics, results and progress."""
    return world().rank() == 0


def my_share(n: int) -> range:
    """This rank's indices of `n` global work items (every world-th, from its rank)."""
    group = world()
    return range(group.rank(), n, group.size())


def sum_over_ranks(values: list[float]) -> list[float]:
    """Sums of host scalars over every rank, in float64 on the CPU stream (exact for counts)."""
    if world().size() == 1:
        return list(values)
    return mx.distributed.all_sum(mx.array(values, dtype=mx.float64), stream=mx.cpu).tolist()


def agree(value: int, what: str) -> None:
    """Fail on every rank alike when the ranks do not hold the same `value` (say the step of
    the checkpoint each would resume from): they would otherwise train different models."""
    group = world()
    if group.size() == 1:
        return
    seen = mx.distributed.all_gather(mx.array([value]), stream=mx.cpu).tolist()
    if len(set(seen)) > 1:
        raise MlxchatError(f"the ranks disagree on {what} ({', '.join(f'rank {r}: {v}' for r, v in enumerate(seen))}); "
                           f"every host must see the same run directory (a shared or synced {what})")


class RankShare:
    """Rank r's micro-batches of a loader's global stream: of every `world` consecutive
    batches, the r-th.

    Every rank reads (tokenizes) the whole stream and keeps its share, so the global batch of
    N ranks is exactly the sequence of micro-batches one process would take, and the loader's
    position is the same on every rank: rank 0's checkpoint resumes them all. The price is
    tokenizing N times; it is small next to the forward and backward passes.
    """

    def __init__(self, loader):
        self.loader = loader
        group = world()
        self.rank, self.size = group.rank(), group.size()

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def __iter__(self) -> "RankShare":
        return self

    def __next__(self):
        mine = None
        for r in range(self.size):
            batch = next(self.loader)
            if r == self.rank:
                mine = batch
        return mine
