"""The one way benchmarks here write their results file (`--json PATH`)."""

import json
from pathlib import Path


def write_json(path: str | None, report: dict) -> None:
    """Write `report` to `path` (parents created) and say so; nothing without a path."""
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")
