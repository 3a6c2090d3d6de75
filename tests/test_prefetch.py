import threading

import pytest

from mlxchat.prefetch import Prefetched


class Counter:
    """An endless loader whose state is the next value; fails at `fail_at` if given."""

    def __init__(self, start=0, fail_at=None):
        self.i, self.fail_at = start, fail_at

    def state_dict(self):
        return {"i": self.i}

    def __next__(self):
        if self.i == self.fail_at:
            raise ValueError(f"bad record {self.i}")
        self.i += 1
        return self.i - 1


def test_batches_in_order_and_state_of_what_was_taken():
    p = Prefetched(Counter(5), depth=3)
    assert p.state_dict() == {"i": 5}
    assert [next(p) for _ in range(4)] == [5, 6, 7, 8]
    assert p.state_dict() == {"i": 9}  # not where the thread got to
    resumed = Prefetched(Counter(p.state_dict()["i"]))
    assert next(resumed) == 9
    p.close()
    resumed.close()


def test_loader_error_is_raised_in_order_and_close_ends_the_thread():
    p = Prefetched(Counter(0, fail_at=2))
    assert [next(p), next(p)] == [0, 1]
    with pytest.raises(ValueError, match="bad record 2"):
        next(p)
    p.close()
    q = Prefetched(Counter())
    next(q)
    q.close()
    assert not any(t.name == "batch-prefetch" and t.is_alive() for t in threading.enumerate())
