"""ARC (allenai/ai2_arc): grade-school science questions with 3-5 lettered choices, in the
ARC-Easy and ARC-Challenge subsets. nanochat's tasks/arc.py; categorical."""

from __future__ import annotations

from mlxchat.common import MlxchatError
from mlxchat.conversations.base import Task, render_mc
from mlxchat.conversations.hub import SHUFFLE_SEED, Rows, load_rows, pack_dir, read_jsonl

REPO = "allenai/ai2_arc"
SUBSETS = {"ARC-Easy": "arc_easy.jsonl", "ARC-Challenge": "arc_challenge.jsonl"}


class ARC(Task):
    eval_type = "categorical"

    def __init__(self, subset: str, split: str, root=None, rows=None, **kwargs):
        super().__init__(**kwargs)
        if subset not in SUBSETS:
            raise MlxchatError(f"ARC subset must be ARC-Easy or ARC-Challenge, got {subset!r}")
        if split not in ("train", "validation", "test"):
            raise MlxchatError(f"ARC split must be train, validation or test, got {split!r}")
        self.subset, self.split = subset, split
        self.rows = rows if rows is not None else load_rows(REPO, f"{subset}/{split}-*.parquet", root)

    @classmethod
    def from_pack(cls, root=None, subset: str = "ARC-Easy", **kwargs) -> "ARC":
        """The test questions from the offline eval pack (`<home>/evals/chat/arc_*.jsonl`,
        rows {"question", "choices": [...], "labels": [...], "answer": "C"})."""
        if subset not in SUBSETS:
            raise MlxchatError(f"ARC subset must be ARC-Easy or ARC-Challenge, got {subset!r}")
        rows = [
            {"question": r["question"], "choices": {"text": r["choices"], "label": r["labels"]}, "answerKey": r["answer"]}
            for r in read_jsonl(pack_dir(root) / SUBSETS[subset], subset)
        ]
        return cls(subset, "test", rows=Rows(rows, SHUFFLE_SEED), **kwargs)

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        row = self.rows[index]
        letters, answer = list(row["choices"]["label"]), row["answerKey"]
        if answer not in letters:
            raise MlxchatError(f"ARC {self.subset} row {index}: answer {answer!r} is not one of {letters}")
        return {
            "messages": [
                {"role": "user", "content": render_mc(row["question"], letters, row["choices"]["text"])},
                {"role": "assistant", "content": answer},
            ],
            "letters": letters,  # evaluation restricts the model's pick to these
        }

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return completion.strip() == conversation["messages"][-1]["content"]
