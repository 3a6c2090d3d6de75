"""HumanEval (openai/openai_humaneval): 164 Python functions to complete, checked by unit
tests. nanochat's tasks/humaneval.py; generative.

Running model-written code is the job of a sandbox, not of this module: `program_for` builds
the program to run (the prompt's imports, the completion's code, the tests, the check call),
and `evaluate` takes the runner as an argument — any `run_program(program: str) -> bool` that
executes it in isolation and says whether it exited cleanly.
"""

from __future__ import annotations

import re
from typing import Callable

from mlxchat.tasks.base import Task
from mlxchat.tasks.hub import Rows, SHUFFLE_SEED, load_rows, pack_dir, read_jsonl

REPO = "openai/openai_humaneval"
_FENCED = re.compile(r"```(?:python)?\s*\n(.*?)\n```", re.DOTALL)


def prompt_imports(prompt: str) -> str:
    """The import lines at the top of a prompt: a completion that restates the function
    without them would otherwise fail on a missing name, not on its logic."""
    imports = []
    for line in prompt.splitlines():
        stripped = line.strip()
        if stripped.startswith(("import ", "from ")):
            imports.append(stripped)
        elif stripped and not stripped.startswith("#"):
            break
    return "\n".join(imports)


def extract_code(completion: str) -> str:
    """The first fenced code block of a completion, else the whole completion."""
    match = _FENCED.search(completion)
    return (match.group(1) if match else completion).strip()


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

    @staticmethod
    def program_for(conversation: dict, completion: str) -> str:
        """The program whose clean exit means the completion passes the problem's tests."""
        imports = prompt_imports(conversation["messages"][0]["content"])
        return f"{imports}\n\n{extract_code(completion)}\n\n{conversation['test']}\ncheck({conversation['entry_point']})\n"

    def evaluate(self, conversation: dict, completion: str, run_program: Callable[[str], bool]) -> bool:
        return bool(run_program(self.program_for(conversation, completion)))
