"""Training: nanochat's base_train, mid_train and chat_sft as one loop, with exact resume.

One loop (`train_loop`) serves every stage; a stage only decides where its batches come from,
what it starts from and how many steps it takes: base trains from scratch on text for a
Chinchilla horizon, mid-training continues base on packed conversations for one epoch of its
mixture, SFT continues mid on padded, assistant-masked conversations for an epoch of examples. Settings are a frozen `TrainConfig`; the derived quantities
(model shape from depth, steps from the Chinchilla ratio, gradient-accumulation steps from
the total batch) are computed once in `plan()` and logged, so a run explains itself.

Resume: a checkpoint holds model, optimizer (including its step counter, which drives the LR
and momentum schedules), data-loader cursor and RNG state. Restarting from it replays exactly
the computation the uninterrupted run would have done, so the final weights are bitwise equal.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map

from mlxchat import checkpoint as ckpt_lib
from mlxchat import cpu_shards
from mlxchat.common import MlxchatError, atomic_write_text, default_dtype, get_logger, seed_everything
from mlxchat.dataloader import DataLoader
from mlxchat.distributed import RankShare, agree, sum_over_ranks, world
from mlxchat.evaluation.bpb import evaluate_bpb, evaluate_loss
from mlxchat.gpt import GPT, GPTConfig
from mlxchat.optim import OptimConfig, WithOptim, add_gradients, build_optimizer
from mlxchat.prefetch import Prefetched
from mlxchat.rundir import METRICS_FILE, RunDir, run_dir

log = get_logger()

# Longest context trained: one attention score matrix (T x T) per head stays well under 2^31
# elements; past it MLX's CPU kernels crash instead of raising.
MAX_SEQ_LEN = 32768

# Peak dense bf16 FLOP/s by device, for MFU (nanochat uses the H100's 989 TFLOP/s).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12}


@dataclass(frozen=True)
class TrainConfig(WithOptim):
    stage: str = "base"
    depth: int = 20
    seq_len: int = 2048
    device_batch_size: int = 32
    total_batch_size: int = 524288  # tokens per optimizer step, across ranks
    max_steps: int = -1  # explicit horizon; -1 derives it from target_param_data_ratio
    target_param_data_ratio: float = 20.0  # Chinchilla
    eval_every: int = 250
    eval_tokens: int = 20 * 524288
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    dtype: str = ""  # "" = bfloat16 on GPU, float32 on CPU
    seed: int = 0
    source: str = "smoke"
    peak_flops: float = 0.0  # for MFU; 0 = look the device up
    examples_per_step: int = 0  # SFT: conversations per optimizer step (replaces total_batch_size)
    eval_steps: int = 0  # batches per evaluation; 0 = eval_tokens / (batch × seq_len)
    init_from: str = ""  # the stage whose latest checkpoint starts this one (mid: base, sft: mid)
    checkpoint_blocks: bool = False  # recompute block activations in the backward (less memory, slower)
    optim: OptimConfig = field(default_factory=OptimConfig)


@dataclass(frozen=True)
class Plan:
    """Everything derived from a TrainConfig, the tokenizer and the world size."""

    model: GPTConfig
    num_params: int
    flops_per_token: int
    num_iterations: int
    grad_accum_steps: int
    world_size: int
    dtype: str

    def describe(self, cfg: TrainConfig) -> str:
        head = (f"model {self.model.to_dict()} | params {self.num_params:,} | FLOPs/token {self.flops_per_token:.3e} | "
                f"micro-batch {cfg.device_batch_size}x{cfg.seq_len} x {self.world_size} ranks, grad accum {self.grad_accum_steps} ")
        if cfg.examples_per_step > 0:  # SFT: a step is a number of conversations, their tokens vary
            return (head + f"=> {cfg.examples_per_step:,} conversations/step (at most {cfg.examples_per_step * cfg.seq_len:,} "
                    f"tokens) | {self.num_iterations:,} steps | dtype {self.dtype}")
        tokens = cfg.total_batch_size * self.num_iterations
        return (head + f"=> {cfg.total_batch_size:,} tokens/step | {self.num_iterations:,} steps, {tokens:,} tokens "
                f"(tokens:params {tokens / self.num_params:.2f}) | dtype {self.dtype}")


def plan(cfg: TrainConfig, vocab_size: int, world_size: int = 1, model: GPTConfig | None = None,
         epoch_size: int | None = None) -> Plan:
    """Derive the model shape, horizon and gradient accumulation.

    `model` is the shape of the checkpoint a stage starts from (mid, SFT); `epoch_size` is what
    one pass over their data holds: tokens for mid-training, conversations for SFT.
    """
    model_cfg = model or GPTConfig.from_depth(cfg.depth, vocab_size=vocab_size, sequence_len=cfg.seq_len)
    for name in ("device_batch_size", "seq_len", "total_batch_size", "depth"):
        if getattr(cfg, name) < 1:
            raise MlxchatError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if cfg.seq_len > MAX_SEQ_LEN:
        raise MlxchatError(f"--seq-len {cfg.seq_len} is longer than mlxchat supports ({MAX_SEQ_LEN}); nanochat uses 2048")
    if cfg.max_steps == 0 or cfg.max_steps < -1:
        raise MlxchatError(f"--max-steps must be positive, got {cfg.max_steps} (leave it out for the Chinchilla horizon)")
    if cfg.examples_per_step > 0:
        per_step = cfg.device_batch_size * world_size
        if cfg.examples_per_step % per_step:
            raise MlxchatError(
                f"{cfg.examples_per_step} examples per step is not a multiple of device batch × ranks = {per_step}; "
                f"change --device-batch-size or --examples-per-step"
            )
        accum = cfg.examples_per_step // per_step
    else:
        per_step = cfg.device_batch_size * cfg.seq_len * world_size
        if cfg.total_batch_size % per_step:
            raise MlxchatError(
                f"total batch {cfg.total_batch_size} tokens is not a multiple of device batch × seq len × ranks = {per_step}; "
                f"change --device-batch-size, --seq-len or --total-batch-size"
            )
        accum = cfg.total_batch_size // per_step
    shape_only = GPT(model_cfg)  # parameters stay lazy: nothing is allocated
    num_params, flops = shape_only.num_params(), shape_only.estimate_flops()
    if cfg.max_steps > 0:
        iters = cfg.max_steps
    elif epoch_size is not None:
        iters = epoch_size // (cfg.examples_per_step or cfg.total_batch_size)
    elif cfg.target_param_data_ratio > 0:
        iters = int(cfg.target_param_data_ratio * num_params // cfg.total_batch_size)
    else:
        raise MlxchatError("no training horizon: give --max-steps or a positive target param:data ratio")
    if iters < 1:
        what = "one epoch of the data is less than one step" if epoch_size is not None else f"the training horizon is {iters} steps"
        raise MlxchatError(f"{what}; raise --max-steps or lower the batch size")
    dtype = cfg.dtype or default_dtype()
    if dtype not in ("float32", "bfloat16", "float16"):
        raise MlxchatError(f"--dtype must be float32, bfloat16 or float16, got {dtype!r}")
    return Plan(model_cfg, num_params, flops, iters, accum, world_size, dtype)


def peak_flops(cfg: TrainConfig) -> float:
    if cfg.peak_flops > 0:
        return cfg.peak_flops
    from mlxchat.common import device_name

    name = device_name()
    return next((v for k, v in PEAK_FLOPS.items() if k in name), 0.0)


def reuse_large_cpu_buffers() -> None:
    """On the CPU, let MLX keep large freed buffers for reuse, as its GPU allocators do.

    MLX's CPU allocator caches at most 32 MB of freed buffers by default; anything larger (the
    (rows × vocab) logits, their exp/tanh temporaries and gradients) goes back to the OS and is
    page-faulted in again on the next step. Raising the cache limit to a quarter of the memory
    limit made the d4 / B8×256 / vocab 8192 fp32 step ~25-35% faster on a 2-core x86 VM with
    the same RSS (bench/README.md). Only ever raises the limit; a no-op on GPUs.
    """
    if mx.default_device() != mx.cpu:
        return
    wanted = mx.get_memory_limit() // 4
    previous = mx.set_cache_limit(wanted)
    if previous > wanted:
        mx.set_cache_limit(previous)


class TrainStep:
    """The compiled optimizer step: micro-batch gradients, accumulation, clipping, update.

    With one micro-batch per step, forward, backward and update are a single compiled graph.
    Across ranks, each accumulates its own micro-batches' gradients and the update averages
    them once (`nn.average_gradients`, inside the compiled graph): one all-reduce per step,
    not per micro-batch. The loss it returns is the mean over every rank's micro-batches.
    On the CPU a micro-batch's rows are split across CPU streams, one per core (`cpu_shards`).
    """

    def __init__(self, model: GPT, optimizer, grad_accum_steps: int, grad_clip: float, world_size: int):
        reuse_large_cpu_buffers()
        self.model, self.optimizer = model, optimizer
        self.accum = grad_accum_steps
        state = [model.state, optimizer.state]
        loss_and_grad = nn.value_and_grad(model, lambda m, x, y, count: m(x, y, reduction="sum") / count)
        self.streams = streams = cpu_shards.shard_streams(world_size)

        self.world_size = world_size
        def grads_of(x, y):
            return cpu_shards.sharded_loss_and_grad(lambda *batch: loss_and_grad(model, *batch), x, y, streams)

        def apply(grads):
            if world_size > 1:  # averaged in fp32, as nanochat's all-reduce of its fp32 .grad
                grads = nn.average_gradients(add_gradients(None, grads))
            return optimizer.clip_and_update(model, grads, grad_clip, streams)

        def fused(x, y):
            loss, grads = grads_of(x, y)
            if world_size > 1:
                loss = mx.distributed.all_sum(loss) / world_size
            return loss, apply(grads)

        self._fused = mx.compile(fused, inputs=state, outputs=state)
        self._grads = mx.compile(grads_of, inputs=state, outputs=state)
        self._apply = mx.compile(apply, inputs=state, outputs=state)

    def dispatch(self, batches) -> tuple[mx.array, mx.array]:
        """Queue one optimizer step over `accum` micro-batches (`mx.async_eval`) and return its
        (mean loss, grad norm) as arrays still being computed; leaves the number of input tokens
        it processed in `self.tokens` (SFT batches vary).

        Nothing here waits for the device, so the caller can load the next batch and queue the
        next step while this one runs; reading the loss (`.item()`) is the one synchronisation."""
        if self.accum == 1:
            x, y = next(batches)
            self.tokens = x.size
            loss, norm = self._fused(x, y)
            mx.async_eval(loss, norm, self.model.parameters(), self.optimizer.state)
            return loss, norm
        total_loss, total, self.tokens = None, None, 0
        for _ in range(self.accum):
            x, y = next(batches)
            self.tokens += x.size
            loss, grads = self._grads(x, y)
            total = add_gradients(total, grads)
            total_loss = loss if total_loss is None else total_loss + loss
            mx.async_eval(total_loss, total)  # one micro-batch's activations alive at a time
        norm = self._apply(tree_map(lambda g: g / self.accum, total))
        loss = total_loss / self.accum
        if self.world_size > 1:
            loss = mx.distributed.all_sum(loss) / self.world_size
        mx.async_eval(loss, norm, self.model.parameters(), self.optimizer.state)
        return loss, norm

    def running(self) -> cpu_shards.OneBlasThreadPerShard:
        """The context the steps run in: OpenBLAS at one thread a shard while it is open."""
        return cpu_shards.OneBlasThreadPerShard(self.streams)

    def __call__(self, batches) -> tuple[float, float]:
        """One optimizer step, waited for: (mean loss, grad norm) as floats."""
        loss, norm = self.dispatch(batches)
        return loss.item(), norm.item()


class StopRequested:
    """Turns SIGINT into a flag checked between steps, so Ctrl-C ends on a consistent state."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self._previous = signal.getsignal(signal.SIGINT)
        try:
            signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: Ctrl-C cannot reach us anyway
            self._previous = None
        return self

    def _handle(self, *_):
        if self.requested:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.requested = True
        log.warning("interrupt received: finishing this step and writing a checkpoint (Ctrl-C again to abort)")

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


