"""The CPU's arithmetic exp and tanh (`mlxchat.arithmetic`) against float64 over the ranges their
callers guarantee, and at the values a diverged step produces (±inf, NaN)."""

import math

import mlx.core as mx
import numpy as np

from mlxchat import arithmetic
from mlxchat.gpt import SOFTCAP


def test_exp_is_within_float32_rounding_over_its_bound():
    """exp(scale·x) within 4.5e-6 relative over ±EXP_BOUND, by itself and with the softcap's scale
    folded in (the loss: x = tanh in [−1, 1]); NaN kept (a diverged step must still show NaN)."""
    x = mx.concatenate([mx.linspace(-arithmetic.EXP_BOUND, arithmetic.EXP_BOUND, 2_000_001), mx.array([0.0, 1e-30])])
    for scale, args in ((1.0, x), (SOFTCAP, x / arithmetic.EXP_BOUND)):
        exact = np.exp(scale * np.array(args, dtype=np.float64))
        got = np.array(arithmetic.exp(args, scale), dtype=np.float64)
        assert (np.abs(got - exact) / exact).max() < 4.5e-6, scale
    assert mx.isnan(arithmetic.exp(mx.array([math.nan]))).item()


def test_tanh_is_within_float32_rounding_far_past_saturation():
    """tanh(x / SOFTCAP) (the loss's softcap) within 4.5e-7 absolute over logits to ±400, ±1 at ±inf,
    NaN kept."""
    z = mx.concatenate([mx.linspace(-400.0, 400.0, 4_000_001), mx.array([0.0, 1e-30, -1e-30, 1e30, -1e30])])
    exact = np.tanh(np.array(z, dtype=np.float64) / SOFTCAP)
    assert np.abs(np.array(arithmetic.tanh(z, 1 / SOFTCAP), dtype=np.float64) - exact).max() < 4.5e-7
    assert arithmetic.tanh(mx.array([-math.inf, math.inf]), 1 / SOFTCAP).tolist() == [-1.0, 1.0]
    assert mx.isnan(arithmetic.tanh(mx.array([math.nan]))).item()
