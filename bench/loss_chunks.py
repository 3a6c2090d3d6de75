"""The chunked head + loss alone, compiled, at several chunk sizes: time and peak memory.

Why: at d12 B32×2048, vocab 65536, the step's peak (52.5 GiB on the H200) is the trunk's kept
activations (28.4 GiB) plus the head + loss's temporaries (19.6 GiB eager at 2^29 logits per
chunk), both alive at the end of the forward. The temporaries scale with the chunk; the time should
not, until the chunks get small enough for the GEMMs to shrink. This picks the chunk.
"""

import argparse
import json
import time

import mlx.core as mx

from mlxchat import gpt


def measure(rows, dim, vocab, dtype, elements, kernel, reps):
    loss_fn = gpt._sequential_chunk_losses(max(1, min(rows, elements // vocab)), kernel)
    h = mx.random.normal((rows, dim)).astype(dtype)
    w = 0.02 * mx.random.normal((vocab, dim))
    t = mx.random.randint(0, vocab, (rows,))
    mx.eval(h, w, t)
    step = mx.compile(mx.value_and_grad(lambda h, w: loss_fn(h, t, w).mean(), argnums=(0, 1)))
    mx.eval(step(h, w))
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    times = []
    for _ in range(reps):
        mx.synchronize()
        t0 = time.perf_counter()
        mx.eval(step(h, w))
        mx.synchronize()
        times.append(time.perf_counter() - t0)
    return {"chunk_elements": elements, "chunk_rows": min(rows, elements // vocab),
            "ms": 1e3 * sorted(times)[len(times) // 2], "peak_above_inputs_gib": (mx.get_peak_memory() - base) / 2**30}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=65536, help="B*T")
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--vocab", type=int, default=65536)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--log2-chunks", default="26,27,28,29")
    p.add_argument("--kernel", default=None, choices=("fused", "portable"), help="default: mlxchat's run-time choice")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    kernel = a.kernel or gpt.loss_kernel()
    rows = []
    for e in (int(x) for x in a.log2_chunks.split(",")):
        r = measure(a.rows, a.dim, a.vocab, getattr(mx, a.dtype), 1 << e, kernel, a.reps)
        rows.append(r)
        print(f"2^{e} logits per chunk ({r['chunk_rows']} rows, {kernel}): {r['ms']:.1f} ms, "
              f"peak {r['peak_above_inputs_gib']:.2f} GiB above the inputs", flush=True)
        mx.clear_cache()
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "kernel": kernel, "device": mx.device_info().get("device_name"), "rows": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()