@dataclass
class TrainResult:
    stage_dir: Path
    checkpoint: Path
    step: int
    num_iterations: int
    interrupted: bool
    metrics: dict

    def to_dict(self) -> dict:
        return {**asdict(self), "stage_dir": str(self.stage_dir), "checkpoint": str(self.checkpoint)}


@dataclass(frozen=True)
class Validation:
    """What the loop's evaluations report: a metric's name and how to measure it on `steps`
    validation batches. Each stage passes its own in (as mlx-lm's trainer takes its loss), so the
    loop never asks which stage it trains."""

    metric: str
    measure: Callable[[GPT, object, int], float]


def bits_per_byte(token_bytes) -> Validation:
    """Base and mid-training: validation bits per byte (nanochat's val_bpb)."""
    return Validation("val_bpb", lambda model, batches, steps: evaluate_bpb(model, batches, steps, token_bytes))


VALIDATION_LOSS = Validation("val_loss", evaluate_loss)  # SFT: the masked loss, as nanochat's chat_sft


def stage_validation(stage: str, token_bytes=None) -> Validation:
    """A training stage's validation, as nanochat: SFT's masked loss, bits per byte otherwise
    (`token_bytes` is only read when it measures)."""
    return VALIDATION_LOSS if stage == "sft" else bits_per_byte(token_bytes)


