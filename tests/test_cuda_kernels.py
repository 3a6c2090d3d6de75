"""The CUDA kernels (`mlxchat.cuda_kernels`) against the portable path they replace.

The kernels need MLX's CUDA backend: on a machine without one (CI) only the choice of path is
checked here; the rest runs on a CUDA GPU (bench/README.md records its run on the H200).
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from arrays import assert_close_at_scale
from mlx.utils import tree_flatten

from mlxchat import cuda_kernels, gpt
from mlxchat.common import MlxchatError

needs_cuda = pytest.mark.skipif(not cuda_kernels.available(), reason="needs MLX's CUDA backend on a GPU")


def test_kernels_are_chosen_only_on_cuda(monkeypatch):
    assert cuda_kernels.available() == (mx.cuda.is_available() and mx.default_device() == mx.gpu)
    monkeypatch.setenv(cuda_kernels.ENV, "0")
    assert not cuda_kernels.available()
    assert gpt.loss_kernel() != "cuda"


@pytest.mark.skipif(cuda_kernels.available(), reason="this machine has the CUDA backend")
def test_forcing_the_cuda_loss_without_cuda_is_one_line(monkeypatch):
    monkeypatch.setenv(gpt.LOSS_ENV, "cuda")
    with pytest.raises(MlxchatError, match="MLXCHAT_LOSS=cuda needs MLX's CUDA backend"):
        gpt.loss_kernel()


def test_shapes_the_kernels_take():
    assert cuda_kernels.loss_fits(mx.zeros((4, 65536), mx.bfloat16))
    assert not cuda_kernels.loss_fits(mx.zeros((4, 65537), mx.bfloat16))
    assert cuda_kernels.loss_fits(mx.zeros((4, 12), mx.float32))  # 48-byte rows
    assert not cuda_kernels.loss_fits(mx.zeros((4, 8), mx.int32))
    assert cuda_kernels.norm_fits(mx.zeros((2, 3, 768), mx.bfloat16))
    assert cuda_kernels.norm_fits(mx.zeros((2, 6, 5, 128), mx.float32))
    assert not cuda_kernels.norm_fits(mx.zeros((2, 64), mx.bfloat16))  # the small test models: portable
    assert not cuda_kernels.norm_fits(mx.zeros((2, 4096), mx.bfloat16))
    assert cuda_kernels.rope_norm_fits(mx.zeros((2, 5, 6, 128), mx.bfloat16))
    assert cuda_kernels.rope_norm_fits(mx.zeros((2, 5, 6, 32), mx.bfloat16))  # 2 lanes a row
    assert not cuda_kernels.rope_norm_fits(mx.zeros((2, 5, 6, 48), mx.bfloat16))  # 3 lanes: not a warp's divisor
    assert not cuda_kernels.rope_norm_fits(mx.zeros((2, 5, 6, 512), mx.float32))  # 64 lanes
    assert not cuda_kernels.rope_norm_fits(mx.zeros((2, 6, 128), mx.bfloat16))
    assert cuda_kernels.decode_attention_fits(mx.zeros((2, 6, 1, 128), mx.bfloat16), mx.zeros((2, 3, 4096, 128), mx.bfloat16))
    assert cuda_kernels.decode_attention_fits(mx.zeros((1, 2, 1, 32), mx.float32), mx.zeros((1, 2, 96, 32), mx.float32))
    assert not cuda_kernels.decode_attention_fits(mx.zeros((2, 6, 2, 128), mx.bfloat16), mx.zeros((2, 6, 64, 128), mx.bfloat16))
    assert not cuda_kernels.decode_attention_fits(mx.zeros((2, 6, 1, 128), mx.bfloat16), mx.zeros((2, 4, 64, 128), mx.bfloat16))
    too_long = mx.zeros((1, 1, cuda_kernels.DECODE_ATTENTION_MAX_KEYS + 1, 128), mx.bfloat16)
    assert not cuda_kernels.decode_attention_fits(mx.zeros((1, 1, 1, 128), mx.bfloat16), too_long)
    assert not cuda_kernels.decode_attention_fits(mx.zeros((1, 1, 1, 4), mx.float16), mx.zeros((1, 1, 8, 4), mx.float16))
    assert cuda_kernels.sum_of_squares_fits([mx.zeros((3, 4)), mx.zeros((5,))])
    assert not cuda_kernels.sum_of_squares_fits([mx.zeros((3, 4)), mx.zeros((5,), mx.bfloat16)])  # one dtype
    assert not cuda_kernels.sum_of_squares_fits([mx.zeros((3, 0))])
    assert not cuda_kernels.sum_of_squares_fits([])
    assert not cuda_kernels.sum_of_squares_fits([mx.zeros((2,))] * (cuda_kernels.SUM_OF_SQUARES_MAX_ARRAYS + 1))


@needs_cuda
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("vocab", [512, 8200, 65536])
def test_softcap_cross_entropy_equals_the_portable_loss(dtype, vocab):
    rows = 67
    z = (mx.random.normal((rows, vocab), key=mx.random.key(1)) * 20).astype(dtype)  # beyond the softcap
    targets = mx.random.randint(0, vocab, (rows,), key=mx.random.key(2))
    targets[3] = -1  # ignored rows
    targets[40] = -1
    weights = mx.random.normal((rows,), key=mx.random.key(3))
    losses, dz = cuda_kernels.softcap_cross_entropy(z, targets, weights, gpt.SOFTCAP)
    z32 = z.astype(mx.float32)
    (ref_losses,), (ref_dz,) = mx.vjp(lambda a: gpt._losses_of_logits(gpt._softcap(a), targets), [z32], [weights])
    assert losses.dtype == mx.float32 and dz.dtype == dtype
    np.testing.assert_allclose(np.array(losses), np.array(ref_losses), rtol=1e-5, atol=1e-4)
    tol = 1e-6 if dtype == mx.float32 else 1e-2
    scale = float(mx.abs(ref_dz).max())
    np.testing.assert_allclose(np.array(dz.astype(mx.float32)), np.array(ref_dz), atol=tol * scale, rtol=tol)
    assert float(mx.abs(dz[3]).max()) == 0.0 and losses[40].item() == 0.0


@needs_cuda
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("width", [128, 768])
def test_norm_kernels_equal_mlx_rms_norm_and_its_autodiff(dtype, width):
    x = (mx.random.normal((3, 37, width), key=mx.random.key(4)) * mx.array([0.01, 1.0, 300.0])[:, None, None]).astype(dtype)
    dy = mx.random.normal(x.shape, key=mx.random.key(5)).astype(dtype)
    y, r = cuda_kernels.rms_norm(x, gpt.NORM_EPS)
    ref_y, (ref_dx,) = mx.vjp(lambda a: mx.fast.rms_norm(a, None, gpt.NORM_EPS), [x], [dy])
    ref_r = mx.rsqrt(mx.mean(mx.square(x.astype(mx.float32)), axis=-1, keepdims=True) + gpt.NORM_EPS)
    dx = cuda_kernels.rms_norm_vjp(y, r, dy)
    res = mx.random.normal(x.shape, key=mx.random.key(6)).astype(dtype)  # the residual stream's own cotangent
    dx_plus = cuda_kernels.rms_norm_vjp(y, r, dy, res)
    tol = 1e-5 if dtype == mx.float32 else 2e-2
    np.testing.assert_allclose(np.array(r), np.array(ref_r), rtol=1e-5)
    assert_close_at_scale(((ref_y[0], y), (ref_dx, dx), ((ref_dx + res).astype(dtype), dx_plus)), tol)


@needs_cuda
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("heads,D", [(1, 128), (3, 128), (3, 64)])
def test_rope_norm_kernels_equal_mlx_rope_then_norm_and_their_autodiff(dtype, heads, D):
    B, T = 2, 37  # 222 rows at 3 heads: a warp's last round part empty
    attn = gpt.CausalSelfAttention(gpt.GPTConfig(sequence_len=T, vocab_size=64, n_layer=1, n_head=heads,
                                                 n_kv_head=heads, n_embd=heads * D))
    x = (mx.random.normal((B, T, heads, D), key=mx.random.key(9)) * 3).astype(dtype)
    dy = mx.random.normal((B, heads, T, D), key=mx.random.key(10)).astype(dtype)
    rope = dict(dims=D, traditional=False, base=None, scale=1.0, offset=0, freqs=attn._freqs)

    def reference(a):
        return mx.fast.rms_norm(mx.fast.rope(a.transpose(0, 2, 1, 3), **rope), None, gpt.NORM_EPS)

    ref_y, (ref_dx,) = mx.vjp(reference, [x], [dy])
    y, (dx,) = mx.vjp(lambda a: attn._rope_norm(a, None), [x], [dy])
    assert_close_at_scale(((ref_y[0], y[0]), (ref_dx, dx)), 1e-5 if dtype == mx.float32 else 2e-2)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("heads, kv_heads, head_dim, capacity, length",
                         [(2, 2, 128, 768, 513), (6, 3, 128, 3000, 2999), (1, 1, 128, 8192, 8000), (4, 1, 32, 40, 1), (2, 2, 64, 300, 300)])
def test_a_key_prefix_mask_attends_to_the_written_keys_only(dtype, heads, kv_heads, head_dim, capacity, length):
    """The compiled decode step's attention (the kernel on CUDA, a bool mask elsewhere) equals MLX's
    attention over the prefix alone, whatever the buffer holds past it."""
    B = 3
    keys = mx.random.split(mx.random.key(13), 3)
    q = mx.random.normal((B, heads, 1, head_dim), key=keys[0]).astype(dtype)
    k, v = (mx.random.normal((B, kv_heads, capacity, head_dim), key=key).astype(dtype) for key in keys[1:])
    k[:, :, length:] = 1e4  # unwritten: any weight on them would show
    v[:, :, length:] = 1e4
    scale = head_dim**-0.5
    got = gpt.attend(q, k, v, scale, gpt.KeyPrefix(mx.array(length)))
    want = mx.fast.scaled_dot_product_attention(q, k[:, :, :length], v[:, :, :length], scale=scale)
    assert_close_at_scale(((want, got),), 1e-5 if dtype == mx.float32 else 2e-2)


@needs_cuda
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_training_loss_and_gradients_equal_the_portable_kernels(monkeypatch, dtype):
    """A model whose norms, rotary embeddings and head take the kernels (width 128, vocab 512): the
    training loss and every gradient with the kernels on and off."""
    cfg = gpt.GPTConfig(sequence_len=64, vocab_size=512, n_layer=2, n_head=1, n_kv_head=1, n_embd=128)
    m = gpt.GPT(cfg, compute_dtype=dtype)
    m.init_weights(0)
    m.update(nn.utils.tree_map(lambda p: p + 0.02 * mx.random.normal(p.shape, key=mx.random.key(6)), m.parameters()))
    idx = mx.random.randint(0, 512, (2, 64), key=mx.random.key(7))
    tgt = mx.random.randint(0, 512, (2, 64), key=mx.random.key(8))
    tgt[0, :5] = -1
    loss_grad = nn.value_and_grad(m, lambda mm: mm(idx, tgt))
    assert gpt.loss_kernel() == "cuda"
    loss, grads = loss_grad(m)
    monkeypatch.setenv(cuda_kernels.ENV, "0")
    ref_loss, ref_grads = loss_grad(m)
    tol = 1e-3 if dtype == mx.float32 else 3e-2
    assert abs(loss.item() - ref_loss.item()) < tol * max(1.0, abs(ref_loss.item()))
    for (name, a), (_, b) in zip(tree_flatten(ref_grads), tree_flatten(grads)):
        a, b = a.astype(mx.float32), b.astype(mx.float32)  # block matrices' gradients come in bf16
        scale = float(mx.abs(a).max()) or 1.0
        np.testing.assert_allclose(np.array(b), np.array(a), atol=tol * scale, rtol=tol, err_msg=name)


@needs_cuda
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_sum_of_squares_equals_the_sum_over_arrays(dtype):
    """Arrays smaller than a block's chunk, one spanning several chunks with a partial last one,
    one whose data starts off a 16-byte boundary (a slice: read element by element), and a model's
    worth of them (122 at d20): the one-launch sum against MLX's per-array sums."""
    chunk = cuda_kernels.SUM_OF_SQUARES_CHUNK
    shapes = [(3,), (17, 5), (2 * chunk + 123,), (chunk,), *[(64, 48)] * 117]
    arrays = [mx.random.normal(s, key=mx.random.key(i)).astype(dtype) for i, s in enumerate(shapes)]
    arrays.append(mx.random.normal((chunk + 9,), key=mx.random.key(999)).astype(dtype)[1:])
    ours = cuda_kernels.sum_of_squares(arrays)
    ref = sum((a.astype(mx.float32) ** 2).sum() for a in arrays)
    assert ours.dtype == mx.float32 and ours.shape == ()
    assert abs(ours.item() - ref.item()) <= 1e-5 * ref.item()
    assert cuda_kernels.sum_of_squares(arrays).item() == ours.item()  # partials, no atomics: the same every run


