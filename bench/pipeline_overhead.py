"""Prefect's overhead on the speedrun: the flow vs the same stages called directly, the fully
cached rerun, and an empty flow on the same kind of local server — all measured in one run.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \
        python bench/pipeline_overhead.py --preset smoke

Each measurement is a fresh process (as a user's run is), in its own temporary home that
shares the prepared corpus. All Prefect runs share one PREFECT_HOME: the first (an empty flow)
creates Prefect's database, a one-time cost reported on its own.

Two overhead figures: wall time of the flow minus wall time of the direct run (what a user
sees, but two runs on a shared machine differ by noise), and each process's time outside its
stages (wall time minus the stage times the stages record in `timings.json`), which is
measured inside one process and so is robust to the machine's load changing between runs.
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
from mlxchat import presets, pipeline
p = presets.resolve(sys.argv[1]); run, root = p.name, sys.argv[2]
pipeline.prepare_data(p.source, p.num_shards, root=root)
pipeline.train_tokenizer(run, p.vocab_size, p.source, p.tokenizer_max_chars, root=root)
pipeline.eval_tokenizer(run, p.source, root=root)
evals = pipeline.prepare_evals(p.evals, root=root)
pipeline.train(run, "base", p.base.to_dict(), root=root)
pipeline.eval_bpb(run, "base", p.bpb_eval_tokens, root=root)
if evals["fingerprint"]:
    pipeline.eval_core(run, "base", p.max_per_task, root=root)
pipeline.train(run, "mid", p.mid.to_dict(), root=root)
pipeline.train(run, "sft", p.sft.to_dict(), root=root)
for stage in ("mid", "sft"):
    pipeline.eval_chat(run, stage, p.max_per_task, p.chat_max_new_tokens, root=root)
for stage in ("base", "mid", "sft"):
    pipeline.sample(run, stage, max_tokens=p.sample_max_tokens, root=root)
pipeline.publish(run, "sft", root=root)
pipeline.report(run, root=root)
"""

EMPTY = """
import sys
sys.path.insert(0, sys.argv[2])
from pathlib import Path
from flows import runtime
runtime.prepare(Path(sys.argv[1]))
from prefect import flow
runtime.wait_until_ready()
flow(name="empty")(lambda: None)()
"""


def timed(cmd: list[str], prefect_home: Path) -> float:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PREFECT_HOME": str(prefect_home)}
    env.pop("PREFECT_API_URL", None)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    return time.perf_counter() - t0


def stage_seconds(home: Path, preset: str) -> float:
    """Total time the run's stages spent inside their own functions (see mlxchat.pipeline.timed)."""
    return sum(json.loads((home / "runs" / preset / "timings.json").read_text()).values())


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

    prefect_home = base / "prefect"
    flow_home, direct_home = fresh_home("flow"), fresh_home("direct")
    flow_cmd = [sys.executable, str(REPO / "flows" / "speedrun.py"), "--preset", args.preset, "--home", str(flow_home)]
    empty_cmd = [sys.executable, "-c", EMPTY, str(fresh_home("empty")), str(REPO)]
    r = {"first_prefect_start_s": timed(empty_cmd, prefect_home), "empty_flow_s": timed(empty_cmd, prefect_home)}
    r["direct_s"] = timed([sys.executable, "-c", DIRECT, args.preset, str(direct_home)], prefect_home)
    r["direct_outside_stages_s"] = r["direct_s"] - stage_seconds(direct_home, args.preset)
    r["flow_s"] = timed(flow_cmd, prefect_home)
    r["flow_outside_stages_s"] = r["flow_s"] - stage_seconds(flow_home, args.preset)
    r["cached_rerun_s"] = timed(flow_cmd, prefect_home)
    r["overhead_s"] = r["flow_s"] - r["direct_s"]
    r["overhead_pct"] = 100 * r["overhead_s"] / r["direct_s"]
    r["overhead_in_process_s"] = r["flow_outside_stages_s"] - r["direct_outside_stages_s"]
    r["overhead_in_process_pct"] = 100 * r["overhead_in_process_s"] / r["direct_s"]
    r["cached_minus_empty_s"] = r["cached_rerun_s"] - r["empty_flow_s"]
    print(f"preset {args.preset}")
    print(f"  stages called directly : {r['direct_s']:8.1f} s  ({r['direct_outside_stages_s']:.1f} s outside the stages)")
    print(f"  through Prefect        : {r['flow_s']:8.1f} s  ({r['flow_outside_stages_s']:.1f} s outside the stages)")
    print(f"    overhead, wall       : {r['overhead_s']:+8.1f} s  ({r['overhead_pct']:+.1f}%)")
    print(f"    overhead, in-process : {r['overhead_in_process_s']:+8.1f} s  ({r['overhead_in_process_pct']:+.1f}%)")
    print(f"  fully cached rerun     : {r['cached_rerun_s']:8.1f} s")
    print(f"  empty flow             : {r['empty_flow_s']:8.1f} s  (cached rerun - empty = {r['cached_minus_empty_s']:+.1f} s)")
    print(f"  first Prefect start    : {r['first_prefect_start_s']:8.1f} s  (an empty flow creating Prefect's database, once per PREFECT_HOME)")
    if args.json:
        Path(args.json).write_text(json.dumps({"preset": args.preset, **r}, indent=2))
    shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
