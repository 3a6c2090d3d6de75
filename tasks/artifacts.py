"""What the Prefect UI shows a person: tables of rounded numbers, plots inline, paths and
commands they can act on, and a live view of training.

A browser refuses `file://` links from a web page, and a markdown artifact cannot reach files
beside the run, so images travel inside the markdown as `data:` URIs and outputs are shown as a
path to copy plus the command that uses them.
"""

from __future__ import annotations

import base64
import re
import time
from pathlib import Path
from uuid import UUID

from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact

INTERNAL = ("fingerprint",)  # record fields that only cache keys use


def artifact_key(run: str, what: str) -> str:
    """Prefect keys allow lowercase letters, digits and dashes only."""
    return f"{run}-{what}".lower().replace("_", "-")


def rounded(value):
    """Four significant digits for a float (whole numbers from 1,000 on), the rest unchanged."""
    if isinstance(value, float):
        return round(value) if abs(value) >= 1000 else float(f"{value:.4g}")
    return value


def metric_rows(metrics: dict) -> list[dict]:
    """{"metric", "value"} rows of a stage's scalar results, rounded, internal fields left out."""
    return [{"metric": k, "value": rounded(v)} for k, v in metrics.items()
            if (isinstance(v, (int, float, str)) or v is None) and not any(i in k for i in INTERNAL)]


def png_data_uri(path: str | Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def inline_images(markdown: str, base: Path) -> str:
    """Replace `![alt](relative.png)` by the image itself, so the UI renders it."""
    def embed(m: re.Match) -> str:
        path = base / m[2]
        return f"![{m[1]}]({png_data_uri(path)})" if path.is_file() else m[0]

    return re.sub(r"!\[([^\]]*)\]\(([^):]+\.png)\)", embed, markdown)


def location_markdown(title: str, path: str | Path, commands: dict[str, str] | None = None) -> str:
    """An output's path to copy, and what to run with it."""
    lines = [f"**{title}**", "", f"`{path}`"]
    for what, command in (commands or {}).items():
        lines += ["", f"{what}:", "```bash", command, "```"]
    return "\n".join(lines) + "\n"


def publish_location(key: str, title: str, path: str | Path, commands: dict[str, str] | None = None,
                     description: str | None = None) -> None:
    create_markdown_artifact(key=key, markdown=location_markdown(title, path, commands), description=description or title)


def label_flow_run(name: str, tags: list[str]) -> None:
    """Name and tag the running flow run after what it makes (the UI lists and filters runs so)."""
    from prefect import get_client
    from prefect.runtime import flow_run

    get_client(sync_client=True).update_flow_run(flow_run.id, name=name, tags=[*flow_run.tags, *tags])


def sparkline_svg(values: list[float], width: int = 320, height: int = 80) -> str:
    """A loss curve as a tiny SVG `data:` URI: cheap enough to redraw every few seconds
    while training (a matplotlib figure costs tenths of a second on a small CPU)."""
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    n = max(len(values) - 1, 1)
    left = 48  # room for the value labels
    points = " ".join(f"{left + (width - left - 4) * i / n:.1f},{6 + (height - 12) * (hi - v) / span:.1f}"
                      for i, v in enumerate(values))
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif">'
           f'<rect width="100%" height="100%" fill="white"/>'
           f'<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="{points}"/>'
           f'<text x="{left - 4}" y="12" font-size="10" text-anchor="end">{hi:.3f}</text>'
           f'<text x="{left - 4}" y="{height - 4}" font-size="10" text-anchor="end">{lo:.3f}</text></svg>')
    return "data:image/svg+xml;base64," + base64.b64encode(svg.encode()).decode()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def training_markdown(stage: str, row: dict, losses: list[float], metric: str, value: float | None) -> str:
    """The live training view: where it is, how fast, when it ends, and the loss so far."""
    mfu = f"{row['mfu']:.1f}%" if row.get("mfu") is not None else "n/a (unknown peak FLOPs)"
    label = "val bpb" if metric == "val_bpb" else "val loss"
    cells = [("step", f"{row['step']:,} / {row['num_iterations']:,}"), ("loss (smoothed)", f"{row['smooth_loss']:.4f}"),
             (label, "-" if value is None else f"{value:.4f}"), ("tok/s", f"{row['tok_per_s']:,.0f}"),
             ("MFU", mfu), ("ETA", _duration(row["eta_s"]))]
    lines = [f"### {stage} training", "", "| " + " | ".join(c for c, _ in cells) + " |",
             "|" + "---|" * len(cells), "| " + " | ".join(v for _, v in cells) + " |", ""]
    if len(losses) > 1:
        lines.append(f"![training loss]({sparkline_svg(losses)})")
    return "\n".join(lines) + "\n"


class LiveTraining:
    """Feeds training progress to the UI at most every `every_s` seconds (and at the end): the
    progress bar, a markdown artifact updated in place (step, loss, validation metric, tok/s,
    MFU, ETA, loss curve), and a log line."""

    MAX_POINTS = 200  # the curve keeps every k-th loss so redrawing stays cheap on long runs

    def __init__(self, run: str, stage: str, metric: str, logger, every_s: float = 3.0):
        from prefect import get_client

        self.stage, self.metric, self.logger, self.every_s = stage, metric, logger, every_s
        self.progress_id = create_progress_artifact(progress=0.0, key=artifact_key(run, f"{stage}-progress"),
                                                    description=f"{stage} training progress")
        self.live_id = create_markdown_artifact(key=artifact_key(run, f"{stage}-live"),
                                                markdown=f"### {stage} training\n\nstarting…\n",
                                                description=f"{stage} training, updated every few seconds")
        self.client = get_client(sync_client=True)
        self.losses: list[float] = []
        self.stride, self.seen, self.last = 1, 0, 0.0

    def __call__(self, row: dict) -> None:
        self.seen += 1
        if self.seen % self.stride == 0:
            self.losses.append(row["smooth_loss"])
            if len(self.losses) > self.MAX_POINTS:
                self.losses, self.stride = self.losses[::2], self.stride * 2
        now = time.monotonic()
        done = row["step"] == row["num_iterations"]
        if now - self.last < self.every_s and not done:
            return
        self.last = now
        value = row.get(self.metric)
        update_progress_artifact(self.progress_id, progress=100.0 * row["step"] / row["num_iterations"])
        self._update(self.live_id, training_markdown(self.stage, row, self.losses, self.metric, value))
        self.logger.info(
            f"step {row['step']}/{row['num_iterations']} | loss {row['smooth_loss']:.4f} | "
            + (f"{self.metric.replace('_', ' ')} {value:.4f} | " if value is not None else "")
            + f"{row['tok_per_s']:,.0f} tok/s | " + (f"MFU {row['mfu']:.1f}% | " if row.get("mfu") else "")
            + f"ETA {_duration(row['eta_s'])}"
        )

    def _update(self, artifact_id: UUID, markdown: str) -> None:
        from prefect.client.schemas.actions import ArtifactUpdate

        self.client.update_artifact(artifact_id=artifact_id, artifact=ArtifactUpdate(data=markdown))


def publish_report(run: str, record: dict) -> None:
    """The report card as a markdown artifact, its plots inline, and where the file is. Apart
    from the (cached) report task, so that a rerun that is all cache hits still shows the report
    card on its own flow-run page."""
    path = Path(record["path"])
    create_markdown_artifact(key=artifact_key(run, "report"), markdown=inline_images(path.read_text(), path.parent),
                             description=f"Report card for run {run}")
    publish_location(artifact_key(run, "report-file"), "report card (markdown, plots in plots/)", path,
                     {"read it": f"less {path}"})
