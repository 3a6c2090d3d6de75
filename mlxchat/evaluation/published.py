"""The nightly evaluation of a published model: every evaluation that has data, then one row
appended to the history (`<home>/eval_history.parquet`) and its trend plot
(`<home>/eval_trend.png`).

`mlxchat eval published` runs it without Prefect; flows/nightly_eval.py schedules it, its tasks
(tasks/nightly.py) only adding logs and artifacts. The math is the speedrun's (`evaluate_bpb`,
`evaluate_core`, `score_chat`, `sample_prompts`), so the nightly numbers are the ones it reports.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pandas as pd

from mlxchat.common import MlxchatError, atomic_path, get_logger, read_json
from mlxchat.rundir import CHAT_STAGES, Home

HISTORY_COLUMNS = ["timestamp", "model_dir", "run", "stage", "step", "val_bpb", "eval_tokens", "source",
                   "core_name", "core_metric", "chatcore", "max_per_task"]


def latest_published(home: Home) -> Path:
    """The published folder whose model.safetensors is newest.

    Hidden folders are skipped: they are a publish in progress or one that crashed."""
    candidates = [p.parent for p in home.published_root.glob("[!.]*/model.safetensors")]
    if not candidates:
        raise MlxchatError(f"no published model under {home.published_root}; run python flows/speedrun.py first")
    return max(candidates, key=lambda d: (d / "model.safetensors").stat().st_mtime)


def evaluate_published(model_dir: str | Path, source: str = "smoke", batch_size: int = 4, seq_len: int = 256,
                       eval_tokens: int = 16384, max_tokens: int = 16, root=None, max_per_task: int = -1,
                       chat_max_new_tokens: int = 512, log: logging.Logger | None = None) -> dict:
    """Every evaluation that has data, on one published model: validation bits per byte and
    greedy samples always, CORE when `<home>/evals/core` exists, ChatCORE's tasks when the
    model is a chat stage (mid, sft, rl)."""
    from mlxchat import dataset, engine
    from mlxchat.dataloader import DataLoader
    from mlxchat.evaluation import eval_batching
    from mlxchat.evaluation.bpb import evaluate_bpb
    from mlxchat.evaluation.chatcore import score_chat
    from mlxchat.evaluation.core import evaluate_core
    from mlxchat.interop import load_published

    log = log or get_logger()
    model_dir = Path(model_dir)
    if not (model_dir / "model.safetensors").exists():
        raise MlxchatError(f"no published model in {model_dir} (model.safetensors is missing)")
    origin = read_json(model_dir / "config.json", "published model config").get("mlxchat", {})
    model, tok = load_published(model_dir)
    steps = max(1, eval_tokens // (batch_size * seq_len))
    log.info(f"{model_dir}: {origin.get('run')}-{origin.get('stage')} step {origin.get('step')}; "
             f"val bpb on {steps * batch_size * seq_len:,} tokens of {source}…")
    loader = DataLoader(dataset.get_source(source, root=root), tok, batch_size, seq_len, "val")
    t0 = time.time()
    val_bpb = evaluate_bpb(model, loader, steps, tok.token_bytes())
    samples = engine.sample_prompts(model, tok, engine.SAMPLE_PROMPTS, max_tokens=max_tokens)
    log.info(f"{model_dir}: val bpb {val_bpb:.4f} on {steps * batch_size * seq_len} tokens "
             f"of {source} ({time.time() - t0:.1f}s)")
    result = {"model_dir": str(model_dir), "run": origin.get("run"), "stage": origin.get("stage"),
              "step": origin.get("step"), "val_bpb": val_bpb, "eval_tokens": steps * batch_size * seq_len,
              "source": source, "samples": samples, "max_per_task": max_per_task}
    bundle = Home.resolve(root).core_bundle
    limit = "every problem" if max_per_task < 0 else f"at most {max_per_task} problems per task"
    if bundle.is_dir():
        log.info(f"CORE on {bundle} ({limit})…")
        core = evaluate_core(model, tok, bundle, max_per_task=max_per_task, batch_tokens=eval_batching()[0])
        result.update(core_name=core["name"], core_metric=core["core_metric"])
        log.info(f"{core['name']}: {core['core_metric']:.4f}")
    else:
        log.warning(f"CORE skipped: no evaluation data in {bundle}; run: mlxchat data prepare-evals")
    if origin.get("stage") in CHAT_STAGES:
        log.info(f"ChatCORE's six tasks ({limit})…")
        chat = score_chat(model, tok, max_per_task, chat_max_new_tokens, root=root)
        result.update(chatcore=chat["chatcore"], chat_results=chat["results"], chat_skipped=chat["skipped"])
        log.info("ChatCORE " + (f"{chat['chatcore']:.4f}" if chat["chatcore"] is not None else "n/a (tasks skipped)"))
    return result


def append_history(path: Path, row: dict) -> pd.DataFrame:
    """Append `row` to the parquet history and return the whole history.

    Written to a temporary file beside it and renamed into place, so a crash mid-write
    leaves the previous history intact rather than a truncated parquet file."""
    new = pd.DataFrame([{**{c: row.get(c) for c in HISTORY_COLUMNS}, "timestamp": pd.Timestamp.now(tz="UTC")}])
    history = pd.concat([pd.read_parquet(path), new], ignore_index=True) if path.exists() else new
    with atomic_path(path) as tmp:
        history.to_parquet(tmp, index=False)
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
        # At least 3 and at most 7 ticks: every span then has a unit and step that fit (matplotlib's
        # default minimum of 5 with a maximum of 5 had none for spans of a few minutes or hours).
        locator = mdates.AutoDateLocator(minticks=3, maxticks=7)
        ax.xaxis.set_major_locator(locator)
        ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return out_png


def record_history(result: dict, root=None) -> tuple[pd.DataFrame, Path]:
    """One history row for an evaluation, and the trend plot redrawn: (the history, the plot)."""
    home = Home.resolve(root)
    history = append_history(home.eval_history, result)
    return history, plot_trend(history, home.eval_trend)


def evaluate_and_record(model_dir: str | Path | None = None, root=None, **settings) -> dict:
    """`mlxchat eval published`: evaluate a published model (default: the newest) and append
    its row to the history. Returns the row as recorded, with where the history is."""
    model_dir = model_dir or latest_published(Home.resolve(root))
    result = evaluate_published(model_dir, root=root, **settings)
    history, png = record_history(result, root)
    return {**{c: result.get(c) for c in HISTORY_COLUMNS if c != "timestamp"}, "samples": result["samples"],
            "history": str(Home.resolve(root).eval_history), "rows": len(history), "trend": str(png)}
