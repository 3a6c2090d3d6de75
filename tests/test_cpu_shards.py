"""The training step's batch split across CPU streams gives the whole batch's loss and update, and
the evaluations' forwards split the same way give the whole batch's numbers."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlxchat import cpu_shards
from mlxchat.common import MlxchatError
from mlxchat.evaluation import bpb, core
from mlxchat.gpt import GPT, GPTConfig
from mlxchat.optim import OptimConfig, build_optimizer
from mlxchat.train import TrainStep

CFG = GPTConfig(sequence_len=16, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=32)


def _model(random_head: bool = False) -> GPT:
    model = GPT(CFG)
    model.init_weights(0)
    if random_head:  # nanochat's zero head gives every token the same loss: nothing to tell shards apart
        model.lm_head.weight = mx.random.normal(model.lm_head.weight.shape, key=mx.random.key(4))
    return model


def _batch(rows: int):
    x = mx.random.randint(0, 64, (rows, 16), key=mx.random.key(1))
    y = mx.random.randint(0, 64, (rows, 16), key=mx.random.key(2))
    # ignored targets spread unevenly over the rows, as SFT's masks: the mean is over valid ones
    ignored = mx.random.uniform(key=mx.random.key(3), shape=y.shape) < mx.linspace(0.0, 0.9, rows)[:, None]
    return x, mx.where(ignored, -1, y)


@pytest.mark.parametrize("rows, shards", [(4, 2), (3, 2), (5, 3), (1, 2)])
def test_sharded_loss_and_gradients_equal_the_whole_batch(rows, shards):
    model = _model()
    x, y = _batch(rows)
    whole = nn.value_and_grad(model, lambda m, x, y: m(x, y))
    summed = nn.value_and_grad(model, lambda m, x, y, count: m(x, y, reduction="sum") / count)
    streams = [mx.default_stream(mx.cpu)] + [mx.new_stream(mx.cpu) for _ in range(shards - 1)]
    loss, grads = cpu_shards.sharded_loss_and_grad(lambda *b: summed(model, *b), x, y, streams)
    ref_loss, ref_grads = whole(model, x, y)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    ref = dict(tree_flatten(ref_grads))
    for name, g in tree_flatten(grads):
        assert g.dtype == mx.float32, name
        np.testing.assert_allclose(np.array(g), np.array(ref[name]), atol=1e-6, rtol=1e-5, err_msg=name)


def test_a_sharded_train_step_gives_the_unsharded_update(monkeypatch):
    """TrainStep compiles the shards, their sum, clipping and Muon into one graph over two streams."""
    x, y = _batch(4)
    results = []
    for shards in ("1", "2"):
        monkeypatch.setenv(cpu_shards.SHARDS_ENV, shards)
        model = _model()
        opt = build_optimizer(model, OptimConfig(), 10)
        opt.init(model.trainable_parameters())
        step = TrainStep(model, opt, 1, 1.0, 1)
        for _ in range(2):
            loss, norm = step(iter([(x, y)]))
        results.append((loss, norm, dict(tree_flatten(model.parameters()))))
    (loss1, norm1, p1), (loss2, norm2, p2) = results
    assert loss2 == pytest.approx(loss1, rel=1e-5) and norm2 == pytest.approx(norm1, rel=1e-4)
    for name in p1:
        np.testing.assert_allclose(np.array(p2[name]), np.array(p1[name]), atol=1e-5, err_msg=name)


def test_shard_count_is_one_per_core_on_the_cpu_and_one_across_ranks(monkeypatch):
    monkeypatch.delenv(cpu_shards.SHARDS_ENV, raising=False)
    assert cpu_shards.shard_count(1) == cpu_shards.cores()
    assert cpu_shards.shard_count(2) == 1
    monkeypatch.setenv(cpu_shards.SHARDS_ENV, "3")
    assert cpu_shards.shard_count(1) == 3


@pytest.mark.parametrize("value", ["0", "two", "-1"])
def test_a_bad_shard_count_is_named(monkeypatch, value):
    monkeypatch.setenv(cpu_shards.SHARDS_ENV, value)
    with pytest.raises(MlxchatError, match=f"MLXCHAT_CPU_SHARDS='{value}': expected a whole number >= 1"):
        cpu_shards.shard_count(1)


def test_the_update_dealt_over_streams_is_the_one_stream_update():
    """Muon's groups dealt out over two streams and the AdamW groups taking turns: the same values."""
    x, y = _batch(4)
    results = []
    for streams in (None, [mx.default_stream(mx.cpu), mx.new_stream(mx.cpu)]):
        model = _model()
        _, g = nn.value_and_grad(model, lambda m, x, y: m(x, y))(model, x, y)
        opt = build_optimizer(model, OptimConfig(), 10)
        opt.init(model.trainable_parameters())
        norm = opt.clip_and_update(model, g, 0.5, streams)
        mx.eval(model.parameters(), opt.state)
        results.append((norm.item(), dict(tree_flatten(model.parameters()))))
    (norm1, p1), (norm2, p2) = results
    assert norm1 == norm2
    for name in p1:
        assert mx.array_equal(p1[name], p2[name]).item(), name


