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
import sys
from dataclasses import dataclass
from typing import Iterator

from mlxchat.calculator import calculator_tool
from mlxchat.checkpoint import latest_checkpoint
from mlxchat.common import MlxchatError
from mlxchat.engine import generate, generate_batch
from mlxchat.rundir import run_dir

# Questions for the chat stages (mid, SFT): facts, identity, the calculator and spelling, the
# skills their mixtures teach.
CHAT_PROMPTS = [
    "What is the capital of France?",
    "Who are you?",
    "What is 12 * 7?",
    "How many r are in the word strawberry?",
    "Spell the word apple.",
    "Why is the sky blue?",
]

# How the tool's special tokens read in a reply (GSM8K's calculator annotation).
TOOL_MARKS = {"<|python_start|>": "<<", "<|python_end|>": "", "<|output_start|>": "=", "<|output_end|>": ">>"}
# The assistant content part each of those tokens starts.
TOOL_PART_AFTER = {"<|python_start|>": "python", "<|python_end|>": "text", "<|output_start|>": "python_output",
                   "<|output_end|>": "text"}

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
    from mlxchat.inference import load_stage

    rdir = run_dir(run, root, must_exist=True)
    stage_dir = rdir.stage(stage)
    before = {"mid": " (after base)", "sft": " (after base and mid)"}.get(stage, "")
    hint = f"train it first: mlxchat train {stage} --run {run}{before}, or the whole pipeline: python flows/speedrun.py"
    if latest_checkpoint(stage_dir) is None:
        raise MlxchatError(f"run {run!r} has no {stage} checkpoint yet (no {stage_dir / 'latest'}); {hint}")
    loaded = load_stage(rdir, stage, hint)
    return ChatModel(loaded.model, loaded.tokenizer, run, stage, loaded.step)


class _TextStream:
    """Turns a reply's tokens into text pieces that never end inside a character, and
    collects the reply as the tokenizer's assistant content parts (text, python,
    python_output) so it can be rendered back exactly as the model saw it."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.marks = {tokenizer.encode_special(name): text for name, text in TOOL_MARKS.items()}
        self.kinds = {tokenizer.encode_special(name): kind for name, kind in TOOL_PART_AFTER.items()}
        self.pending: list[int] = []  # tokens of the current run of ordinary text
        self.sent = 0  # characters of their decoding already emitted
        self.kind = "text"  # the part the current run belongs to
        self.parts: list[dict] = []

    def push(self, token: int) -> str:
        if token in self.marks:
            piece = self.flush() + self.marks[token]
            self.kind = self.kinds[token]
            return piece
        self.pending.append(token)
        text = self.tokenizer.decode(self.pending)
        if text.endswith("\ufffd"):
            return ""
        piece, self.sent = text[self.sent:], len(text)
        return piece

    def flush(self) -> str:
        """Whatever is left (a character the model never finished shows as U+FFFD); closes
        the current part."""
        if not self.pending:
            return ""
        text = self.tokenizer.decode(self.pending)
        self.parts.append({"type": self.kind, "text": text})
        piece = text[self.sent:]
        self.pending, self.sent = [], 0
        return piece


def render_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Tokens asking for the assistant's next turn: the conversation and <|assistant_start|>.
    Never cut here (training rendering cuts at 2048 tokens, which would drop the newest
    turn, the one being answered); `fit_to_context` cuts from the oldest end instead."""
    if not messages or not isinstance(messages[-1], dict) or messages[-1].get("role") != "user":
        raise MlxchatError("the conversation must end with a user message for the assistant to answer")
    ids, _ = tokenizer.render_conversation({"messages": messages}, max_tokens=sys.maxsize)
    return ids + [tokenizer.encode_special("<|assistant_start|>")]


