"""Optimizer semantics match nanochat's Muon / AdamW setup and schedules."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlxchat.gpt import GPT, GPTConfig
from mlxchat.optim import OptimConfig, build_optimizer, lr_multiplier, muon_momentum, param_group


def _nanochat_lr(it, n, warmup_ratio=0.0, warmdown_ratio=0.2, final=0.0):
    warmup, warmdown = round(warmup_ratio * n), round(warmdown_ratio * n)
    if it < warmup:
        return (it + 1) / warmup
    if it <= n - warmdown:
        return 1.0
    progress = (n - it) / warmdown
    return progress * 1.0 + (1 - progress) * final


def _ns_reference(G, steps=5):
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.T if G.shape[0] > G.shape[1] else G
    X = X / (np.linalg.norm(X) + 1e-7)
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if G.shape[0] > G.shape[1] else X


def test_every_parameter_is_in_exactly_one_group():
    m = GPT(GPTConfig.from_depth(3, vocab_size=512))
    groups = {}
    for name, _ in tree_flatten(m.parameters()):
        groups.setdefault(param_group(name), []).append(name)
    assert groups["lm_head"] == ["lm_head.weight"]
    assert groups["embedding"] == ["transformer.wte.weight"]
    assert len(groups["matrix"]) == 3 * 6
    assert sum(len(v) for v in groups.values()) == len(tree_flatten(m.parameters()))
    opt = build_optimizer(m, OptimConfig(), 10)
    opt.init(m.trainable_parameters())
    owned = [sorted(k for k, v in tree_flatten(s) if k.endswith((".m", ".v")) and "weight" in k) for s in opt.state["states"]]
    flat = [k.rsplit(".", 1)[0] for o in owned for k in o]
    # AdamW holds m and v per parameter, Muon holds v: every parameter appears in exactly one optimizer
    assert sorted(set(flat)) == sorted(k for k, _ in tree_flatten(m.parameters()))
    assert len(set(k.rsplit(".", 1)[0] for k in owned[0] + owned[1]) & set(k.rsplit(".", 1)[0] for k in owned[2])) == 0


@pytest.mark.parametrize("it", [0, 1, 500, 799, 800, 801, 900, 999, 1000])
def test_lr_schedule_matches_nanochat(it):
    cfg = OptimConfig()
    assert lr_multiplier(it, 1000, cfg) == pytest.approx(_nanochat_lr(it, 1000))
    assert lr_multiplier(mx.array(float(it)), 1000, cfg).item() == pytest.approx(_nanochat_lr(it, 1000), abs=1e-6)
    warm = OptimConfig(warmup_ratio=0.1, final_lr_frac=0.1)
    assert lr_multiplier(it, 1000, warm) == pytest.approx(_nanochat_lr(it, 1000, 0.1, 0.2, 0.1))


@pytest.mark.parametrize("it,expected", [(0, 0.85), (150, 0.90), (300, 0.95), (5000, 0.95)])
def test_muon_momentum_warmup_matches_nanochat(it, expected):
    assert muon_momentum(it) == pytest.approx(expected)
    assert muon_momentum(mx.array(float(it))).item() == pytest.approx(expected, abs=1e-6)


def test_newton_schulz_output_is_near_orthogonal():
    from mlxchat.optim import NanoMuon

    G = mx.random.normal((64, 256))
    X = np.array(NanoMuon(0.02, 0.95)._zeropower_via_newtonschulz5(G, steps=5))
    s = np.linalg.svd(X, compute_uv=False)
    assert s.min() > 0.5 and s.max() < 1.5  # nanochat: S' ~ Uniform(0.5, 1.5), not exactly 1
    np.testing.assert_allclose(X, _ns_reference(np.array(G, dtype=np.float64)), atol=1e-4)


def test_one_step_equals_nanochat_muon_and_adamw_update():
    """Two steps of the MLX optimizers reproduce nanochat's update rules written out in NumPy."""
    cfg = GPTConfig(sequence_len=8, vocab_size=32, n_layer=1, n_head=1, n_kv_head=1, n_embd=16)
    m = GPT(cfg)
    m.init_weights(0)
    n = 100
    opt = build_optimizer(m, OptimConfig(), n)
    params0 = {k: np.array(v, dtype=np.float64) for k, v in tree_flatten(m.parameters())}
    grads = [{k: np.random.default_rng(s).normal(size=v.shape) for k, v in params0.items()} for s in (1, 2)]
    scale = (16 / 768) ** -0.5
    ref = {k: v.copy() for k, v in params0.items()}
    buf = {k: np.zeros_like(v) for k, v in params0.items()}
    adam_m = {k: np.zeros_like(v) for k, v in params0.items()}
    adam_v = {k: np.zeros_like(v) for k, v in params0.items()}
    for it, g in enumerate(grads):
        opt.update(m, nn.utils.tree_unflatten([(k, mx.array(v, dtype=mx.float32)) for k, v in g.items()]))
        lrm = _nanochat_lr(it, n)
        mom = (1 - min(it / 300, 1)) * 0.85 + min(it / 300, 1) * 0.95
        for k, gk in g.items():
            group = param_group(k)
            if group == "matrix":
                buf[k] = buf[k] + (1 - mom) * (gk - buf[k])  # lerp_
                upd = gk + mom * (buf[k] - gk)  # nesterov lerp
                upd = _ns_reference(upd)
                ref[k] -= 0.02 * lrm * max(1, upd.shape[0] / upd.shape[1]) ** 0.5 * upd
            else:
                lr = (0.004 if group == "lm_head" else 0.2) * scale * lrm
                b1, b2, step = 0.8, 0.95, it + 1
                adam_m[k] = b1 * adam_m[k] + (1 - b1) * gk
                adam_v[k] = b2 * adam_v[k] + (1 - b2) * gk * gk
                mhat, vhat = adam_m[k] / (1 - b1**step), adam_v[k] / (1 - b2**step)
                ref[k] -= lr * mhat / (np.sqrt(vhat) + 1e-10)
    for k, v in tree_flatten(m.parameters()):
        np.testing.assert_allclose(np.array(v), ref[k], atol=2e-5, err_msg=k)


