"""Conversation datasets for mid-training, SFT and chat evaluation (nanochat's `tasks/`).

`build_mixture(kind, split, source, root)` is what the training stages use; the task classes
are also what chat evaluation reads problems from (hub datasets or the offline eval pack).
"""

from mlxchat.tasks.arithmetic import Arithmetic
from mlxchat.tasks.base import Task, TaskMixture, TaskSequence, render_mc
from mlxchat.tasks.customjson import CustomJSON, identity_path
from mlxchat.tasks.mixtures import build_mixture, mixture_fingerprint
from mlxchat.tasks.spelling import SimpleSpelling, SpellingBee

__all__ = [
    "Arithmetic", "CustomJSON", "SimpleSpelling", "SpellingBee", "Task", "TaskMixture", "TaskSequence",
    "build_mixture", "identity_path", "mixture_fingerprint", "render_mc",
]  # fmt: skip
