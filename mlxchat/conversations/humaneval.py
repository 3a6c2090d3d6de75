"""HumanEval (openai/openai_humaneval): 164 Python functions to complete, checked by unit
tests. nanochat's tasks/humaneval.py; generative.

`evaluate` runs the completion against the problem's tests in the sandbox
(`mlxchat.evaluation.chatcore.humaneval_passes`): model-written code never runs in this process.
"""

from __future__ import annotations

from mlxchat.conversations.base import Task
from mlxchat.conversations.hub import SHUFFLE_SEED, Rows, load_rows, pack_dir, read_jsonl

REPO = "openai/openai_humaneval"


class HumanEval(Task):
    eval_type = "generative"

    def __init__(self, root=None, rows=None, **kwargs):
        super().__init__(**kwargs)
        self.rows = rows if rows is not None else load_rows(REPO, "openai_humaneval/test-*.parquet", root)

    @classmethod
    def from_pack(cls, root=None, **kwargs) -> "HumanEval":
        """The problems from the offline eval pack (`<home>/evals/chat/humaneval.jsonl`, rows
        {"task_id", "prompt", "canonical_solution", "test", "entry_point"})."""
        return cls(rows=Rows(read_jsonl(pack_dir(root) / "humaneval.jsonl", "HumanEval"), SHUFFLE_SEED), **kwargs)

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        row = self.rows[index]
        return {
            "messages": [
                {"role": "user", "content": row["prompt"]},
                {"role": "assistant", "content": f"{row['prompt']}\n{row['canonical_solution']}"},
            ],
            "task_id": row.get("task_id", ""),
            "entry_point": row["entry_point"],
            "test": row["test"],
        }

    def evaluate(self, conversation: dict, completion: str) -> bool:
        from mlxchat.evaluation.chatcore import humaneval_passes

        return humaneval_passes(conversation, completion)
