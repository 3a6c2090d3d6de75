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

REPO = Path(__file__).resolve().parents[1]
STAGES = ["prepare-data", "tokenizer-train", "tokenizer-eval", "prepare-evals", "base-train", "base-eval", "mid-train",
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


def test_flow_runs_every_stage_then_reruns_from_cache(home):
    first = _flow(home)
    states = _states(first.stdout + first.stderr)
    assert states == {s: "Completed" for s in STAGES}
    run = home / "runs" / "tiny"
    assert (run / "report.md").read_text().startswith("# mlxchat report: tiny")
    assert all((run / "plots" / f"{stage}.png").stat().st_size > 1000 for stage in ("base", "mid", "sft"))
    assert "The capital of France is" in (run / "samples" / "base.md").read_text()
    assert all("What is the capital of France?" in (run / "samples" / f"{s}.md").read_text() for s in ("mid", "sft"))
    assert (run / "sft" / "latest").is_symlink() and (run / "mid" / "latest").is_symlink()
    assert (home / "published" / "tiny-sft" / "model.safetensors").exists()
    assert (home / "published" / "tiny-sft" / "config.json").read_text().count('"nanochat"') == 1

    report = (run / "report.md").read_text()
    assert "| CORE-pack (14/22) | " in report and "| ChatCORE | - | " in report
    assert "Evaluated on at most 2 problems per task" in report
    chat = json.loads((run / "eval" / "chat_sft.json").read_text())
    assert chat["problems"] == {t: 2 for t in ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee")}
    assert chat["chatcore"] is not None and chat["skipped"] == {}
    answer = subprocess.run([sys.executable, "-m", "mlxchat.cli", "--home", str(home), "chat", "--run", "tiny",
                             "-p", "Who are you?", "--max-tokens", "8"], capture_output=True, text=True, timeout=120)
    assert answer.returncode == 0 and answer.stdout.strip(), answer.stderr[-2000:]

    again = _flow(home)
    assert _states(again.stdout + again.stderr) == {s: "Cached" for s in STAGES}

    shutil.rmtree(home / "published")  # outputs deleted by hand: their stages rerun, despite the cache
    (run / "tokenizer" / "tok_eval.json").unlink()
    out = _flow(home)
    repaired = _states(out.stdout + out.stderr)
    assert {s for s, st in repaired.items() if st == "Completed"} == {"tokenizer-eval", "publish"}, repaired
    assert (home / "published" / "tiny-sft" / "model.safetensors").exists()

    forced = _flow(home, "--force", "base-train")
    states = _states(forced.stdout + forced.stderr)
    cut = STAGES.index("base-train")
    before, after = STAGES[:cut], STAGES[cut:]
    assert all(states[s] == "Cached" for s in before), states
    assert all(states[s] == "Completed" for s in after), states


def test_flow_with_rl_trains_rl_after_sft_and_reports_its_column(home):
    first = _flow(home, "--rl", "--run", "tinyrl")
    with_rl = STAGES[:STAGES.index("chat-eval")] + ["rl-train"] + STAGES[STAGES.index("chat-eval"):]
    assert _states(first.stdout + first.stderr) == {s: "Completed" for s in with_rl}
    run = home / "runs" / "tinyrl"
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
    again = _flow(home, "--rl", "--run", "tinyrl")
    assert _states(again.stdout + again.stderr) == {s: "Cached" for s in with_rl}


def test_only_without_inputs_names_the_stage_to_run_first(tmp_path, home):
    shutil.copytree(home / "data", tmp_path / "data")
    out = _flow(tmp_path, "--only", "base-eval", check=False)
    assert out.returncode == 2
    assert "stage 'tokenizer-train' has no results for run 'tiny': run it first" in out.stderr


def test_sigkill_during_base_train_then_rerun_resumes_from_latest(tmp_path, home):
    shutil.copytree(home / "data", tmp_path / "data")
    proc = _flow(tmp_path, "--max-steps", "150", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stage = tmp_path / "runs" / "tiny" / "base"
    deadline = time.time() + 300
    while time.time() < deadline and not any(stage.glob("step_0000[1-9]*")):
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = int(os.readlink(stage / "latest").split("_")[1])
    assert 0 < killed_at < 150
    out = _flow(tmp_path, "--max-steps", "150")
    log = out.stdout + out.stderr
    states = _states(log)
    assert states["prepare-data"] == "Cached" and states["tokenizer-train"] == "Cached"
    assert states["base-train"] == "Completed"
    assert re.search(rf"resuming base from step_0*{killed_at} \(step {killed_at} of 150\)", log), log[-3000:]
    assert os.readlink(stage / "latest") == "step_000150"


def test_a_failing_stage_fails_the_flow_and_the_fixed_rerun_resumes_there(tmp_path, home):
    shutil.copytree(home / "data", tmp_path / "data")
    _flow(tmp_path, "--only", "prepare-data")
    _flow(tmp_path, "--only", "tokenizer-train")
    pkl = tmp_path / "runs" / "tiny" / "tokenizer" / "tokenizer.pkl"
    good = pkl.read_bytes()
    pkl.write_bytes(b"corrupt")
    out = _flow(tmp_path, "--from", "tokenizer-eval", check=False)
    assert out.returncode != 0
    assert re.search(r"Task run 'tokenizer-eval-[0-9a-f]+' - .*tokenizer .*tokenizer.pkl is corrupt", out.stdout + out.stderr)
    pkl.write_bytes(good)
    fixed = _flow(tmp_path, "--from", "tokenizer-eval")
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
    assert flow_run.name and flow_run.state.is_completed()
    assert sorted(t.name.rsplit("-", 1)[0] for t in tasks) == sorted(STAGES)
    assert all(t.state.is_completed() for t in tasks)
    by_key = {a.key: a for a in artifacts}
    assert by_key["tiny-base-progress"].type == "progress" and by_key["tiny-base-progress"].data == 100.0
    assert by_key["tiny-base-train"].type == "table" and "val_bpb" in str(by_key["tiny-base-train"].data)
    checkpoint = tmp_path / "runs" / "tiny" / "base" / "step_000012"
    assert by_key["tiny-base-checkpoint"].data == f"[base checkpoint (step 12)](file://{checkpoint})"
    assert by_key["tiny-report"].type == "markdown" and by_key["tiny-report"].data.startswith("# mlxchat report: tiny")
    assert by_key["tiny-samples-base"].type == "table"
    assert f"(file://{tmp_path / 'published' / 'tiny-sft'})" in by_key["tiny-published-sft"].data
    assert by_key["tiny-sft-progress"].data == 100.0 and by_key["tiny-mid-train"].type == "table"
    assert {"tiny-samples-mid", "tiny-samples-sft"} <= set(by_key)
