"""Talking to a chat model: load a run's chat checkpoint, stream an assistant reply as text.

Shared by `mlxchat chat` (a terminal REPL) and `mlxchat serve` (the web UI), so both load,
prompt, sample and decode the same way, as nanochat's chat_cli and chat_web do:

- the conversation is rendered by the tokenizer's chat template and followed by
  `<|assistant_start|>`; the reply ends at `<|assistant_end|>` (or `<|bos|>`, a model that
  starts a new document has finished its answer);
- the calculator tool is always on, and its calls show in the text as GSM8K writes them in
  the training data, `<<12*7=84>>`: what the model asked for, then what it was told;
- text goes out as soon as it decodes to whole characters. A character can span several
  byte-level tokens (é, emoji), and decoding half of it gives U+FFFD; like chat_web, tokens
  accumulate until the decoded text no longer ends in U+FFFD, so no broken character is shown.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator

from mlxchat.calculator import calculator_tool
from mlxchat.checkpoint import latest_checkpoint
from mlxchat.common import MlxchatError, run_dir
from mlxchat.engine import generate

# How the tool's special tokens read in a reply (GSM8K's calculator annotation).
TOOL_MARKS = {"<|python_start|>": "<<", "<|python_end|>": "", "<|output_start|>": "=", "<|output_end|>": ">>"}

DEFAULT_TEMPERATURE = 0.6
DEFAULT_TOP_K = 50
DEFAULT_MAX_TOKENS = 512


@dataclass
class ChatModel:
    """A loaded chat model and its tokenizer (`step`: the checkpoint's training step)."""

    model: object
    tokenizer: object
    run: str
    stage: str
    step: int


def load_chat_model(run: str, stage: str = "sft", root=None) -> ChatModel:
    """The model of `runs/<run>/<stage>/latest` and the run's tokenizer. A run without a
    checkpoint for that stage is a user error that says how to train it."""
    from mlxchat.tokenizer import Tokenizer
    from mlxchat.train import load_trained_model

    rdir = run_dir(run, root, must_exist=True)
    stage_dir = rdir / stage
    hint = (f"train it first: mlxchat train {stage} --run {run} (after base and mid), "
            f"or the whole pipeline: python flows/speedrun.py")
    if latest_checkpoint(stage_dir) is None:
        raise MlxchatError(f"run {run!r} has no {stage} checkpoint yet (no {stage_dir / 'latest'}); {hint}")
    model, ck = load_trained_model(stage_dir, hint)
    return ChatModel(model, Tokenizer.load(rdir / "tokenizer"), run, stage, ck.step)


class _TextStream:
    """Turns a reply's tokens into text pieces that never end inside a character."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.marks = {tokenizer.encode_special(name): text for name, text in TOOL_MARKS.items()}
        self.pending: list[int] = []  # tokens of the current run of ordinary text
        self.sent = 0  # characters of their decoding already emitted

    def push(self, token: int) -> str:
        if token in self.marks:
            return self.flush() + self.marks[token]
        self.pending.append(token)
        text = self.tokenizer.decode(self.pending)
        if text.endswith("\ufffd"):
            return ""
        piece, self.sent = text[self.sent:], len(text)
        return piece

    def flush(self) -> str:
        """Whatever is left (a character the model never finished shows as U+FFFD)."""
        piece = self.tokenizer.decode(self.pending)[self.sent:]
        self.pending, self.sent = [], 0
        return piece


def stream_reply(
    chat: ChatModel,
    messages: list[dict],
    temperature: float = DEFAULT_TEMPERATURE,
    top_k: int | None = DEFAULT_TOP_K,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    seed: int | None = None,
    cancelled=lambda: False,
) -> Iterator[str]:
    """Text pieces of the assistant's answer to `messages` (user/assistant turns, optional
    leading system message), as they are generated. `seed` None draws a fresh one, so asking
    again gives another answer (at temperature > 0); `cancelled()` true stops early (a web
    client that went away)."""
    tok = chat.tokenizer
    prompt = tok.render_for_completion({"messages": [*messages, {"role": "assistant", "content": ""}]})
    stop = {tok.encode_special("<|assistant_end|>"), tok.bos_id}
    seed = random.randrange(2**31) if seed is None else seed
    text = _TextStream(tok)
    for (token,) in generate(chat.model, prompt, max_tokens, temperature=temperature, top_k=top_k, seed=seed,
                             stop_tokens=tuple(stop), tool=calculator_tool(tok)):
        if token in stop or cancelled():
            break
        piece = text.push(token)
        if piece:
            yield piece
    rest = text.flush()
    if rest:
        yield rest


def chat_repl(chat: ChatModel, stdin, stdout, temperature: float = 0.6, top_k: int | None = 50,
              max_tokens: int = 512, seed: int = 42) -> None:
    """nanochat's chat_cli: read user turns line by line, stream each reply as it is made;
    'quit' or 'exit' (or end of input) leaves, 'clear' starts a new conversation. Each turn
    draws with the next seed, so a session is reproducible but turns do not repeat."""
    stdout.write(f"mlxchat {chat.run}/{chat.stage} (step {chat.step}). 'clear' starts over, 'quit' leaves.\n")
    messages: list[dict] = []
    while True:
        stdout.write("\nUser: ")
        stdout.flush()
        line = stdin.readline()
        if not line:
            stdout.write("\n")
            return
        text = line.strip()
        if text.lower() in ("quit", "exit"):
            return
        if text.lower() == "clear":
            messages = []
            stdout.write("(conversation cleared)\n")
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        stdout.write("\nAssistant: ")
        reply = []
        for piece in stream_reply(chat, messages, temperature, top_k, max_tokens, seed):
            reply.append(piece)
            stdout.write(piece)
            stdout.flush()
        stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})
        seed += 1
