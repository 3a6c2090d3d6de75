"""ChatCORE's evaluation loops on a tiny model and tokenizer, with small in-test tasks."""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from mlxchat.common import MlxchatError
from mlxchat.engine import generate_batch
from mlxchat.evaluation.chatcore import (
    CHATCORE_TASKS,
    centered_accuracy,
    chatcore,
    evaluate_chat,
    extract_program,
    humaneval_passes,
    humaneval_program,
    run_categorical_eval,
    run_generative_eval,
    run_task_eval,
)
from mlxchat.gpt import GPT, GPTConfig
from mlxchat.tokenizer import Tokenizer

TEXT = [
    "The quick brown fox jumps over the lazy dog. Which answer is right: A, B, C or D?",
    "Water boils at 100 degrees. The sun is a star. Paris is the capital of France.",
    "def add(a, b):\n    return a + b\nprint(add(2, 3))",
] * 20
QUESTIONS = [
    "What is the capital of France?",
    "Which one is a star? The sun or the moon",
    "How many legs does a dog have?",
    "Water boils at what temperature?",
    "Pick the odd one out: apple, pear, brown fox",
    "Is the quick brown fox lazy?",
    "A",
]


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train_from_iterator(TEXT, vocab_size=400)


@pytest.fixture(scope="module")
def model(tokenizer):
    """A random tiny model with noise on the zero-initialised projections (else every
    logit is equal and every comparison trivially agrees)."""
    m = GPT(GPTConfig(sequence_len=128, vocab_size=tokenizer.vocab_size, n_layer=2, n_head=2, n_kv_head=1, n_embd=64))
    m.init_weights(0)
    params = []
    for i, (name, p) in enumerate(tree_flatten(m.parameters())):
        if name == "lm_head.weight" or name.endswith("c_proj.weight"):
            p = mx.random.normal(p.shape, scale=0.5, key=mx.random.key(100 + i))
        params.append((name, p))
    m.update(tree_unflatten(params))
    mx.eval(m.parameters())
    return m


class ChoiceTask:
    """Multiple choice: each question's answer letter is given; letters vary per question."""

    eval_type = "categorical"

    def __init__(self, answers, letters=("A", "B", "C", "D")):
        self.answers = answers
        self.letters = list(letters)
        self.seen = []

    def __len__(self):
        return len(self.answers)

    def __getitem__(self, i):
        q = QUESTIONS[i % len(QUESTIONS)] + " x" * i  # prompts of different lengths
        letters = self.letters[: 2 + i % 3]  # 2 to 4 choices
        return {
            "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": self.answers[i]}],
            "letters": letters,
        }

    def evaluate(self, conversation, completion):
        self.seen.append(completion)
        return completion == conversation["messages"][-1]["content"]


class TargetTask:
    """Generative: a problem is right when a completion equals its target text."""

    eval_type = "generative"

    def __init__(self, targets):
        self.targets = targets
        self.seen = []

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return {
            "messages": [{"role": "user", "content": QUESTIONS[i]}, {"role": "assistant", "content": "?"}],
            "target": self.targets[i],
        }

    def evaluate(self, conversation, completion):
        self.seen.append(completion)
        return completion == conversation["target"]


class PrefixSumModel:
    """Logits that depend on the whole prefix (a hash of the cumulative id sum), so the
    expected letter can be computed by hand and a wrong position would show."""

    def __init__(self, vocab_size):
        self.vocab_size = vocab_size

    def hidden(self, idx):
        return mx.cumsum(idx, axis=1).astype(mx.float32)[..., None]

    def logits(self, h):
        return mx.sin(h * (mx.arange(self.vocab_size, dtype=mx.float32) + 1.0) * 0.37)

    def expected_logits(self, prompt):
        s = float(sum(prompt))
        return np.sin(s * (np.arange(self.vocab_size, dtype=np.float32) + 1.0) * 0.37)


def test_categorical_picks_the_letter_with_the_highest_logit(tokenizer):
    fake = PrefixSumModel(tokenizer.vocab_size)
    probe = ChoiceTask(["A"] * 9)
    expected = []
    for i in range(len(probe)):
        conv = probe[i]
        logits = fake.expected_logits(tokenizer.render_for_completion(conv))
        ids = [tokenizer.encode(letter)[0] for letter in conv["letters"]]
        expected.append(conv["letters"][int(np.argmax(logits[ids]))])
    assert len(set(expected)) > 1, "the probe should not pick the same letter everywhere"
    # make the answer key agree with the expected letter on the even problems only
    answers = [e if i % 2 == 0 else next(c for c in probe[i]["letters"] if c != e) for i, e in enumerate(expected)]
    task = ChoiceTask(answers)
    result = run_categorical_eval(task, fake, tokenizer, batch_size=4)
    assert [a[0] for a in result.answers] == expected
    assert task.seen == expected
    assert (result.passed, result.total) == (5, 9)
    assert result.accuracy == pytest.approx(5 / 9)
    assert result.outcomes == [i % 2 == 0 for i in range(9)]


