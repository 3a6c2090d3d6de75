"""The speedrun flow end to end on the tiny preset: stages, caching, --force, --only, kill and resume.

Each flow runs in a fresh process, as a user's rerun would, on Prefect's ephemeral local server."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mlxchat.rundir import run_dir

REPO = Path(__file__).resolve().parents[1]
STEPS = ["prepare-data", "tokenizer-train", "tokenizer-eval", "prepare-evals", "base-train", "base-eval", "mid-train",
          "sft-train", "chat-eval", "sample", "publish", "report"]

pytestmark = pytest.mark.slow


def _flow(home, *args, check=True, **popen):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("PREFECT_API_URL", None)
    cmd = [sys.executable, str(REPO / "flows" / "speedrun.py"), "--preset", "tiny", "--home", str(home), *args]
    if popen:
        return subprocess.Popen(cmd, env=env, **popen)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def _states(output: str) -> dict[str, str]:
    """Final state of each task run, by stage name, from the flow's log."""
    states = {}
    for name, state in re.findall(r"Task run '([a-z-]+)-[0-9a-f]+' - Finished in state (\w+)", output):
        states[name] = state
    return states


@pytest.fixture(scope="module")
def home(smoke_root, eval_pack_home, tmp_path_factory):
    """The smoke corpus and the PyPI eval pack (the tiny preset uses the eval data it finds)."""
    root = tmp_path_factory.mktemp("flow_home")
    shutil.copytree(smoke_root / "data", root / "data")
    shutil.copytree(eval_pack_home / "evals", root / "evals")
    return root


def _run(home) -> Path:
    return home / "runs" / "tiny"


def _record_fingerprints(home) -> dict[str, str]:
    return {s: json.loads(run_dir("tiny", home).step_record(s).read_text())["fingerprint"] for s in STEPS}


def assert_trained_from_their_parents(home):
    """Every checkpoint records the tokenizer and parent it was trained from: they are the
    current ones, and the published model carries the tokenizer its weights were trained with."""
    from mlxchat.checkpoint import latest_checkpoint
    from mlxchat.interop import load_published
    from mlxchat.tokenizer import tokenizer_fingerprint

    run = _run(home)
    tok = tokenizer_fingerprint(run / "tokenizer")
    base, mid, sft = (latest_checkpoint(run / s) for s in ("base", "mid", "sft"))
    assert [ck.state["identity"]["tokenizer"] for ck in (base, mid, sft)] == [tok] * 3
    assert mid.state["identity"]["parent"] == base.fingerprint and sft.state["identity"]["parent"] == mid.fingerprint
    published = home / "published" / "tiny-sft"
    assert tokenizer_fingerprint(published) == tok
    model, ptok = load_published(published)
    assert model.config.vocab_size == ptok.vocab_size == sft.state["model_config"]["vocab_size"]


