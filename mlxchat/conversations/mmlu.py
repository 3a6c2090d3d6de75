"""MMLU (cais/mmlu): four-choice questions over 57 subjects. nanochat trains on its
auxiliary_train subset (100K questions from ARC, MCTest, OBQA and RACE) and evaluates on
`all`/test (14K). nanochat's tasks/mmlu.py; categorical."""

from __future__ import annotations

from mlxchat.common import MlxchatError
from mlxchat.conversations.base import Task, render_mc
from mlxchat.conversations.hub import SHUFFLE_SEED, Rows, load_rows, pack_dir, read_jsonl

REPO = "cais/mmlu"
LETTERS = ("A", "B", "C", "D")


class MMLU(Task):
    eval_type = "categorical"

    def __init__(self, subset: str, split: str, root=None, rows=None, **kwargs):
        super().__init__(**kwargs)
        if subset not in ("all", "auxiliary_train"):
            raise MlxchatError(f"MMLU subset must be all or auxiliary_train, got {subset!r}")
        if split not in ("train", "validation", "dev", "test") or (subset == "auxiliary_train") != (split == "train"):
            raise MlxchatError(f"MMLU split {split!r} does not exist for subset {subset!r}")
        self.subset, self.split = subset, split
        self.rows = rows if rows is not None else load_rows(REPO, f"{subset}/{split}-*.parquet", root)

    @classmethod
    def from_pack(cls, root=None, **kwargs) -> "MMLU":
        """The test questions from the offline eval pack (`<home>/evals/chat/mmlu.jsonl`, rows
        {"question", "subject", "choices": [4], "answer": index})."""
        rows = read_jsonl(pack_dir(root) / "mmlu.jsonl", "MMLU")
        return cls("all", "test", rows=Rows(rows, SHUFFLE_SEED), **kwargs)

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        row = self.rows[index]
        # auxiliary_train's parquet nests each question in a struct column named "train"
        row = row.get("train") or row
        choices, answer = row["choices"], row["answer"]
        if len(choices) != 4 or not 0 <= answer < 4:
            raise MlxchatError(f"MMLU {self.subset}/{self.split} row {index}: needs 4 choices and an answer 0-3")
        return {
            "messages": [
                {"role": "user", "content": render_mc(row["question"], LETTERS, choices)},
                {"role": "assistant", "content": LETTERS[answer]},
            ],
            "subject": row.get("subject", ""),  # for per-subject metrics
            "letters": LETTERS,  # evaluation restricts the model's pick to these
        }

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return completion.strip() == conversation["messages"][-1]["content"]
