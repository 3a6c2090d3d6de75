"""Where a training step's GPU time goes, kernel by kernel, for MLX and torch alike.

`train_step.py --profile-steps K` calls `profile_kernels` after its timed steps. It uses torch's
profiler because CUPTI, under it, records every kernel the process launches on the GPU, whichever
library launched it (MLX's own kernels, cuBLAS, cuDNN, kernels inside CUDA graphs), so our step
and nanochat's are split the same way. Needs torch with CUDA; elsewhere it says so and records nothing.
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


def profile_kernels(step, steps: int, top: int = 40) -> dict:
    """Run `step()` `steps` times under the profiler; per-step GPU milliseconds by kernel and by kind."""
    try:
        import torch
        from torch.profiler import ProfilerActivity, profile
    except ImportError:
        return {"error": "torch is not installed: no kernel profile"}
    if not torch.cuda.is_available():
        return {"error": "no CUDA device visible to torch: no kernel profile"}
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f).get("traceEvents", [])
    per_name, per_kind = defaultdict(lambda: [0, 0.0]), defaultdict(float)
    starts, ends = [], []
    for e in events:
        if e.get("cat") not in ("kernel", "gpu_memcpy", "gpu_memset") or "dur" not in e:
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
    for r in prof["top"][:25]:
        print(f"  {r['ms_per_step']:8.2f} ms {r['calls_per_step']:7.1f}×  {r['kind']:<9} {r['name'][:110]}")