@needs_cuda
def test_global_norm_on_cuda_equals_mlx_clip_grad_norm():
    """Gradients of two dtypes (bf16 block matrices, fp32 rest): a sum-of-squares kernel each."""
    import mlx.optimizers as optim

    from mlxchat.optim import global_norm

    grads = {"a": mx.random.normal((40, 30), key=mx.random.key(1)).astype(mx.bfloat16),
             "b": [mx.random.normal((7,), key=mx.random.key(2))]}
    _, ref_norm = optim.clip_grad_norm({"a": grads["a"].astype(mx.float32), "b": grads["b"]}, 1.0)
    assert abs(global_norm(grads).item() - ref_norm.item()) <= 1e-5 * ref_norm.item()


@needs_cuda
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_nesterov_momentum_kernel_equals_muons_arithmetic(dtype):
    """A group of matrices spanning several blocks with a partial last one: new velocities and
    the stacked updates against Muon's formula in MLX ops."""
    shape, n = (96, cuda_kernels.MATRIX_GROUP_CHUNK // 64 + 4), 5
    grads = [mx.random.normal(shape, key=mx.random.key(i)).astype(dtype) for i in range(n)]
    vs = [mx.random.normal(shape, key=mx.random.key(10 + i)) for i in range(n)]
    m, scale = mx.array(0.9), mx.array(0.25)
    assert cuda_kernels.nesterov_momentum_fits(grads, vs)
    new_vs, stack = cuda_kernels.nesterov_momentum(grads, vs, m, scale, mx.bfloat16)
    assert stack.shape == (n, *shape) and stack.dtype == mx.bfloat16
    for i in range(n):
        g = grads[i].astype(mx.float32) * scale
        v = m * vs[i] + (1 - m) * g
        np.testing.assert_allclose(np.array(new_vs[i]), np.array(v), rtol=1e-5, atol=1e-6)  # fma or not
        u = (g * (1 - m) + v * m).astype(mx.float32)
        np.testing.assert_allclose(np.array(stack[i].astype(mx.float32)), np.array(u), rtol=2**-8, atol=1e-6)  # bf16 rounding


@needs_cuda
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_orthogonal_step_kernel_equals_muons_arithmetic(dtype):
    """A group of parameters spanning several blocks with a partial last one, minus lr times their
    slices of a bf16 stack, against the same arithmetic in MLX ops."""
    shape, n = (96, cuda_kernels.MATRIX_GROUP_CHUNK // 64 + 4), 5
    params = [mx.random.normal(shape, key=mx.random.key(i)).astype(dtype) for i in range(n)]
    stack = mx.random.normal((n, *shape), key=mx.random.key(20)).astype(mx.bfloat16)
    lr = mx.array(0.02) * 1.5
    assert cuda_kernels.orthogonal_step_fits(params, stack)
    new = cuda_kernels.orthogonal_step(params, stack, lr)
    for p, x, q in zip(params, stack, new):
        assert q.shape == shape and q.dtype == dtype
        want = p.astype(mx.float32) - lr * x.astype(mx.float32)
        np.testing.assert_allclose(np.array(q.astype(mx.float32)), np.array(want), rtol=2**-8 if dtype == mx.bfloat16 else 1e-6, atol=1e-6)


def test_orthogonal_step_fits_one_dtype_and_shape():
    p, x = mx.zeros((4, 8)), mx.zeros((2, 4, 8), mx.bfloat16)
    assert cuda_kernels.orthogonal_step_fits([p, p], x)
    assert not cuda_kernels.orthogonal_step_fits([p, p.astype(mx.bfloat16)], x)  # one dtype
    assert not cuda_kernels.orthogonal_step_fits([p, mx.zeros((8, 4))], x)  # one shape
    assert not cuda_kernels.orthogonal_step_fits([p], x)  # one slice of the stack each
    assert not cuda_kernels.orthogonal_step_fits([mx.zeros((3, 5))], mx.zeros((1, 3, 5)))  # 4 a thread
    assert not cuda_kernels.orthogonal_step_fits([p, p], x.astype(mx.int32))
    assert not cuda_kernels.orthogonal_step_fits([], x)


def test_nesterov_momentum_fits_one_dtype_and_shape():
    g, v = mx.zeros((4, 8), mx.bfloat16), mx.zeros((4, 8))
    assert cuda_kernels.nesterov_momentum_fits([g, g], [v, v])
    assert not cuda_kernels.nesterov_momentum_fits([g, g.astype(mx.float32)], [v, v])  # one dtype
    assert not cuda_kernels.nesterov_momentum_fits([g, mx.zeros((8, 4), mx.bfloat16)], [v, v])  # one shape
    assert not cuda_kernels.nesterov_momentum_fits([g], [v.astype(mx.bfloat16)])  # fp32 velocities
    assert not cuda_kernels.nesterov_momentum_fits([mx.zeros((3, 5))], [mx.zeros((3, 5))])  # 4 a thread
    assert not cuda_kernels.nesterov_momentum_fits([], [])