def test_flow_runs_every_stage_then_reruns_from_cache(home):
    first = _flow(home)
    states = _states(first.stdout + first.stderr)
    assert states == {s: "Completed" for s in STEPS}
    run = _run(home)
    assert (run / "report.md").read_text().startswith("# mlxchat report: tiny")
    assert all((run / "plots" / f"{stage}.png").stat().st_size > 1000 for stage in ("base", "mid", "sft"))
    assert "The capital of France is" in (run / "samples" / "base.md").read_text()
    assert all("What is the capital of France?" in (run / "samples" / f"{s}.md").read_text() for s in ("mid", "sft"))
    assert (run / "sft" / "latest").is_symlink() and (run / "mid" / "latest").is_symlink()
    assert (home / "published" / "tiny-sft" / "model.safetensors").exists()
    assert (home / "published" / "tiny-sft" / "config.json").read_text().count('"nanochat"') == 1
    assert_trained_from_their_parents(home)
    from mlxchat.pipeline import timings_by_step

    timed_steps = list(timings_by_step(json.loads((run / "timings.json").read_text())))
    assert timed_steps == [s for s in STEPS if s in timed_steps] and len(timed_steps) >= 9  # every key is a step's

    report = (run / "report.md").read_text()
    assert "| CORE-pack (14/22) | " in report and "| ChatCORE | - | " in report
    assert "Evaluated on at most 2 problems per task" in report
    chat = json.loads((run / "eval" / "chat_sft.json").read_text())
    assert chat["problems"] == {t: 2 for t in ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee")}
    assert chat["chatcore"] is not None and chat["skipped"] == {}
    answer = subprocess.run([sys.executable, "-m", "mlxchat.cli", "--home", str(home), "chat", "--run", "tiny",
                             "-p", "Who are you?", "--max-tokens", "8"], capture_output=True, text=True, timeout=120)
    assert answer.returncode == 0 and answer.stdout.strip(), answer.stderr[-2000:]

    # --rl on the same run: rl-train joins, what it does not change is reused, then all cache hits
    with_rl = STEPS[:STEPS.index("chat-eval")] + ["rl-train"] + STEPS[STEPS.index("chat-eval"):]
    rl = _flow(home, "--rl")
    rl_states = _states(rl.stdout + rl.stderr)
    assert rl_states == {s: "Completed" if s in ("rl-train", "chat-eval", "report") else "Cached" for s in with_rl}
    assert_rl_trained_and_reported(home)
    again = _flow(home, "--rl")
    assert _states(again.stdout + again.stderr) == {s: "Cached" for s in with_rl}


def assert_rl_trained_and_reported(home):
    run = _run(home)
    assert os.readlink(run / "rl" / "latest") == "step_000002"
    rows = [json.loads(line) for line in (run / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "reward" in r] == [1, 2] and [r["step"] for r in rows if "pass@1" in r] == [0, 2]
    chat = json.loads((run / "eval" / "chat_rl.json").read_text())
    assert chat["chatcore"] is not None and chat["problems"]["GSM8K"] == 2
    report = (run / "report.md").read_text()
    assert "| Metric | BASE | MID | SFT | RL |" in report
    assert f"| ChatCORE | - | {json.loads((run / 'eval' / 'chat_sft.json').read_text())['chatcore']:.4f} | " in report
    assert re.search(rf"\| ChatCORE \| - \| \S+ \| \S+ \| {chat['chatcore']:.4f} \|", report), report[:1500]
    assert "## RL training" in report


def test_damaged_or_deleted_outputs_recompute_their_stage_never_cached(home):
    """Truncated weights, an emptied tokenizer, garbage in an eval file, deleted published /
    sample / eval files: each such stage reruns; a stage after them reruns exactly when what
    it reads changed (retraining from the same inputs gives the same weights)."""
    from mlxchat import pipeline

    run = _run(home)
    before = _record_fingerprints(home)
    ckpt = (run / "base" / "latest").resolve() / "model.safetensors"
    with open(ckpt, "r+b") as f:
        f.truncate(1000)
    (run / "tokenizer" / "tokenizer.pkl").write_bytes(b"")
    (run / "eval" / "chat_sft.json").write_text("garbage")
    for path in (home / "published" / "tiny-sft" / "config.json", run / "samples" / "base.md",
                 run / "eval" / "chat_mid.json", run / "tokenizer" / "tok_eval.json"):
        path.unlink()
    out = _flow(home)
    log = out.stdout + out.stderr
    states = _states(log)
    damaged = {"tokenizer-train", "tokenizer-eval", "base-train", "chat-eval", "sample", "publish"}
    assert {s for s in damaged if states[s] != "Completed"} == set(), states
    assert states["prepare-data"] == states["prepare-evals"] == "Cached"
    assert "base-train: recomputing: " + str(ckpt) + " is 1000 bytes" in log
    after = _record_fingerprints(home)
    assert after["tokenizer-train"] == before["tokenizer-train"]  # retrained from the same data: the same tokenizer
    for stage, inputs in (("base-eval", ["base-train"]), ("mid-train", ["base-train"]), ("sft-train", ["mid-train"])):
        changed = any(after[s] != before[s] for s in inputs)
        assert states[stage] == ("Completed" if changed else "Cached"), (stage, states)
    for stage in STEPS:  # nothing that is left is broken
        assert pipeline.reuse_problem(stage, "tiny", None, root=home)[1] is None, stage
    assert json.loads((run / "eval" / "chat_sft.json").read_text())["chatcore"] is not None
    assert_trained_from_their_parents(home)


def test_force_tokenizer_with_another_vocab_retrains_everything_from_the_new_parents(home):
    out = _flow(home, "--force", "tokenizer-train", "--vocab-size", "400")
    log = out.stdout + out.stderr
    states = _states(log)
    cut = STEPS.index("tokenizer-train")
    assert all(states[s] == "Cached" for s in STEPS[:cut]), states
    assert all(states[s] == "Completed" for s in STEPS[cut:] if s != "prepare-evals"), states
    assert not re.search(r"resuming (base|mid|sft)", log), log[-3000:]
    assert_trained_from_their_parents(home)
    assert json.loads((home / "published" / "tiny-sft" / "config.json").read_text())["vocab_size"] == 400


def test_a_changed_setting_recomputes_that_stage_and_what_follows_on_two_ranks(home):
    """Two ranks (`--np 2`) launch training and evaluation through mlx.launch; the tiny
    preset's micro-batch is halved to fit, so base retrains, as the changed --max-steps wants."""
    out = _flow(home, "--vocab-size", "400", "--max-steps", "14", "--np", "2")
    log = out.stdout + out.stderr
    states = _states(log)
    assert states["tokenizer-train"] == "Cached" and states["base-eval"] == "Completed"
    assert all(states[s] == "Completed" for s in ("base-train", "mid-train", "sft-train", "publish")), states
    assert re.search(r"base: starting fresh: step_000012 was made with other settings \(([a-z_]+, )*max_steps", log)
    assert os.readlink(_run(home) / "base" / "latest") == "step_000014"
    for stage in ("base-train", "base-eval", "mid-train", "sft-train", "chat-eval"):
        assert re.search(rf"Task run '{stage}-[0-9a-f]+' - launching 2 ranks: mlxchat ", log), stage
    assert "micro-batch 2x64 x 2 ranks" in log  # the tiny preset's 4-row micro-batch, halved to fit 2 ranks
    assert re.search(r"Task run 'base-train-[0-9a-f]+' - step 14/14 \| loss", log)  # rank 0's progress, streamed
    assert re.search(r"Task run 'base-eval-[0-9a-f]+' - CORE-pack \(14/22\): ", log)
    assert (_run(home) / "report.md").read_text().startswith("# mlxchat report: tiny")
    assert_trained_from_their_parents(home)


def test_force_mid_retrains_sft_for_real_and_a_second_flow_on_the_run_is_refused(home):
    """Also on two ranks, after the test before: its results are reused as cache hits."""
    sft_state = (_run(home) / "sft" / "latest").resolve() / "state.json"
    stamp = sft_state.stat().st_mtime_ns
    first = _flow(home, "--force", "mid-train", "--vocab-size", "400", "--max-steps", "14", "--np", "2",
                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lock = _run(home) / ".lock"
    deadline = time.time() + 120
    while time.time() < deadline and str(first.pid) not in (lock.read_text() if lock.exists() else ""):
        time.sleep(0.1)
    second = _flow(home, "--vocab-size", "400", "--max-steps", "14", check=False)
    assert second.returncode == 2
    assert f"error: run 'tiny' is in use by PID {first.pid} (flows/speedrun.py --preset tiny" in second.stderr
    log, _ = first.communicate(timeout=600)
    assert first.returncode == 0, log[-3000:]
    states = _states(log)
    # the two-rank results of the test before are reused (ranks are not in the keys), then retrained from mid
    assert states["base-train"] == states["base-eval"] == "Cached", states
    assert states["mid-train"] == states["sft-train"] == "Completed", states
    assert not re.search(r"resuming (mid|sft)", log)
    assert sft_state.stat().st_mtime_ns != stamp  # sft trained again, not "resumed" at its end
    assert_trained_from_their_parents(home)


@pytest.mark.parametrize("args,message", [
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["--force", "nosuch"], "--force 'nosuch' is not a pipeline step"),
    (["--from", "nosuch"], "--from 'nosuch' is not a pipeline step"),
    (["--run", "my run"], "invalid run name 'my run'"),
    (["--run", "r" * 300], "invalid run name"),
    (["--max-steps", "0"], "--max-steps must be at least 1, got 0"),
    (["--max-steps", "-5"], "--max-steps must be at least 1, got -5"),
])
def test_bad_arguments_are_one_line_before_any_flow_run(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLXCHAT_HOME", str(tmp_path))  # main() sets it from --home; restored afterwards
    sys.path.insert(0, str(REPO))
    from flows import runtime, speedrun

    assert speedrun.main(["--home", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert runtime._server is None and not (tmp_path / ".prefect").exists()  # Prefect never started


def test_only_without_inputs_names_the_stage_to_run_first(tmp_path, home):
    shutil.copytree(home / "data", tmp_path / "data")
    out = _flow(tmp_path, "--only", "base-eval", check=False)
    assert out.returncode == 2
    assert "step 'tokenizer-train' has no results for run 'tiny': run it first" in out.stderr


def test_ctrl_c_during_base_train_ends_cancelled_with_a_checkpoint_and_the_rerun_resumes(tmp_path, home):
    shutil.copytree(home / "data", tmp_path / "data")
    proc = _flow(tmp_path, "--max-steps", "150", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stage = tmp_path / "runs" / "tiny" / "base"
    deadline = time.time() + 300
    while time.time() < deadline and not any(stage.glob("step_0000[1-9]*")):
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr[-3000:]
    stopped_at = int(os.readlink(stage / "latest").split("_")[1])
    assert 0 < stopped_at < 150
    assert stderr.strip().splitlines()[-1] == (f"cancelled: base-train stopped at step {stopped_at} of 150; "
                                               f"rerun the flow to resume from {stage / f'step_{stopped_at:06d}'}")
    assert "Traceback" not in stdout + stderr
    assert re.search(r"Flow run '[\w-]+' - Finished in state Cancelled", stdout + stderr)
    out = _flow(tmp_path, "--max-steps", "150")
    log = out.stdout + out.stderr
    states = _states(log)
    assert states["prepare-data"] == "Cached" and states["tokenizer-train"] == "Cached"
    assert states["base-train"] == "Completed"
    assert re.search(rf"resuming base from step_0*{stopped_at} \(step {stopped_at} of 150\)", log), log[-3000:]
    assert os.readlink(stage / "latest") == "step_000150"


def test_a_damaged_input_of_a_skipped_stage_stops_with_one_line_naming_the_file(tmp_path, home):
    shutil.copytree(home / "data", tmp_path / "data")
    _flow(tmp_path, "--only", "tokenizer-train")  # prepare-data is not run: its data is there
    pkl = tmp_path / "runs" / "tiny" / "tokenizer" / "tokenizer.pkl"
    good = pkl.read_bytes()
    pkl.write_bytes(b"corrupt")
    out = _flow(tmp_path, "--from", "tokenizer-eval", check=False)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == (
        f"error: step 'tokenizer-train' of run 'tiny' cannot be reused ({pkl} is 7 bytes, {len(good)} when it was "
        f"written): run it again (--from tokenizer-train)")
    pkl.write_bytes(good)
    fixed = _flow(tmp_path, "--only", "tokenizer-eval")
    assert _states(fixed.stdout + fixed.stderr)["tokenizer-eval"] == "Completed"


def test_flow_runs_task_runs_and_artifacts_are_visible_through_the_prefect_client(
        prefect_server, smoke_root, tmp_path, monkeypatch):
    """The speedrun in-process against a Prefect test server: what the UI would show."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.utilities.asyncutils import run_coro_as_sync

    sys.path.insert(0, str(REPO))
    from flows.speedrun import build_flow

    shutil.copytree(smoke_root / "data", tmp_path / "data")
    monkeypatch.setenv("MLXCHAT_HOME", str(tmp_path))
    state = build_flow()(preset="tiny", return_state=True)
    assert state.is_completed(), state.message
    flow_run_id = state.state_details.flow_run_id

    async def read():
        async with get_client() as client:
            flow_run = await client.read_flow_run(flow_run_id)
            runs = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            tasks = await client.read_task_runs(flow_run_filter=runs)
            artifacts = await client.read_artifacts(flow_run_filter=runs)
            return flow_run, tasks, artifacts

    flow_run, tasks, artifacts = run_coro_as_sync(read())
    assert flow_run.name == "tiny (tiny, d2)" and {"run:tiny", "preset:tiny", "depth:2"} <= set(flow_run.tags)
    assert flow_run.state.is_completed()
    assert sorted(t.name.rsplit("-", 1)[0] for t in tasks) == sorted(STEPS)
    assert all(t.state.is_completed() for t in tasks)

    # The graph is the true DAG: each task waits on exactly the stages whose outputs it uses.
    by_id = {t.id: t.name.rsplit("-", 1)[0] for t in tasks}
    edges = {by_id[t.id]: {by_id[i.id] for inputs in t.task_inputs.values() for i in inputs if i.id in by_id}
             for t in tasks}
    assert edges["prepare-data"] == set() and edges["prepare-evals"] == set()
    assert edges["tokenizer-eval"] == {"tokenizer-train"}
    assert edges["base-train"] == {"prepare-data", "tokenizer-train"}
    assert edges["base-eval"] == {"base-train"}  # no eval data here: prepare-evals left no fingerprint
    assert edges["sample"] == {"base-train", "mid-train", "sft-train"}
    assert edges["publish"] == {"sft-train", "base-eval"}
    # prepare-evals found no data here, so it has no fingerprint for the report to name
    assert edges["report"] == set(STEPS) - {"report", "prepare-evals"}

    by_key = {a.key: a for a in artifacts}
    assert by_key["tiny-base-progress"].type == "progress" and by_key["tiny-base-progress"].data == 100.0
    live = by_key["tiny-base-live"].data
    assert live.startswith("### base training") and "| 12 / 12 |" in live and "val bpb" in live
    assert "tok/s" in live and "MFU" in live and "ETA" in live and "](data:image/svg+xml;base64," in live
    table = by_key["tiny-base-train"].data
    assert by_key["tiny-base-train"].type == "table" and "val_bpb" in str(table) and "fingerprint" not in str(table)
    values = [row["value"] for row in (json.loads(table) if isinstance(table, str) else table)]
    # rounded to 4 significant digits (a count of decimals failed a peak memory of 0.0xx GiB)
    assert all(v == float(f"{v:.4g}") for v in values if isinstance(v, float)), values
    assert not any(isinstance(v, float) and v >= 1000 for v in values), values  # large ones as integers
    checkpoint = tmp_path / "runs" / "tiny" / "base" / "step_000012"
    assert "file://" not in str([a.data for a in artifacts])
    assert f"`{checkpoint}`" in by_key["tiny-base-checkpoint"].data
    assert "mlxchat --home" in by_key["tiny-base-checkpoint"].data
    report = by_key["tiny-report"].data
    assert by_key["tiny-report"].type == "markdown" and report.startswith("# mlxchat report: tiny")
    assert report.count("](data:image/png;base64,") == 3 and "](plots/" not in report
    assert by_key["tiny-samples-base"].type == "table"
    published = tmp_path / "published" / "tiny-sft"
    assert f"python -m mlx_lm generate --model {published}" in by_key["tiny-published-sft"].data
    assert by_key["tiny-sft-progress"].data == 100.0 and by_key["tiny-mid-train"].type == "table"
    assert {"tiny-samples-mid", "tiny-samples-sft"} <= set(by_key)
    assert "skipped: " in by_key["tiny-core"].data  # no eval data: CORE says why

    # A rerun that is all cache hits still shows the report card on its own page.
    again = build_flow()(preset="tiny", return_state=True)
    assert again.is_completed()
    rerun = FlowRunFilter(id=FlowRunFilterId(any_=[again.state_details.flow_run_id]))

    async def read_again():
        async with get_client() as client:
            return await client.read_artifacts(flow_run_filter=rerun)

    keys = {a.key: a for a in run_coro_as_sync(read_again())}
    assert keys["tiny-report"].data.startswith("# mlxchat report: tiny")
