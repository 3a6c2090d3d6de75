"""Spelling and letter counting, generated from a word list (nanochat's tasks/spellingbee.py).

A token is a chunk of characters, so "how many r in strawberry" is hard for a small model: it
must know which letters each token is made of. `SimpleSpelling` drills exactly that (spell a
word out letter by letter); `SpellingBee` builds on it — spell the word, count by hand, then
check with the python tool — which also teaches the habit of verifying with a tool.

Both are synthetic, so they work offline: the word list is Webster's Second International
(`web2`, 234,450 words) as the PyPI package `english-words` ships it, a pip dependency rather
than nanochat's download or an OS package, keeping lowercase a-z words only (sorted, so the
list is the same in every process).
Example `i` is drawn from `random.Random(seed(i))`, so a task of any size costs nothing until
read, and words are split between train and validation by a stable hash (`in_split`): the
two splits never share a word, hence never a conversation.
"""

from __future__ import annotations

import functools
import pickle
import random
import re
from importlib import resources
from pathlib import Path

from mlxchat.common import MlxchatError
from mlxchat.conversations.base import Task, evaluate_final_number, in_split

WORDS_PACKAGE = "english-words"  # pinned in pyproject.toml: its list decides the conversations
LETTERS = "abcdefghijklmnopqrstuvwxyz"
_WORD = re.compile(r"[a-z]+")

# Ways people ask; the variety (case, quotes, question mark, a few languages) is data
# augmentation, so the model learns the task rather than one phrasing.
QUESTIONS = (
    "How many {letter} are in the word {word}",
    "How many {letter} are in {word}",
    "How many {letter}s are in {word}",
    "How many {letter}'s does {word} have",
    "Count the {letter} in {word}",
    "Count the letter {letter} in the word {word}",
    "How often does {letter} occur in {word}",
    "How many times does the letter {letter} appear in {word}",
    "What is the number of {letter} in {word}",
    "Number of {letter} in {word}",
    "In the word {word}, how many {letter} are there",
    "In {word}, how many times do you see {letter}",
    "{word}: how many {letter}",
    "{word} contains how many {letter}",
    "Tell me how many {letter} there are in {word}",
    "Please count every {letter} in {word}",
    "Can you count the letter {letter} in {word}",
    "I need the count of {letter} in {word}",
    "Quick question, how many {letter} in {word}",
    "How many occurrences of {letter} does {word} contain",
    "¿Cuántas {letter} tiene la palabra {word}",
    "Combien de {letter} y a-t-il dans {word}",
    "Wie viele {letter} hat das Wort {word}",
    "Quante {letter} ci sono in {word}",
    "{word}에 {letter}가 몇 개 있어요",
    "{word}里有多少个{letter}",
    "{word}に{letter}はいくつありますか",
)
QUOTES = ("", "'", '"')


def packaged_words_file() -> Path:
    """The pickled word set inside the installed `english-words` package (web2, punctuation
    stripped, case kept): what mixture fingerprints hash."""
    try:
        return Path(str(resources.files("english_words").joinpath("data", "web2_alpha.pickle")))
    except ModuleNotFoundError:
        raise MlxchatError(f"the word list package is missing: pip install {WORDS_PACKAGE}") from None


@functools.lru_cache(maxsize=4)
def load_words(path: str | Path | None = None) -> tuple[str, ...]:
    """The lowercase a-z words of the packaged list, or of a one-word-per-line file at `path`
    (names, capitals and accents dropped: the tasks spell with the 26 letters only),
    deduplicated; the packaged set sorted, a file in its own order."""
    if path is None:
        lines = sorted(pickle.loads(packaged_words_file().read_bytes()))
        path = packaged_words_file()
    else:
        path = Path(path)
        try:
            lines = path.read_text(encoding="utf-8", errors="replace").split()
        except FileNotFoundError:
            raise MlxchatError(f"word list {path} not found: pass a one-word-per-line file, "
                               f"or none to use the {WORDS_PACKAGE} package's list") from None
    words = tuple(dict.fromkeys(w for w in lines if _WORD.fullmatch(w)))
    if len(words) < 100:
        raise MlxchatError(f"word list {path} has only {len(words)} lowercase a-z words; need 100 or more")
    return words


class _WordTask(Task):
    eval_type = "generative"

    def __init__(self, size: int = 1000, split: str = "train", words_path: str | Path | None = None,
                 shuffle_seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        words = [w for w in load_words(words_path) if in_split(w, split)]
        if shuffle_seed is not None:
            random.Random(shuffle_seed).shuffle(words)
        self.size, self.split, self.words = size, split, words

    def num_examples(self) -> int:
        return self.size

    def _rng(self, index: int) -> random.Random:
        # Train and validation already draw from different words; distinct seeds on top keep
        # their letter and phrasing choices independent too.
        return random.Random(index if self.split == "train" else -(index + 1))


class SimpleSpelling(_WordTask):
    """"Spell the word: apple" -> "apple:a,p,p,l,e"."""

    def __init__(self, size: int = 1000, split: str = "train", words_path: str | Path | None = None, **kwargs):
        # A different word order from SpellingBee's, as nanochat, so example i of the two
        # tasks is not about the same word.
        super().__init__(size, split, words_path, shuffle_seed=42, **kwargs)

    def get_example(self, index: int) -> dict:
        word = self._rng(index).choice(self.words)
        return {"messages": [
            {"role": "user", "content": f"Spell the word: {word}"},
            {"role": "assistant", "content": f"{word}:{','.join(word)}"},
        ]}  # fmt: skip


class SpellingBee(_WordTask):
    """"How many r are in strawberry?" answered by spelling, counting by hand, checking with
    python (`'strawberry'.count('r')`), and a final "#### 3" that `evaluate` compares."""

    def get_example(self, index: int) -> dict:
        rng = self._rng(index)
        word = rng.choice(self.words)
        letter = rng.choice(word) if rng.random() < 0.9 else rng.choice(LETTERS)  # sometimes a count of 0
        count = word.count(letter)
        template = rng.choice(QUESTIONS)
        if rng.random() < 0.3:
            template = template.lower()
        lq, wq = rng.choice(QUOTES), rng.choice(QUOTES)
        question = template.format(letter=f"{lq}{letter}{lq}", word=f"{wq}{word}{wq}")
        if rng.random() < 0.5:
            question += "?"

        # Positions are written "3:r" with no space: " r" and "r" are different tokens, and
        # the letter must be the same token as in the spelled-out word.
        lines, running = [], 0
        for i, char in enumerate(word, 1):
            if char == letter:
                running += 1
                lines.append(f"{i}:{char} hit! count={running}")
            else:
                lines.append(f"{i}:{char}")
        manual = (
            f"We are asked to find the number '{letter}' in the word '{word}'. Let me try a manual approach first.\n\n"
            f"First spell the word out:\n{word}:{','.join(word)}\n\n"
            f"Then count the occurrences of '{letter}':\n" + "\n".join(lines) + f"\n\nThis gives us {running}."
        )
        parts = [
            {"type": "text", "text": manual},
            {"type": "text", "text": "\n\nLet me double check this using Python:\n\n"},
            {"type": "python", "text": f"'{word}'.count('{letter}')"},
            {"type": "python_output", "text": str(count)},
            {"type": "text", "text": f"\n\nPython gives us {count}.\n\nMy final answer is:\n\n#### {count}"},
        ]
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": parts}]}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return evaluate_final_number(conversation, completion)
