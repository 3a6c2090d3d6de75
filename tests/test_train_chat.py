"""Mid-training and SFT: they continue the previous stage, learn, and resume exactly after SIGKILL."""

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace

import mlx.core as mx
import pytest
from killing import kill_after_checkpoint

from mlxchat import pipeline
from mlxchat.checkpoint import latest_checkpoint
from mlxchat.common import MlxchatError
from mlxchat.presets import resolve

pytestmark = pytest.mark.slow

TINY = resolve("tiny")
COMMON = ["--seq-len", "64", "--dtype", "float32", "--source", "smoke", "--checkpoint-every", "3"]
STAGE_ARGS = {
    "mid": ["--device-batch-size", "4", "--total-batch-size", "256", "--eval-every", "6", "--eval-tokens", "512"],
    "sft": ["--device-batch-size", "2", "--examples-per-step", "4", "--eval-every", "6", "--eval-steps", "2"],
}


@pytest.fixture(scope="module")
def home(smoke_root, tmp_path_factory):
    """A home with the smoke corpus and run 'src': tokenizer, base (4 steps) and mid (4 steps)."""
    root = tmp_path_factory.mktemp("chat_home")
    shutil.copytree(smoke_root / "data", root / "data")
    pipeline.train_tokenizer("src", vocab_size=512, max_chars=300_000, root=root)
    pipeline.train("src", "base", replace(TINY.base, max_steps=4, eval_every=0).to_dict(), root=root)
    pipeline.train("src", "mid", replace(TINY.mid, max_steps=4, eval_every=0).to_dict(), root=root)
    return root


def _new_run(home, name, stages_to_copy=("tokenizer", "base", "mid")):
    for stage in stages_to_copy:
        shutil.copytree(home / "runs" / "src" / stage, home / "runs" / name / stage, symlinks=True)
    return name


def _weights(path):
    return mx.load(str(path / "latest" / "model.safetensors"))


def test_a_chat_stage_starts_from_the_previous_stages_weights(home):
    run = _new_run(home, "starts", ("tokenizer", "base"))
    frozen = replace(TINY.mid, max_steps=1, eval_every=0, optim=replace(TINY.mid.optim, init_lr_frac=0.0))
    result = pipeline.train(run, "mid", frozen.to_dict(), root=home)
    assert result["step"] == 1
    base, mid = _weights(home / "runs" / run / "base"), _weights(home / "runs" / run / "mid")
    assert base.keys() == mid.keys() and all(mx.array_equal(base[k], mid[k]).item() for k in base)


def test_mid_training_lowers_validation_bpb_and_sft_reports_validation_loss(home):
    run = _new_run(home, "learns", ("tokenizer", "base"))
    pipeline.train(run, "mid", replace(TINY.mid, max_steps=30, eval_every=30).to_dict(), root=home)
    history = latest_checkpoint(home / "runs" / run / "mid").state["history"]
    assert [h["step"] for h in history] == [0, 30]
    assert history[-1]["val_bpb"] < 0.9 * history[0]["val_bpb"], history
    sft = pipeline.train(run, "sft", replace(TINY.sft, max_steps=4, eval_every=4).to_dict(), root=home)
    assert sft["metrics"]["val_loss"] > 0 and "val_bpb" not in sft["metrics"]
    rows = [json.loads(line) for line in (home / "runs" / run / "sft" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "dt" in r]  # each step logs its padded input tokens (bench/train_loop.py replays them)
    assert len(steps) == 4 and all(0 < r["tokens"] <= TINY.sft.examples_per_step * TINY.sft.seq_len for r in steps)
    assert (home / "runs" / run / "samples").exists() is False  # training writes no samples
    out = pipeline.sample(run, "sft", max_tokens=4, root=home)
    assert [s["prompt"] for s in out["samples"]][0] == "What is the capital of France?"


def test_a_chat_stage_without_its_starting_checkpoint_names_the_command(home):
    run = _new_run(home, "nobase", ("tokenizer",))
    with pytest.raises(MlxchatError, match=r"train it first: mlxchat train mid --run nobase"):
        pipeline.train(run, "sft", TINY.sft.to_dict(), root=home)


def _cli(home, *args):
    env = {**os.environ, "MLXCHAT_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    return [sys.executable, "-m", "mlxchat.cli", *args], env


@pytest.mark.parametrize("stage", ["mid", "sft"])
def test_resume_after_sigkill_matches_uninterrupted_run_bitwise(home, stage):
    common = ["train", stage, *COMMON, *STAGE_ARGS[stage], "--max-steps", "18"]
    before = ("tokenizer", "base") if stage == "mid" else ("tokenizer", "base", "mid")
    ref = _new_run(home, f"{stage}-ref", before)
    cmd, env = _cli(home, *common, "--run", ref)
    subprocess.run(cmd, env=env, check=True, capture_output=True)

    run = _new_run(home, f"{stage}-killed", before)
    cmd, env = _cli(home, *common, "--run", run)
    out = home / "runs" / run / stage
    killed_at = kill_after_checkpoint(cmd, env, out, 6)
    assert 6 <= killed_at < 18, "the run should have been killed part-way"

    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resuming {stage} from step_{killed_at:06d}" in done.stderr
    assert latest_checkpoint(out).step == 18
    a = (home / "runs" / ref / stage / "latest" / "model.safetensors").read_bytes()
    assert a == (out / "latest" / "model.safetensors").read_bytes()
