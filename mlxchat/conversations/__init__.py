"""Conversation datasets for mid-training, SFT and chat evaluation (nanochat's `tasks/`).

`build_mixture(kind, split, source, root)` is what the training stages use; the task classes
are also what chat evaluation reads problems from: ARC, MMLU, GSM8K and HumanEval come from
the hub or, offline, from the eval pack (`Class.from_pack(root)`).
"""

from mlxchat.conversations.arc import ARC
from mlxchat.conversations.arithmetic import Arithmetic
from mlxchat.conversations.base import Task, TaskMixture, TaskSequence, render_mc
from mlxchat.conversations.customjson import CustomJSON, identity_path
from mlxchat.conversations.gsm8k import GSM8K
from mlxchat.conversations.humaneval import HumanEval
from mlxchat.conversations.mixtures import build_mixture, mixture_fingerprint
from mlxchat.conversations.mmlu import MMLU
from mlxchat.conversations.smoltalk import SmolTalk
from mlxchat.conversations.spelling import SimpleSpelling, SpellingBee

__all__ = [
    "ARC", "Arithmetic", "CustomJSON", "GSM8K", "HumanEval", "MMLU", "SimpleSpelling", "SmolTalk", "SpellingBee",
    "Task", "TaskMixture", "TaskSequence", "build_mixture", "identity_path", "mixture_fingerprint", "render_mc",
]  # fmt: skip
