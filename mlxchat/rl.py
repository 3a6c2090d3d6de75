"""RL on GSM8K: nanochat's chat_rl ("GRPO" that is really REINFORCE), continuing the SFT model.

As nanochat (scripts/chat_rl.py, Oct 2025): on-policy, no KL to a reference model, no PPO
ratio or clipping; each question gets `num_samples` rollouts, its advantage is the reward
minus the mean reward of its own samples, and the policy-gradient objective is normalised by
token (over every sampled token of the step), not by sequence. Rewards come from the task's
grader (the "#### n" of GSM8K, or of the generated arithmetic problems offline). Tokens the
calculator tool forced into a rollout are masked out of the loss: the model did not choose
them. LRs start at 5% of base and fall linearly to 0; Muon momentum is constant.

Exact resume: rollouts sample from seeds derived from (seed, step, example, sampling pass), and
the example order is a function of the step, so a checkpoint needs only the weights and the
optimizer state for the resumed run to replay the uninterrupted one bit for bit.

The loss is a function passed into the loop (as mlx-lm's tuner/losses.py), so a different
objective needs no change to the loop.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlxchat import checkpoint as ckpt_lib
from mlxchat.common import MlxchatError, default_dtype, get_logger
from mlxchat.gpt import GPT, GPTConfig, valid_target_count
from mlxchat.optim import OptimConfig, WithOptim, add_gradients, build_optimizer
from mlxchat.rundir import METRICS_FILE, run_dir

log = get_logger()

RL_STAGE = "rl"


def _rl_optim() -> OptimConfig:
    """chat_rl: init_lr_frac 0.05, lr multiplier 1 - step/num_steps, Muon's constant 0.95, no clipping."""
    return OptimConfig(init_lr_frac=0.05, warmdown_ratio=1.0, momentum_warmup_steps=0, grad_clip=0.0)


@dataclass(frozen=True)
class RLConfig(WithOptim):
    stage: str = RL_STAGE
    init_from: str = "sft"  # the stage whose latest checkpoint RL starts from
    source: str = "smoke"  # smoke: generated arithmetic problems; hub: GSM8K train
    seed: int = 0
    examples_per_step: int = 16  # questions per optimizer step
    num_samples: int = 16  # rollouts per question
    device_batch_size: int = 8  # rollouts per forward (generation and training)
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 50
    num_epochs: int = 1
    max_steps: int = -1  # -1: num_epochs over the training problems
    train_size: int = 7473  # generated arithmetic problems (smoke); GSM8K train has 7,473
    eval_every: int = 60  # pass@k on the test problems; 0 = never
    eval_examples: int = 400
    checkpoint_every: int = 60
    keep_checkpoints: int = 2
    dtype: str = ""  # "" = bfloat16 on GPU, float32 on CPU
    optim: OptimConfig = field(default_factory=_rl_optim)


    def validated(self) -> "RLConfig":
        for name in ("examples_per_step", "num_samples", "device_batch_size", "max_new_tokens", "num_epochs", "train_size"):
            if getattr(self, name) < 1:
                raise MlxchatError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.num_samples % self.device_batch_size:
            raise MlxchatError(f"--num-samples {self.num_samples} is not a multiple of --device-batch-size "
                               f"{self.device_batch_size}; change one of them")
        if self.source not in ("smoke", "hub"):
            raise MlxchatError(f"RL --source must be smoke (generated arithmetic) or hub (GSM8K), got {self.source!r}")
        return self


# Settings that may change between a run and its resumption without changing what it computes.
RESUME_FREE = ("checkpoint_every", "keep_checkpoints", "eval_every", "eval_examples")


# -- the objective ---------------------------------------------------------------------------


