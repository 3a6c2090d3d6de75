"""Checkpoints: model + optimizer state as safetensors, everything else in state.json.

Layout: `<stage_dir>/step_NNNNNN/{model,optim}.safetensors, state.json` and a `latest` symlink.
A checkpoint is written into a hidden temporary directory, flushed, renamed into place, and
only then does `latest` move (atomically, via a temporary symlink + rename). A crash at any
moment therefore leaves the previous `latest` intact and loadable; stray temporaries are
swept on the next save.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from mlxchat.common import MlxchatError, read_json

LATEST = "latest"


@dataclass
class Checkpoint:
    path: Path
    step: int
    state: dict[str, Any]

    @property
    def model_file(self) -> Path:
        return self.path / "model.safetensors"


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    stage_dir: Path, step: int, model_params: dict, optimizer_state: dict | None, state: dict, keep: int = 2
) -> Path:
    """Write checkpoint `step` and point `latest` at it; keep the newest `keep` checkpoints."""
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    final = stage_dir / step_dir_name(step)
    tmp = stage_dir / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    mx.save_safetensors(str(tmp / "model.safetensors"), dict(tree_flatten(model_params)))
    if optimizer_state is not None:
        mx.save_safetensors(str(tmp / "optim.safetensors"), dict(tree_flatten(optimizer_state)))
    (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=2, sort_keys=True, default=str))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():  # same step written again (e.g. resumed then interrupted at once)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _point_latest(stage_dir, final.name)
    _prune(stage_dir, keep)
    return final


def _point_latest(stage_dir: Path, target: str) -> None:
    link = stage_dir / LATEST
    tmp_link = stage_dir / f".{LATEST}.tmp-{os.getpid()}"
    if tmp_link.is_symlink() or tmp_link.exists():
        tmp_link.unlink()
    os.symlink(target, tmp_link)
    os.replace(tmp_link, link)
    _fsync_dir(stage_dir)


def _prune(stage_dir: Path, keep: int) -> None:
    """Delete older checkpoints and stale temporaries, never the one `latest` names."""
    latest = os.readlink(stage_dir / LATEST)
    for stale in stage_dir.glob(".step_*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    steps = sorted(p.name for p in stage_dir.glob("step_*") if p.is_dir())
    for name in steps[: max(0, len(steps) - max(keep, 1))]:
        if name != latest:
            shutil.rmtree(stage_dir / name, ignore_errors=True)


def latest_checkpoint(stage_dir: Path) -> Checkpoint | None:
    """The checkpoint `latest` points at, or None if the stage has none yet."""
    link = Path(stage_dir) / LATEST
    if not link.is_symlink():
        return None
    path = link.resolve()
    if not path.is_dir():
        raise MlxchatError(f"{link} points at missing {path}; delete the link to start the stage over")
    state = read_json(path / "state.json", "checkpoint state")
    return Checkpoint(path, int(state["step"]), state)


def require_checkpoint(stage_dir: Path, hint: str) -> Checkpoint:
    ckpt = latest_checkpoint(stage_dir)
    if ckpt is None:
        raise MlxchatError(f"no checkpoint in {stage_dir}; {hint}")
    return ckpt


def load_arrays(path: Path) -> dict:
    """Nested parameter tree from a safetensors file (nanochat-style dotted names)."""
    try:
        return tree_unflatten(list(mx.load(str(path)).items()))
    except (RuntimeError, ValueError, OSError) as e:
        raise MlxchatError(f"cannot read {path} ({e}); the checkpoint is damaged: delete it and resume from an older one") from None


def load_model_weights(model, ckpt: Checkpoint) -> None:
    """Load weights into `model`, checking every parameter name and shape matches."""
    try:
        model.load_weights(str(ckpt.model_file), strict=True)
    except ValueError as e:
        raise MlxchatError(f"{ckpt.model_file} does not match the model config ({e})") from None
    mx.eval(model.parameters())
