"""The nightly-eval flow against a Prefect test server: history rows, runs, artifacts, deployment.

One tiny model is trained and published for the module (it dominates the cost of these tests);
the Prefect test server is the session's (conftest.prefect_server)."""

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def home(smoke_root, eval_pack_home, tmp_path_factory):
    """A home with the smoke corpus, the eval pack and a 2-layer model trained 4 steps per stage,
    published after base and after SFT (the newest)."""
    from dataclasses import replace

    from mlxchat import pipeline
    from mlxchat.presets import resolve

    tiny = resolve("tiny")
    root = tmp_path_factory.mktemp("nightly_home")
    shutil.copytree(smoke_root / "data", root / "data")
    shutil.copytree(eval_pack_home / "evals", root / "evals")
    pipeline.train_tokenizer("nightly", vocab_size=512, max_chars=300_000, root=root)
    for stage in ("base", "mid", "sft"):
        pipeline.train("nightly", stage, replace(getattr(tiny, stage), max_steps=4, eval_every=0).to_dict(), root=root)
    pipeline.publish("nightly", "base", root=root)
    pipeline.publish("nightly", "sft", root=root)
    return root


@pytest.fixture(scope="module")
def flow(home, prefect_server):
    from flows.nightly_eval import build_flow

    return build_flow()


def _run(flow, home):
    return flow(root=str(home), seq_len=64, eval_tokens=1024, max_tokens=4, max_per_task=2, chat_max_new_tokens=8)


def test_each_run_appends_one_history_row_visible_in_prefect(flow, home):
    from prefect import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterId
    from prefect.utilities.asyncutils import run_coro_as_sync

    first = _run(flow, home)
    history = pd.read_parquet(home / "eval_history.parquet")
    assert len(history) == 1 and first["rows"] == 1
    row = history.iloc[0]
    assert math.isfinite(row["val_bpb"]) and row["val_bpb"] > 0
    assert (row["run"], row["stage"], row["step"], row["source"]) == ("nightly", "sft", 4, "smoke")
    assert row["model_dir"] == str(home / "published" / "nightly-sft")
    assert row["core_name"] == "CORE-pack (14/22)" and math.isfinite(row["core_metric"])
    assert math.isfinite(row["chatcore"]) and row["max_per_task"] == 2
    assert (home / "eval_trend.png").stat().st_size > 1000
    assert str(row["timestamp"].tz) == "UTC"

    _run(flow, home)
    assert len(pd.read_parquet(home / "eval_history.parquet")) == 2

    async def read():
        async with get_client() as client:
            runs = await client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["nightly-eval"])))
            ids = [r.id for r in runs]
            tasks = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
            artifacts = await client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
            return runs, tasks, artifacts

    runs, tasks, artifacts = run_coro_as_sync(read())
    assert len(runs) == 2 and all(r.state.is_completed() for r in runs)
    assert all(r.name == "nightly nightly-sft" and "model:nightly-sft" in r.tags for r in runs)
    assert sorted(t.task_key.split("-")[0] for t in tasks) == sorted(["evaluate_published", "record_history"] * 2)
    by_key = {a.key: a for a in artifacts}  # the latest version of each keyed artifact
    assert by_key["nightly-eval-history"].type == "table"
    trend = by_key["nightly-eval-trend"].data  # the plot itself, inline, and where its file is
    assert trend.startswith("![nightly trend](data:image/png;base64,") and f"`{home / 'eval_trend.png'}`" in trend
    assert "file://" not in str([a.data for a in artifacts])
    assert by_key["nightly-eval-samples"].type == "markdown"
    assert "The capital of France is" in by_key["nightly-eval-samples"].data


def test_register_deployment_creates_cron_schedule(flow):
    from prefect import get_client
    from prefect.utilities.asyncutils import run_coro_as_sync

    from flows.nightly_eval import register_deployment

    register_deployment(flow, parameters={"source": "smoke"})

    async def read():
        async with get_client() as client:
            return await client.read_deployment_by_name("nightly-eval/nightly-eval")

    deployment = run_coro_as_sync(read())
    assert deployment.schedules[0].schedule.cron == "0 3 * * *"
    assert deployment.parameters == {"source": "smoke"}


def test_missing_published_model_is_a_one_line_error(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    out = subprocess.run([sys.executable, str(REPO / "flows" / "nightly_eval.py"), "--home", str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr == (f"error: no published model under {tmp_path / 'published'}; "
                          "run python flows/speedrun.py first\n")


def test_mlxchat_eval_published_runs_the_nightly_evaluation_without_prefect(home, tmp_path, monkeypatch, capsys):
    """The same evaluation from the command line: a base model gets bpb, samples and CORE (no
    ChatCORE: it is not a chat stage), one history row and the trend plot."""
    import json

    from mlxchat.cli import main

    copy = tmp_path / "home"
    shutil.copytree(home, copy, ignore=shutil.ignore_patterns("eval_history.parquet", "eval_trend.png", ".prefect"))
    monkeypatch.setenv("MLXCHAT_HOME", str(copy))  # main() sets it from --home; restored afterwards
    model = copy / "published" / "nightly-base"
    assert main(["--home", str(copy), "eval", "published", "--model", str(model), "--seq-len", "64",
                 "--eval-tokens", "1024", "--max-tokens", "4", "--max-per-task", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["run"], out["stage"], out["step"], out["rows"]) == ("nightly", "base", 4, 1)
    assert math.isfinite(out["val_bpb"]) and out["core_name"] == "CORE-pack (14/22)" and out["chatcore"] is None
    history = pd.read_parquet(copy / "eval_history.parquet")
    assert len(history) == 1 and history.iloc[0]["model_dir"] == str(model)
    assert (copy / "eval_trend.png").stat().st_size > 1000
    assert main(["--home", str(copy), "eval", "published", "--model", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err == f"error: no published model in {tmp_path / 'nowhere'} (model.safetensors is missing)\n"
    assert main(["--home", str(copy), "eval", "bpb"]) == 2
    assert "needs --run RUN" in capsys.readouterr().err
