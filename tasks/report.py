"""The report task: assemble report.md and publish it as a markdown artifact."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_link_artifact, create_markdown_artifact

from mlxchat import stages
from tasks.caching import stage_cache_key


@task(name="report", cache_key_fn=stage_cache_key, persist_result=True)
def report(run: str, inputs: dict, root: str) -> dict:
    result = stages.report(run, root=root)
    key = f"{run}-report".lower().replace("_", "-")
    create_markdown_artifact(key=key, markdown=Path(result["path"]).read_text(), description=f"Report card for run {run}")
    create_link_artifact(key=f"{key}-file", link=f"file://{result['path']}", link_text="report.md")
    return result
