"""ChatCORE: how a chat model does on ARC, MMLU, GSM8K, HumanEval and SpellingBee, as nanochat's
`scripts/chat_eval.py` measures it.

A task is any object with `__len__`, `__getitem__(i) -> conversation` (`{"messages": [...]}`,
the last message being the assistant's reference answer; categorical tasks add
`"letters": ["A", "B", ...]`), `eval_type` ("categorical" or "generative") and
`evaluate(conversation, completion) -> bool`. Two ways to score:

- categorical (ARC-Easy, ARC-Challenge, MMLU): no sampling. The prompt goes through the model
  once and the answer is the letter whose token has the highest logit at the last prompt
  position, among the letters this question offers. This asks less of the model than
  making it write the letter, which is nanochat's (and the usual) choice. Prompts are
  batched, right-padded with <|bos|>: attention is causal, so padding after a prompt
  cannot change the logits at its last position. Only those positions go through the
  lm_head (`model.hidden`, then `model.logits`).
- generative (GSM8K, HumanEval, SpellingBee): `num_samples` completions per problem through
  the engine, stopped at <|assistant_end|> or <|bos|>, optionally with the calculator
  tool; a problem counts as solved if any sample is correct (pass@k). Greedy single samples (the
  default) decode several problems together (`engine.complete_prompts`): the same completions
  as one at a time, up to the rounding of batched matmuls, in a fraction of the steps.

Data-parallel ranks take every world-th problem and add up their counts; sampling is seeded
per problem and answers do not depend on the batch, so the split changes no outcome.

ChatCORE is the mean over the six tasks of the centered accuracy (acc − baseline)/(1 − baseline):
0 at chance, 1 at perfect. Chance is 1/4 for the four-way multiple-choice tasks, 0 for the
open-ended ones.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlxchat.common import MlxchatError
from mlxchat.distributed import my_share, sum_over_ranks
from mlxchat.engine import Tool, complete_prompts, generate_batch
from mlxchat.evaluation.sandbox import run_program

# nanochat's chat_eval: the tasks ChatCORE averages and their chance-level accuracy.
BASELINE_ACCURACY = {
    "ARC-Easy": 0.25,
    "ARC-Challenge": 0.25,
    "MMLU": 0.25,
    "GSM8K": 0.0,
    "HumanEval": 0.0,
    "SpellingBee": 0.0,
}
CHATCORE_TASKS = list(BASELINE_ACCURACY)


@dataclass
class TaskResult:
    """How a task went: `passed` of `total` problems, and per problem the model's answers
    (the chosen letter for categorical tasks, every sample's completion for generative
    ones) and whether it was counted correct. Across ranks, `passed` and `total` count every
    rank's problems (`over_ranks`), the per-problem lists this rank's."""

    passed: int = 0
    total: int = 0
    answers: list[list[str]] = field(default_factory=list)
    outcomes: list[bool] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.passed / self.total if self.total else 0.0

    def add(self, answers: list[str], outcome: bool) -> None:
        self.answers.append(answers)
        self.outcomes.append(outcome)
        self.passed += int(outcome)
        self.total += 1

    def over_ranks(self) -> "TaskResult":
        self.passed, self.total = (int(v) for v in sum_over_ranks([self.passed, self.total]))
        return self


def _num_problems(task, max_problems: int | None) -> int:
    if max_problems is not None and max_problems < 1:
        raise MlxchatError(f"max_problems must be >= 1 or None, got {max_problems}")
    n = len(task) if max_problems is None else min(len(task), max_problems)
    if n == 0:
        raise MlxchatError(f"task {type(task).__name__} has no problems to evaluate")
    return n


def _letter_ids(tokenizer, letters: list[str], cache: dict[str, int]) -> list[int]:
    ids = []
    for letter in letters:
        if letter not in cache:
            encoded = tokenizer.encode(letter)
            if len(encoded) != 1:
                raise MlxchatError(
                    f"answer letter {letter!r} encodes to {len(encoded)} tokens; categorical evaluation needs one token per letter"
                )
            cache[letter] = encoded[0]
        ids.append(cache[letter])
    return ids


def run_categorical_eval(task, model, tokenizer, batch_size: int = 8, max_problems: int | None = None) -> TaskResult:
    """Score a multiple-choice task by the answer letters' logits, `batch_size` prompts per
    forward pass. Batched and one-at-a-time give the same answers (padding is causal-safe)."""
    if batch_size < 1:
        raise MlxchatError(f"batch_size must be >= 1, got {batch_size}")
    n = _num_problems(task, max_problems)
    letter_cache: dict[str, int] = {}
    result = TaskResult()
    mine = my_share(n)
    for start in range(0, len(mine), batch_size):
        conversations = [task[i] for i in mine[start : start + batch_size]]
        prompts = [tokenizer.render_for_completion(c) for c in conversations]
        width = max(len(p) for p in prompts)
        padded = mx.array([p + [tokenizer.bos_id] * (width - len(p)) for p in prompts])
        last = mx.array([len(p) - 1 for p in prompts])
        # lm_head on each prompt's last position only: (B, V), not (B, T, V) (GBs at 65k vocab)
        logits = model.logits(model.hidden(padded)[mx.arange(len(prompts)), last])
        logits = np.array(logits.astype(mx.float32))
        for row, conversation in zip(logits, conversations):
            letters = conversation["letters"]
            choice = letters[int(np.argmax(row[_letter_ids(tokenizer, letters, letter_cache)]))]
            result.add([choice], bool(task.evaluate(conversation, choice)))
    return result.over_ranks()


def run_generative_eval(
    task,
    model,
    tokenizer,
    num_samples: int = 1,
    max_new_tokens: int = 512,
    temperature: float = 0.0,
    top_k: int | None = 50,
    max_problems: int | None = None,
    tool: Tool | None = None,
    seed: int = 42,
    batch_size: int = 1,
) -> TaskResult:
    """Sample `num_samples` completions per problem; solved if any passes `task.evaluate`.

    Defaults are nanochat's chat_eval ones (greedy, 512 new tokens, top_k 50, one sample).
    `tool` is the calculator (`mlxchat.calculator.calculator_tool`): nanochat's engine runs
    it in every generation, so it is passed for every generative task, not only GSM8K.
    Greedy single samples (the default) decode `batch_size` problems together
    (`engine.complete_prompts`): each the same completion as alone, up to the rounding of
    batched matmuls. Sampling stays one problem at a time: its draws are seeded per problem.
    """
    n = _num_problems(task, max_problems)
    stop = (tokenizer.encode_special("<|assistant_end|>"), tokenizer.bos_id)
    result = TaskResult()
    mine = my_share(n)
    together = batch_size if temperature == 0.0 and num_samples == 1 and isinstance(model, nn.Module) else 1
    for start in range(0, len(mine), together):
        conversations = [task[i] for i in mine[start : start + together]]
        prompts = [tokenizer.render_for_completion(c) for c in conversations]
        if together > 1:
            rows_per_problem = [[row] for row in complete_prompts(model, prompts, max_new_tokens, stop, tool)]
        else:
            rows_per_problem = [generate_batch(model, prompts[0], max_new_tokens, temperature=temperature, top_k=top_k,
                                               seed=seed, num_samples=num_samples, stop_tokens=stop, tool=tool)]
        for conversation, rows in zip(conversations, rows_per_problem):
            completions = [tokenizer.decode(row) for row in rows]
            outcomes = [bool(task.evaluate(conversation, c)) for c in completions]
            result.add(completions, any(outcomes))
    return result.over_ranks()


def run_task_eval(task, model, tokenizer, batch_size: int = 8, decode_batch: int = 8, **generative) -> TaskResult:
    """Dispatch on the task's `eval_type`: categorical tasks take `batch_size` prompts a forward,
    generative ones decode `decode_batch` greedy problems together; `generative` holds
    run_generative_eval's options (max_problems applies to both)."""
    if task.eval_type == "categorical":
        return run_categorical_eval(task, model, tokenizer, batch_size, generative.get("max_problems"))
    if task.eval_type == "generative":
        return run_generative_eval(task, model, tokenizer, batch_size=decode_batch, **generative)
    raise MlxchatError(f"task {type(task).__name__} has eval_type {task.eval_type!r}; expected categorical or generative")


