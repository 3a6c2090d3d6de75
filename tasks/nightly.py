"""Tasks of the nightly evaluation: score a published model, then record the score in a history.

The math stays in mlxchat (`evaluate_bpb`, `sample_prompts`); these tasks only load, call,
persist and publish artifacts, so the nightly numbers are the ones the speedrun reports.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pandas as pd
from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from mlxchat.common import MlxchatError, read_json
from tasks.artifacts import png_data_uri, rounded

HISTORY_NAME = "eval_history.parquet"
HISTORY_COLUMNS = ["timestamp", "model_dir", "run", "stage", "step", "val_bpb", "eval_tokens", "source",
                   "core_name", "core_metric", "chatcore", "max_per_task"]
TREND_NAME = "eval_trend.png"
TREND_ROWS = 20


def latest_published(root: Path) -> Path:
    """The published folder under `<root>/published/` whose model.safetensors is newest.

    Hidden folders are skipped: they are a publish in progress or one that crashed."""
    candidates = [p.parent for p in (Path(root) / "published").glob("[!.]*/model.safetensors")]
    if not candidates:
        raise MlxchatError(f"no published model under {Path(root) / 'published'}; run python flows/speedrun.py first")
    return max(candidates, key=lambda d: (d / "model.safetensors").stat().st_mtime)


# Never cached: the point of a nightly run is to measure again, even if nothing changed.
@task(name="evaluate-published", cache_policy=NO_CACHE)
def evaluate_published(model_dir: str, source: str, batch_size: int, seq_len: int, eval_tokens: int,
                       max_tokens: int, root: str, max_per_task: int = -1, chat_max_new_tokens: int = 512) -> dict:
    """Every evaluation that has data, on one published model: validation bits per byte and
    greedy samples always, CORE when `<home>/evals/core` exists, ChatCORE's tasks when the
    model is a chat stage (mid, sft)."""
    from mlxchat import dataset, engine, pipeline
    from mlxchat.evaluation.core import evaluate_core
    from mlxchat.evaluation.pack import evals_dir
    from mlxchat.dataloader import DataLoader
    from mlxchat.evaluation.bpb import evaluate_bpb
    from mlxchat.interop import load_published

    logger = get_run_logger()
    origin = read_json(Path(model_dir) / "config.json", "published model config").get("mlxchat", {})
    model, tok = load_published(Path(model_dir))
    steps = max(1, eval_tokens // (batch_size * seq_len))
    logger.info(f"{model_dir}: {origin.get('run')}-{origin.get('stage')} step {origin.get('step')}; "
                f"val bpb on {steps * batch_size * seq_len:,} tokens of {source}…")
    loader = DataLoader(dataset.get_source(source, root=root), tok, batch_size, seq_len, "val")
    t0 = time.time()
    val_bpb = evaluate_bpb(model, loader, steps, tok.token_bytes())
    samples = engine.sample_prompts(model, tok, engine.SAMPLE_PROMPTS, max_tokens=max_tokens)
    logger.info(f"{model_dir}: val bpb {val_bpb:.4f} on {steps * batch_size * seq_len} tokens "
                f"of {source} ({time.time() - t0:.1f}s)")
    result = {"model_dir": str(model_dir), "run": origin.get("run"), "stage": origin.get("stage"),
              "step": origin.get("step"), "val_bpb": val_bpb, "eval_tokens": steps * batch_size * seq_len,
              "source": source, "samples": samples, "max_per_task": max_per_task}
    bundle = evals_dir(root) / "core"
    limit = "every problem" if max_per_task < 0 else f"at most {max_per_task} problems per task"
    if bundle.is_dir():
        logger.info(f"CORE on {bundle} ({limit})…")
        core = evaluate_core(model, tok, bundle, max_per_task=max_per_task, batch_tokens=pipeline.eval_batching()[0])
        result.update(core_name=core["name"], core_metric=core["core_metric"])
        logger.info(f"{core['name']}: {core['core_metric']:.4f}")
    else:
        logger.warning(f"CORE skipped: no evaluation data in {bundle}; run: mlxchat data prepare-evals")
    if origin.get("stage") in ("mid", "sft"):
        logger.info(f"ChatCORE's six tasks ({limit})…")
        chat = pipeline.score_chat(model, tok, max_per_task, chat_max_new_tokens, root=root)
        result.update(chatcore=chat["chatcore"], chat_results=chat["results"], chat_skipped=chat["skipped"])
        logger.info("ChatCORE " + (f"{chat['chatcore']:.4f}" if chat["chatcore"] is not None else "n/a (tasks skipped)"))
    return result


def append_history(path: Path, row: dict) -> pd.DataFrame:
    """Append `row` to the parquet history and return the whole history.

    Written to a temporary file beside it and renamed into place, so a crash mid-write
    leaves the previous history intact rather than a truncated parquet file."""
    new = pd.DataFrame([{**{c: row.get(c) for c in HISTORY_COLUMNS}, "timestamp": pd.Timestamp.now(tz="UTC")}])
    history = pd.concat([pd.read_parquet(path), new], ignore_index=True) if path.exists() else new
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        history.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return history


def plot_trend(history: pd.DataFrame, out_png: Path) -> Path:
    """val bpb, CORE and ChatCORE against time, one panel each, every evaluation a point.

    Readable from the first row on: a single evaluation gets a day either side of it and a
    value range around it instead of matplotlib's degenerate axes, and a metric never measured
    says so instead of drawing an empty frame."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    from mlxchat.common import atomic_path

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    titles = {"val_bpb": "val bits per byte", "core_metric": "CORE", "chatcore": "ChatCORE"}
    for ax, (column, title) in zip(axes, titles.items()):
        rows = history.dropna(subset=[column]) if column in history else history.iloc[:0]
        ax.set_title(title)
        if rows.empty:
            ax.text(0.5, 0.5, "not measured yet", ha="center", va="center", transform=ax.transAxes, color="gray")
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        when = pd.to_datetime(rows["timestamp"], utc=True).dt.tz_localize(None)
        values = rows[column].astype(float)
        ax.plot(when, values, marker="o", linestyle="-" if len(rows) > 1 else "none")
        if when.nunique() == 1:
            ax.set_xlim(when.iloc[0] - pd.Timedelta(days=1), when.iloc[0] + pd.Timedelta(days=1))
        if values.nunique() == 1:
            pad = max(abs(values.iloc[0]) * 0.1, 0.01)
            ax.set_ylim(values.iloc[0] - pad, values.iloc[0] + pad)
        locator = mdates.AutoDateLocator(maxticks=5)
        ax.xaxis.set_major_locator(locator)
        ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return out_png


