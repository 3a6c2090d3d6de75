"""Talking to a chat model (mid or SFT): loading it, and streaming a reply to a conversation.

Shared by `mlxchat chat` (terminal) and `mlxchat serve` (web), so both see the same model,
prompt rendering, stop tokens and calculator. A reply is produced token by token through the
engine and handed out as text pieces as soon as they are complete characters: a byte-level
BPE token can end inside a multi-byte UTF-8 character (an emoji spans several tokens), so
text is decoded from all tokens of the current run and only emitted when it does not end in
U+FFFD (nanochat's chat_web does the same).

The calculator's calls and answers are shown in the text the way a Python prompt shows them:
`<|python_start|>12*7<|python_end|>` appears as "\\n>>> 12*7\\n", its output `84` as "84\\n".
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Iterator

from mlxchat.calculator import calculator_tool
from mlxchat.common import MlxchatError, run_dir
from mlxchat.engine import generate

CHAT_STAGES = ("sft", "mid")

# How the tool-use special tokens read in streamed text (the reply's own text is verbatim).
TOOL_MARKERS = {
    "<|python_start|>": "\n>>> ",
    "<|python_end|>": "\n",
    "<|output_start|>": "",
    "<|output_end|>": "\n",
}


@dataclass
class ChatModel:
    """A loaded chat checkpoint: the model in inference mode and its run's tokenizer."""

    model: object
    tokenizer: object
    run: str
    stage: str
    step: int


def load_chat_model(run: str, stage: str = "sft", root=None) -> ChatModel:
    """The `latest` checkpoint of a run's chat stage with the run's tokenizer; a one-line
    error saying how to train the stage when it has no checkpoint yet."""
    from mlxchat.tokenizer import Tokenizer
    from mlxchat.train import load_trained_model

    if stage not in CHAT_STAGES:
        raise MlxchatError(f"stage {stage!r} is not a chat stage; chat with one of: {', '.join(CHAT_STAGES)}")
    rdir = run_dir(run, root, must_exist=True)
    hint = f"train it first: mlxchat train {stage} --run {run} (or the whole pipeline: python flows/speedrun.py)"
    model, ck = load_trained_model(rdir / stage, hint)
    tokenizer = Tokenizer.load(rdir / "tokenizer")
    if tokenizer.vocab_size != model.config.vocab_size:
        raise MlxchatError(
            f"{rdir / 'tokenizer'} has {tokenizer.vocab_size} tokens but the {stage} model expects "
            f"{model.config.vocab_size}; the run's tokenizer was replaced after training"
        )
    return ChatModel(model, tokenizer, run, stage, ck.step)


def render_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Tokens asking for the assistant's next turn: the whole conversation (never cut, unlike
    training rendering: the latest turn is the one that matters) and <|assistant_start|>."""
    if not messages or not isinstance(messages[-1], dict) or messages[-1].get("role") != "user":
        raise MlxchatError("the conversation must end with a user message for the assistant to answer")
    ids, _ = tokenizer.render_conversation({"messages": messages}, max_tokens=sys.maxsize)
    return ids + [tokenizer.encode_special("<|assistant_start|>")]


def stream_reply(
    chat: ChatModel,
    messages: list[dict],
    temperature: float = 0.6,
    top_k: int | None = 50,
    max_tokens: int = 512,
    seed: int = 42,
) -> Iterator[str]:
    """Text pieces of the assistant's reply to `messages` as they are generated, the
    calculator on. Ends at <|assistant_end|>, <|bos|> or after `max_tokens` tokens."""
    tok = chat.tokenizer
    prompt = render_prompt(tok, messages)
    stop = {tok.encode_special("<|assistant_end|>"), tok.bos_id}
    markers = {tok.encode_special(name): text for name, text in TOOL_MARKERS.items()}
    text = TextStream(tok)
    for (token,) in generate(chat.model, prompt, max_tokens, temperature=temperature, top_k=top_k, seed=seed,
                             stop_tokens=stop, tool=calculator_tool(tok)):
        if token in stop:
            break
        if token in markers:
            piece = text.flush() + markers[token]
        else:
            piece = text.add(token)
        if piece:
            yield piece
    rest = text.flush()
    if rest:
        yield rest


class TextStream:
    """Incremental decoding of ordinary tokens: `add` returns the new complete text, holding
    back a character whose bytes have not all arrived; `flush` returns what is left (at a
    special token or the end, where nothing more can complete it)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.emitted = 0

    def add(self, token: int) -> str:
        self.tokens.append(token)
        decoded = self.tokenizer.decode(self.tokens)
        if decoded.endswith("\ufffd"):
            return ""
        piece, self.emitted = decoded[self.emitted :], len(decoded)
        return piece

    def flush(self) -> str:
        piece = self.tokenizer.decode(self.tokens)[self.emitted :] if self.tokens else ""
        self.tokens, self.emitted = [], 0
        return piece
