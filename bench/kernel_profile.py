"""Where a training step's GPU time goes, kernel by kernel, for MLX and torch alike.

`train_step.py --profile-steps K` calls `profile_kernels` after its timed steps. It uses torch's
profiler because CUPTI, under it, records every kernel the process launches on the GPU, whichever
library launched it (MLX's own kernels, cuBLAS, cuDNN, kernels inside CUDA graphs), so our step
and nanochat's are split the same way. Needs torch with CUDA; elsewhere it says so and records nothing.
Host activity is recorded too, for the annotation around each step (`step_timeline`); for torch's
step that also records each of its operators, which slows its host side: there its timeline's host
figures are upper bounds (MLX's operators are not seen by torch's profiler).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import defaultdict

KINDS = (  # first match wins: (kind, substrings of the lower-cased kernel name)
    ("attention", ("flash", "fmha", "sdpa", "attention", "cudnn")),
    ("gemm", ("gemm", "xmma", "cutlass", "gmma", "matmul", "sm90_", "cublas")),
    ("copy", ("memcpy", "memset", "copy")),
)


def kind_of(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KINDS if any(k in low for k in keys)), "other")


STEP = "profiled_step"  # the host-side annotation around each profiled step


def is_gpu_work(event: dict) -> bool:
    """A kernel, copy or memset that ran on the GPU (and has its duration) in a chrome trace."""
    return event.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in event


def step_timeline(events: list[dict]) -> dict:
    """Where each annotated step's wall time went, from a chrome trace: the milliseconds before its
    first kernel starts (the host building and launching the step), with no kernel running inside it
    (gaps, the first-kernel wait included), and after its last kernel ends (the host noticing).

    Why: the kernels of d20's step (442 ms) fit in a 435 ms span while the step takes ~447 ms; this
    says whether the rest is launch latency, gaps between MLX's CUDA graphs, or the wait at the end."""
    windows = sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in events
                     if e.get("name") == STEP and e.get("cat") == "user_annotation" and "dur" in e)
    kernels = sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in events if is_gpu_work(e))
    rows = []
    for lo, hi in windows:
        inside = [(max(a, lo), min(b, hi)) for a, b in kernels if a < hi and b > lo]
        busy, reach = 0.0, lo
        for a, b in inside:  # the union of the kernels' intervals: concurrent kernels count once
            if b > reach:
                busy += b - max(a, reach)
                reach = b
        first = inside[0][0] if inside else hi
        last = max((b for _, b in inside), default=lo)
        rows.append({"wall": hi - lo, "before_first": first - lo, "idle": hi - lo - busy, "after_last": hi - last})
    if not rows:
        return {}
    return {f"{k}_ms": sum(r[k] for r in rows) / len(rows) / 1e3 for k in rows[0]}


def profile_kernels(step, steps: int, top: int = 40) -> dict:
    """Run `step()` `steps` times under the profiler; per-step GPU milliseconds by kernel and by kind,
    and the step's wall time against the time kernels ran (`step_timeline`)."""
    try:
        import torch
        from torch.profiler import ProfilerActivity, profile, record_function
    except ImportError:
        return {"error": "torch is not installed: no kernel profile"}
    if not torch.cuda.is_available():
        return {"error": "no CUDA device visible to torch: no kernel profile"}
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            with record_function(STEP):
                step()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f).get("traceEvents", [])
    per_name, per_kind = defaultdict(lambda: [0, 0.0]), defaultdict(float)
    starts, ends = [], []
    for e in events:
        if not is_gpu_work(e):
            continue
        name, us = e.get("name", "?"), float(e["dur"])
        per_name[name][0] += 1
        per_name[name][1] += us
        per_kind[kind_of(name)] += us
        starts.append(float(e["ts"]))
        ends.append(float(e["ts"]) + us)
    if not starts:
        return {"error": "the profiler recorded no GPU kernels"}
    busy_us = sum(per_kind.values())
    rows = sorted(per_name.items(), key=lambda kv: -kv[1][1])
    return {
        "steps": steps,
        "kernel_ms_per_step": busy_us / steps / 1e3,
        "span_ms_per_step": (max(ends) - min(starts)) / steps / 1e3,
        "kernels_per_step": sum(c for c, _ in per_name.values()) / steps,
        "timeline": step_timeline(events),
        "by_kind_ms_per_step": {k: v / steps / 1e3 for k, v in sorted(per_kind.items(), key=lambda kv: -kv[1])},
        "top": [{"name": n[:200], "kind": kind_of(n), "calls_per_step": c / steps, "ms_per_step": us / steps / 1e3}
                for n, (c, us) in rows[:top]],
    }


def print_profile(label: str, prof: dict) -> None:
    if "error" in prof:
        print(f"{label}: {prof['error']}")
        return
    kinds = ", ".join(f"{k} {v:.1f}" for k, v in prof["by_kind_ms_per_step"].items())
    print(f"{label}: kernels {prof['kernel_ms_per_step']:.1f} ms of a {prof['span_ms_per_step']:.1f} ms span per step, "
          f"{prof['kernels_per_step']:.0f} kernels ({kinds})")
    if prof.get("timeline"):
        t = prof["timeline"]
        print(f"{label}: a step's {t['wall_ms']:.1f} ms wall: {t['before_first_ms']:.1f} ms before its first kernel, "
              f"{t['idle_ms']:.1f} ms with no kernel running (that included), {t['after_last_ms']:.1f} ms after its last")
    for r in prof["top"][:25]:
        print(f"  {r['ms_per_step']:8.2f} ms {r['calls_per_step']:7.1f}×  {r['kind']:<9} {r['name'][:110]}")
