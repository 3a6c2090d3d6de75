"""The CPU's causal attention (`mlxchat.cpu_attention`: an arithmetic softmax, for QK-normed heads)
gives MLX's attention and its gradients, and is taken only where its bound holds."""

import mlx.core as mx
import numpy as np
import pytest

from mlxchat import cpu_attention, gpt


@pytest.fixture(autouse=True)
def on_the_cpu():
    """What it replaces is the CPU's attention: on a GPU machine too, these tests run there."""
    device = mx.default_device()
    mx.set_default_device(mx.cpu)
    yield
    mx.set_default_device(device)


def _qkv(heads: int, kv_heads: int, T: int, D: int, key: int):
    """q, k as the model hands them over: rotated and RMS-normed, so every score is within ±√D;
    k correlated with q, so some rows' softmax is sharp."""
    keys = mx.random.split(mx.random.key(key), 3)
    q = mx.fast.rms_norm(mx.random.normal((2, heads, T, D), key=keys[0]), None, gpt.NORM_EPS)
    k = mx.random.normal((2, kv_heads, T, D), key=keys[1])
    k = mx.fast.rms_norm(k + 4 * q[:, : kv_heads], None, gpt.NORM_EPS)
    return q, k, mx.random.normal((2, kv_heads, T, D), key=keys[2])


@pytest.mark.parametrize("heads, kv_heads, T, D", [(2, 2, 37, 128), (4, 2, 16, 16), (6, 3, 64, 64)])
def test_causal_attention_and_its_gradients_equal_mlxs(heads, kv_heads, T, D):
    q, k, v = _qkv(heads, kv_heads, T, D, key=T)
    scale = D**-0.5
    assert cpu_attention.runs_for(q, k, "causal")
    weights = mx.random.normal((2, heads, T, D), key=mx.random.key(1))

    def loss(attention):
        return lambda q, k, v: (attention(q, k, v) * weights).sum()

    ours = mx.value_and_grad(loss(lambda q, k, v: cpu_attention.causal(q, k, v, scale)), argnums=(0, 1, 2))(q, k, v)
    mlx = mx.value_and_grad(loss(lambda q, k, v: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal")),
                            argnums=(0, 1, 2))(q, k, v)
    np.testing.assert_allclose(np.array(cpu_attention.causal(q, k, v, scale)),
                               np.array(mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal")),
                               atol=2e-6, rtol=1e-5)
    for a, b in zip(ours[1], mlx[1]):
        np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-5, rtol=1e-4)


def test_it_runs_only_where_its_bound_and_mask_hold():
    q, k, _ = _qkv(2, 2, 8, 64, key=0)
    assert cpu_attention.runs_for(q, k, "causal")
    assert not cpu_attention.runs_for(q, k, None)  # no mask, or an array mask: MLX's
    assert not cpu_attention.runs_for(q, k[:, :, :5], "causal")  # a cache's keys: bottom-right mask
    assert not cpu_attention.runs_for(q.astype(mx.bfloat16), k.astype(mx.bfloat16), "causal")
    wide = mx.zeros((1, 1, 8, 512))  # √512 > the exp's bound
    assert not cpu_attention.runs_for(wide, wide, "causal")


@pytest.mark.skipif(not (mx.metal.is_available() or mx.cuda.is_available()), reason="needs a GPU")
def test_a_gpu_keeps_mlxs_attention():
    q, k, _ = _qkv(2, 2, 8, 64, key=0)
    with mx.stream(mx.gpu):
        assert not cpu_attention.runs_for(q, k, "causal")
