"""The report task: assemble report.md; `publish_report` shows it in the UI.

Publishing is apart from the (cached) task so that a rerun that is all cache hits still shows
the report card on its own flow-run page."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact

from mlxchat import pipeline
from tasks.artifacts import artifact_key, inline_images, publish_location
from tasks.caching import stage_cache_key


@task(name="report", cache_key_fn=stage_cache_key, persist_result=True)
def report(run: str, inputs: dict, root: str) -> dict:
    return pipeline.report(run, root=root)


def publish_report(run: str, record: dict) -> None:
    """The report card as a markdown artifact, its plots inline, and where the file is."""
    path = Path(record["path"])
    create_markdown_artifact(key=artifact_key(run, "report"), markdown=inline_images(path.read_text(), path.parent),
                             description=f"Report card for run {run}")
    publish_location(artifact_key(run, "report-file"), "report card (markdown, plots in plots/)", path,
                     {"read it": f"less {path}"})
