"""Loading a trained model stage for inference: the one way evaluation, sampling, chat, serve
and the flow get a stage's model and the run's tokenizer (training loads its own start, with
the optimizer, in train.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mlxchat import checkpoint as ckpt_lib
from mlxchat.rundir import RunDir


@dataclass
class LoadedStage:
    model: object  # mlxchat.gpt.GPT, in inference mode
    tokenizer: object  # mlxchat.tokenizer.Tokenizer
    checkpoint: ckpt_lib.Checkpoint

    @property
    def step(self) -> int:
        return self.checkpoint.step


def load_model(stage_dir: Path, hint: str):
    """(the model of a stage's `latest` checkpoint in inference mode, the checkpoint); `hint`
    says what to do when there is none."""
    import mlx.core as mx

    from mlxchat.common import default_dtype
    from mlxchat.gpt import GPT, GPTConfig

    ck = ckpt_lib.require_checkpoint(stage_dir, hint)
    dtype = ck.state["config"].get("dtype")  # any stage's config (TrainConfig, RLConfig) has one
    model = GPT(GPTConfig(**ck.state["model_config"]), compute_dtype=getattr(mx, dtype or default_dtype()))
    ckpt_lib.load_model_weights(model, ck)
    model.eval()  # plain ops, no hand-written backward's custom functions (gpt.CastLinear)
    return model, ck


def load_stage(rdir: RunDir, stage: str, hint: str | None = None) -> LoadedStage:
    """A model stage's latest checkpoint and the run's tokenizer."""
    from mlxchat.tokenizer import Tokenizer

    model, ck = load_model(rdir.stage(stage), hint or f"train it first: mlxchat train {stage} --run {rdir.name}")
    return LoadedStage(model, Tokenizer.load(rdir.tokenizer), ck)
