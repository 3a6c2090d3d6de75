"""SmolTalk: general conversations (HuggingFaceTB/smol-smoltalk, the smaller-model cut of
SmolTalk: 460K train, 24K test), nanochat's tasks/smoltalk.py."""

from __future__ import annotations

from mlxchat.common import MlxchatError
from mlxchat.conversations.base import Task
from mlxchat.conversations.hub import load_rows

REPO = "HuggingFaceTB/smol-smoltalk"


class SmolTalk(Task):
    def __init__(self, split: str = "train", root=None, **kwargs):
        super().__init__(**kwargs)
        if split not in ("train", "test"):
            raise MlxchatError(f"SmolTalk split must be train or test, got {split!r}")
        self.rows = load_rows(REPO, f"data/{split}-*.parquet", root)

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        messages = self.rows[index]["messages"]
        # Checked as read, as nanochat does: an optional system message, then user and
        # assistant turns alternating, all plain strings.
        body = messages[1:] if messages and messages[0]["role"] == "system" else messages
        roles_ok = len(body) >= 2 and all(m["role"] == ("user", "assistant")[i % 2] for i, m in enumerate(body))
        if not roles_ok or not all(isinstance(m["content"], str) for m in body):
            raise MlxchatError(f"{REPO} row {index} is not a user/assistant conversation of strings")
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}