def fit_to_context(tokenizer, messages: list[dict], max_prompt_tokens: int) -> tuple[list[dict], int, str | None]:
    """The newest part of a conversation whose prompt fits in `max_prompt_tokens`: the
    oldest turns are left out (a user turn with the assistant's answer to it, so roles still
    alternate), then, if the user's last message alone is too long, its beginning; a system
    message stays unless even the last message's end needs its room. Returns the messages,
    their prompt length and a note saying what was left out (None when nothing was).

    Each message is encoded once to find where to cut, then the kept ones are rendered, so
    a conversation far beyond the context costs one pass over its text, never its prefill."""
    system = messages[:1] if messages[0]["role"] == "system" else []
    turns = messages[len(system):]
    sizes = [len(tokenizer.encode(m["content"])) + 2 for m in turns]  # + the turn's start and end tokens
    room = max_prompt_tokens - 2 - (len(tokenizer.encode(system[0]["content"])) + 1 if system else 0)
    first = len(turns) - 1
    while first >= 2 and sum(sizes[first - 2:]) <= room:
        first -= 2
    kept = turns[first:]
    prompt = render_prompt(tokenizer, system + kept)
    if len(prompt) <= max_prompt_tokens:
        return system + kept, len(prompt), _left_out(first, 0, max_prompt_tokens)
    if system and len(render_prompt(tokenizer, kept)) <= max_prompt_tokens:
        return kept, len(render_prompt(tokenizer, kept)), _left_out(first + 1, 0, max_prompt_tokens)
    content = kept[-1]["content"]
    lo, hi = 0, len(content)  # the longest end of the last message that fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(render_prompt(tokenizer, [{"role": "user", "content": content[-mid:]}])) <= max_prompt_tokens:
            lo = mid
        else:
            hi = mid - 1
    if lo == 0:
        raise MlxchatError(f"a context of {max_prompt_tokens} prompt tokens holds no message at all")
    last = [{"role": "user", "content": content[-lo:]}]
    return last, len(render_prompt(tokenizer, last)), _left_out(len(messages) - 1, len(content) - lo,
                                                                 max_prompt_tokens)


def _left_out(messages: int, characters: int, budget: int) -> str | None:
    if not messages and not characters:
        return None
    parts = [f"the {messages} oldest message{'s' * (messages != 1)}"] if messages else []
    if characters:
        parts.append(f"the first {characters} characters of the last one")
    return f"the conversation was cut to the model's context ({budget} prompt tokens): left out {' and '.join(parts)}"


def sample_chat(model, tokenizer, prompts: list[str] | None = None, max_tokens: int = 64, temperature: float = 0.0,
                top_k: int | None = None) -> list[dict]:
    """Answer each prompt (default CHAT_PROMPTS) as a one-turn conversation, calculator on;
    the reply ends at <|assistant_end|>. What the sample stage writes for mid and SFT."""
    stop = (tokenizer.encode_special("<|assistant_end|>"), tokenizer.bos_id)
    samples = []
    for prompt in prompts or CHAT_PROMPTS:
        ids = render_prompt(tokenizer, [{"role": "user", "content": prompt}])
        (reply,) = generate_batch(model, ids, max_tokens, temperature=temperature, top_k=top_k, stop_tokens=stop,
                                  tool=calculator_tool(tokenizer))
        samples.append({"prompt": prompt, "completion": tokenizer.decode(reply)})
    return samples


def stream_reply(
    chat: ChatModel,
    messages: list[dict],
    temperature: float = DEFAULT_TEMPERATURE,
    top_k: int | None = DEFAULT_TOP_K,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    seed: int | None = None,
    cancelled=lambda: False,
    parts: list[dict] | None = None,
) -> Iterator[str]:
    """Text pieces of the assistant's answer to `messages` (user/assistant turns, optional
    leading system message, ending with the user's), as they are generated. `seed` None
    draws a fresh one, so asking again gives another answer (at temperature > 0);
    `cancelled()` true stops early (a web client that went away). `parts`, when given,
    receives the reply as assistant content parts, for a caller that keeps the conversation
    (the terminal chat) to send the calculator exchange back as tool tokens, not text."""
    tok = chat.tokenizer
    prompt = render_prompt(tok, messages)
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
    if parts is not None:
        parts.extend(text.parts)


def chat_repl(chat: ChatModel, stdin, stdout, temperature: float = DEFAULT_TEMPERATURE,
              top_k: int | None = DEFAULT_TOP_K, max_tokens: int = DEFAULT_MAX_TOKENS, seed: int = 42) -> None:
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
        parts: list[dict] = []
        for piece in stream_reply(chat, messages, temperature, top_k, max_tokens, seed, parts=parts):
            stdout.write(piece)
            stdout.flush()
        stdout.write("\n")
        messages.append({"role": "assistant", "content": parts})
        seed += 1