def test_categorical_batched_equals_one_at_a_time(model, tokenizer):
    task = ChoiceTask(["B"] * 11)
    one = run_categorical_eval(task, model, tokenizer, batch_size=1)
    batched = run_categorical_eval(task, model, tokenizer, batch_size=4)
    assert batched.answers == one.answers
    assert batched.outcomes == one.outcomes
    for i, answer in enumerate(one.answers):  # and both are the argmax of a plain forward pass
        conv = task[i]
        prompt = tokenizer.render_for_completion(conv)
        row = np.array(model(mx.array([prompt]))[0, -1])
        ids = [tokenizer.encode(letter)[0] for letter in conv["letters"]]
        assert answer == [conv["letters"][int(np.argmax(row[ids]))]]
    assert len({a[0] for a in one.answers}) > 1, "the model should not be degenerate"


def test_categorical_max_problems_and_multi_token_letters(model, tokenizer):
    task = ChoiceTask(["A"] * 10)
    assert run_categorical_eval(task, model, tokenizer, batch_size=3, max_problems=4).total == 4
    with pytest.raises(MlxchatError, match="one token per letter"):
        run_categorical_eval(ChoiceTask(["A1"] * 2, letters=("A1 option", "B2 option")), model, tokenizer)


def test_generative_is_pass_at_k_over_samples(model, tokenizer):
    stop = (tokenizer.encode_special("<|assistant_end|>"), tokenizer.bos_id)
    prompt = tokenizer.render_for_completion(TargetTask(["?"])[0])
    rows = generate_batch(model, prompt, 12, temperature=1.0, top_k=None, seed=7, num_samples=3, stop_tokens=stop)
    samples = [tokenizer.decode(r) for r in rows]
    assert len(set(samples)) == 3, "samples at temperature 1 should differ"
    task = TargetTask([samples[2], "never produced"])  # problem 0: only the last sample is right
    result = run_generative_eval(
        task, model, tokenizer, num_samples=3, max_new_tokens=12, temperature=1.0, top_k=None, seed=7
    )
    assert (result.passed, result.total) == (1, 2)
    assert result.answers[0] == samples
    assert task.seen[:3] == samples and len(task.seen) == 6
    assert all("<|assistant_end|>" not in s and "<|bos|>" not in s for s in task.seen)


def test_generative_greedy_defaults_and_max_problems(model, tokenizer):
    task = TargetTask(["a", "b", "c"])
    result = run_generative_eval(task, model, tokenizer, max_new_tokens=5, max_problems=2)
    assert result.total == 2 and all(len(a) == 1 for a in result.answers)
    prompt = tokenizer.render_for_completion(task[0])
    stop = (tokenizer.encode_special("<|assistant_end|>"), tokenizer.bos_id)
    (greedy,) = generate_batch(model, prompt, 5, temperature=0.0, stop_tokens=stop)
    assert result.answers[0] == [tokenizer.decode(greedy)]


def test_greedy_problems_decoded_together_equal_one_at_a_time(model, tokenizer):
    """batch_size > 1 decodes greedy problems side by side (`engine.complete_prompts`; 7 prompts of
    different lengths in batches of 3, 3 and 1): the same completions and outcomes as one at a time."""
    answers = [a[0] for a in run_generative_eval(TargetTask(["?"] * 7), model, tokenizer, max_new_tokens=8).answers]
    assert len(set(answers)) > 1, "the model should not be degenerate"
    targets = [a if i % 2 == 0 else "never produced" for i, a in enumerate(answers)]
    one = run_generative_eval(TargetTask(targets), model, tokenizer, max_new_tokens=8, batch_size=1)
    together = run_generative_eval(TargetTask(targets), model, tokenizer, max_new_tokens=8, batch_size=3)
    assert together.answers == one.answers and [a[0] for a in one.answers] == answers
    assert together.outcomes == one.outcomes and (together.passed, together.total) == (4, 7)


def test_generative_passes_the_tool_to_the_engine(model, tokenizer):
    """A tool that forces the tokens of 'ok' after the first sampled token shows up in the
    completion the task sees."""
    forced = tokenizer.encode("ok")
    calls = []

    def tool(tokens):
        calls.append(len(tokens))
        return forced if len(calls) == 1 else []

    result = run_generative_eval(TargetTask(["x"]), model, tokenizer, max_new_tokens=6, tool=tool)
    assert calls
    assert "ok" in result.answers[0][0]


def test_run_task_eval_dispatches_on_eval_type(model, tokenizer):
    cat = run_task_eval(ChoiceTask(["A"] * 3), model, tokenizer, batch_size=2)
    gen = run_task_eval(TargetTask(["a", "b"]), model, tokenizer, max_new_tokens=3, max_problems=1)
    assert (cat.total, gen.total) == (3, 1)

    class Odd(ChoiceTask):
        eval_type = "ranking"

    with pytest.raises(MlxchatError, match="ranking"):
        run_task_eval(Odd(["A"]), model, tokenizer)


