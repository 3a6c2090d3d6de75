"""RL (nanochat's chat_rl): the policy-gradient loss against a hand computation, RL raising a
rewarded behaviour's probability, and a killed RL run resuming bit for bit."""

import os
import subprocess
import sys
from pathlib import Path
from pydoc_data.topics import topics

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from killing import kill_after_checkpoint
from mlx.utils import tree_flatten
from rlrun import SayE

from mlxchat.calculator import calculator_tool
from mlxchat.checkpoint import latest_checkpoint, save_checkpoint
from mlxchat.gpt import GPT, GPTConfig
from mlxchat.optim import OptimConfig, build_optimizer
from mlxchat.rl import RLConfig, pad_rollouts, pg_loss, policy_gradient_step, rollouts, sampler_seed
from mlxchat.tokenizer import Tokenizer


class Bigram(nn.Module):
    """logits[t] = W[x[t]]: small enough to differentiate by hand."""

    def __init__(self, W):
        super().__init__()
        self.W = W

    def __call__(self, x, targets, reduction="none"):
        logits = self.W[x]
        valid = targets >= 0
        picked = mx.take_along_axis(logits, mx.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
        return mx.where(valid, mx.logsumexp(logits, axis=-1) - picked, 0.0)


def test_pg_loss_and_gradient_match_a_hand_computation():
    # two samples of one question: prompt [1, 2], sample 0 called the tool (tokens 3, 4 forced)
    prompt, pad = [1, 2], 0
    seqs = [[5, 3, 4, 6], [6, 5]]
    masks = [[1, 0, 0, 1], [1, 1]]
    rewards = np.array([1.0, 0.0], dtype=np.float32)
    ro = pad_rollouts(prompt, seqs, masks, rewards, pad)
    assert ro.inputs.tolist() == [[1, 2, 5, 3, 4], [1, 2, 6, 5, 0]]
    assert ro.targets.tolist() == [[-1, 5, -1, -1, 6], [-1, 6, 5, -1, -1]]  # prompt, tool output, padding: -1
    assert ro.advantages.tolist() == [0.5, -0.5]

    W = np.random.default_rng(0).normal(size=(8, 8)).astype(np.float32)
    model = Bigram(mx.array(W))
    normalizer = 4.0  # the 4 sampled tokens
    loss, grads = nn.value_and_grad(model, pg_loss)(model, ro.inputs, ro.targets, ro.advantages, mx.array(normalizer))

    def log_softmax(row):
        return row - np.log(np.exp(row - row.max()).sum()) - row.max()

    x, y, adv = np.array(ro.inputs), np.array(ro.targets), np.array(ro.advantages)
    ref_loss, ref_grad = 0.0, np.zeros_like(W)
    for b in range(2):
        for t in range(x.shape[1]):
            if y[b, t] < 0:
                continue
            logp = log_softmax(W[x[b, t]])
            ref_loss -= adv[b] * logp[y[b, t]] / normalizer
            onehot = np.eye(8)[y[b, t]]
            ref_grad[x[b, t]] -= adv[b] * (onehot - np.exp(logp)) / normalizer  # d(-adv·logp)/dlogits
    np.testing.assert_allclose(loss.item(), ref_loss, rtol=1e-5)
    np.testing.assert_allclose(np.array(grads["W"]), ref_grad, rtol=1e-5, atol=1e-7)
    assert np.abs(ref_grad).max() > 0.01


def test_pg_loss_on_the_gpt_uses_its_log_probs():
    cfg = GPTConfig(sequence_len=16, vocab_size=32, n_layer=1, n_head=1, n_kv_head=1, n_embd=16)
    model = _noisy_gpt(cfg)
    ro = pad_rollouts([1, 2], [[3, 4, 5], [6]], [[1, 0, 1], [1]], np.array([0.0, 1.0], np.float32), pad=0)
    logp = np.array(nn.log_softmax(model(ro.inputs), axis=-1))
    x, y, adv = np.array(ro.inputs), np.array(ro.targets), np.array(ro.advantages)
    expected = -sum(adv[b] * logp[b, t, y[b, t]] for b in range(2) for t in range(x.shape[1]) if y[b, t] >= 0) / 3
    np.testing.assert_allclose(pg_loss(model, ro.inputs, ro.targets, ro.advantages, 3.0).item(), expected, rtol=1e-4)


def _noisy_gpt(cfg, seed=0):
    model = GPT(cfg)
    model.init_weights(seed)
    model.load_weights([(k, v + 0.05 * mx.random.normal(v.shape, key=mx.random.key(i)))
                        for i, (k, v) in enumerate(tree_flatten(model.parameters()))])
    return model


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train_from_iterator(iter(list(topics.values())[:100]), 300)


def test_rl_steps_on_a_scripted_reward_raise_its_probability(tok):
    cfg = GPTConfig(sequence_len=64, vocab_size=tok.vocab_size, n_layer=1, n_head=1, n_kv_head=1, n_embd=32)
    model = _noisy_gpt(cfg)
    rl = RLConfig(num_samples=16, device_batch_size=8, max_new_tokens=1, top_k=None)
    optimizer = build_optimizer(model, OptimConfig(init_lr_frac=5.0, warmdown_ratio=0.0, momentum_warmup_steps=0,
                                                   grad_clip=0.0), 10)
    optimizer.init(model.trainable_parameters())
    task = SayE()
    prompt = tok.render_for_completion(task[0])
    rewarded = np.array([float("e" in tok.decode([i])) for i in range(tok.vocab_size)])

    def p_rewarded() -> float:
        return float((np.array(mx.softmax(model(mx.array([prompt]))[0, -1])) * rewarded).sum())

    before, rewards = p_rewarded(), []
    for step in range(8):
        batch = [rollouts(model, tok, task, 0, [sampler_seed(0, step, 0, s) for s in range(2)], rl, calculator_tool(tok))]
        rewards.append(batch[0].rewards.mean())
        policy_gradient_step(model, optimizer, batch, rl.device_batch_size)
    after = p_rewarded()
    print(f"P(rewarded) {before:.4f} -> {after:.4f}, rewards {rewards}")
    assert 0.02 < before < 0.2 and after > 3 * before, (before, after, rewards)


def _sft_run(home, tok):
    """A run whose `sft` stage is a small noisy GPT: what RL starts from."""
    rdir = home / "runs" / "r"
    tok.save(rdir / "tokenizer")
    cfg = GPTConfig(sequence_len=128, vocab_size=tok.vocab_size, n_layer=1, n_head=1, n_kv_head=1, n_embd=32)
    model = _noisy_gpt(cfg)
    save_checkpoint(rdir / "sft", 1, model.parameters(), None,
                    {"config": {"dtype": "float32"}, "model_config": cfg.to_dict(), "num_iterations": 1})
    return rdir


RL_ARGS = ["train", "rl", "--run", "r", "--max-steps", "5", "--checkpoint-every", "1", "--examples-per-step", "2",
           "--num-samples", "2", "--device-batch-size", "2", "--max-new-tokens", "12", "--eval-every", "0",
           "--dtype", "float32"]
RLRUN = [sys.executable, str(Path(__file__).parent / "rlrun.py")]


@pytest.mark.slow
def test_sigkill_then_rerun_resumes_rl_bitwise(tmp_path, tok):
    homes = {name: tmp_path / name for name in ("straight", "killed")}
    for home in homes.values():
        _sft_run(home, tok)
    env = dict(os.environ)

    def rl(home, *extra):
        return subprocess.run(RLRUN + ["--home", str(home), *RL_ARGS, *extra], env=env, capture_output=True, text=True)

    assert rl(homes["straight"]).returncode == 0
    killed_at = kill_after_checkpoint(RLRUN + ["--home", str(homes["killed"]), *RL_ARGS], env,
                                      homes["killed"] / "runs" / "r" / "rl", min_step=2)
    assert 2 <= killed_at < 5
    assert rl(homes["killed"]).returncode == 0
    a = latest_checkpoint(homes["straight"] / "runs" / "r" / "rl")
    b = latest_checkpoint(homes["killed"] / "runs" / "r" / "rl")
    assert a.step == b.step == 5
    for name in ("model.safetensors", "optim.safetensors"):
        x, y = mx.load(str(a.path / name)), mx.load(str(b.path / name))
        assert sorted(x) == sorted(y) and all(np.array_equal(np.array(x[k]), np.array(y[k])) for k in x), name
    start = mx.load(str(homes["straight"] / "runs" / "r" / "sft" / "step_000001" / "model.safetensors"))
    final = mx.load(str(a.path / "model.safetensors"))
    assert not np.array_equal(np.array(final["lm_head.weight"]), np.array(start["lm_head.weight"]))  # RL did learn
    # another setting does not resume: it starts fresh and says why in one line
    out = rl(homes["killed"], "--num-samples", "4", "--max-steps", "1")
    assert out.returncode == 0, out.stderr
    assert "rl: starting fresh: step_000005 was made with other settings (max_steps, num_iterations, num_samples)" in out.stderr
