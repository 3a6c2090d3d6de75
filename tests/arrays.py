"""Comparing a fused or hand-written path's arrays with the reference it replaces."""

import mlx.core as mx
import numpy as np


def assert_close_at_scale(pairs, tol):
    """Each (reference, ours): same dtype and shape, equal within tol of the reference's largest value."""
    for a, b in pairs:
        assert a.dtype == b.dtype and a.shape == b.shape
        scale = float(mx.abs(a.astype(mx.float32)).max())
        np.testing.assert_allclose(np.array(b.astype(mx.float32)), np.array(a.astype(mx.float32)), atol=tol * scale, rtol=tol)
