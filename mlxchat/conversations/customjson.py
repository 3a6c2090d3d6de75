"""Conversations from a JSONL file (nanochat's tasks/customjson.py), and the identity
conversations shipped with mlxchat.

Each line is one conversation: a JSON array of messages `{"role", "content"}` alternating
user, assistant, user, ... and ending with the assistant (an optional leading system message
is allowed; the tokenizer merges it into the first user turn). Lines are checked when the file
is read, so a bad file fails at the start of a stage with its line number, not hours into it.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from mlxchat.common import MlxchatError
from mlxchat.conversations.base import Task


def identity_path() -> Path:
    """mlxchat's own identity conversations (package data): who the model is, who made it,
    what it can and cannot do — nanochat mixes its equivalent into mid-training and SFT so
    the model answers "who are you?" truthfully."""
    return Path(str(resources.files("mlxchat.conversations") / "data" / "identity.jsonl"))


def _check(messages, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise MlxchatError(f"{where}: expected a JSON array of messages")
    has_system = isinstance(messages[0], dict) and messages[0].get("role") == "system"
    body = messages[1:] if has_system else messages
    if len(body) < 2 or len(body) % 2:
        raise MlxchatError(f"{where}: a conversation needs user/assistant pairs, got {len(body)} messages")
    for i, message in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if not isinstance(message, dict) or message.get("role") != expected:
            raise MlxchatError(f"{where}: message {i} should have role {expected!r}")
        if not isinstance(message.get("content"), str) or not message["content"]:
            raise MlxchatError(f"{where}: message {i} needs non-empty string content")
    return messages


class CustomJSON(Task):
    """Every conversation of a JSONL file, in file order."""

    def __init__(self, path: str | Path, **kwargs):
        super().__init__(**kwargs)
        self.path = Path(path)
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise MlxchatError(f"conversation file {self.path} not found") from None
        self.conversations = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{self.path}:{number}"
            try:
                messages = json.loads(line)
            except json.JSONDecodeError as e:
                raise MlxchatError(f"{where}: not JSON ({e})") from None
            self.conversations.append({"messages": _check(messages, where)})

    def num_examples(self) -> int:
        return len(self.conversations)

    def get_example(self, index: int) -> dict:
        return self.conversations[index]