@task(name="record-history", cache_policy=NO_CACHE)
def record_history(result: dict, root: str) -> dict:
    """One history row per evaluation, plus artifacts: the recent trend and the samples."""
    from mlxchat import engine

    path = Path(root) / HISTORY_NAME
    history = append_history(path, result)
    trend = history.tail(TREND_ROWS).assign(timestamp=lambda d: d["timestamp"].dt.strftime("%Y-%m-%d %H:%M UTC"))
    rows = [{k: None if pd.isna(v) else rounded(v) for k, v in row.items()} for row in trend.to_dict(orient="records")]
    create_table_artifact(key="nightly-eval-history", table=rows,
                          description=f"the last {len(trend)} nightly evaluations ({path})")
    png = plot_trend(history, Path(root) / TREND_NAME)
    create_markdown_artifact(key="nightly-eval-trend", markdown=f"![nightly trend]({png_data_uri(png)})\n\n`{png}`\n",
                             description="val bpb, CORE and ChatCORE over the nightly evaluations")
    name = f"{result['run']}-{result['stage']} step {result['step']}"
    create_markdown_artifact(key="nightly-eval-samples", markdown=engine.render_samples_markdown(name, result["samples"]),
                             description=f"Greedy samples of {result['model_dir']}")
    return {"history": str(path), "rows": len(history)}