def pg_loss(model, inputs: mx.array, targets: mx.array, advantages: mx.array, normalizer) -> mx.array:
    """nanochat's policy-gradient loss: −Σ log p(token) · advantage over the sampled tokens
    (targets ≥ 0; prompt, padding and tool output are −1), divided by `normalizer` (the step's
    token count, so gradients accumulated over passes and questions add up to a token mean)."""
    logp = -model(inputs, targets, reduction="none")  # (B, T), 0 where targets < 0
    return -(logp * advantages[:, None]).sum() / normalizer


# -- rollouts --------------------------------------------------------------------------------


def sampler_seed(*parts: int) -> int:
    """A positive int32 seed from (seed, step, example, pass): the same in every process,
    unlike Python's salted hash of strings."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little") & 0x7FFFFFFF


@dataclass
class Rollouts:
    """One question's samples, padded into a batch: inputs/targets (N, T) with targets −1
    wherever the model did not choose the token, rewards and advantages (N,)."""

    inputs: mx.array
    targets: mx.array
    rewards: np.ndarray
    advantages: mx.array
    lengths: list[int]


def rollouts(model, tok, task, example_idx: int, seeds: list[int], cfg: RLConfig, tool) -> Rollouts:
    """`cfg.num_samples` completions of one problem through engine.generate_batch (calculator
    on), graded by the task."""
    from mlxchat.engine import generate_batch

    conversation = task[example_idx]
    prompt = tok.render_for_completion(conversation)
    assistant_end = tok.encode_special("<|assistant_end|>")
    stop = [assistant_end, tok.bos_id]
    seqs, masks = [], []
    for seed in seeds:
        gen, mask = generate_batch(model, prompt, cfg.max_new_tokens, return_masks=True, num_samples=cfg.device_batch_size,
                                   temperature=cfg.temperature, top_k=cfg.top_k, seed=seed, stop_tokens=stop, tool=tool)
        seqs += gen
        masks += mask
    rewards = np.array([float(task.evaluate(conversation, tok.decode(g))) for g in seqs], dtype=np.float32)
    return pad_rollouts(prompt, seqs, masks, rewards, pad=assistant_end)


def pad_rollouts(prompt: list[int], seqs: list[list[int]], masks: list[list[int]], rewards: np.ndarray,
                 pad: int) -> Rollouts:
    """Prompt + completion per row, padded with `pad` (masked out) to the longest row."""
    longest = max(len(s) for s in seqs)
    ids = np.array([prompt + s + [pad] * (longest - len(s)) for s in seqs], dtype=np.int32)
    mask = np.array([[0] * len(prompt) + m + [0] * (longest - len(m)) for m in masks], dtype=bool)
    targets = np.where(mask[:, 1:], ids[:, 1:], -1)
    return Rollouts(mx.array(ids[:, :-1]), mx.array(targets), rewards, mx.array(rewards - rewards.mean()),
                    [len(prompt) + len(s) for s in seqs])


def policy_gradient_step(model, optimizer, batch: list[Rollouts], device_batch_size: int, loss_fn=pg_loss) -> float:
    """Accumulate `loss_fn`'s gradients over every question and forward pass of the step, then
    update once; returns the summed loss."""
    loss_and_grad = nn.value_and_grad(model, loss_fn)
    total, loss_sum = None, 0.0
    for ro in batch:
        n = ro.inputs.shape[0]
        passes = n // device_batch_size
        for b0 in range(0, n, device_batch_size):
            targets = ro.targets[b0:b0 + device_batch_size]
            normalizer = valid_target_count(targets).astype(mx.float32) * passes * len(batch)
            loss, grads = loss_and_grad(model, ro.inputs[b0:b0 + device_batch_size], targets,
                                        ro.advantages[b0:b0 + device_batch_size], normalizer)
            total = add_gradients(total, grads)
            mx.eval(loss, total)
            loss_sum += loss.item()
    optimizer.update(model, total)
    mx.eval(model.parameters(), optimizer.state)
    return loss_sum


def pass_at_k(model, tok, task, cfg: RLConfig, step: int, tool) -> dict:
    """nanochat's RL validation: `device_batch_size` samples (temperature 1) per test problem;
    pass@k = share of problems with a correct answer among the first k samples."""
    from mlxchat.engine import generate_batch

    n = min(cfg.eval_examples, len(task))
    k_max = cfg.device_batch_size
    hits = np.zeros(k_max)
    stop = [tok.encode_special("<|assistant_end|>"), tok.bos_id]
    for idx in range(n):
        conversation = task[idx]
        gen = generate_batch(model, tok.render_for_completion(conversation), cfg.max_new_tokens, num_samples=k_max,
                             temperature=1.0, top_k=cfg.top_k, seed=sampler_seed(cfg.seed, step, idx, -1),
                             stop_tokens=stop, tool=tool)
        correct = [task.evaluate(conversation, tok.decode(g)) for g in gen]
        hits += np.cumsum(correct) > 0
    return {f"pass@{k}": float(hits[k - 1] / max(n, 1)) for k in range(1, k_max + 1)}


# -- tasks -----------------------------------------------------------------------------------


def rl_tasks(cfg: RLConfig, root=None):
    """(train task, test task or None, why the test task is missing)."""
    from mlxchat.conversations import GSM8K
    from mlxchat.conversations.arithmetic import Arithmetic

    if cfg.source == "hub":
        train = GSM8K("main", "train", root=root)
        make_val = lambda: GSM8K("main", "test", root=root)  # noqa: E731
    else:
        train = Arithmetic(size=cfg.train_size, split="train")
        make_val = lambda: GSM8K.from_pack(root)  # noqa: E731
    try:
        return train, make_val(), None
    except MlxchatError as e:
        return train, None, str(e)


# -- the stage -------------------------------------------------------------------------------


def train_rl(run: str, cfg: RLConfig, root=None, fresh: bool = False, on_progress: Callable[[dict], None] | None = None,
             loss_fn=pg_loss):
    """RL from the `init_from` stage into `<run>/rl/`, resuming from its `latest` checkpoint."""
    from tqdm.auto import tqdm

    from mlxchat.calculator import calculator_tool
    from mlxchat.tokenizer import Tokenizer
    from mlxchat.train import StopRequested, TrainResult, append_metrics, resumable_checkpoint, training_identity, truncate_metrics

    cfg = cfg.validated()
    rdir = run_dir(run, root, must_exist=True)
    tok = Tokenizer.load(rdir.tokenizer)
    start = ckpt_lib.require_checkpoint(rdir.stage(cfg.init_from), f"train it first: mlxchat train {cfg.init_from} --run {run}")
    train_task, val_task, no_val = rl_tasks(cfg, root)
    num_steps = cfg.max_steps if cfg.max_steps > 0 else len(train_task) // cfg.examples_per_step * cfg.num_epochs
    if num_steps < 1:
        raise MlxchatError(f"{len(train_task)} problems make less than one step of {cfg.examples_per_step}; "
                           f"raise --max-steps or lower --examples-per-step")
    model_cfg = GPTConfig(**start.state["model_config"])
    model = GPT(model_cfg, compute_dtype=getattr(mx, cfg.dtype or default_dtype()))
    optimizer = build_optimizer(model, cfg.optim, num_steps)
    stage_dir = rdir.stage(cfg.stage)
    # resumed only by a run of the same settings, tokenizer, problems and SFT parent (train.py's rule)
    settings = {k: v for k, v in cfg.to_dict().items() if k not in RESUME_FREE}
    identity = training_identity({**settings, "num_iterations": num_steps}, rdir,
                                 data=f"{cfg.source}:{len(train_task)}", parent=start.fingerprint)
    resume = None if fresh else resumable_checkpoint(stage_dir, identity)
    history: list[dict] = []
    if resume is not None:
        ckpt_lib.load_model_weights(model, resume)
        optimizer.state = ckpt_lib.load_arrays(resume.path / "optim.safetensors")
        optimizer.init(model.trainable_parameters())
        history = resume.state.get("history", [])
        log.info(f"rl: resuming from {resume.path.name} (step {resume.step} of {num_steps})")
    else:
        ckpt_lib.load_model_weights(model, start)
        optimizer.init(model.trainable_parameters())
    start_step = resume.step if resume is not None else 0
    tool = calculator_tool(tok)
    stage_dir.mkdir(parents=True, exist_ok=True)
    metrics_file = stage_dir / METRICS_FILE
    truncate_metrics(metrics_file, start_step)
    log.info(f"rl: from {start.path} | {len(train_task):,} training problems ({cfg.source}) | {num_steps} steps of "
             f"{cfg.examples_per_step} x {cfg.num_samples} rollouts"
             + ("" if val_task is not None else f" | pass@k skipped: {no_val}"))

    def evaluate(step: int) -> None:
        if val_task is None or cfg.eval_every <= 0:
            return
        row = {"step": step, **pass_at_k(model, tok, val_task, cfg, step, tool)}
        history.append(row)
        append_metrics(metrics_file, row, True)
        log.info(f"rl step {step:05d} | " + ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "step"))

    def save(step: int) -> Path:
        state = {"config": cfg.to_dict(), "identity": identity, "model_config": model_cfg.to_dict(), "num_iterations": num_steps,
                 "history": history, "init_from": str(start.path), "loader": {"next_example": step * cfg.examples_per_step},
                 "reward": reward}
        return ckpt_lib.save_checkpoint(stage_dir, step, model.parameters(), optimizer.state, state, keep=cfg.keep_checkpoints)

    bar = tqdm(total=num_steps, initial=start_step, desc="rl", dynamic_ncols=True)
    step, interrupted, last_ckpt, t_train, reward = start_step, False, None, 0.0, None
    with StopRequested() as stop:
        while step < num_steps:
            if cfg.eval_every > 0 and step % cfg.eval_every == 0:
                evaluate(step)
            t0 = time.perf_counter()
            batch = []
            for i in range(cfg.examples_per_step):
                idx = (step * cfg.examples_per_step + i) % len(train_task)
                seeds = [sampler_seed(cfg.seed, step, idx, s) for s in range(cfg.num_samples // cfg.device_batch_size)]
                batch.append(rollouts(model, tok, train_task, idx, seeds, cfg, tool))
            loss = policy_gradient_step(model, optimizer, batch, cfg.device_batch_size, loss_fn)
            if not math.isfinite(loss):
                raise MlxchatError(f"RL loss became {loss} at step {step}; lower the learning rates (--init-lr-frac)")
            dt = time.perf_counter() - t0
            step += 1
            t_train += dt
            reward = float(np.mean([ro.rewards.mean() for ro in batch]))
            generated = sum(sum(ro.lengths) - ro.inputs.shape[0] for ro in batch)
            row = {"step": step, "loss": loss, "smooth_loss": loss, "reward": reward, "dt": dt,
                   "sequence_length": float(np.mean([n for ro in batch for n in ro.lengths])), "tok_per_s": generated / dt}
            append_metrics(metrics_file, row, True)
            bar.update(1)
            bar.set_postfix(reward=f"{reward:.3f}", loss=f"{loss:.4f}")
            if on_progress is not None:
                on_progress({**row, "num_iterations": num_steps, "eta_s": (num_steps - step) * t_train / (step - start_step)})
            if step == num_steps:
                evaluate(step)
            if step == num_steps or (cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0) or stop.requested:
                last_ckpt = save(step)
            if stop.requested:
                interrupted = True
                break
    bar.close()
    if last_ckpt is None:
        last_ckpt = ckpt_lib.latest_checkpoint(stage_dir).path
    final = {"step": step, "num_iterations": num_steps, "train_time_s": t_train, "reward": reward,
             **({k: v for k, v in history[-1].items() if k != "step"} if history else {})}
    return TrainResult(stage_dir, last_ckpt, step, num_steps, interrupted, final)