def test_batched_newton_schulz_equals_muon_per_matrix():
    """NanoMuon's update (momentum per matrix, Newton–Schulz per stacked shape group, tall
    matrices transposed into the wide group) equals mlx's Muon run one matrix at a time."""
    import mlx.optimizers as optim

    from mlxchat.optim import NanoMuon

    shapes = {"a": (16, 16), "b": (16, 16), "c": (48, 16), "d": (16, 48), "e": (8, 24)}
    params = {k: mx.random.normal(s, key=mx.random.key(i)) for i, (k, s) in enumerate(shapes.items())}
    batched, per_matrix = NanoMuon(0.02, 0.9), NanoMuon(0.02, 0.9)
    p_batched, p_per_matrix = params, params
    for step in range(3):
        grads = {k: mx.random.normal(s, key=mx.random.key(10 * step + i)) for i, (k, s) in enumerate(shapes.items())}
        p_batched = batched.apply_gradients(grads, p_batched)
        p_per_matrix = optim.Optimizer.apply_gradients(per_matrix, grads, p_per_matrix)  # Muon.apply_single
    for k in shapes:
        np.testing.assert_allclose(np.array(p_batched[k]), np.array(p_per_matrix[k]), rtol=1e-5, atol=1e-6, err_msg=k)
        np.testing.assert_allclose(np.array(batched.state[k]["v"]), np.array(per_matrix.state[k]["v"]), rtol=1e-5, atol=1e-7, err_msg=k)
    assert not np.allclose(np.array(p_batched["a"]), np.array(params["a"]))


