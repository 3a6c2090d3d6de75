"""Presets: named, fully resolved settings for a whole speedrun.

A preset is plain data (a dict per stage); `resolve()` applies overrides such as `--depth` and
returns frozen configs, so the flow, the CLI and `run.json` all see the same numbers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from mlxchat.common import MlxchatError
from mlxchat.optim import OptimConfig
from mlxchat.rl import RLConfig
from mlxchat.rundir import LOOP_STAGES
from mlxchat.tokenizer import MIN_VOCAB_SIZE
from mlxchat.train import TrainConfig


@dataclass(frozen=True)
class RunPreset:
    name: str
    source: str  # smoke | hub | dir:PATH
    num_shards: int | None  # train shards to fetch (hub only)
    vocab_size: int
    tokenizer_max_chars: int
    base: TrainConfig
    bpb_eval_tokens: int
    sample_max_tokens: int
    mid: TrainConfig
    sft: TrainConfig
    evals: str = "pypi"  # where the eval data comes from: pypi (the PyPI pack) | bundle (DCLM zip + hub) | existing
    max_per_task: int = -1  # nanochat's --max-per-task for CORE and ChatCORE; -1 = every problem
    chat_max_new_tokens: int = 512  # generation budget of the generative chat tasks (nanochat: 512)
    rl: RLConfig = RLConfig()  # the rl-train step's settings (the flow runs it with --rl)

    def to_dict(self) -> dict:
        return asdict(self)


def _base(**kw) -> TrainConfig:
    return TrainConfig(stage="base", **kw)


def _mid(**kw) -> TrainConfig:
    """nanochat's mid_train: base's optimizer and warm-down, no gradient clipping, one epoch of
    the mixture unless max_steps says otherwise."""
    return TrainConfig(stage="mid", init_from="base", optim=OptimConfig(grad_clip=0.0), **kw)


def _sft(**kw) -> TrainConfig:
    """nanochat's chat_sft: 2% of the base LRs decaying linearly to 0, constant Muon momentum,
    no clipping, 32 conversations per step, one epoch, validation loss on assistant tokens."""
    optim = OptimConfig(init_lr_frac=0.02, warmdown_ratio=1.0, momentum_warmup_steps=0, grad_clip=0.0)
    return TrainConfig(stage="sft", init_from="mid", optim=optim, **kw)


PRESETS = {
    # Seconds on a CPU: what the test-suite runs.
    "tiny": RunPreset(
        name="tiny", source="smoke", num_shards=None, vocab_size=512, tokenizer_max_chars=300_000,
        base=_base(depth=2, seq_len=64, device_batch_size=4, total_batch_size=256, max_steps=12, eval_every=6,
                   eval_tokens=2048, checkpoint_every=4, dtype="float32"),
        bpb_eval_tokens=2048, sample_max_tokens=8,
        mid=_mid(depth=2, seq_len=64, device_batch_size=4, total_batch_size=256, max_steps=6, eval_every=3,
                 eval_tokens=1024, checkpoint_every=2, dtype="float32"),
        sft=_sft(depth=2, seq_len=64, device_batch_size=2, examples_per_step=4, max_steps=6, eval_every=3,
                 eval_steps=2, checkpoint_every=2, dtype="float32"),
        evals="existing", max_per_task=2, chat_max_new_tokens=16,
        rl=RLConfig(examples_per_step=1, num_samples=2, device_batch_size=2, max_new_tokens=8, max_steps=2,
                    train_size=64, eval_every=2, eval_examples=2, checkpoint_every=1, dtype="float32")),
    # Minutes on a 2-core CPU, offline: the whole pipeline on Python's own documentation.
    "smoke": RunPreset(
        name="smoke", source="smoke", num_shards=None, vocab_size=4096, tokenizer_max_chars=2_000_000,
        base=_base(depth=4, seq_len=256, device_batch_size=8, total_batch_size=2048, max_steps=120, eval_every=40,
                   eval_tokens=16384, checkpoint_every=20),
        bpb_eval_tokens=16384, sample_max_tokens=16,
        mid=_mid(depth=4, seq_len=256, device_batch_size=8, total_batch_size=2048, max_steps=40, eval_every=20,
                 eval_tokens=8192, checkpoint_every=20),
        sft=_sft(depth=4, seq_len=256, device_batch_size=8, examples_per_step=16, eval_every=10, eval_steps=8,
                 checkpoint_every=20),
        evals="pypi", max_per_task=16, chat_max_new_tokens=64,
        rl=RLConfig(examples_per_step=4, num_samples=4, device_batch_size=4, max_new_tokens=64, max_steps=6,
                    train_size=1000, eval_every=6, eval_examples=8, checkpoint_every=2)),
    # nanochat's hyperparameters on FineWeb-edu (Chinchilla horizon, 524,288-token batches).
    "d12": RunPreset(
        name="d12", source="hub", num_shards=80, vocab_size=65536, tokenizer_max_chars=2_000_000_000,
        base=_base(depth=12, device_batch_size=32, source="hub"), bpb_eval_tokens=20 * 524288, sample_max_tokens=16,
        mid=_mid(depth=12, device_batch_size=32, eval_every=150, source="hub"),
        sft=_sft(depth=12, device_batch_size=4, examples_per_step=32, eval_every=100, eval_steps=100, source="hub"),
        evals="bundle", rl=RLConfig(source="hub")),
    "d20": RunPreset(
        name="d20", source="hub", num_shards=240, vocab_size=65536, tokenizer_max_chars=2_000_000_000,
        base=_base(depth=20, device_batch_size=32, source="hub"), bpb_eval_tokens=20 * 524288, sample_max_tokens=16,
        mid=_mid(depth=20, device_batch_size=32, eval_every=150, source="hub"),
        sft=_sft(depth=20, device_batch_size=4, examples_per_step=32, eval_every=100, eval_steps=100, source="hub"),
        evals="bundle", rl=RLConfig(source="hub")),
}


def stage_defaults(stage: str) -> TrainConfig:
    """nanochat's full-size settings for one training stage, what `mlxchat train STAGE` starts from."""
    defaults = {
        "base": _base(),
        "mid": _mid(device_batch_size=32, eval_every=150),
        "sft": _sft(device_batch_size=4, examples_per_step=32, eval_every=100, eval_steps=100),
    }
    if stage not in defaults:
        raise MlxchatError(f"unknown training stage {stage!r}; expected one of {', '.join(defaults)}")
    return defaults[stage]


