"""Cache keys and result storage shared by every stage task.

A stage's key is its name, its resolved settings, the fingerprints of its inputs and the
mlxchat code version: same key -> Prefect returns the persisted result without running the
stage; any change -> it recomputes. Results persist under the run home (`.cache/`, set by the
flow), so a new process (or a new Prefect server) still finds them.
"""

from __future__ import annotations

import hashlib
import json

from mlxchat.pipeline import code_version

# Parameters that do not change what a stage computes (`ranks`: N ranks give one process's results).
NOT_IN_KEY = {"root", "on_progress", "fresh", "ranks"}


def key_settings(parameters: dict) -> dict:
    """The parameters that decide what a stage computes (its settings and input fingerprints)."""
    return {k: v for k, v in parameters.items() if k not in NOT_IN_KEY}


def cache_key(stage: str, parameters: dict) -> str:
    """The key of `stage` called with `parameters`; the flow checks a step's record against it."""
    blob = json.dumps({"stage": stage, "settings": key_settings(parameters), "code": code_version()}, sort_keys=True,
                      default=str)
    return f"{stage}-{hashlib.sha256(blob.encode()).hexdigest()[:24]}"


def stage_cache_key(context, parameters: dict) -> str:
    return cache_key(context.task.name, parameters)

