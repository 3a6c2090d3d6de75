"""A tiny run directory with a chat checkpoint, for the chat CLI, web and browser tests: a
small trained tokenizer and a random GPT saved as stage `sft`'s latest checkpoint, laid out
exactly as training leaves a run (so `mlxchat.chat_session.load_chat_model` reads it unchanged)."""

from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from mlxchat import checkpoint
from mlxchat.gpt import GPT, GPTConfig
from mlxchat.tokenizer import Tokenizer
from mlxchat.train import TrainConfig

RUN = "tiny"
TEXT = [
    "The quick brown fox jumps over the lazy dog. What is 12 * 7? It is 84.",
    "Hello there! How are you today? I am fine, thank you. The sky is blue because of scattering.",
    "Paris is the capital of France. Strawberry has three r letters. Café, naïve, über: ünïcödé.",
] * 20


def make_chat_run(root: Path, run: str = RUN, stage: str = "sft") -> Path:
    """Write `root/runs/<run>/{tokenizer, <stage>}` and return the run directory."""
    rdir = Path(root) / "runs" / run
    tok = Tokenizer.train_from_iterator(TEXT, vocab_size=400)
    tok.save(rdir / "tokenizer")
    config = GPTConfig(sequence_len=128, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_kv_head=1, n_embd=64)
    model = GPT(config)
    model.init_weights(0)
    # nanochat's init zeroes lm_head and the projections (every logit equal); noise makes the
    # replies vary with the prompt like a real model's.
    params = [(name, mx.random.normal(p.shape, scale=0.5, key=mx.random.key(7 + i))
               if name == "lm_head.weight" or name.endswith("c_proj.weight") else p)
              for i, (name, p) in enumerate(tree_flatten(model.parameters()))]
    model.update(tree_unflatten(params))
    mx.eval(model.parameters())
    cfg = TrainConfig(stage=stage, depth=2, seq_len=128, dtype="float32")
    state = {"config": cfg.to_dict(), "model_config": config.to_dict()}
    checkpoint.save_checkpoint(rdir / stage, 1, model.parameters(), None, state)
    return rdir


class ScriptedModel:
    """A stand-in model for `engine.generate`: at the i-th generated position its logits put
    all mass on `script[i]` (then on the script's last token). Where a tool should force
    tokens, a script can say junk, so the output shows whether the forced tokens won.
    `prompts` records every generation's prompt (a new cache starts a new generation)."""

    compute_dtype = mx.float32

    def __init__(self, config: GPTConfig, script: list[int]):
        self.config = config
        self.script = script
        self.prompts: list[list[int]] = []
        self._cache = None
        self._fed = 0

    def __call__(self, idx, cache=None):
        B, T = idx.shape
        if cache is not self._cache:
            self._cache, self._fed = cache, 0
            self.prompts.append(idx[0].tolist())
        self._fed += T
        i = self._fed - len(self.prompts[-1])
        nxt = self.script[min(i, len(self.script) - 1)]
        return mx.full((B, T, self.config.vocab_size), -1e9).at[:, :, nxt].add(mx.array(2e9))
