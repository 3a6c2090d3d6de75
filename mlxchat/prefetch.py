"""Training batches made ahead by a background thread.

Why: mid-training's and SFT's loaders render, tokenize and pack conversations in Python, and the
loop made each batch on the host between launching one step and the next, so on the H200 the mid
loop ran at 0.73× the bare d12 B32×2048 step (bench/train_loop.py). MLX releases the GIL while the
host waits for the device, so a thread makes the next batches in the step's shadow: 1.04×.
"""

from __future__ import annotations

import queue
import threading


class Prefetched:
    """`loader`'s batches in order, made up to `depth` ahead by a daemon thread.

    `state_dict()` is the loader's state right after the last batch handed out (recorded by the
    thread as it made that batch), so a checkpoint resumes exactly where the consumer stopped,
    not where the thread got to. An exception in the loader is raised by the `next()` that would
    have returned its batch."""

    def __init__(self, loader, depth: int = 2):
        self.loader = loader
        self._state = loader.state_dict()
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, name="batch-prefetch", daemon=True)
        self._thread.start()

    def _fill(self) -> None:
        while not self._stop.is_set():
            try:
                item = (next(self.loader), self.loader.state_dict(), None)
            except BaseException as e:  # handed to the consumer, which raises it
                item = (None, None, e)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[2] is not None:
                return

    def __iter__(self) -> "Prefetched":
        return self

    def __next__(self):
        batch, state, error = self._queue.get()
        if error is not None:
            raise error
        self._state = state
        return batch

    def state_dict(self) -> dict:
        return self._state

    def close(self) -> None:
        """Stop the thread (it finishes the batch it is making) and drop what it made."""
        self._stop.set()
        self._thread.join()
