"""The model matches nanochat: names, sizes, init, attention, RoPE, chunked loss."""

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlxchat import cuda_kernels, gpt
from mlxchat.common import MlxchatError
from mlxchat.gpt import GPT, GPTConfig

TINY = GPTConfig(sequence_len=32, vocab_size=256, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)


@pytest.mark.parametrize("depth,expected", [(12, 185_597_952), (20, 560_988_160)])
def test_parameter_count_equals_nanochat(depth, expected):
    assert GPT(GPTConfig.from_depth(depth)).num_params() == expected


def test_parameter_names_follow_nanochat():
    names = {k for k, _ in tree_flatten(GPT(GPTConfig.from_depth(2, vocab_size=512)).parameters())}
    expected = {"transformer.wte.weight", "lm_head.weight"}
    for i in range(2):
        expected |= {f"transformer.h.{i}.attn.{n}.weight" for n in ("c_q", "c_k", "c_v", "c_proj")}
        expected |= {f"transformer.h.{i}.mlp.{n}.weight" for n in ("c_fc", "c_proj")}
    assert names == expected


def test_from_depth_derives_nanochat_shapes():
    c = GPTConfig.from_depth(20)
    assert (c.n_layer, c.n_embd, c.n_head, c.n_kv_head, c.head_dim, c.vocab_size, c.sequence_len) == (
        20, 1280, 10, 10, 128, 65536, 2048)


def test_impossible_config_is_a_one_line_error():
    with pytest.raises(MlxchatError, match="not divisible"):
        GPT(GPTConfig(n_embd=100, n_head=3, n_kv_head=3))
    with pytest.raises(MlxchatError, match="must divide"):
        GPT(GPTConfig(n_embd=64, n_head=4, n_kv_head=3))


def test_init_zeroes_projections_and_scales_linears():
    m = GPT(GPTConfig.from_depth(2, vocab_size=512))
    m.init_weights(seed=0)
    params = dict(tree_flatten(m.parameters()))
    assert not params["lm_head.weight"].any().item()
    assert not params["transformer.h.0.attn.c_proj.weight"].any().item()
    assert not params["transformer.h.1.mlp.c_proj.weight"].any().item()
    assert abs(np.std(np.array(params["transformer.wte.weight"])) - 1.0) < 0.02
    fc = np.array(params["transformer.h.0.mlp.c_fc.weight"])  # fan_out 512 > fan_in 128: std 1/sqrt(128)
    assert abs(fc.std() - 1 / math.sqrt(128)) < 0.005
    proj_in = np.array(params["transformer.h.0.attn.c_q.weight"])
    assert abs(proj_in.std() - 1 / math.sqrt(128)) < 0.005


def _nanochat_rope(x):
    """nanochat's apply_rotary_emb on (B, H, T, D): y1 = x1 cos + x2 sin, y2 = -x1 sin + x2 cos."""
    B, H, T, D = x.shape
    inv = 1.0 / (10000 ** (np.arange(0, D, 2) / D))
    freqs = np.outer(np.arange(T), inv)
    cos, sin = np.cos(freqs), np.sin(freqs)
    x1, x2 = x[..., : D // 2], x[..., D // 2 :]
    return np.concatenate([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], -1)


def _rms(x, eps=gpt.NORM_EPS):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)


