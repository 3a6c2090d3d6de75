"""The diagnostic benchmark that calls the model's parts one by one (bench/memory_breakdown.py) still
runs against the current model at a tiny size: a part whose call no longer fits the model's
signature reports an error row instead of failing, so nothing else would notice. Nothing is timed."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_memory_breakdown_runs_every_part(tmp_path):
    out = tmp_path / "rows.json"
    subprocess.run([sys.executable, str(REPO / "bench" / "memory_breakdown.py"), "--depth", "1", "--batch", "1",
                    "--seq-len", "64", "--vocab", "256", "--dtype", "float32", "--reps", "1", "--json", str(out)],
                   check=True, capture_output=True, text=True, timeout=600)
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) >= 10
    assert [r["part"] for r in rows if r["error"]] == []
