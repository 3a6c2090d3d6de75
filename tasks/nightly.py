"""Tasks of the nightly evaluation: score a published model, then record the score in a history.

The work is `mlxchat.evaluation.published` (also `mlxchat eval published`); these tasks only
call it, log through the run logger and publish artifacts.
"""

from __future__ import annotations

import pandas as pd
from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from mlxchat.evaluation import published
from mlxchat.rundir import Home
from tasks.artifacts import png_data_uri, rounded

TREND_ROWS = 20


# Never cached: the point of a nightly run is to measure again, even if nothing changed.
@task(name="evaluate-published", cache_policy=NO_CACHE)
def evaluate_published(model_dir: str, source: str, batch_size: int, seq_len: int, eval_tokens: int,
                       max_tokens: int, root: str, max_per_task: int = -1, chat_max_new_tokens: int = 512) -> dict:
    return published.evaluate_published(model_dir, source, batch_size, seq_len, eval_tokens, max_tokens, root,
                                        max_per_task, chat_max_new_tokens, log=get_run_logger())


@task(name="record-history", cache_policy=NO_CACHE)
def record_history(result: dict, root: str) -> dict:
    """One history row per evaluation, plus artifacts: the recent trend and the samples."""
    from mlxchat import engine

    history, png = published.record_history(result, root)
    path = Home.resolve(root).eval_history
    trend = history.tail(TREND_ROWS).assign(timestamp=lambda d: d["timestamp"].dt.strftime("%Y-%m-%d %H:%M UTC"))
    rows = [{k: None if pd.isna(v) else rounded(v) for k, v in row.items()} for row in trend.to_dict(orient="records")]
    create_table_artifact(key="nightly-eval-history", table=rows,
                          description=f"the last {len(trend)} nightly evaluations ({path})")
    create_markdown_artifact(key="nightly-eval-trend", markdown=f"![nightly trend]({png_data_uri(png)})\n\n`{png}`\n",
                             description="val bpb, CORE and ChatCORE over the nightly evaluations")
    name = f"{result['run']}-{result['stage']} step {result['step']}"
    create_markdown_artifact(key="nightly-eval-samples", markdown=engine.render_samples_markdown(name, result["samples"]),
                             description=f"Greedy samples of {result['model_dir']}")
    return {"history": str(path), "rows": len(history)}