def fit_to_ranks(cfg: TrainConfig, world_size: int) -> TrainConfig:
    """The stage's settings with the micro-batch halved until the global batch divides among
    `world_size` ranks (a no-op on one process, or where it divides already). The global batch,
    the horizon and the schedule stay; only how the batch is cut into micro-batches changes."""
    batch = cfg.device_batch_size
    per_step = cfg.examples_per_step or cfg.total_batch_size // cfg.seq_len
    while batch > 1 and per_step % (batch * world_size):
        batch //= 2
    return replace(cfg, device_batch_size=batch)


def resolve(preset: str, depth: int | None = None, max_steps: int | None = None,
            vocab_size: int | None = None) -> RunPreset:
    if preset not in PRESETS:
        raise MlxchatError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    for flag, value, low in (("--depth", depth, 1), ("--max-steps", max_steps, 1), ("--vocab-size", vocab_size, MIN_VOCAB_SIZE)):
        if value is not None and value < low:
            raise MlxchatError(f"{flag} must be at least {low}, got {value}")
    p = PRESETS[preset]
    if vocab_size is not None:
        p = replace(p, vocab_size=vocab_size)
    base = replace(p.base, source=p.source)
    if depth is not None:
        base = replace(base, depth=depth)
    if max_steps is not None:
        base = replace(base, max_steps=max_steps)
    chat = {name: replace(getattr(p, name), source=p.source if p.source in ("smoke", "hub") else "smoke",
                          depth=base.depth) for name in LOOP_STAGES[1:]}
    rl = replace(p.rl, source=p.source if p.source in ("smoke", "hub") else "smoke")
    return replace(p, base=base, rl=rl, **chat)
