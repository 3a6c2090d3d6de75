"""Conversation datasets for mid-training, SFT and chat evaluation (nanochat's `tasks/`).

`build_mixture(kind, split, source, root)` is what the training stages use; the task classes
are also what chat evaluation reads problems from: ARC, MMLU, GSM8K and HumanEval come from
the hub or, offline, from the eval pack (`Class.from_pack(root)`).
"""

from mlxchat.tasks.arc import ARC
from mlxchat.tasks.arithmetic import Arithmetic
from mlxchat.tasks.base import Task, TaskMixture, TaskSequence, render_mc
from mlxchat.tasks.customjson import CustomJSON, identity_path
from mlxchat.tasks.gsm8k import GSM8K
from mlxchat.tasks.humaneval import HumanEval
from mlxchat.tasks.mixtures import build_mixture, mixture_fingerprint
from mlxchat.tasks.mmlu import MMLU
from mlxchat.tasks.smoltalk import SmolTalk
from mlxchat.tasks.spelling import SimpleSpelling, SpellingBee

__all__ = [
    "ARC", "Arithmetic", "CustomJSON", "GSM8K", "HumanEval", "MMLU", "SimpleSpelling", "SmolTalk", "SpellingBee",
    "Task", "TaskMixture", "TaskSequence", "build_mixture", "identity_path", "mixture_fingerprint", "render_mc",
]  # fmt: skip