def test_attention_equals_naive_causal_softmax_reference():
    mx.random.seed(0)
    attn = gpt.CausalSelfAttention(TINY)
    x = mx.random.normal((2, 7, TINY.n_embd))
    got = np.array(attn(x))
    xn = np.array(x, dtype=np.float64)
    w = {k: np.array(v, dtype=np.float64) for k, v in tree_flatten(attn.parameters())}
    H, KV, D = TINY.n_head, TINY.n_kv_head, TINY.head_dim

    def split(t, h):
        return t.reshape(2, 7, h, D).transpose(0, 2, 1, 3)

    q = _rms(_nanochat_rope(split(xn @ w["c_q.weight"].T, H)))
    k = _rms(_nanochat_rope(split(xn @ w["c_k.weight"].T, KV)))
    v = split(xn @ w["c_v.weight"].T, KV)
    k, v = np.repeat(k, H // KV, axis=1), np.repeat(v, H // KV, axis=1)
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(D)
    scores = np.where(np.tril(np.ones((7, 7), bool)), scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    y = (p / p.sum(-1, keepdims=True)) @ v
    ref = y.transpose(0, 2, 1, 3).reshape(2, 7, -1) @ w["c_proj.weight"].T
    np.testing.assert_allclose(got, ref, atol=2e-5, rtol=1e-4)


def _random_model(seed=0):
    mx.random.seed(seed)
    m = GPT(TINY)
    m.init_weights(seed)
    # give the zero-initialised projections some weight so every path matters
    m.update(nn.utils.tree_map(lambda p: p + 0.02 * mx.random.normal(p.shape), m.parameters()))
    return m


def test_chunked_loss_and_gradients_equal_unchunked(monkeypatch):
    m = _random_model()
    idx = mx.random.randint(0, 256, (2, 16))
    tgt = mx.random.randint(0, 256, (2, 16))
    tgt[0, :3] = -1  # ignored positions
    loss_grad = nn.value_and_grad(m, lambda mm: mm(idx, tgt))
    full_loss, full_grads = loss_grad(m)
    logits = m(idx)
    ref = nn.losses.cross_entropy(logits.reshape(-1, 256), mx.maximum(tgt, 0).reshape(-1), reduction="none")
    ref = (ref * (tgt.reshape(-1) >= 0)).sum() / (tgt >= 0).sum()
    assert abs(full_loss.item() - ref.item()) < 1e-5
    monkeypatch.setattr(gpt, "LOSS_CHUNK_ELEMENTS", 256 * 5)  # chunks of 5 rows, uneven split of 32
    chunk_loss, chunk_grads = loss_grad(m)
    assert abs(chunk_loss.item() - full_loss.item()) < 1e-6
    for (name, a), (_, b) in zip(tree_flatten(full_grads), tree_flatten(chunk_grads)):
        np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-6, err_msg=name)


@pytest.mark.parametrize("kernel", [
    pytest.param("cuda", marks=pytest.mark.skipif(not cuda_kernels.available(), reason="needs MLX's CUDA backend")),
    "fused", "portable"])
@pytest.mark.parametrize("rows_per_chunk", [32, 5])  # one chunk; chunks of 5 rows, uneven split of 32
@pytest.mark.parametrize("objective", ["mean", "weighted"])
def test_chunked_losses_and_gradients_equal_the_reference(monkeypatch, kernel, rows_per_chunk, objective):
    """Both loss kernels give the reference's loss and gradients: full softcapped fp32 logits into
    nn.losses.cross_entropy, targets < 0 ignored, plain autodiff. 'mean' is the training loss (its
    head gradient formed in the forward, `chunked_loss_sum`); 'weighted' is RL's use of the
    per-token losses, a different cotangent per row through the recomputing backward."""
    m = _random_model()
    idx = mx.random.randint(0, 256, (2, 16))
    tgt = mx.random.randint(0, 256, (2, 16))
    tgt[0, :3] = -1
    tgt[1, 5] = -1
    valid = tgt >= 0
    weights = mx.random.normal((2, 16))

    def reduce(per_token):
        if objective == "mean":
            return mx.where(valid, per_token, 0.0).sum() / valid.sum()
        return (per_token * weights).sum()

    def reference(mm):
        per_token = nn.losses.cross_entropy(mm(idx).reshape(-1, 256), mx.maximum(tgt, 0).reshape(-1), reduction="none")
        return reduce(mx.where(valid, per_token.reshape(2, 16), 0.0))

    def chunked(mm):
        return mm(idx, tgt) if objective == "mean" else reduce(mm(idx, tgt, reduction="none"))

    ref_loss, ref_grads = nn.value_and_grad(m, reference)(m)
    monkeypatch.setenv(gpt.LOSS_ENV, kernel)
    monkeypatch.setattr(gpt, "FUSED_LOSS_CHUNK_ELEMENTS", 256 * rows_per_chunk)
    monkeypatch.setattr(gpt, "LOSS_CHUNK_ELEMENTS", 256 * rows_per_chunk)
    loss, grads = nn.value_and_grad(m, chunked)(m)
    assert abs(loss.item() - ref_loss.item()) < 1e-5
    for (name, a), (_, b) in zip(tree_flatten(ref_grads), tree_flatten(grads)):
        np.testing.assert_allclose(np.array(b), np.array(a), atol=1e-6, rtol=1e-5, err_msg=name)


def test_unknown_loss_kernel_is_named(monkeypatch):
    monkeypatch.setenv(gpt.LOSS_ENV, "fast")
    with pytest.raises(MlxchatError, match="MLXCHAT_LOSS='fast': expected one of cuda, fused, portable"):
        _random_model()(mx.zeros((1, 4), mx.int32), mx.zeros((1, 4), mx.int32))


def test_logits_are_softcapped():
    m = _random_model()
    m.lm_head.weight = m.lm_head.weight * 1000
    logits = m(mx.random.randint(0, 256, (1, 8)))
    assert mx.abs(logits).max().item() <= gpt.SOFTCAP


def test_bfloat16_compute_keeps_fp32_master_weights():
    m = _random_model()
    m.compute_dtype = mx.bfloat16
    idx = mx.random.randint(0, 256, (1, 8))
    loss, grads = nn.value_and_grad(m, lambda mm: mm(idx, idx))(m)
    assert m.hidden(idx).dtype == mx.bfloat16
    assert all(p.dtype == mx.float32 for _, p in tree_flatten(m.parameters()))
    # the block matrices' gradients stay in the compute dtype (gpt._weight_gradient), the rest fp32
    dtypes = {name: g.dtype for name, g in tree_flatten(grads)}
    assert {d for n, d in dtypes.items() if n.startswith("transformer.h.")} == {mx.bfloat16}
    assert {d for n, d in dtypes.items() if not n.startswith("transformer.h.")} == {mx.float32}
    assert math.isfinite(loss.item())


def test_eval_mode_gives_the_same_logits_and_autodiff_gradients():
    """model.eval() (the inference loaders') swaps the hand-written backward's custom functions
    for the same ops: the same logits, and autodiff still differentiates them (in fp32)."""
    m = _random_model()
    m.compute_dtype = mx.bfloat16
    idx = mx.random.randint(0, 256, (2, 8))
    loss_grad = nn.value_and_grad(m, lambda mm: mm(idx, idx))
    logits, (loss, grads) = m(idx), loss_grad(m)
    m.eval()
    assert not m.transformer.h[0].attn.c_q.training
    np.testing.assert_array_equal(np.array(m(idx)), np.array(logits))
    eval_loss, eval_grads = loss_grad(m)
    assert eval_loss.item() == loss.item()
    for (name, a), (_, b) in zip(tree_flatten(grads), tree_flatten(eval_grads)):
        assert b.dtype == mx.float32
        scale = mx.abs(b).max().item() + 1e-6
        assert mx.abs(a.astype(mx.float32) - b).max().item() <= 2**-6 * scale, name


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_hand_written_linear_backward_equals_autodiff(dtype):
    """CastLinear (with and without the residual in its GEMM) and the q/k/v projection are
    differentiated by hand; autodiff of the plain expressions is the reference."""
    mx.random.seed(3)
    x = mx.random.normal((2, 5, 32)).astype(dtype)
    res = mx.random.normal((2, 5, 48)).astype(dtype)
    ws = [mx.random.normal((n, 32)) * 0.2 for n in (48, 16, 16)]
    cots = [mx.random.normal((10, n)).astype(dtype) for n in (48, 16, 16)]
    lin = gpt.CastLinear(32, 48)
    lin.weight = ws[0]

    def ours(x, res, wq, wk, wv):
        lin.weight = wq
        q, k, v = gpt._qkv(x.reshape(10, 32), wq, wk, wv)[:3]
        terms = [lin(x).reshape(10, 48), lin(x, res).reshape(10, 48) - res.reshape(10, 48), q, k, v]
        cs = [cots[0], cots[0] * 0.5, *cots]
        return sum(((t * c).astype(mx.float32)).sum() for t, c in zip(terms, cs))

    def reference(x, res, wq, wk, wv):
        x2 = x.reshape(10, 32)
        ps = [x2 @ w.astype(dtype).T for w in (wq, wk, wv)]
        terms = [ps[0], (res.reshape(10, 48) + ps[0]) - res.reshape(10, 48), *ps]
        cs = [cots[0], cots[0] * 0.5, *cots]
        return sum(((t * c).astype(mx.float32)).sum() for t, c in zip(terms, cs))

    got = mx.grad(ours, argnums=(0, 1, 2, 3, 4))(x, res, *ws)
    want = mx.grad(reference, argnums=(0, 1, 2, 3, 4))(x, res, *ws)
    ulps = 2**-20 if dtype == mx.float32 else 2**-6  # bf16 sums rounded in another order
    for g, w in zip(got, want):
        assert g.shape == w.shape
        scale = mx.abs(w).max().item() + 1e-6
        assert mx.abs(g.astype(mx.float32) - w.astype(mx.float32)).max().item() <= ulps * scale


def test_estimate_flops_matches_nanochat_formula():
    m = GPT(GPTConfig.from_depth(12))
    c = m.config
    non_emb = m.num_params() - c.vocab_size * c.n_embd
    assert m.estimate_flops() == 6 * non_emb + 12 * 12 * 6 * 128 * 2048


def test_checkpointed_blocks_give_the_same_loss_and_gradients():
    m = _random_model()
    idx = mx.random.randint(0, 256, (2, 16))
    loss_grad = nn.value_and_grad(m, lambda mm: mm(idx, idx))
    loss, grads = loss_grad(m)
    m.checkpoint_blocks = True
    ck_loss, ck_grads = loss_grad(m)
    assert abs(ck_loss.item() - loss.item()) < 1e-6
    for (name, a), (_, b) in zip(tree_flatten(grads), tree_flatten(ck_grads)):
        np.testing.assert_allclose(np.array(b), np.array(a), atol=1e-6, err_msg=name)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_squared_relu_backward_from_its_output_equals_autodiff(dtype):
    """The MLP's activation differentiated from its output (relu(h)²) gives autodiff's gradient,
    zero where h ≤ 0, within the dtype's rounding."""
    h = (3 * mx.random.normal((2, 5, 32), key=mx.random.key(1))).astype(dtype)
    h[0, 0, :4] = 0.0
    cot = mx.random.normal((2, 5, 32), key=mx.random.key(3)).astype(dtype)
    (ref_out,), (ref_dh,) = mx.vjp(lambda a: mx.square(nn.relu(a)), [h], [cot])
    (out,), (dh,) = mx.vjp(gpt.squared_relu, [h], [cot])
    assert dh.dtype == dtype and dh.shape == h.shape and not dh[0, 0, :4].any()
    tol = 1e-6 if dtype == mx.float32 else 1e-2
    for a, b in ((ref_out, out), (ref_dh, dh)):
        np.testing.assert_allclose(np.array(b.astype(mx.float32)), np.array(a.astype(mx.float32)), atol=tol, rtol=tol)


def test_the_mlp_backward_keeps_its_squared_activation_only():
    """Through the projection (GEMM with the residual), the MLP's gradients equal autodiff's."""
    cfg = gpt.GPTConfig(sequence_len=8, vocab_size=32, n_layer=1, n_head=1, n_kv_head=1, n_embd=16)
    mlp = gpt.MLP(cfg)
    x = mx.random.normal((2, 5, 16), key=mx.random.key(5))
    res = mx.random.normal((2, 5, 16), key=mx.random.key(6))

    def reference(m, x, res):
        return res + mx.square(nn.relu(x @ m.c_fc.weight.T)) @ m.c_proj.weight.T

    ref = nn.value_and_grad(mlp, lambda m: (reference(m, x, res) ** 2).sum())(mlp)
    ours = nn.value_and_grad(mlp, lambda m: (m(x, res) ** 2).sum())(mlp)
    assert abs(ref[0].item() - ours[0].item()) <= 1e-5 * abs(ref[0].item())
    for (name, a), (_, b) in zip(tree_flatten(ref[1]), tree_flatten(ours[1])):
        np.testing.assert_allclose(np.array(b), np.array(a), rtol=1e-4, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_norm_backward_from_its_output_equals_autodiff(dtype):
    """The norm's backward from its output and row scale gives the fused RMSNorm's gradient, on
    rows of very different scales (the residual stream grows with depth)."""
    x = (mx.random.normal((3, 7, 64), key=mx.random.key(4)) * mx.array([0.01, 1.0, 300.0])[:, None, None]).astype(dtype)
    cot = mx.random.normal((3, 7, 64), key=mx.random.key(5)).astype(dtype)
    reference = mx.vjp(lambda a: mx.fast.rms_norm(a, None, gpt.NORM_EPS), [x], [cot])
    ours = mx.vjp(gpt.block_norm(None), [x], [cot])
    tol = 1e-5 if dtype == mx.float32 else 2e-2
    for a, b in zip(reference[0] + reference[1], ours[0] + ours[1]):
        assert a.dtype == b.dtype and a.shape == b.shape
        scale = float(mx.abs(a.astype(mx.float32)).max())
        np.testing.assert_allclose(np.array(b.astype(mx.float32)), np.array(a.astype(mx.float32)), atol=tol * scale, rtol=tol)


@pytest.mark.parametrize("kernel", ["fused", "portable"])
def test_per_token_losses_equal_the_softcapped_log_sum_exp_in_float64(monkeypatch, kernel):
    """`gpt.token_losses` (CORE's, bpb's and RL's per-token losses; on the CPU with the arithmetic
    tanh and exp) against float64 on logits from tiny to far past the softcap, (rows, T, vocab)
    as CORE passes them, ignored targets giving 0."""
    monkeypatch.setenv(gpt.LOSS_ENV, kernel)
    z = mx.random.normal((3, 5, 300), key=mx.random.key(6)) * mx.array([0.01, 10.0, 400.0])[:, None, None]
    targets = mx.random.randint(0, 300, (3, 5), key=mx.random.key(7))
    targets[1, 2] = -1
    capped = gpt.SOFTCAP * np.tanh(np.array(z, dtype=np.float64) / gpt.SOFTCAP)
    picked = np.take_along_axis(capped, np.maximum(np.array(targets), 0)[..., None], axis=-1)[..., 0]
    lse = capped.max(-1) + np.log(np.exp(capped - capped.max(-1, keepdims=True)).sum(-1))
    exact = np.where(np.array(targets) >= 0, lse - picked, 0.0)
    losses = gpt.token_losses(z, targets)
    assert losses.shape == (3, 5) and losses[1, 2].item() == 0.0
    np.testing.assert_allclose(np.array(losses, dtype=np.float64), exact, rtol=2e-6, atol=2e-5)


def test_per_token_losses_of_three_dimensional_logits_differentiate_as_the_reference(monkeypatch):
    """The CPU's per-token losses under autodiff (RL's use) on (rows, T, vocab) logits: the hand-written
    backward equals autodiff through the softcapped log-sum-exp, a weight per position."""
    monkeypatch.setenv(gpt.LOSS_ENV, "portable")
    z = mx.random.normal((2, 4, 50), key=mx.random.key(8)) * 20
    targets = mx.random.randint(0, 50, (2, 4), key=mx.random.key(9))
    targets[0, 1] = -1
    weights = mx.random.normal((2, 4), key=mx.random.key(10))
    (ours,), (dz,) = mx.vjp(lambda a: gpt.token_losses(a, targets), [z], [weights])
    (ref,), (ref_dz,) = mx.vjp(lambda a: gpt._losses_of_logits(gpt._softcap(a), targets), [z], [weights])
    np.testing.assert_allclose(np.array(ours), np.array(ref), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.array(dz), np.array(ref_dz), rtol=1e-5, atol=1e-6)
    assert float(mx.abs(dz[0, 1]).max()) == 0.0
