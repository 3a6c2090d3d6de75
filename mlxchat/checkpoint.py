"""Checkpoints: model + optimizer state as safetensors, everything else in state.json.

Layout: `<stage_dir>/step_NNNNNN/{model,optim}.safetensors, state.json, manifest.json` and a
`latest` symlink. A checkpoint is written into a hidden temporary directory named for this
process (`.step_NNNNNN.tmp-PID`), flushed, renamed into place, and only then does `latest`
move (atomically, via a temporary symlink + rename). `manifest.json` records each file's
size and sha256 (see provenance.py), so a truncated or rewritten file is caught before it is
read, and the model's digest names the checkpoint (its fingerprint) without re-hashing it.

A crash at any moment leaves a loadable checkpoint: the previous `latest`, or, when the same
step was being written again, the one moved aside (`.step_NNNNNN.old-PID`), which the next
save (or resume) puts back. Temporaries are swept only once the process named in them is
gone, so two writers never delete each other's work.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from mlxchat import provenance
from mlxchat.common import MlxchatError, owned_temporary, owner_pid, pid_alive, read_json, sweep_temporaries

LATEST = "latest"
MANIFEST = "manifest.json"


@dataclass
class Checkpoint:
    path: Path
    step: int
    state: dict[str, Any]

    @property
    def model_file(self) -> Path:
        return self.path / "model.safetensors"

    @property
    def fingerprint(self) -> str:
        """The model's content digest: what a stage trained from this checkpoint records as its parent."""
        entries = _manifest(self.path)
        if entries and "model.safetensors" in entries:
            return entries["model.safetensors"]["sha256"][:16]
        return provenance.file_entry(self.model_file)["sha256"][:16]  # written before manifests existed

    def manifest(self) -> dict:
        """Manifest entries keyed by absolute path (for a stage's output record)."""
        return {str(self.path / name): e for name, e in (_manifest(self.path) or {}).items()}


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def save_checkpoint(
    stage_dir: Path, step: int, model_params: dict, optimizer_state: dict | None, state: dict, keep: int = 2
) -> Path:
    """Write checkpoint `step` and point `latest` at it; keep the newest `keep` checkpoints."""
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    recover(stage_dir)
    final = stage_dir / step_dir_name(step)
    tmp, aside = owned_temporary(final), owned_temporary(final, "old")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        mx.save_safetensors(str(tmp / "model.safetensors"), dict(tree_flatten(model_params)))
        if optimizer_state is not None:
            mx.save_safetensors(str(tmp / "optim.safetensors"), dict(tree_flatten(optimizer_state)))
        (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=2, sort_keys=True, default=str))
        for f in tmp.iterdir():
            _fsync_file(f)
        files = sorted(tmp.iterdir())
        (tmp / MANIFEST).write_text(json.dumps(provenance.manifest(files, tmp), indent=2, sort_keys=True))
        _fsync_file(tmp / MANIFEST)
        _fsync_dir(tmp)
        if final.exists():  # the same step written again: move it aside, never delete it first
            os.replace(final, aside)
        os.replace(tmp, final)
        point_latest(stage_dir, final.name)
    except (OSError, RuntimeError) as e:
        if isinstance(e, MlxchatError):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        if aside.exists() and not final.exists():
            os.replace(aside, final)
        # MLX reports a failed write as a RuntimeError without errno: ask the disk too
        full = (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or "space" in str(e).lower() \
            or shutil.disk_usage(stage_dir).free < 1 << 20
        raise MlxchatError(
            f"cannot write checkpoint {final} ({'no space left on device' if full else e}); "
            f"{'free some disk space' if full else 'fix the problem'} and rerun to resume from the last checkpoint"
        ) from None
    shutil.rmtree(aside, ignore_errors=True)
    _prune(stage_dir, keep)
    return final


def point_latest(stage_dir: Path, target: str) -> None:
    """Make `latest` name `target` (a step directory), atomically."""
    link = Path(stage_dir) / LATEST
    tmp_link = owned_temporary(link)
    if tmp_link.is_symlink() or tmp_link.exists():
        tmp_link.unlink()
    os.symlink(target, tmp_link)
    os.replace(tmp_link, link)
    _fsync_dir(Path(stage_dir))



def recover(stage_dir: Path) -> None:
    """Undo what a killed save left: put back a checkpoint it had moved aside (if its step
    directory is gone), and sweep its temporaries. Only leftovers of processes that are gone."""
    stage_dir = Path(stage_dir)
    for aside in stage_dir.glob(".step_*.old-*"):
        pid = owner_pid(aside)
        if pid is None or pid_alive(pid):
            continue
        final = stage_dir / aside.name[1:].split(".old-")[0]
        if final.exists():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            try:
                os.replace(aside, final)
            except FileNotFoundError:  # another rank of a data-parallel run put it back first
                pass
    sweep_temporaries(stage_dir)


def _prune(stage_dir: Path, keep: int) -> None:
    """Delete older checkpoints, never the one `latest` names."""
    latest = os.readlink(stage_dir / LATEST)
    steps = sorted(p.name for p in stage_dir.glob("step_*") if p.is_dir())
    for name in steps[: max(0, len(steps) - max(keep, 1))]:
        if name != latest:
            shutil.rmtree(stage_dir / name, ignore_errors=True)


def _manifest(path: Path) -> dict | None:
    file = path / MANIFEST
    if not file.exists():
        return None
    entries = read_json(file, "checkpoint manifest")
    if not isinstance(entries, dict):
        raise MlxchatError(f"checkpoint manifest {file} is not valid; delete {path} and rerun training")
    return entries


def load_checkpoint(path: Path) -> Checkpoint:
    """The checkpoint in step directory `path`, verified: its files are as its manifest
    recorded (size, and content where the mtime moved) and its state names a step."""
    path = Path(path)
    entries = _manifest(path)
    if entries is not None and (why := provenance.problem(entries, path)) is not None:
        raise MlxchatError(f"checkpoint {path} is damaged: {why}; rerun its training stage to rebuild it")
    state = read_json(path / "state.json", "checkpoint state")
    step = state.get("step") if isinstance(state, dict) else None
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise MlxchatError(f"checkpoint state {path / 'state.json'} is not valid (no integer step); "
                           f"delete {path} and rerun its training stage")
    return Checkpoint(path, step, state)


def latest_checkpoint(stage_dir: Path) -> Checkpoint | None:
    """The checkpoint `latest` points at, verified, or None if the stage has none yet."""
    link = Path(stage_dir) / LATEST
    if not link.is_symlink():
        return None
    path = link.resolve()
    if not path.is_dir():
        raise MlxchatError(f"{link} points at missing {path}; rerun its training stage (it resumes from the newest "
                           f"complete checkpoint) or delete the link to start the stage over")
    return load_checkpoint(path)


def checkpoints(stage_dir: Path):
    """(step directory, Checkpoint or the reason it cannot be used), newest step first."""
    stage_dir = Path(stage_dir)
    for path in sorted((p for p in stage_dir.glob("step_*") if p.is_dir()), reverse=True):
        try:
            yield path, load_checkpoint(path)
        except MlxchatError as e:
            yield path, str(e)


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
    except (RuntimeError, OSError) as e:
        raise MlxchatError(f"cannot read {ckpt.model_file} ({e}); the checkpoint is damaged: rerun its training stage") from None
    mx.eval(model.parameters())
