"""Data parallel on this machine: training tok/s with 1 vs 2 local ranks, and the all-reduce per step.

1. `mlxchat train base` at the same global batch, once in one process and once under
   `mlx.launch -n 2 --backend ring`; tok/s is the mean over the steps after the first few
   (compilation), as each run's metrics.jsonl records it. The ratio is 2-rank / 1-process.
2. The step's one collective, `nn.average_gradients` over a gradient tree shaped like the
   model's at each depth (fp32, what the CPU trains in), timed on 2 ranks; also as a fraction
   of the d4 training step measured in 1.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 python bench/data_parallel.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def allreduce_worker(depths: list[int], vocab: int, repeats: int) -> None:
    """On every rank: time average_gradients over model-shaped gradients; rank 0 prints JSON."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten, tree_map

    from mlxchat.gpt import GPT, GPTConfig

    group = mx.distributed.init(strict=True)
    out = {}
    for depth in depths:
        shapes = GPT(GPTConfig.from_depth(depth, vocab_size=vocab)).parameters()
        grads = tree_map(lambda p: mx.ones(p.shape, dtype=mx.float32), shapes)
        mx.eval(grads)
        nbytes = sum(g.nbytes for _, g in tree_flatten(grads))
        step = mx.compile(nn.average_gradients)
        mx.eval(step(grads))  # warm-up: connections, compilation
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            mx.eval(step(grads))
            times.append(time.perf_counter() - t0)
        times.sort()
        out[f"d{depth}"] = {"grad_bytes": nbytes, "median_s": times[len(times) // 2], "min_s": times[0],
                            "GB_per_s": nbytes / times[len(times) // 2] / 1e9}
    if group.rank() == 0:
        print("@bench " + json.dumps(out), flush=True)


def train_tok_s(home: Path, run: str, args: list[str], np_: int, skip: int) -> dict:
    env = {**os.environ, "MLXCHAT_HOME": str(home), "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "mlxchat.cli", "train", "base", "--run", run, *args]
    if np_ > 1:
        cmd += ["--np", str(np_), "--backend", "ring"]
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (home / "runs" / run / "base" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "tok_per_s" in r][skip:]
    return {"ranks": np_, "tok_per_s": sum(r["tok_per_s"] for r in rows) / len(rows),
            "step_s": sum(r["dt"] for r in rows) / len(rows), "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--device-batch-size", type=int, default=4)
    parser.add_argument("--total-batch-size", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--skip", type=int, default=3, help="first steps left out (compilation)")
    parser.add_argument("--allreduce-depths", default="4,12")
    parser.add_argument("--allreduce-vocab", type=int, default=65536, help="nanochat's vocab for the gradient sizes")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    depths = [int(d) for d in args.allreduce_depths.split(",")]
    if args.worker:
        return allreduce_worker(depths, args.allreduce_vocab, args.repeats)

    from mlxchat import pipeline
    from mlxchat.corpus import prepare_smoke
    from mlxchat.launch import Ranks, launch_command

    home = Path(tempfile.mkdtemp(prefix="bench_dist_"))
    try:
        prepare_smoke(root=home)
        pipeline.train_tokenizer("tok", vocab_size=args.vocab, max_chars=2_000_000, root=home)
        train = ["--depth", str(args.depth), "--seq-len", str(args.seq_len), "--device-batch-size",
                 str(args.device_batch_size), "--total-batch-size", str(args.total_batch_size), "--dtype", "float32",
                 "--max-steps", str(args.steps), "--eval-every", "0", "--checkpoint-every", "0"]
        runs = []
        for np_ in (1, 2):
            run = f"np{np_}"
            shutil.copytree(home / "runs" / "tok" / "tokenizer", home / "runs" / run / "tokenizer")
            runs.append(train_tok_s(home, run, train, np_, args.skip))
        worker = [sys.executable, str(Path(__file__).resolve()), "--worker", "--allreduce-depths", args.allreduce_depths,
                  "--allreduce-vocab", str(args.allreduce_vocab), "--repeats", str(args.repeats)]
        out = subprocess.run(launch_command(worker, Ranks(np=2, backend="ring")), capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("@bench ")), None)
        if line is None:
            raise SystemExit(f"the all-reduce ranks printed no result:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
        allreduce = json.loads(line[len("@bench "):])
    finally:
        shutil.rmtree(home, ignore_errors=True)

    import mlx.core as mx

    one, two = runs
    print(f"training d{args.depth}, global batch {args.total_batch_size} tokens (micro-batch {args.device_batch_size}x"
          f"{args.seq_len}), fp32, mean of steps {args.skip + 1}-{args.steps}:")
    for r in runs:
        print(f"  {r['ranks']} rank(s): {r['tok_per_s']:,.0f} tok/s, {r['step_s']:.3f} s/step, wall {r['wall_s']:.1f} s")
    print(f"  2 ranks / 1 process: {two['tok_per_s'] / one['tok_per_s']:.2f}x")
    print(f"all-reduce of the gradients (nn.average_gradients, fp32, vocab {args.allreduce_vocab}, 2 local ranks, ring):")
    for name, r in allreduce.items():
        print(f"  {name}: {r['grad_bytes'] / 1e6:,.1f} MB, median {r['median_s'] * 1e3:,.1f} ms "
              f"({r['GB_per_s']:.2f} GB/s), min {r['min_s'] * 1e3:,.1f} ms")
    result = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "mlx": mx.__version__,
              "train": {"depth": args.depth, "seq_len": args.seq_len, "device_batch_size": args.device_batch_size,
                        "total_batch_size": args.total_batch_size, "vocab": args.vocab, "steps": args.steps,
                        "skip": args.skip, "runs": runs, "ratio_2_over_1": two["tok_per_s"] / one["tok_per_s"]},
              "allreduce": allreduce}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
