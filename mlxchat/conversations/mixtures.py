"""The mid-training and SFT data mixtures, as recipes: lists of (task, arguments).

`hub` is nanochat's mixtures exactly (scripts/mid_train.py and scripts/chat_sft.py at
c75fe54). `smoke` needs no network and runs in minutes on a laptop CPU: identity
conversations, spelling drills and generated arithmetic with calculator calls — the parts of
nanochat's mixture that can be generated or shipped honestly — sized so a mid-training epoch
is a few hundred thousand tokens and SFT a few hundred conversations. Its validation sets are
held out from training: the last identity conversations, and words and problems that hash
into the validation split.

Recipes are data, so `mixture_fingerprint` can identify a mixture (for stage cache keys)
without building it or touching the network.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from mlxchat.common import MlxchatError
from mlxchat.conversations.base import Task, TaskMixture

IDENTITY_VAL = 12  # the identity file's last conversations, held out for smoke validation

Recipe = list[tuple[str, dict]]

RECIPES: dict[tuple[str, str, str], Recipe] = {
    # nanochat's mid_train.py
    ("mid", "train", "hub"): [
        ("SmolTalk", {"split": "train"}),
        ("MMLU", {"subset": "auxiliary_train", "split": "train"}),
        ("GSM8K", {"subset": "main", "split": "train"}),
        ("Identity", {}),
        ("Identity", {}),  # two epochs of these
        ("SimpleSpelling", {"size": 200_000, "split": "train"}),
        ("SpellingBee", {"size": 80_000, "split": "train"}),
    ],
    ("mid", "val", "hub"): [
        ("SmolTalk", {"split": "test"}),
        ("MMLU", {"subset": "all", "split": "test", "stop": 5200}),
        ("GSM8K", {"subset": "main", "split": "test", "stop": 420}),
    ],
    # nanochat's chat_sft.py
    ("sft", "train", "hub"): [
        ("ARC", {"subset": "ARC-Easy", "split": "train"}),
        ("ARC", {"subset": "ARC-Challenge", "split": "train"}),
        ("GSM8K", {"subset": "main", "split": "train"}),
        ("SmolTalk", {"split": "train", "stop": 10_000}),
        ("Identity", {}),
        ("SimpleSpelling", {"size": 300, "split": "train"}),
        ("SpellingBee", {"size": 300, "split": "train"}),
    ],
    ("sft", "val", "hub"): [
        ("SmolTalk", {"split": "test"}),
    ],
    # offline
    ("mid", "train", "smoke"): [
        ("Identity", {"stop": -IDENTITY_VAL}),
        ("Identity", {"stop": -IDENTITY_VAL}),
        ("SimpleSpelling", {"size": 3000, "split": "train"}),
        ("SpellingBee", {"size": 500, "split": "train"}),
        ("Arithmetic", {"size": 1200, "split": "train"}),
    ],
    ("mid", "val", "smoke"): [
        ("Identity", {"start": -IDENTITY_VAL}),
        ("SimpleSpelling", {"size": 300, "split": "val"}),
        ("SpellingBee", {"size": 50, "split": "val"}),
        ("Arithmetic", {"size": 120, "split": "val"}),
    ],
    ("sft", "train", "smoke"): [
        ("Identity", {"stop": -IDENTITY_VAL}),
        ("SimpleSpelling", {"size": 60, "split": "train"}),
        ("SpellingBee", {"size": 60, "split": "train"}),
        ("Arithmetic", {"size": 100, "split": "train"}),
    ],
    ("sft", "val", "smoke"): [
        ("Identity", {"start": -IDENTITY_VAL}),
        ("SimpleSpelling", {"size": 20, "split": "val"}),
        ("SpellingBee", {"size": 20, "split": "val"}),
        ("Arithmetic", {"size": 30, "split": "val"}),
    ],
}


def recipe(kind: str, split: str, source: str) -> Recipe:
    try:
        return RECIPES[(kind, split, source)]
    except KeyError:
        raise MlxchatError(
            f"no {kind!r} mixture for split {split!r} from source {source!r}: "
            "kind is mid or sft, split train or val, source smoke or hub"
        ) from None


def _identity(start: int = 0, stop: int | None = None) -> Task:
    """The identity conversations; negative bounds count from the end (train takes all but
    the last IDENTITY_VAL, smoke validation those last ones)."""
    from mlxchat.conversations.customjson import CustomJSON, identity_path

    n = len(CustomJSON(identity_path()))
    start = start % n if start < 0 else start
    stop = None if stop is None else stop % n if stop < 0 else stop
    return CustomJSON(identity_path(), start=start, stop=stop)


def make_task(name: str, args: dict, root=None) -> Task:
    """One recipe entry as a task; hub tasks download into `<root>/data/hub-datasets`."""
    from mlxchat.conversations import arithmetic, spelling

    if name == "Identity":
        return _identity(**args)
    local = {"SimpleSpelling": spelling.SimpleSpelling, "SpellingBee": spelling.SpellingBee,
             "Arithmetic": arithmetic.Arithmetic}  # fmt: skip
    if name in local:
        return local[name](**args)
    from mlxchat.conversations.arc import ARC
    from mlxchat.conversations.gsm8k import GSM8K
    from mlxchat.conversations.mmlu import MMLU
    from mlxchat.conversations.smoltalk import SmolTalk

    hub = {"SmolTalk": SmolTalk, "MMLU": MMLU, "GSM8K": GSM8K, "ARC": ARC}
    if name not in hub:
        raise MlxchatError(f"unknown task {name!r} in a mixture recipe")
    return hub[name](root=root, **args)


def build_mixture(kind: str, split: str, source: str, root=None) -> Task:
    """The conversations mid-training (`kind="mid"`) or SFT (`"sft"`) trains or validates on:
    `len(ds)` conversations, `ds[i]` -> {"messages": [...]}, shuffled once with a fixed seed."""
    return TaskMixture([make_task(name, args, root) for name, args in recipe(kind, split, source)])


def mixture_fingerprint(kind: str, split: str, source: str, root=None) -> str:
    """A hash of everything that decides a mixture's conversations — its recipe, the shipped
    identity file, the word list (smoke) and the code of the task modules — so a stage's cache
    key changes exactly when its data would. Builds nothing and needs no network. (Hub
    datasets are identified by name: their files are fetched at the hub's current revision.)"""
    from mlxchat.conversations.customjson import identity_path
    from mlxchat.conversations.spelling import packaged_words_file

    entries = recipe(kind, split, source)
    h = hashlib.sha256(json.dumps([kind, split, source, entries], sort_keys=True).encode())
    files = sorted(Path(__file__).parent.glob("*.py")) + [identity_path()]
    if any(name in ("SimpleSpelling", "SpellingBee") for name, _ in entries):
        files.append(packaged_words_file())
    for path in files:
        h.update(path.name.encode())
        try:
            h.update(path.read_bytes())
        except FileNotFoundError:
            raise MlxchatError(f"{path} not found: it is needed to build the {kind} {split} mixture") from None
    return h.hexdigest()[:16]
