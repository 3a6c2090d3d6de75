"""What every conversation dataset shares: sliceable `Task` views, mixtures, and the
multiple-choice prompt format (nanochat's tasks/common.py, c75fe54).

A task is a list of conversations `{"messages": [{"role": "user"|"assistant", "content": ...}]}`
that is computed on access: a training loop only needs `len(task)` and `task[i]`, so a 460K-row
hub dataset or a 200K-row synthetic one costs nothing until a row is read. Evaluatable tasks
also say how a sampled completion is judged (`eval_type`, `evaluate`).
"""

from __future__ import annotations

import random
import re
import zlib

from mlxchat.common import MlxchatError

MIXTURE_SEED = 42  # nanochat's TaskMixture shuffle seed

_ANSWER = re.compile(r"#### (\-?[0-9\.\,]+)")


class Task:
    """A lazily computed list of conversations, viewed through `start:stop:step`.

    Subclasses implement `num_examples()` and `get_example(i)` over their whole dataset; the
    slice lets a mixture take e.g. the first 10K rows of SmolTalk without copying anything.
    """

    eval_type: str | None = None  # "categorical" (pick a letter) | "generative" (sample and check)

    def __init__(self, start: int = 0, stop: int | None = None, step: int = 1):
        if start < 0 or (stop is not None and stop < start) or step < 1:
            raise MlxchatError(f"bad task slice start={start} stop={stop} step={step}: need 0 <= start <= stop, step >= 1")
        self.start, self.stop, self.step = start, stop, step

    def num_examples(self) -> int:
        raise NotImplementedError

    def get_example(self, index: int) -> dict:
        raise NotImplementedError

    def __len__(self) -> int:
        stop = self.num_examples() if self.stop is None else min(self.stop, self.num_examples())
        return max(0, -(-(stop - self.start) // self.step))

    def __getitem__(self, index: int) -> dict:
        if not isinstance(index, int):
            raise TypeError(f"task index must be an int, got {type(index).__name__}")
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a task of {len(self)} conversations")
        return self.get_example(self.start + index * self.step)

    def evaluate(self, conversation: dict, completion: str) -> bool:
        raise NotImplementedError(f"{type(self).__name__} has no evaluation")


class TaskMixture(Task):
    """Several tasks shuffled together with one fixed seed, so every run (and every resume)
    sees the same order and no task is bunched at the start or the end of an epoch. List a
    task twice to oversample it (nanochat does this with the identity conversations)."""

    def __init__(self, tasks: list[Task], **kwargs):
        super().__init__(**kwargs)
        self.tasks = list(tasks)
        self.index_map = [(t, i) for t, task in enumerate(self.tasks) for i in range(len(task))]
        random.Random(MIXTURE_SEED).shuffle(self.index_map)

    def num_examples(self) -> int:
        return len(self.index_map)

    def get_example(self, index: int) -> dict:
        task, local = self.index_map[index]
        return self.tasks[task][local]


class TaskSequence(Task):
    """Tasks one after another, in order: a curriculum rather than a mix."""

    def __init__(self, tasks: list[Task], **kwargs):
        super().__init__(**kwargs)
        self.tasks = list(tasks)

    def num_examples(self) -> int:
        return sum(len(task) for task in self.tasks)

    def get_example(self, index: int) -> dict:
        for task in self.tasks:
            if index < len(task):
                return task[index]
            index -= len(task)
        raise IndexError(index)


def render_mc(question: str, letters, choices) -> str:
    """The user message of a multiple-choice question, in nanochat's exact format.

    Two choices matter for small models. The letter comes *after* its choice ("- Paris=A"),
    which binds the letter to the choice better than a leading "A. Paris". And there is no
    space between "=" and the letter: the assistant answers with the bare letter "A", and the
    tokenizer gives " A" and "A" different ids, so the prompt must show the very token the
    answer uses.
    """
    lines = "".join(f"- {choice}={letter}\n" for letter, choice in zip(letters, choices))
    return f"Multiple Choice question: {question}\n{lines}\nRespond only with the letter of the correct answer."


def extract_answer(text: str) -> str | None:
    """The number after the first "#### " (commas dropped), as GSM8K's official grader reads
    the final answer; None when there is none."""
    match = _ANSWER.search(text)
    return match.group(1).strip().replace(",", "") if match else None


def last_text(conversation: dict) -> str:
    """The text of the reference answer's last part, where "#### n" is."""
    content = conversation["messages"][-1]["content"]
    return content if isinstance(content, str) else content[-1]["text"]


def evaluate_final_number(conversation: dict, completion: str) -> bool:
    """True when the completion's "#### n" matches the reference's, as nanochat's GSM8K."""
    reference = extract_answer(last_text(conversation))
    return reference is not None and extract_answer(completion) == reference


def check_split(split: str) -> str:
    """A generated task's split: "train", or "val"/"test" (the same held-out items)."""
    if split not in ("train", "val", "test"):
        raise MlxchatError(f"unknown split {split!r}; expected train, val or test")
    return split


def in_split(key: str, split: str, val_share: int = 10) -> bool:
    """Whether `key` (a word, a question) belongs to `split`: a stable hash sends one in
    `val_share` to "val"/"test" and the rest to "train", so generated train and validation
    data can never contain the same item, whatever the seeds."""
    check_split(split)
    held_out = zlib.crc32(key.encode()) % val_share == 0
    return held_out == (split != "train")
