"""Checkpoints are atomic: `latest` only ever names a complete checkpoint."""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from mlxchat import checkpoint as ck
from mlxchat.common import MlxchatError


def _params(v):
    return {"transformer": {"wte": {"weight": mx.full((4, 3), v)}}, "lm_head": {"weight": mx.full((2, 3), v)}}


def test_save_then_load_round_trips(tmp_path):
    ck.save_checkpoint(tmp_path, 5, _params(1.0), {"step": mx.array(5, mx.uint64)}, {"loader": {"x": 1}})
    got = ck.latest_checkpoint(tmp_path)
    assert got.step == 5 and got.path.name == "step_000005" and got.state["loader"] == {"x": 1}
    arrays = ck.load_arrays(got.path / "model.safetensors")
    assert arrays["lm_head"]["weight"].tolist() == [[1.0] * 3] * 2
    assert ck.load_arrays(got.path / "optim.safetensors")["step"].item() == 5


def test_crash_during_write_leaves_previous_latest_intact(tmp_path, monkeypatch):
    ck.save_checkpoint(tmp_path, 1, _params(1.0), None, {})
    real = mx.save_safetensors
    calls = []

    def dies_after_first_file(path, arrays):
        calls.append(path)
        real(path, arrays)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(mx, "save_safetensors", dies_after_first_file)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(tmp_path, 2, _params(2.0), {"m": mx.zeros(3)}, {})
    latest = ck.latest_checkpoint(tmp_path)
    assert latest.step == 1
    assert ck.load_arrays(latest.model_file)["lm_head"]["weight"][0, 0].item() == 1.0
    assert not (tmp_path / "step_000002").exists()
    monkeypatch.setattr(mx, "save_safetensors", real)
    ck.save_checkpoint(tmp_path, 2, _params(2.0), None, {})  # the next save sweeps the temporary
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert ck.latest_checkpoint(tmp_path).step == 2


def test_keeps_only_the_newest_k(tmp_path):
    for step in range(1, 6):
        ck.save_checkpoint(tmp_path, step, _params(float(step)), None, {}, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_000004", "step_000005"]
    assert os.readlink(tmp_path / "latest") == "step_000005"


def test_missing_and_damaged_checkpoints_are_clear_errors(tmp_path):
    assert ck.latest_checkpoint(tmp_path) is None
    with pytest.raises(MlxchatError, match="no checkpoint in .*train it"):
        ck.require_checkpoint(tmp_path, "train it first")
    path = ck.save_checkpoint(tmp_path, 1, _params(1.0), None, {})
    good = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(MlxchatError, match="model.safetensors"):
        ck.load_arrays(path / "model.safetensors")
    with pytest.raises(MlxchatError, match=r"is damaged: .*model.safetensors is 7 bytes"):
        ck.latest_checkpoint(tmp_path)  # caught by the manifest before anything reads it
    (path / "model.safetensors").write_bytes(good)
    for bad in ("{not json", "[]", "{}", '{"step": "twelve"}'):
        (path / "state.json").write_text(bad)
        (path / ck.MANIFEST).unlink(missing_ok=True)  # only the state is at fault
        with pytest.raises(MlxchatError, match="state.json"):
            ck.latest_checkpoint(tmp_path)


def _crash_harness(what, tmp_path):
    out = subprocess.run([sys.executable, str(Path(__file__).with_name("crashing.py")), what, str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)["results"]


@pytest.mark.slow
def test_sigkill_at_every_line_of_save_leaves_a_checkpoint_the_next_run_uses(tmp_path):
    results = _crash_harness("checkpoint", tmp_path)
    assert [r for r in results if not r["ok"]] == []
    lines = {r["at"] for r in results}
    # every line of the protocol was a kill point, including between moving the old step aside and the rename
    assert {"save_checkpoint", "point_latest", "recover", "_prune"} <= {at.split("(")[1][:-1] for at in lines}
    assert {tuple(r["found"]) for r in results} == {(2, 2.0), (3, 3.0), (2, 20.0)}


def test_sigkill_inside_the_metrics_rewrite_loses_nothing(tmp_path):
    results = _crash_harness("metrics", tmp_path)
    assert len(results) > 10 and [r for r in results if not r["ok"]] == []


def test_disk_full_during_save_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    ck.save_checkpoint(tmp_path, 1, _params(1.0), None, {})

    def disk_full(path, arrays):
        open(path, "wb").write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mx, "save_safetensors", disk_full)
    with pytest.raises(MlxchatError, match=r"cannot write checkpoint .*step_000002 \(no space left on device\); free some disk space and rerun") as e:
        ck.save_checkpoint(tmp_path, 2, _params(2.0), None, {})
    assert "\n" not in str(e.value)
    assert ck.latest_checkpoint(tmp_path).step == 1
    assert [p.name for p in tmp_path.iterdir()] and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_live_writers_temporary_is_never_swept(tmp_path):
    live = tmp_path / f".step_000009.tmp-{os.getppid()}"  # another process's save in progress
    live.mkdir()
    dead = tmp_path / ".step_000008.tmp-999999999"
    dead.mkdir()
    ck.save_checkpoint(tmp_path, 1, _params(1.0), None, {})
    assert live.exists() and not dead.exists()


def test_files_are_created_with_the_users_umask(tmp_path):
    from mlxchat.common import atomic_write_json

    previous = os.umask(0o027)
    try:
        path = ck.save_checkpoint(tmp_path / "base", 1, _params(1.0), None, {})
        atomic_write_json(tmp_path / "eval" / "bpb.json", {})
    finally:
        os.umask(previous)
    assert {f.name: f.stat().st_mode & 0o777 for f in path.iterdir()} == dict.fromkeys(
        ["model.safetensors", "state.json", ck.MANIFEST], 0o640)
    assert path.stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "eval" / "bpb.json").stat().st_mode & 0o777 == 0o640
