"""The report task: assemble report.md and publish it as a markdown artifact."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_link_artifact, create_markdown_artifact

from mlxchat.report import build_report
from tasks.caching import stage_cache_key


@task(name="report", cache_key_fn=stage_cache_key, persist_result=True)
def report(run: str, inputs: dict, root: str) -> dict:
    path = build_report(run, root=root)
    key = f"{run}-report".lower().replace("_", "-")
    create_markdown_artifact(key=key, markdown=path.read_text(), description=f"Report card for run {run}")
    create_link_artifact(key=f"{key}-file", link=f"file://{path}", link_text="report.md")
    return {"path": str(path)}
