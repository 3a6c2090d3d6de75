"""Data parallel through mlx.launch (ring backend, 2 local processes): the same numbers as one
process, exact resume after a rank is SIGKILLed, and one line naming the rank that failed."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import mlx.core as mx
import numpy as np
import pytest
from killing import rank_pid
from test_core_eval import write_bundle

from mlxchat import pipeline
from mlxchat.checkpoint import latest_checkpoint
from mlxchat.launch import culprit

pytestmark = pytest.mark.slow

# One process: micro-batch 2x64, 4 accumulation steps; two ranks: 2 each. fp32 on the CPU.
BASE = ["train", "base", "--depth", "2", "--seq-len", "64", "--device-batch-size", "2", "--total-batch-size", "512",
        "--eval-tokens", "1024", "--dtype", "float32", "--max-steps", "8", "--eval-every", "4", "--checkpoint-every", "2"]
# One process: 2 conversations x 2 accumulation steps; two ranks: one fused step each.
SFT = ["train", "sft", "--seq-len", "64", "--dtype", "float32", "--source", "smoke", "--device-batch-size", "2",
       "--examples-per-step", "4", "--max-steps", "4", "--eval-every", "4", "--eval-steps", "3", "--checkpoint-every", "2"]
HANG_GUARD_S = 300  # a collective waiting on a dead rank would hang for ever; this only bounds the test


def _in_process(home, *args):
    """The same `mlxchat train` command in this process: one rank, and no start-up to pay."""
    from mlxchat.cli import build_parser, train_config

    parsed = build_parser().parse_args(list(args))
    return pipeline.train(parsed.run, parsed.stage, train_config(parsed).to_dict(), root=home)


def _two_ranks(home, *args):
    """`mlxchat <args> --np 2`: two local ranks through mlx.launch, ring backend."""
    env = {**os.environ, "MLXCHAT_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    out = subprocess.run([sys.executable, "-m", "mlxchat.cli", *args, "--np", "2", "--backend", "ring"], env=env,
                         capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def _new_run(home, name, stages_to_copy=("tokenizer",)):
    for stage in stages_to_copy:
        shutil.copytree(home / "runs" / "src" / stage, home / "runs" / name / stage, symlinks=True)
    return name


def _rows(home, run, stage, key):
    rows = [json.loads(line) for line in (home / "runs" / run / stage / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r[key]) for r in rows if key in r]


def _weights(home, run, stage):
    return mx.load(str(home / "runs" / run / stage / "latest" / "model.safetensors"))


@pytest.fixture(scope="module")
def home(smoke_root, tmp_path_factory):
    """The smoke corpus, run 'src' (tokenizer, a short base and mid), and the reference 2-rank base run."""
    root = tmp_path_factory.mktemp("dist_home")
    shutil.copytree(smoke_root / "data", root / "data")
    pipeline.train_tokenizer("src", vocab_size=512, max_chars=300_000, root=root)
    _in_process(root, *BASE[:2], "--run", "src", *BASE[2:-6], "--max-steps", "2", "--eval-every", "0")
    _in_process(root, "train", "mid", "--run", "src", *SFT[2:8], "--device-batch-size", "2", "--total-batch-size", "256",
                "--max-steps", "2", "--eval-every", "0")
    (root / "two.log").write_text(_two_ranks(root, *BASE, "--run", _new_run(root, "two")).stderr)
    return root


def _assert_same_training(home, one, two, stage, metric):
    """Per-step losses and evaluations to 1e-5 relative; weights to 1e-3 in relative norm.

    The ranks add the same gradients in another order (float rounding, ~1e-8 after one step);
    AdamW's normalised update (eps 1e-10) turns that noise on near-zero gradients into
    lr-sized steps, so the weights drift to ~1e-4 while the losses stay within 1e-6. A wrong
    batch (the bug this guards against) is off by 1e-1 in the loss at once."""
    assert np.allclose(_rows(home, one, stage, "loss"), _rows(home, two, stage, "loss"), rtol=1e-5, atol=0)
    assert np.allclose(_rows(home, one, stage, metric), _rows(home, two, stage, metric), rtol=1e-5, atol=0)
    a, b = _weights(home, one, stage), _weights(home, two, stage)
    assert a.keys() == b.keys()
    drift = {k: float(np.linalg.norm(np.array(a[k]) - np.array(b[k])) / np.linalg.norm(np.array(a[k]))) for k in a}
    assert max(drift.values()) < 1e-3, drift


def test_two_ranks_train_base_as_one_process_at_the_same_global_batch(home):
    one = _new_run(home, "one")
    _in_process(home, *BASE, "--run", one)
    _assert_same_training(home, one, "two", "base", "val_bpb")
    assert len(_rows(home, "two", "base", "loss")) == 8  # rank 0 alone wrote the metrics
    log = (home / "two.log").read_text()
    assert log.count("validation bpb") == 3, log[-2000:]  # steps 0, 4, 8: once each, not once per rank


def test_two_ranks_train_sft_as_one_process(home):
    one, two = (_new_run(home, f"sft-{n}", ("tokenizer", "base", "mid")) for n in ("one", "two"))
    _in_process(home, *SFT, "--run", one)
    _two_ranks(home, *SFT, "--run", two)
    _assert_same_training(home, one, two, "sft", "val_loss")


def test_a_killed_rank_ends_the_job_naming_it_and_the_rerun_resumes_bitwise(home):
    run = _new_run(home, "killed")
    env = {**os.environ, "MLXCHAT_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "mlxchat.cli", *BASE, "--run", run, "--np", "2"]
    job = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stage = home / "runs" / run / "base"
    deadline = time.time() + HANG_GUARD_S
    while not ((stage / "latest").is_symlink() and latest_checkpoint(stage).step >= 2) and time.time() < deadline:
        time.sleep(0.05)
    os.kill(rank_pid(job.pid, 1), signal.SIGKILL)  # mid-step: rank 0 is waiting in the all-reduce
    _, err = job.communicate(timeout=HANG_GUARD_S)
    assert job.returncode != 0
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: rank 1 of 2 was killed by SIGKILL"), err[-2000:]
    killed_at = latest_checkpoint(stage).step
    assert 2 <= killed_at < 8, "the job should have ended part-way"

    done = _two_ranks(home, *BASE, "--run", run)
    assert f"resuming base from step_{killed_at:06d}" in done.stderr
    assert (stage / "latest" / "model.safetensors").read_bytes() == \
        (home / "runs" / "two" / "base" / "latest" / "model.safetensors").read_bytes()
    assert _rows(home, run, "base", "loss") == _rows(home, "two", "base", "loss")


def test_bpb_core_and_chat_evaluation_over_two_ranks_equal_one_process(home):
    mc = [{"query": f"Q: the cat {i}?", "choices": ["red", "blue"], "gold": i % 2} for i in range(7)]
    lm = [{"context": f"The cat {i} sat on the", "continuation": "mat"} for i in range(5)]
    write_bundle(home / "evals", [("mc", "multiple_choice", 2, mc), ("lm", "language_modeling", 1, lm)])
    in_process = {"bpb": lambda: pipeline.eval_bpb("two", "base", 1664, root=home),
                  "core": lambda: pipeline.eval_core("two", "base", root=home),
                  "chat": lambda: pipeline.eval_chat("two", "base", 5, 4, root=home)}
    for metric, extra, keys in (("bpb", ["--eval-tokens", "1664"], ("val_bpb", "train_bpb", "eval_tokens")),
                                ("core", [], ("results", "core_metric")),
                                ("chat", ["--stage", "base", "--max-per-task", "5", "--max-new-tokens", "4"],
                                 ("results", "problems"))):
        one = in_process[metric]()
        two = json.loads(_two_ranks(home, "eval", metric, "--run", "two", *extra).stdout)
        for key in keys:
            assert one[key] == pytest.approx(two[key], rel=1e-6), (metric, key, one[key], two[key])
    assert two["problems"]["SpellingBee"] == 5


def test_the_cause_is_the_rank_that_failed_first_not_the_ones_it_took_down():
    lost = "RuntimeError: [ring] connection to a peer was lost"
    assert culprit({0: 1, 1: -9}, {0: lost}) == "rank 1 of 2 was killed by SIGKILL (out of memory, or killed by hand)"
    assert culprit({0: -15, 1: 2, 2: 0}, {1: "the batch does not fit"}) == "rank 1 of 3 failed: the batch does not fit"
    assert culprit({0: 0, 1: 0}, {}) is None


def test_bad_launch_settings_are_one_line_errors(home, tmp_path):
    for args, message in ((["--np", "0"], "--np must be at least 1"),
                          (["--hosts", str(tmp_path / "nope.json")], "hostfile")):
        out = subprocess.run([sys.executable, "-m", "mlxchat.cli", "eval", "bpb", "--run", "two", *args],
                             env={**os.environ, "MLXCHAT_HOME": str(home)}, capture_output=True, text=True)
        assert out.returncode == 2 and out.stderr.startswith("error: ") and message in out.stderr, out.stderr
