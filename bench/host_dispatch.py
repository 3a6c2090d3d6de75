"""What the host does during a training step: blocks of steps timed under different conditions in one process.

    python bench/host_dispatch.py --depth 20 --batch 32 --seq-len 2048 --vocab 65536 --json results/X.json

Why: on an H100, d20's timed steps took ~448 ms while the profiled steps of the same process took
436 ms (bench/README.md, twelfth session). This times `mlxchat.train.TrainStep` in one process:
  timed        steps waited for one by one (train_step.py's `ours`), two blocks
  dispatch     the host's time inside `TrainStep.dispatch` (graph built, `mx.async_eval` returned)
               against the wait for the loss after it, one step
  queued       N steps dispatched back to back, then waited for: host time and time per step
  torch-init   timed steps after torch has initialised CUDA in this process (GPU only)
  profiler     timed steps under torch's profiler, CUDA activity only (GPU only)
  after        timed steps after those
Each block is its own median; nothing here asserts.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchjson import write_json  # noqa: E402
from train_step import random_batches  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--steps", type=int, default=12, help="steps in each timed block")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    p.add_argument("--queued", type=int, default=10, help="steps in the queued block")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import mlx.core as mx

    from mlxchat.gpt import GPT, GPTConfig
    from mlxchat.optim import OptimConfig, build_optimizer
    from mlxchat.train import TrainStep

    gpu = mx.default_device() == mx.gpu
    cfg = GPTConfig.from_depth(args.depth, vocab_size=args.vocab, sequence_len=args.seq_len)
    mx.random.seed(args.seed)
    model = GPT(cfg, compute_dtype=mx.bfloat16 if gpu else mx.float32)
    model.init_weights(args.seed)
    batches = [(mx.array(x, dtype=mx.int32), mx.array(y, dtype=mx.int32)) for x, y in random_batches(args)]
    optimizer = build_optimizer(model, OptimConfig(), 10**6)
    optimizer.init(model.trainable_parameters())
    step = TrainStep(model, optimizer, 1, OptimConfig().grad_clip, 1)
    it = (batches[i % len(batches)] for i in range(10**9))
    report: dict = {"config": vars(args), "device": str(mx.default_device()), "mlx": mx.__version__, "blocks": {}}

    def block(name: str, n: int, around=None) -> None:
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            if around is None:
                step(it)
            else:
                with around():
                    step(it)
            times.append(time.perf_counter() - t0)
        report["blocks"][name] = {"step_times_s": times, "median_ms": 1e3 * statistics.median(times)}
        print(f"{name:12s} median {1e3 * statistics.median(times):8.1f} ms  {[round(1e3 * t) for t in times]}", flush=True)

    block("warmup", args.warmup)
    block("timed", args.steps)
    block("timed-again", args.steps)
    t0 = time.perf_counter()
    loss, _ = step.dispatch(it)
    t1 = time.perf_counter()
    loss.item()
    report["dispatch"] = {"host_ms": 1e3 * (t1 - t0), "wait_ms": 1e3 * (time.perf_counter() - t1)}
    print(f"dispatch     host {report['dispatch']['host_ms']:.1f} ms, then waited {report['dispatch']['wait_ms']:.1f} ms")
    t0 = time.perf_counter()
    pending = [step.dispatch(it) for _ in range(args.queued)]
    t1 = time.perf_counter()
    mx.eval(pending)
    report["queued"] = {"steps": args.queued, "host_ms": 1e3 * (t1 - t0),
                        "ms_per_step": 1e3 * (time.perf_counter() - t0) / args.queued}
    print(f"queued       {args.queued} steps: host {report['queued']['host_ms']:.1f} ms, "
          f"{report['queued']['ms_per_step']:.1f} ms a step")
    try:
        import torch
        from torch.profiler import ProfilerActivity, profile
        cuda = gpu and torch.cuda.is_available()
    except ImportError:
        cuda = False
    if cuda:
        torch.zeros(1, device="cuda")
        torch.cuda.synchronize()
        block("torch-init", args.steps)
        block("profiler", args.steps, around=lambda: profile(activities=[ProfilerActivity.CUDA]))
        block("after", args.steps)
    else:
        report["torch"] = "no CUDA torch here: the torch-init and profiler blocks did not run"
    write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