def test_bfloat16_newton_schulz_stays_near_the_fp32_iteration():
    """The GPU runs Newton–Schulz in bf16 on stacks of matrices: it must stay finite and within
    bf16's error of the float64 iteration, for tiny gradients and for an all-zero one (a zero-init
    c_proj's first gradients)."""
    from mlxchat.optim import newton_schulz

    G = mx.concatenate([1e-4 * mx.random.normal((3, 32, 96), key=mx.random.key(0)), mx.zeros((1, 32, 96))])
    X = np.array(newton_schulz(G.astype(mx.bfloat16), 5).astype(mx.float32))
    assert np.isfinite(X).all()
    for i in range(3):
        np.testing.assert_allclose(X[i], _ns_reference(np.array(G[i], dtype=np.float64)), atol=0.05)
    assert not X[3].any()


def _model_and_grads(seed: int, matrix_dtype=mx.float32):
    cfg = GPTConfig(sequence_len=8, vocab_size=32, n_layer=2, n_head=2, n_kv_head=1, n_embd=32)
    m = GPT(cfg)
    m.init_weights(0)
    grads = [(k, mx.random.normal(v.shape, key=mx.random.key(seed + i)).astype(matrix_dtype if param_group(k) == "matrix" else mx.float32))
             for i, (k, v) in enumerate(tree_flatten(m.parameters()))]
    return m, nn.utils.tree_unflatten(grads)


@pytest.mark.parametrize("max_norm", [0.5, 1e6, 0.0])
def test_clip_and_update_equals_clip_grad_norm_then_update(max_norm):
    """Clipping's scale handed to Muon's momentum pass gives the parameters and the norm of
    mlx's `clip_grad_norm` followed by a plain update (max_norm 0: no clipping)."""
    import mlx.optimizers as optim

    ours, grads = _model_and_grads(1)
    ref, _ = _model_and_grads(1)
    opt_ours, opt_ref = build_optimizer(ours, OptimConfig(), 10), build_optimizer(ref, OptimConfig(), 10)
    for _ in range(2):
        norm = opt_ours.clip_and_update(ours, grads, max_norm)
        clipped, ref_norm = optim.clip_grad_norm(grads, max_norm) if max_norm > 0 else (grads, norm)
        opt_ref.update(ref, clipped)
        assert norm.item() == pytest.approx(ref_norm.item(), rel=1e-6)
    for (k, a), (_, b) in zip(tree_flatten(ours.parameters()), tree_flatten(ref.parameters())):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-6, atol=1e-7, err_msg=k)


def test_matrix_gradients_in_bfloat16_update_as_their_fp32_values():
    """The block matrices' gradients arrive in bf16 on GPUs (gpt._weight_gradient): their values
    cast up exactly, so the update must equal the one from the same values in fp32; summing
    micro-batches (`add_gradients`) happens in fp32."""
    from mlxchat.optim import add_gradients

    low, grads = _model_and_grads(2, mx.bfloat16)
    high, _ = _model_and_grads(2)
    grads32 = add_gradients(None, grads)
    assert {g.dtype for _, g in tree_flatten(grads32)} == {mx.float32}
    build_optimizer(low, OptimConfig(), 10).clip_and_update(low, grads, 1.0)
    build_optimizer(high, OptimConfig(), 10).clip_and_update(high, grads32, 1.0)
    for (k, a), (_, b) in zip(tree_flatten(low.parameters()), tree_flatten(high.parameters())):
        assert a.dtype == mx.float32
        # equal up to the norm's summation order (on CUDA one kernel per gradient dtype)
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-5, atol=1e-8, err_msg=k)
    twice = add_gradients(grads32, grads)
    tiny = mx.array(1e-3, mx.bfloat16)  # bf16 + bf16 would round it away next to 1.0
    summed = add_gradients(add_gradients(None, {"g": mx.array(1.0, mx.bfloat16)}), {"g": tiny})
    assert summed["g"].item() == pytest.approx(1.0 + float(tiny.item()), rel=1e-7)
    for (_, t), (_, g) in zip(tree_flatten(twice), tree_flatten(grads32)):
        np.testing.assert_array_equal(np.array(t), 2 * np.array(g))
