"""Checkpoints are atomic: `latest` only ever names a complete checkpoint."""

import os

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