def test_blas_runs_one_thread_a_shard_while_the_steps_run_and_all_of_them_otherwise(monkeypatch):
    """The count is set only inside TrainStep.running() and restored after it, so later stages in
    the same process keep every BLAS thread; an evaluation nested inside (bpb's sums) changes
    nothing."""
    calls = []
    threads = {"n": 2}
    monkeypatch.setattr(cpu_shards.blas, "openblas_threads", lambda: threads["n"])
    monkeypatch.setattr(cpu_shards.blas, "set_openblas_threads", lambda n: (calls.append(n), threads.update(n=n)))
    streams = [mx.default_stream(mx.cpu), mx.new_stream(mx.cpu)]
    with cpu_shards.OneBlasThreadPerShard(streams):
        assert threads["n"] == 1
        with cpu_shards.OneBlasThreadPerShard(streams):
            assert threads["n"] == 1
        assert threads["n"] == 1
    assert threads["n"] == 2 and calls == [1, 2]
    with cpu_shards.OneBlasThreadPerShard(streams[:1]):  # one shard: BLAS keeps its threads
        assert threads["n"] == 2
    assert calls == [1, 2]


def test_the_real_openblas_thread_count_is_read_and_set():
    from mlxchat import blas

    before = blas.openblas_threads()
    if before is None:
        pytest.skip("no OpenBLAS loaded in this process (MLX's own BLAS or Accelerate)")
    try:
        blas.set_openblas_threads(1)
        assert blas.openblas_threads() == 1
    finally:
        blas.set_openblas_threads(before)
    assert blas.openblas_threads() == before


@pytest.mark.parametrize("rows, shards", [(5, 2), (5, 3), (1, 2)])
def test_cores_sharded_forward_gives_the_whole_batchs_losses_and_predictions(rows, shards):
    model = _model(random_head=True)
    x, _ = _batch(rows)
    ids = [r[: 16 - i] for i, r in enumerate(x.tolist())]  # ragged rows, right-padded by _forward
    streams = [mx.default_stream(mx.cpu)] + [mx.new_stream(mx.cpu) for _ in range(shards - 1)]
    losses, preds = core._forward(model, ids, 0, streams)
    ref_losses, ref_preds = core._forward(model, ids, 0)
    assert len(losses) == rows and preds == ref_preds
    np.testing.assert_allclose(np.array(losses), np.array(ref_losses), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("evaluate", ["bpb", "loss"])
def test_bpb_and_the_validation_loss_sharded_equal_the_unsharded(monkeypatch, evaluate):
    """Each batch's sums are added over the shards; rows 5 over 3 shards leave them uneven."""
    batches = [_batch(5) for _ in range(2)]
    token_bytes = mx.arange(64) % 4  # some tokens count no bytes, as special tokens
    results = []
    for shards in ("1", "3"):
        monkeypatch.setenv(cpu_shards.SHARDS_ENV, shards)
        if evaluate == "bpb":
            results.append(bpb.evaluate_bpb(_model(random_head=True), iter(batches), 2, token_bytes))
        else:
            results.append(bpb.evaluate_loss(_model(random_head=True), iter(batches), 2))
    assert results[1] == pytest.approx(results[0], rel=1e-6)


def test_core_runs_its_forwards_with_one_blas_thread_a_shard(monkeypatch):
    """evaluate_task holds OneBlasThreadPerShard around its forwards and gives the threads back."""
    seen, threads = [], {"n": 2}
    monkeypatch.setenv(cpu_shards.SHARDS_ENV, "2")
    monkeypatch.setattr(cpu_shards.blas, "openblas_threads", lambda: threads["n"])
    monkeypatch.setattr(cpu_shards.blas, "set_openblas_threads", lambda n: threads.update(n=n))
    forward = core._forward
    monkeypatch.setattr(core, "_forward", lambda *a: (seen.append((threads["n"], len(a[3]))), forward(*a))[1])

    class Tok:
        bos_id = 0

        def encode(self, texts, prepend=None):
            return [[prepend or 0] + [1 + ord(c) % 60 for c in t] for t in texts]

    data = [{"context": "ab", "continuation": "cd"}, {"context": "ef", "continuation": "g"}]
    meta = {"task_type": "language_modeling", "num_fewshot": 0, "continuation_delimiter": " "}
    core.evaluate_task(_model(), Tok(), data, meta)
    assert seen and all(s == (1, 2) for s in seen) and threads["n"] == 2
