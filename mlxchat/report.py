"""The report card: one markdown file per run, assembled from what each stage left in the run
directory (like nanochat's report.md), with a loss / bits-per-byte plot."""

from __future__ import annotations

import json
from pathlib import Path

from mlxchat.common import atomic_path, atomic_write_text
from mlxchat.rundir import CHAT_STAGES, MODEL_STAGES, RunDir, run_dir


def _read(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def plot_training(metrics_file: Path, out_png: Path, metric: str = "val_bpb") -> Path | None:
    """Training loss and the validation metric (bpb, or SFT's loss) against step, as a PNG."""
    if not metrics_file.exists():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mlxchat.train import read_metrics

    rows = read_metrics(metrics_file)
    train = [(r["step"], r["smooth_loss"]) for r in rows if "smooth_loss" in r]
    val = [(r["step"], r[metric]) for r in rows if metric in r]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    if train:
        ax1.plot(*zip(*train))
    ax1.set(title="training loss (smoothed)", xlabel="step", ylabel="nats/token")
    if val:
        ax2.plot(*zip(*val), marker="o")
    label = "bits per byte" if metric == "val_bpb" else "loss (assistant tokens)"
    ax2.set(title=f"validation {label}", xlabel="step", ylabel=metric)
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return out_png


def duration(seconds: float) -> str:
    """A wall time as people read it: 4.2 s, 3m07s, 1h05m."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    s = int(round(seconds))
    return f"{s // 60}m{s % 60:02d}s" if s < 3600 else f"{s // 3600}h{s // 60 % 60:02d}m"


def _value(key: str, v) -> str:
    if isinstance(v, float) and (key.endswith("_s") or key.endswith(" time")):
        return duration(v)
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def _section(title: str, data: dict | None) -> str:
    if not data:
        return ""
    lines = [f"## {title}", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {_value(k, v)} |" for k, v in data.items() if not isinstance(v, (dict, list))]
    return "\n".join(lines) + "\n"


def _final(rdir: RunDir, stage: str, metric: str):
    """A stage's last validation value, as its latest checkpoint recorded it (None if none)."""
    from mlxchat.checkpoint import latest_checkpoint

    ck = latest_checkpoint(rdir.stage(stage)) if rdir.stage(stage).exists() else None
    return ck.state.get(metric) if ck else None


CHAT_ROWS = ["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee"]


def summary_rows(rdir: RunDir) -> list[dict]:
    """nanochat's summary table: a row per metric, a column per stage (BASE / MID / SFT / RL).

    CORE comes from `eval/core.json` (named "CORE-pack (N/22)" when its data is not the
    official bundle), the chat tasks and ChatCORE from `eval/chat_<stage>.json`. A task that
    could not run says "skipped (reason)"; "-" is a cell that does not apply or has not run
    yet; never a guess."""
    core = (_read(rdir.eval_file("core")) or {}).get("base", {})
    chat = {stage: _read(rdir.chat_eval(stage)) or {} for stage in CHAT_STAGES}

    def cell(value) -> str:
        return "-" if value is None else f"{value:.4f}"

    def skipped(reason: str) -> str:
        return "skipped (no eval data: mlxchat data prepare-evals)" if "prepare-evals" in reason else f"skipped ({reason[:60]})"

    base_trained = (rdir.stage("base") / "latest").exists()
    core_cell = cell(core.get("core_metric")) if core else (skipped("prepare-evals") if base_trained else "-")
    bpb = (_read(rdir.eval_file("bpb")) or {}).get("base", {})
    rows = [{"metric": "val bpb", "BASE": cell(bpb.get("val_bpb")), "MID": cell(_final(rdir, "mid", "val_bpb")), "SFT": "-", "RL": "-"},
            {"metric": core.get("name", "CORE"), "BASE": core_cell, "MID": "-", "SFT": "-", "RL": "-"}]
    for task in CHAT_ROWS + ["ChatCORE"]:
        row = {"metric": task, "BASE": "-"}
        for stage, data in chat.items():
            if task in data.get("skipped", {}):
                row[stage.upper()] = skipped(data["skipped"][task])
            elif task == "ChatCORE" and data and data.get("chatcore") is None:
                row[stage.upper()] = "skipped (needs all six tasks)"
            else:
                row[stage.upper()] = cell(data.get("chatcore") if task == "ChatCORE" else data.get("results", {}).get(task))
        rows.append(row)
    return rows


def summary_markdown(rows: list[dict], note: str = "") -> str:
    lines = ["## Summary", "", "| Metric | BASE | MID | SFT | RL |", "|---|---|---|---|---|"]
    lines += [f"| {r['metric']} | {r['BASE']} | {r['MID']} | {r['SFT']} | {r.get('RL', '-')} |" for r in rows]
    return "\n".join(lines) + ("\n\n" + note if note else "") + "\n"


def build_report(run: str, root=None) -> Path:
    """Write `runs/<run>/report.md` (and `plots/<stage>.png`) from the run directory."""
    from datetime import datetime, timezone

    from mlxchat.checkpoint import latest_checkpoint
    from mlxchat.common import hardware

    rdir = run_dir(run, root)
    meta = _read(rdir.run_json) or {}
    from mlxchat.pipeline import timings_by_step

    timings = timings_by_step(_read(rdir.timings) or {})
    machine = meta.get("hardware") or hardware()
    parts = [f"# mlxchat report: {run}\n",
             f"Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC · total wall time {duration(sum(timings.values()))} "
             f"(the steps' own, {len(timings)} steps) · {machine.get('chip')}, {machine.get('memory')} memory, "
             f"MLX on {machine.get('MLX device')}" + (f" ({machine['GPU memory']})" if machine.get("GPU memory") else "") + "\n"]
    rows = summary_rows(rdir)
    if any(v != "-" for r in rows for k, v in r.items() if k != "metric"):
        records = [(_read(rdir.eval_file("core")) or {}).get("base", {})]
        records += [_read(rdir.chat_eval(stage)) or {} for stage in CHAT_STAGES]
        limits = sorted({r.get("max_per_task") for r in records} - {None, -1})
        parts.append(summary_markdown(rows, f"Evaluated on at most {limits[-1]} problems per task (--max-per-task)." if limits else ""))
    if meta:
        parts.append(_section("Environment", {"git commit": meta.get("git_commit"), "code version": meta.get("code_version"),
                                             "platform": meta.get("platform"), **machine, **meta.get("versions", {})}))
    parts.append(_section("Tokenizer training", _read(rdir.tokenizer_meta)))
    tok_eval = _read(rdir.tok_eval)
    if tok_eval:
        parts.append(_section("Tokenizer evaluation (bytes per token)", {k: v["ratio"] for k, v in tok_eval.items()}))
    for stage in MODEL_STAGES:
        ck = latest_checkpoint(rdir.stage(stage)) if rdir.stage(stage).exists() else None
        if ck is None:
            continue
        cfg = ck.state.get("config", {})
        metric = "val_loss" if stage == "sft" else "val_bpb"
        if stage == "rl":
            last = ck.state.get("history", [{}])[-1] if ck.state.get("history") else {}
            parts.append(_section("RL training", {"steps": ck.step, "questions per step": cfg.get("examples_per_step"),
                                                  "samples per question": cfg.get("num_samples"), "source": cfg.get("source"),
                                                  "mean reward (last step)": ck.state.get("reward"),
                                                  **{k: v for k, v in last.items() if k != "step"}}))
            continue
        parts.append(_section(f"{stage.upper()} training", {
            "depth": cfg.get("depth"), **ck.state.get("model_config", {}), "steps": ck.step,
            "tokens per step" if stage != "sft" else "conversations per step":
                cfg.get("total_batch_size") if stage != "sft" else cfg.get("examples_per_step"),
            f"final {metric.replace('_', ' ')}": ck.state.get(metric),
        }))
        png = plot_training(rdir.metrics(stage), rdir.plot(stage), metric)
        if png:
            parts.append(f"![{stage} training]({png.relative_to(rdir.path)})\n")
    bpb = _read(rdir.eval_file("bpb")) or {}
    for stage, res in bpb.items():
        parts.append(_section(f"Bits per byte ({stage})", {k: res[k] for k in ("step", "val_bpb", "train_bpb", "eval_tokens")}))
    if timings:
        parts.append(_section("Wall time per step", {**{k: duration(v) for k, v in timings.items()},
                                                      "total": duration(sum(timings.values()))}))
    for stage in MODEL_STAGES:
        samples = rdir.samples(stage)
        if samples.exists():
            parts.append(f"## Samples ({stage})\n\n" + samples.read_text())
    path = rdir.report
    atomic_write_text(path, "\n".join(p for p in parts if p))
    return path