def evaluate_chat(tasks: dict, model, tokenizer, batch_size: int = 8, decode_batch: int = 8,
                  **generative) -> dict[str, TaskResult]:
    """Every task of `tasks` (name -> task), in order, as nanochat's chat_eval runs them.
    ChatCORE follows from the accuracies once all six tasks are there (`chatcore`)."""
    return {name: run_task_eval(task, model, tokenizer, batch_size, decode_batch, **generative)
            for name, task in tasks.items()}


def centered_accuracy(task_name: str, accuracy: float) -> float:
    """(accuracy − chance) / (1 − chance): 0 at chance level, 1 when every answer is right."""
    if task_name not in BASELINE_ACCURACY:
        raise MlxchatError(f"unknown ChatCORE task {task_name!r}; known: {', '.join(CHATCORE_TASKS)}")
    baseline = BASELINE_ACCURACY[task_name]
    return (accuracy - baseline) / (1.0 - baseline)


def chatcore(results: dict[str, float]) -> float:
    """ChatCORE from per-task accuracies: the mean centered accuracy over all six tasks.

    As nanochat, it exists only when every task was evaluated: a mean over a subset would
    not be comparable with anyone's ChatCORE.
    """
    missing = [t for t in CHATCORE_TASKS if t not in results]
    if missing:
        raise MlxchatError(f"ChatCORE needs all of {', '.join(CHATCORE_TASKS)}; missing {', '.join(missing)}")
    return sum(centered_accuracy(name, acc) for name, acc in results.items()) / len(results)


