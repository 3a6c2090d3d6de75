"""Generated arithmetic word problems solved with the calculator tool: the offline stand-in
for GSM8K in the smoke mixtures.

Answers are written exactly as GSM8K's worked solutions are once parsed: text, a `python`
part holding the expression the model should send to the calculator, a `python_output` part
holding what the calculator returns (`str()` of Python's value, e.g. "6.0" for 12/2, because
that is what inference feeds back), the result restated in prose, and a final "#### n". So
GSM8K's `evaluate` grades these too, and the model practises the same tool protocol.

Problems are split between train and validation by a stable hash of the question
(`in_split`), so the two splits never share one.
"""

from __future__ import annotations

import random

from mlxchat.conversations.base import Task, check_split, evaluate_final_number, in_split

NAMES = ("Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jo", "Kofi", "Lena", "Mateo",
         "Nia", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tariq", "Uma", "Victor", "Wen", "Yusuf", "Zoe")
ITEMS = ("apples", "pencils", "stickers", "books", "marbles", "cookies", "stamps", "cards", "shells", "buttons")
MAX_DRAWS = 1000


def _num(value: float) -> str:
    """A result as prose writes it: 6.0 -> "6"."""
    return str(int(value)) if float(value).is_integer() else str(value)


class _Solution:
    """Builds the assistant's parts: prose, calculator calls, and the final answer."""

    def __init__(self):
        self.parts: list[dict] = []
        self.text = ""

    def say(self, text: str) -> None:
        self.text += text

    def calc(self, expr: str, value: float) -> str:
        """Write `expr` as a tool call, its output `str(value)`, and return the value as prose."""
        self.parts.append({"type": "text", "text": self.text})
        self.parts.append({"type": "python", "text": expr})
        self.parts.append({"type": "python_output", "text": str(value)})
        self.text = ""
        return _num(value)

    def answer(self, value: float) -> list[dict]:
        self.parts.append({"type": "text", "text": f"{self.text}\n#### {_num(value)}"})
        return self.parts


def _plain(rng: random.Random) -> tuple[str, list[dict]]:
    a, b = rng.randint(2, 999), rng.randint(2, 999)
    op = rng.choice("+-*")
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    question = rng.choice(("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "Calculate {a} {op} {b}",
                           "{a} {op} {b} = ?", "what's {a}{op}{b}"))
    s = _Solution()
    s.say(f"{a} {op} {b} = ")
    s.say(s.calc(f"{a}{op}{b}", value))
    return question.format(a=a, b=b, op=op), s.answer(value)


def _buy_change(rng: random.Random) -> tuple[str, list[dict]]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    n, price = rng.randint(2, 12), rng.randint(1, 9)
    bill = rng.choice([b for b in (20, 50, 100, 200) if b >= n * price])
    s = _Solution()
    s.say(f"The {item} cost {n}*{price} = $")
    cost = s.calc(f"{n}*{price}", n * price)
    s.say(f"{cost}.\nThe change is {bill}-{cost} = $")
    s.say(s.calc(f"{bill}-{cost}", bill - n * price) + ".")
    question = f"{name} buys {n} {item} at ${price} each and pays with a ${bill} bill. How much change does {name} get?"
    return question, s.answer(bill - n * price)


def _share(rng: random.Random) -> tuple[str, list[dict]]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    friends, each = rng.randint(2, 9), rng.randint(2, 15)
    total = friends * each
    s = _Solution()
    s.say(f"Each friend gets {total}/{friends} = ")
    s.say(s.calc(f"{total}/{friends}", total / friends) + f" {item}.")
    question = f"{name} has {total} {item} and shares them equally among {friends} friends. How many {item} does each friend get?"
    return question, s.answer(each)


def _collect(rng: random.Random) -> tuple[str, list[dict]]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    start, per_day, days, lost = rng.randint(0, 50), rng.randint(2, 20), rng.randint(2, 10), rng.randint(1, 10)
    s = _Solution()
    s.say(f"In {days} days {name} collects {per_day}*{days} = ")
    gained = s.calc(f"{per_day}*{days}", per_day * days)
    s.say(f"{gained} {item}.\nWith the {start} from before, that makes {start}+{gained} = ")
    have = s.calc(f"{start}+{gained}", start + per_day * days)
    s.say(f"{have}.\nAfter losing {lost}, {name} has {have}-{lost} = ")
    final = start + per_day * days - lost
    s.say(s.calc(f"{have}-{lost}", final) + f" {item}.")
    question = (f"{name} has {start} {item} and collects {per_day} more every day for {days} days, "
                f"then loses {lost}. How many {item} does {name} have now?")
    return question, s.answer(final)


def _distance(rng: random.Random) -> tuple[str, list[dict]]:
    name = rng.choice(NAMES)
    speed, hours = rng.randint(3, 90), rng.randint(2, 8)
    vehicle = rng.choice(("bike", "car", "train", "boat"))
    s = _Solution()
    s.say(f"Distance is speed times time: {speed}*{hours} = ")
    s.say(s.calc(f"{speed}*{hours}", speed * hours) + " km.")
    question = f"{name}'s {vehicle} travels at {speed} km per hour for {hours} hours. How many km does it go?"
    return question, s.answer(speed * hours)


def _pages(rng: random.Random) -> tuple[str, list[dict]]:
    name = rng.choice(NAMES)
    per_day, days = rng.randint(5, 40), rng.randint(2, 14)
    total = per_day * days + rng.randint(1, 200)
    s = _Solution()
    s.say(f"{name} reads {per_day}*{days} = ")
    read = s.calc(f"{per_day}*{days}", per_day * days)
    s.say(f"{read} pages.\nPages left: {total}-{read} = ")
    s.say(s.calc(f"{total}-{read}", total - per_day * days) + ".")
    question = f"A book has {total} pages. {name} reads {per_day} pages a day for {days} days. How many pages are left?"
    return question, s.answer(total - per_day * days)


def _ages(rng: random.Random) -> tuple[str, list[dict]]:
    a, b = rng.sample(NAMES, 2)
    age, diff, years = rng.randint(4, 40), rng.randint(1, 30), rng.randint(1, 20)
    s = _Solution()
    s.say(f"{b} is {age}+{diff} = ")
    older = s.calc(f"{age}+{diff}", age + diff)
    s.say(f"{older} now.\nIn {years} years {b} will be {older}+{years} = ")
    s.say(s.calc(f"{older}+{years}", age + diff + years) + ".")
    question = f"{a} is {age} years old and {b} is {diff} years older. How old will {b} be in {years} years?"
    return question, s.answer(age + diff + years)


PROBLEMS = (_plain, _buy_change, _share, _collect, _distance, _pages, _ages)


class Arithmetic(Task):
    """`size` generated problems of `split` ("train" or "val"/"test"), example i from seed i."""

    eval_type = "generative"

    def __init__(self, size: int = 1000, split: str = "train", **kwargs):
        super().__init__(**kwargs)
        self.size, self.split = size, check_split(split)

    def num_examples(self) -> int:
        return self.size

    def get_example(self, index: int) -> dict:
        rng = random.Random(index if self.split == "train" else -(index + 1))
        for _ in range(MAX_DRAWS):  # redraw until the question hashes into this split
            question, parts = rng.choice(PROBLEMS)(rng)
            if in_split(question, self.split):
                return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": parts}]}
        raise RuntimeError(f"no {self.split} problem in {MAX_DRAWS} draws")

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return evaluate_final_number(conversation, completion)
