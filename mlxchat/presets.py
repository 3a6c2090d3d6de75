"""Presets: named, fully resolved settings for a whole speedrun.

A preset is plain data (a dict per stage); `resolve()` applies overrides such as `--depth` and
returns frozen configs, so the flow, the CLI and `run.json` all see the same numbers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from mlxchat.common import MlxchatError
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

    def to_dict(self) -> dict:
        return asdict(self)


def _base(**kw) -> TrainConfig:
    return TrainConfig(stage="base", **kw)


PRESETS = {
    # Seconds on a CPU: what the test-suite runs.
    "tiny": RunPreset("tiny", "smoke", None, 512, 300_000,
                      _base(depth=2, seq_len=64, device_batch_size=4, total_batch_size=256, max_steps=12,
                            eval_every=6, eval_tokens=2048, checkpoint_every=4, dtype="float32"),
                      2048, 8),
    # Minutes on a 2-core CPU, offline: the whole pipeline on Python's own documentation.
    "smoke": RunPreset("smoke", "smoke", None, 4096, 2_000_000,
                       _base(depth=4, seq_len=256, device_batch_size=8, total_batch_size=2048, max_steps=150,
                             eval_every=50, eval_tokens=16384, checkpoint_every=25),
                       16384, 16),
    # nanochat's hyperparameters on FineWeb-edu (Chinchilla horizon, 524,288-token batches).
    "d12": RunPreset("d12", "hub", 80, 65536, 2_000_000_000,
                     _base(depth=12, device_batch_size=32, source="hub"), 20 * 524288, 16),
    "d20": RunPreset("d20", "hub", 240, 65536, 2_000_000_000,
                     _base(depth=20, device_batch_size=32, source="hub"), 20 * 524288, 16),
}


def resolve(preset: str, depth: int | None = None, max_steps: int | None = None) -> RunPreset:
    if preset not in PRESETS:
        raise MlxchatError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    p = PRESETS[preset]
    base = replace(p.base, source=p.source)
    if depth is not None:
        base = replace(base, depth=depth)
    if max_steps is not None:
        base = replace(base, max_steps=max_steps)
    return replace(p, base=base)