@dataclass
class LoopContext:
    """What evaluating and checkpointing need from a running loop (the loop owns it)."""

    stage_dir: Path
    cfg: TrainConfig
    p: Plan
    model: GPT
    optimizer: object
    identity: dict
    validation: Validation
    is_main: bool
    history: list = field(default_factory=list)

    @property
    def metrics_file(self) -> Path:
        return self.stage_dir / METRICS_FILE

    def last_metric(self):
        return self.history[-1][self.validation.metric] if self.history else None


def evaluate(ctx: LoopContext, make_loader: Callable[..., DataLoader], step: int) -> float:
    """Measure the validation metric on a fresh validation loader; log and keep it."""
    steps = ctx.cfg.eval_steps or max(1, ctx.cfg.eval_tokens // (ctx.cfg.device_batch_size * ctx.cfg.seq_len))
    metric = ctx.validation.metric
    value = ctx.validation.measure(ctx.model, make_loader("val"), steps)  # global batches
    ctx.history.append({"step": step, metric: value})
    append_metrics(ctx.metrics_file, {"step": step, metric: value}, ctx.is_main)
    log.info(f"step {step:05d} | validation {metric[4:]} {value:.4f}")
    return value


def save(ctx: LoopContext, step: int, loader_state: dict) -> Path:
    """Checkpoint the model, the optimizer and everything that makes resuming exact."""
    # MLX's generator state cannot be restored, so every checkpoint reseeds it from
    # (seed, step): the uninterrupted and the resumed run then draw the same numbers.
    rng_seed = ctx.cfg.seed * 1_000_003 + step
    mx.random.seed(rng_seed)
    state = {
        "loader": loader_state,
        "rng_seed": rng_seed,
        "config": ctx.cfg.to_dict(),
        "model_config": ctx.p.model.to_dict(),
        "num_iterations": ctx.p.num_iterations,
        "identity": ctx.identity,
        "history": ctx.history,
        ctx.validation.metric: ctx.last_metric(),
    }
    if not ctx.is_main:
        return ctx.stage_dir / ckpt_lib.step_dir_name(step)
    return ckpt_lib.save_checkpoint(ctx.stage_dir, step, ctx.model.parameters(), ctx.optimizer.state, state,
                                    keep=ctx.cfg.keep_checkpoints)


def train_base(
    run: str,
    cfg: TrainConfig,
    root=None,
    fresh: bool = False,
    on_progress: Callable[[dict], None] | None = None,
) -> TrainResult:
    """nanochat's base_train on a run's tokenizer and a text source; resumes from `latest`."""
    from mlxchat.dataset import get_source
    from mlxchat.tokenizer import Tokenizer

    rdir = run_dir(run, root, must_exist=True)
    tokenizer = Tokenizer.load(rdir.tokenizer)
    p = plan(cfg, tokenizer.vocab_size, world().size())
    source = get_source(cfg.source, root=root)

    def loader(split: str, state: dict | None = None) -> DataLoader:
        return DataLoader(source, tokenizer, cfg.device_batch_size, cfg.seq_len, split, state=state)

    identity = training_identity(cfg.to_dict(), rdir, data=source.fingerprint())
    return train_loop(rdir.stage(cfg.stage), cfg, p, loader, stage_validation(cfg.stage, tokenizer.token_bytes()), fresh=fresh,
                      on_progress=on_progress, identity=identity)


CHAT_STAGES = {"mid": "base", "sft": "mid"}  # stage -> the stage it continues


def train_chat(
    run: str,
    cfg: TrainConfig,
    root=None,
    fresh: bool = False,
    on_progress: Callable[[dict], None] | None = None,
) -> TrainResult:
    """nanochat's mid_train (stage "mid") or chat_sft (stage "sft"): continue the previous
    stage's latest checkpoint on a conversation mixture (`cfg.source`: smoke or hub)."""
    from mlxchat.chatloader import PackedConversations, PaddedConversations, epoch_tokens
    from mlxchat.conversations import build_mixture, mixture_fingerprint
    from mlxchat.tokenizer import Tokenizer

    if cfg.stage not in CHAT_STAGES:
        raise MlxchatError(f"unknown training stage {cfg.stage!r}; expected base, {' or '.join(CHAT_STAGES)}")
    parent = cfg.init_from or CHAT_STAGES[cfg.stage]
    rdir = run_dir(run, root, must_exist=True)
    tokenizer = Tokenizer.load(rdir.tokenizer)
    start = ckpt_lib.require_checkpoint(rdir.stage(parent), f"train it first: mlxchat train {parent} --run {run}")
    data = {split: build_mixture(cfg.stage, split, cfg.source, root=root) for split in ("train", "val")}
    Loader = PackedConversations if cfg.stage == "mid" else PaddedConversations
    if cfg.max_steps > 0:  # an explicit horizon: rendering the whole mixture to count its tokens would be wasted
        epoch = None
    else:
        epoch = epoch_tokens(data["train"], tokenizer) if cfg.stage == "mid" else len(data["train"])
    p = plan(cfg, tokenizer.vocab_size, world().size(), model=GPTConfig(**start.state["model_config"]), epoch_size=epoch)
    if p.model.sequence_len < cfg.seq_len:
        raise MlxchatError(f"--seq-len {cfg.seq_len} is longer than the {parent} model's context {p.model.sequence_len}")
    log.info(f"{cfg.stage}: starting from {start.path} | {len(data['train']):,} training conversations")

    def loader(split: str, state: dict | None = None):
        return Loader(data[split], tokenizer, cfg.device_batch_size, cfg.seq_len, state=state)

    mixtures = {split: mixture_fingerprint(cfg.stage, split, cfg.source, root=root) for split in ("train", "val")}
    identity = training_identity(cfg.to_dict(), rdir, data=mixtures, parent=start.fingerprint)
    validation = stage_validation(cfg.stage, tokenizer.token_bytes())
    return train_loop(rdir.stage(cfg.stage), cfg, p, loader, validation, fresh=fresh, init_from=start.path,
                      on_progress=on_progress, identity=identity)


# Settings that change how often a run saves, not what it computes: a checkpoint made with
# other values is still the same training.
NOT_IN_IDENTITY = ("checkpoint_every", "keep_checkpoints", "peak_flops")


def training_identity(settings: dict, rdir: RunDir, data, parent: str | None = None) -> dict:
    """What a stage's checkpoints are made from: its settings, the tokenizer's and the data's
    content fingerprints and (mid, SFT) the parent checkpoint's. Stored in every checkpoint's
    state.json; a checkpoint is resumed only by a run with the same identity."""
    from mlxchat.tokenizer import tokenizer_fingerprint

    config = {k: v for k, v in settings.items() if k not in NOT_IN_IDENTITY}
    identity = {"settings": config, "tokenizer": tokenizer_fingerprint(rdir.tokenizer), "data": data,
                "parent": parent}
    return json.loads(json.dumps(identity, sort_keys=True, default=str))  # as state.json will hold it


def build_model(p: Plan, seed: int, checkpoint_blocks: bool = False) -> GPT:
    model = GPT(p.model, compute_dtype=getattr(mx, p.dtype), checkpoint_blocks=checkpoint_blocks)
    model.init_weights(seed)
    return model


def train_loop(
    stage_dir: Path,
    cfg: TrainConfig,
    p: Plan,
    make_loader: Callable[..., DataLoader],
    validation: Validation,
    fresh: bool = False,
    init_from: Path | None = None,
    on_progress: Callable[[dict], None] | None = None,
    identity: dict | None = None,
) -> TrainResult:
    """Train `p.num_iterations` steps into `stage_dir`, resuming from its newest checkpoint made
    from the same `identity` (see training_identity); otherwise from scratch.

    `init_from` (a checkpoint directory) seeds the weights of a fresh run (mid/SFT start from
    the previous stage); `validation` is what its evaluations measure.

    Data-parallel (under `mlx.launch`): `make_loader` gives the global stream and each rank
    trains on its `RankShare`; every rank resumes from the same `latest`, and rank 0 alone
    writes (metrics, checkpoints, progress) once the step's all-reduce has heard from all."""
    stage_dir = Path(stage_dir)
    is_main = world().rank() == 0
    seed_everything(cfg.seed)
    model = build_model(p, cfg.seed, cfg.checkpoint_blocks)
    optimizer = build_optimizer(model, cfg.optim, p.num_iterations)
    optimizer.init(model.trainable_parameters())
    log.info(p.describe(cfg))

    identity = identity if identity is not None else {"settings": cfg.to_dict()}
    resume = None if fresh else resumable_checkpoint(stage_dir, identity)
    agree(resume.step if resume else -1, f"the checkpoint to resume in {stage_dir}")
    start_step, loader_state, history = 0, None, []
    if resume is not None:
        if is_main and (stage_dir / ckpt_lib.LATEST).resolve() != resume.path:
            ckpt_lib.point_latest(stage_dir, resume.path.name)
        ckpt_lib.load_model_weights(model, resume)
        optimizer.state = ckpt_lib.load_arrays(resume.path / "optim.safetensors")
        optimizer.init(model.trainable_parameters())
        mx.random.seed(resume.state["rng_seed"])
        start_step, loader_state = resume.step, resume.state["loader"]
        history = resume.state.get("history", [])
        log.info(f"resuming {stage_dir.name} from {resume.path.name} (step {start_step} of {p.num_iterations})")
    elif init_from is not None:
        model.load_weights(str(Path(init_from) / "model.safetensors"), strict=True)
    elif fresh and stage_dir.exists():
        log.info(f"--fresh: ignoring existing checkpoints in {stage_dir}")

    step_fn = TrainStep(model, optimizer, p.grad_accum_steps, cfg.optim.grad_clip, p.world_size)
    peak = peak_flops(cfg)
    ctx = LoopContext(stage_dir, cfg, p, model, optimizer, identity, validation, is_main, history)
    metric, metrics_file = validation.metric, ctx.metrics_file
    if is_main:
        stage_dir.mkdir(parents=True, exist_ok=True)
        truncate_metrics(metrics_file, start_step)

    from tqdm.auto import tqdm

    bar = tqdm(total=p.num_iterations, initial=start_step, desc=stage_dir.name, disable=not is_main, dynamic_ncols=True)
    smooth, tokens_seen = 0.0, 0
    rate = StepRate()
    step, interrupted, last_ckpt = start_step, False, None
    t_train = 0.0
    if start_step == 0 and resume is None and cfg.eval_every > 0:
        evaluate(ctx, make_loader, 0)

    def must_settle(after: int) -> bool:
        """Whether the loop needs the state right after step `after` (to evaluate, checkpoint or
        finish), so no later step may be queued before it is handled."""
        return (after == p.num_iterations or (cfg.eval_every > 0 and after % cfg.eval_every == 0)
                or (cfg.checkpoint_every > 0 and after % cfg.checkpoint_every == 0))

    prefetched = Prefetched(make_loader("train", loader_state))
    train_batches = RankShare(prefetched)
    with StopRequested() as stop, contextlib.closing(prefetched), step_fn.running():
        # One step runs ahead: step k+1 is loaded and queued before step k's loss is read, so the
        # device never waits for the host (batch loading, logging) between steps.
        queued = None
        t_last = time.perf_counter()
        while step < p.num_iterations:
            if queued is None:
                queued = (*step_fn.dispatch(train_batches), step_fn.tokens)
            loss_a, gnorm_a, tokens = queued
            queued = None
            # across ranks no step runs ahead: every rank must meet the same collectives in order
            if p.world_size == 1 and not (must_settle(step + 1) or stop.requested):
                queued = (*step_fn.dispatch(train_batches), step_fn.tokens)
            loss, gnorm = loss_a.item(), gnorm_a.item()
            now = time.perf_counter()
            dt, t_last = now - t_last, now
            if not math.isfinite(loss):
                last = ckpt_lib.latest_checkpoint(stage_dir)
                kept = f"the last good checkpoint {last.path} is kept" if last else "no checkpoint was written"
                raise MlxchatError(
                    f"training loss became {loss} at step {step}; {kept}: lower the learning rates or check the data"
                )
            step += 1
            t_train += dt
            smooth = 0.9 * smooth + 0.1 * loss
            debiased = smooth / (1 - 0.9 ** (step - start_step))
            tokens_seen += tokens * p.world_size
            tok_s = rate.add(tokens * p.world_size, dt)
            mfu = 100 * p.flops_per_token * tok_s / peak if peak else None
            row = {"step": step, "loss": loss, "smooth_loss": debiased, "grad_norm": gnorm, "dt": dt,
                   "tokens": tokens * p.world_size, "tok_per_s": tok_s, "mfu": mfu}
            append_metrics(metrics_file, row, is_main)
            bar.update(1)
            bar.set_postfix(loss=f"{debiased:.4f}", tok_s=f"{tok_s:,.0f}", **({"mfu": f"{mfu:.1f}%"} if mfu else {}))
            if on_progress is not None and is_main:
                eta = (p.num_iterations - step) * (t_train / (step - start_step))
                on_progress({**row, "num_iterations": p.num_iterations, "eta_s": eta, metric: ctx.last_metric()})
            if p.world_size == 1:
                stopping = stop.requested and queued is None  # a queued step finishes first
            else:  # Ctrl-C reaches the ranks at different moments: they stop at the first step any saw it
                stopping = sum_over_ranks([stop.requested])[0] > 0
            last_step = step == p.num_iterations
            if cfg.eval_every > 0 and (last_step or step % cfg.eval_every == 0):
                evaluate(ctx, make_loader, step)
            if last_step or (cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0) or stopping:
                last_ckpt = save(ctx, step, train_batches.state_dict())
            if stopping:
                interrupted = True
                break
            if queued is None:
                t_last = time.perf_counter()  # evaluation and checkpoints are not step time
    bar.close()
    if last_ckpt is None:  # resumed at the very end: nothing left to do
        last_ckpt = ckpt_lib.latest_checkpoint(stage_dir).path
    final = {
        "step": step,
        "num_iterations": p.num_iterations,
        "num_params": p.num_params,
        "flops_per_token": p.flops_per_token,
        "tokens": tokens_seen,
        "train_time_s": t_train,
        "peak_memory_gib": mx.get_peak_memory() / 2**30,  # this process's, as nanochat's "Peak memory usage"
        metric: ctx.last_metric(),
        f"min_{metric}": min((h[metric] for h in ctx.history), default=None),
    }
    if interrupted:
        log.warning(f"stopped at step {step}; rerun the same command to resume from {last_ckpt}")
    return TrainResult(stage_dir, last_ckpt, step, p.num_iterations, interrupted, final)


class StepRate:
    """Tokens per second over the last `window` steps, the first step (compilation) apart.

    Why not each step's own tokens / dt: with a step queued ahead, one loss read can wait for two
    steps and the next for none (around an evaluation or a checkpoint), so a single step's dt
    moves time between neighbours (seen on the CPU: 40,094 then 474 tok/s); a short window sums
    them back. The loop still logs each `dt` as measured."""

    def __init__(self, window: int = 10):
        self.recent: collections.deque = collections.deque(maxlen=window)
        self.first = True

    def add(self, tokens: int, dt: float) -> float:
        if self.first:  # the compiling step's rate is its own and stays out of the window
            self.first = False
            return tokens / dt
        self.recent.append((tokens, dt))
        return sum(n for n, _ in self.recent) / sum(t for _, t in self.recent)


def resumable_checkpoint(stage_dir: Path, identity: dict) -> ckpt_lib.Checkpoint | None:
    """The newest intact checkpoint in `stage_dir` made from `identity`, or None. Why a newer
    one is passed over (damaged, other settings or inputs) is logged in one line."""
    ckpt_lib.recover(stage_dir)
    passed_over = None
    for path, ck in ckpt_lib.checkpoints(stage_dir):
        if isinstance(ck, str):
            why = ck
        elif ck.state.get("identity") != identity:
            why = f"{path.name} was made with {_differences(ck.state.get('identity'), identity)}"
        else:
            if passed_over:
                log.info(f"{stage_dir.name}: resuming from {path.name}, not a newer checkpoint: {passed_over}")
            return ck
        passed_over = passed_over or why
    if passed_over:
        log.info(f"{stage_dir.name}: starting fresh: {passed_over}")
    return None


def _differences(old, new: dict) -> str:
    """What differs between two identities, for a person ("other settings (max_steps), another tokenizer")."""
    if not isinstance(old, dict):
        return "an older mlxchat that recorded no identity"
    words = {"tokenizer": "another tokenizer", "data": "other data", "parent": "another parent checkpoint"}
    names = []
    for key in new:
        if key == "settings" and isinstance(old.get(key), dict):
            fields = sorted(k for k in {*old[key], *new[key]} if old[key].get(k) != new[key].get(k))
            if fields:
                names.append(f"other settings ({', '.join(fields)})")
        elif old.get(key) != new[key]:
            names.append(words.get(key, f"another {key}"))
    return ", ".join(names) or "another identity"


def append_metrics(path: Path, row: dict, is_main: bool) -> None:
    if is_main:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl; a line that is not a row (cut short by a kill mid-append,
    or edited by hand) is skipped, not fatal: the log is for reading, not for resuming."""
    rows = []
    for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric rows past the resumed step, so a resumed run's log reads as one run; the
    rewrite is atomic, so a kill during it leaves the old log, never an empty one."""
    if path.exists():
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in read_metrics(path) if r["step"] <= step))
