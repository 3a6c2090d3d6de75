"""GSM8K (openai/gsm8k): grade-school math word problems with worked solutions, nanochat's
tasks/gsm8k.py; generative.

The solutions mark each calculation as a calculator call: "12/60 = $<<12/60=0.2>>0.2 per
minute". Parsed into assistant parts, "<<12/60=0.2>>" becomes a `python` part "12/60" (the
model learns to write the call) and a `python_output` part "0.2" (which the tool supplies at
inference, so it is not trained). The solution ends with "#### 10", the number graded.
"""

from __future__ import annotations

import re

from mlxchat.common import MlxchatError
from mlxchat.conversations.base import Task, evaluate_final_number
from mlxchat.conversations.hub import SHUFFLE_SEED, Rows, load_rows, pack_dir, read_jsonl

REPO = "openai/gsm8k"
_CALL = re.compile(r"(<<[^>]+>>)")


def solution_parts(answer: str) -> list[dict]:
    """A worked GSM8K answer as assistant parts: text between calls, and each `<<expr=result>>`
    as a python call `expr` and its output `result` (split at the last "=", as the expression
    itself may not contain one; a call without "=" has an empty output)."""
    parts = []
    for piece in _CALL.split(answer):
        if piece.startswith("<<") and piece.endswith(">>"):
            expr, _, result = piece[2:-2].rpartition("=") if "=" in piece else (piece[2:-2], "", "")
            parts.append({"type": "python", "text": expr})
            parts.append({"type": "python_output", "text": result})
        else:
            parts.append({"type": "text", "text": piece})
    return parts


class GSM8K(Task):
    eval_type = "generative"

    def __init__(self, subset: str = "main", split: str = "train", root=None, rows=None, **kwargs):
        super().__init__(**kwargs)
        if subset not in ("main", "socratic") or split not in ("train", "test"):
            raise MlxchatError(f"GSM8K has subsets main|socratic and splits train|test, got {subset!r}/{split!r}")
        self.subset, self.split = subset, split
        self.rows = rows if rows is not None else load_rows(REPO, f"{subset}/{split}-*.parquet", root)

    @classmethod
    def from_pack(cls, root=None, **kwargs) -> "GSM8K":
        """The test problems from the offline eval pack (`<home>/evals/chat/gsm8k.jsonl`, rows
        {"question", "answer"} with the full worked answer)."""
        rows = read_jsonl(pack_dir(root) / "gsm8k.jsonl", "GSM8K")
        return cls("main", "test", rows=Rows(rows, SHUFFLE_SEED), **kwargs)

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        row = self.rows[index]
        return {"messages": [
            {"role": "user", "content": row["question"]},
            {"role": "assistant", "content": solution_parts(row["answer"])},
        ]}  # fmt: skip

    def evaluate(self, conversation: dict, completion: str) -> bool:
        """Whether the completion's "#### n" is the reference's n (commas ignored)."""
        return evaluate_final_number(conversation, completion)
