"""Prefect's overhead on the speedrun: the flow vs the same stages called directly, the fully
cached rerun, and an empty flow on the same ephemeral server — all measured in one run.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \
        python bench/pipeline_overhead.py --preset smoke

Each measurement is a fresh process (as a user's run is), in its own temporary home that
shares the prepared corpus.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

DIRECT = """
import sys
from mlxchat import presets, stages
p = presets.resolve(sys.argv[1]); run, root = p.name, sys.argv[2]
stages.prepare_data(p.source, p.num_shards, root=root)
stages.train_tokenizer(run, p.vocab_size, p.source, p.tokenizer_max_chars, root=root)
stages.eval_tokenizer(run, p.source, root=root)
stages.train_base(run, p.base.to_dict(), root=root)
stages.eval_bpb(run, "base", p.bpb_eval_tokens, root=root)
stages.sample(run, "base", max_tokens=p.sample_max_tokens, root=root)
stages.publish(run, "base", root=root)
from mlxchat.report import build_report; build_report(run, root=root)
"""

EMPTY = """
import os, sys
sys.path.insert(0, sys.argv[2])
from flows.speedrun import _prefect_env
from pathlib import Path
_prefect_env(Path(sys.argv[1]))
from prefect import flow
flow(name="empty")(lambda: None)()
"""


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="smoke")
    ap.add_argument("--json")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="mlxchat-bench-"))
    corpus = base / "corpus"
    subprocess.run([sys.executable, "-m", "mlxchat.cli", "--home", str(corpus), "data", "prepare-smoke"],
                   check=True, stdout=subprocess.DEVNULL)

    def fresh_home(name: str) -> Path:
        home = base / name
        shutil.copytree(corpus / "data", home / "data")
        return home

    flow_home = fresh_home("flow")
    flow_cmd = [sys.executable, str(REPO / "flows" / "speedrun.py"), "--preset", args.preset, "--home", str(flow_home)]
    r = {
        "empty_flow_s": timed([sys.executable, "-c", EMPTY, str(fresh_home("empty")), str(REPO)]),
        "direct_s": timed([sys.executable, "-c", DIRECT, args.preset, str(fresh_home("direct"))]),
        "flow_s": timed(flow_cmd),
    }
    r["cached_rerun_s"] = timed(flow_cmd)
    r["overhead_s"] = r["flow_s"] - r["direct_s"]
    r["overhead_pct"] = 100 * r["overhead_s"] / r["direct_s"]
    r["cached_minus_empty_s"] = r["cached_rerun_s"] - r["empty_flow_s"]
    print(f"preset {args.preset}")
    print(f"  stages called directly : {r['direct_s']:8.1f} s")
    print(f"  through Prefect        : {r['flow_s']:8.1f} s  (overhead {r['overhead_s']:+.1f} s, {r['overhead_pct']:+.1f}%)")
    print(f"  fully cached rerun     : {r['cached_rerun_s']:8.1f} s")
    print(f"  empty flow             : {r['empty_flow_s']:8.1f} s  (cached rerun - empty = {r['cached_minus_empty_s']:+.1f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps({"preset": args.preset, **r}, indent=2))
    shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