def test_evaluate_chat_runs_every_task_and_feeds_chatcore(model, tokenizer):
    tasks = {name: ChoiceTask(["A"] * 4) if i < 3 else TargetTask(["never"] * 2) for i, name in enumerate(CHATCORE_TASKS)}
    results = evaluate_chat(tasks, model, tokenizer, batch_size=2, max_new_tokens=3)
    assert list(results) == CHATCORE_TASKS
    assert [r.total for r in results.values()] == [4, 4, 4, 2, 2, 2]
    accuracies = {name: r.accuracy for name, r in results.items()}
    expected = sum((accuracies[n] - 0.25) / 0.75 for n in CHATCORE_TASKS[:3]) / 6  # generative ones are 0
    assert chatcore(accuracies) == pytest.approx(expected)


# -- ChatCORE arithmetic ---------------------------------------------------------------


def test_centered_accuracy_and_chatcore_by_hand():
    results = {"ARC-Easy": 0.5, "ARC-Challenge": 0.25, "MMLU": 0.4, "GSM8K": 0.1, "HumanEval": 0.05, "SpellingBee": 0.9}
    # (0.5-.25)/.75 = 1/3, 0, (0.4-.25)/.75 = 0.2, then 0.1, 0.05, 0.9 unchanged
    assert centered_accuracy("ARC-Easy", 0.5) == pytest.approx(1 / 3)
    assert centered_accuracy("MMLU", 0.25) == 0.0
    assert centered_accuracy("GSM8K", 0.1) == pytest.approx(0.1)
    assert chatcore(results) == pytest.approx((1 / 3 + 0 + 0.2 + 0.1 + 0.05 + 0.9) / 6)
    assert chatcore({t: 1.0 for t in CHATCORE_TASKS}) == pytest.approx(1.0)
    assert chatcore({t: (0.25 if i < 3 else 0.0) for i, t in enumerate(CHATCORE_TASKS)}) == 0.0


def test_centered_formula_reproduces_nanochats_published_speedrun_figure():
    """nanochat's d20 speedrun report (before SpellingBee joined): ChatCORE 0.0884."""
    sft = {"ARC-Easy": 0.3876, "ARC-Challenge": 0.2807, "MMLU": 0.3151, "GSM8K": 0.0455, "HumanEval": 0.0854}
    mean = sum(centered_accuracy(t, a) for t, a in sft.items()) / len(sft)
    assert round(mean, 4) == 0.0884


def test_chatcore_needs_every_task_and_known_names():
    with pytest.raises(MlxchatError, match="missing SpellingBee"):
        chatcore({t: 0.5 for t in CHATCORE_TASKS if t != "SpellingBee"})
    with pytest.raises(MlxchatError, match="unknown ChatCORE task 'MMLU-Pro'"):
        chatcore({**{t: 0.5 for t in CHATCORE_TASKS}, "MMLU-Pro": 0.5})


# -- HumanEval through the sandbox -------------------------------------------------------

PROBLEM = {
    "prompt": 'import math\nfrom typing import List\n\n\ndef norm(xs: List[float]) -> float:\n    """Euclidean norm."""\n',
    "test": "def check(candidate):\n    assert candidate([3.0, 4.0]) == 5.0\n    assert candidate([]) == 0.0\n",
    "entry_point": "norm",
}
RIGHT = "def norm(xs: List[float]) -> float:\n    return math.sqrt(sum(x * x for x in xs))"


def test_extract_program_takes_the_first_code_block():
    assert extract_program(f"Here you go:\n```python\n{RIGHT}\n```\nand\n```\nother\n```") == RIGHT
    assert extract_program(f"```\n{RIGHT}\n```") == RIGHT
    assert extract_program(f"  {RIGHT}\n") == RIGHT


def test_humaneval_program_restores_the_prompts_imports():
    program = humaneval_program(PROBLEM, f"```python\n{RIGHT}\n```")
    assert program.startswith("import math\nfrom typing import List\n\n")
    assert program.endswith("check(norm)")


def test_humaneval_passes_right_and_fails_wrong_completions():
    conversation = {
        "messages": [{"role": "user", "content": PROBLEM["prompt"]}, {"role": "assistant", "content": RIGHT}],
        "test": PROBLEM["test"],
        "entry_point": "norm",
    }
    assert humaneval_passes(PROBLEM, f"Sure:\n```python\n{RIGHT}\n```\nDone.")
    assert humaneval_passes(conversation, RIGHT)  # no imports in the completion: taken from the prompt
    assert not humaneval_passes(PROBLEM, RIGHT.replace("math.sqrt", "abs"))
    assert not humaneval_passes(PROBLEM, "def norm(xs):\n    while True:\n        pass", timeout_s=1)
    assert not humaneval_passes(PROBLEM, "import os\nos.system('true')\n" + RIGHT)
    with pytest.raises(MlxchatError, match="entry_point"):
        humaneval_program({"prompt": "x"}, RIGHT)