# -- HumanEval: programs from completions, run in the sandbox ----------------------------

_CODE_BLOCK = re.compile(r"```(?:python)?\s*\n(.*?)\n```", re.DOTALL)


def extract_imports(prompt: str) -> str:
    """The import lines at the top of a HumanEval prompt (up to the first other code line):
    completions usually restate the function but not the imports it needs."""
    imports = []
    for line in prompt.splitlines():
        stripped = line.strip()
        if stripped.startswith(("import ", "from ")):
            imports.append(stripped)
        elif stripped and not stripped.startswith("#"):
            break
    return "\n".join(imports)


def extract_program(completion: str) -> str:
    """The first fenced code block of a completion (```python or ```), else all of it."""
    match = _CODE_BLOCK.search(completion)
    return (match.group(1) if match else completion).strip()


def humaneval_program(problem: dict, completion: str) -> str:
    """The program nanochat runs: the prompt's imports, the completion's code, the tests and
    `check(<entry point>)`. `problem` is a HumanEval row (prompt, test, entry_point) or a
    conversation whose first message is the prompt and which carries test and entry_point."""
    try:
        prompt = problem["prompt"] if "prompt" in problem else problem["messages"][0]["content"]
        test, entry_point = problem["test"], problem["entry_point"]
    except (KeyError, IndexError, TypeError):
        raise MlxchatError(
            "a HumanEval problem needs prompt (or messages[0].content), test and entry_point"
        ) from None
    return f"{extract_imports(prompt)}\n\n{extract_program(completion)}\n\n{test}\ncheck({entry_point})"


def humaneval_passes(problem: dict, completion: str, timeout_s: float = 5.0) -> bool:
    """Whether the completion passes the problem's tests, run in the sandbox."""
    return run_program(humaneval_program(problem, completion), timeout_s=timeout_s).passed


# -- ChatCORE's tasks, read from the eval pack, scored on a model ---------------------------------


def chat_tasks(root=None) -> tuple[dict, dict]:
    """ChatCORE's six tasks as nanochat's chat_eval builds them, read from the eval pack
    (`<home>/evals/chat/`); a task whose data is missing is skipped with the reason."""
    from mlxchat.conversations import ARC, GSM8K, MMLU, HumanEval, SpellingBee

    builders = {
        "ARC-Easy": lambda: ARC.from_pack(root, "ARC-Easy"),
        "ARC-Challenge": lambda: ARC.from_pack(root, "ARC-Challenge"),
        "MMLU": lambda: MMLU.from_pack(root),
        "GSM8K": lambda: GSM8K.from_pack(root),
        "HumanEval": lambda: HumanEval.from_pack(root),
        "SpellingBee": lambda: SpellingBee(size=256, split="test"),
    }
    tasks, skipped = {}, {}
    for name, build in builders.items():
        try:
            tasks[name] = build()
        except MlxchatError as e:
            skipped[name] = str(e)
    return tasks, skipped


def score_chat(model, tok, max_per_task: int = -1, max_new_tokens: int = 512, batch_size: int | None = None,
               root=None) -> dict:
    """ChatCORE's tasks on a model (nanochat's chat_eval: greedy, top-k 50, one sample, the
    calculator on); ChatCORE itself only when all six tasks ran."""
    from mlxchat.calculator import calculator_tool
    from mlxchat.evaluation import eval_batching

    tasks, skipped = chat_tasks(root)
    _, categorical_rows, decode_rows = eval_batching()
    t0 = time.time()
    limit = max_per_task if max_per_task > 0 else None
    outcome = evaluate_chat(tasks, model, tok, batch_size or categorical_rows, decode_rows, max_problems=limit,
                            max_new_tokens=max_new_tokens, tool=calculator_tool(tok))
    results = {name: r.accuracy for name, r in outcome.items()}
    return {
        "max_per_task": max_per_task, "results": results, "problems": {name: r.total for name, r in outcome.items()},
        "centered": {name: centered_accuracy(name, acc) for name, acc in results.items()},
        "chatcore": chatcore(results) if not skipped else None, "skipped": skipped, "eval_time_s": time.time() - t0,
    }
