"""Decoding throughput: `mlxchat.engine` against `mlx_lm`'s generate_step on the same published model.

    python bench/decode.py --model DIR                       # a folder written by `mlxchat publish`
    python bench/decode.py --model DIR --dtype bfloat16 --prompt-len 512 --new-tokens 256 --json OUT

Both sides load the same folder (ours through `mlxchat.interop.load_published`, mlx-lm through
`mlx_lm.load`, which builds its `nanochat` architecture), cast their weights to --dtype, and
decode greedily from the same random prompt with no stop token, so they do the same work:
  prefill tok/s = prompt tokens / time to the first generated token (prefill + one sample)
  decode tok/s  = rows × (new tokens − 1) / time from the first token to the last
Rows: ours batch 1, mlx-lm batch 1 (`mlx_lm.generate.generate_step`, token ids in and out, no
detokenizing), ours batch 1 without the compiled step (`compiled=False`: the forward per token over
growing caches, as mlx-lm decodes), ours at --batch rows (`num_samples`: one prefill, rows decoded together). After
one untimed warm-up each, the variants take turns --reps times; the median is reported. Greedy tokens of ours and
mlx-lm at batch 1 are compared (they should agree, up to near-ties in the logits).

This is a benchmark, never a test: nothing here asserts. It runs unchanged on CPU and GPU (the
default device; --device cpu forces the CPU).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

from benchjson import write_json

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a folder written by `mlxchat publish`")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batch", type=int, default=8, help="rows for ours at batch > 1")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="weights and compute; auto = bfloat16 on GPU, float32 on CPU")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "gpu"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true",
                   help="also one generation of each batch-1 variant under the kernel profiler (CUDA with torch)")
    p.add_argument("--json", default=None, help="write the results here")
    return p.parse_args(argv)


def timed_generation(tokens) -> tuple[float, float, list]:
    """(seconds to the first yielded step, seconds from it to the last, the steps) of a
    generator of per-step outputs."""
    t0 = time.perf_counter()
    steps = [next(tokens)]
    t1 = time.perf_counter()
    steps.extend(tokens)
    return t1 - t0, time.perf_counter() - t1, steps


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.device != "auto":
        mx.set_default_device(mx.cpu if args.device == "cpu" else mx.gpu)
    on_gpu = mx.default_device() == mx.gpu
    dtype = getattr(mx, args.dtype if args.dtype != "auto" else ("bfloat16" if on_gpu else "float32"))

    import mlx_lm
    from mlx_lm.generate import generate_step

    from mlxchat import engine
    from mlxchat.interop import load_published

    ours, _ = load_published(Path(args.model))
    ours.set_dtype(dtype)
    ours.compute_dtype = dtype
    theirs, _ = mlx_lm.load(args.model)
    theirs.set_dtype(dtype)
    mx.eval(ours.parameters(), theirs.parameters())
    vocab = ours.config.vocab_size
    prompt = mx.random.randint(0, vocab, (args.prompt_len,), key=mx.random.key(args.seed)).tolist()
    n = args.new_tokens

    def run_ours(rows: int, compiled: bool = True):
        return engine.generate(ours, prompt, n, temperature=0.0, num_samples=rows, compiled=compiled)

    def run_mlx_lm():
        steps = generate_step(mx.array(prompt), theirs, max_tokens=n, sampler=lambda logprobs: mx.argmax(logprobs, axis=-1))
        return ([int(tok)] for tok, _ in steps)

    variants = {"ours, batch 1": (lambda: run_ours(1), 1), "mlx-lm, batch 1": (run_mlx_lm, 1),
                "ours eager, batch 1": (lambda: run_ours(1, compiled=False), 1),
                f"ours, batch {args.batch}": (lambda: run_ours(args.batch), args.batch)}
    for make, _ in variants.values():
        timed_generation(make())  # warm-up
    runs = {name: {"prefill": [], "decode": []} for name in variants}
    greedy = {}
    for _ in range(args.reps):  # the variants take turns, so a busy spell of a shared machine hits them alike
        for name, (make, rows) in variants.items():
            t_first, t_rest, steps = timed_generation(make())
            runs[name]["prefill"].append(args.prompt_len / t_first)
            runs[name]["decode"].append(rows * (len(steps) - 1) / t_rest)
            greedy[name] = [column[0] for column in steps]
    results = {}
    for name, (_, rows) in variants.items():
        prefill, decode = runs[name]["prefill"], runs[name]["decode"]
        results[name] = {"rows": rows, "prefill_tok_per_s": statistics.median(prefill),
                         "decode_tok_per_s": statistics.median(decode), "prefill_runs": prefill, "decode_runs": decode}
        print(f"  {name:<16} prefill {results[name]['prefill_tok_per_s']:>10,.0f} tok/s   "
              f"decode {results[name]['decode_tok_per_s']:>9,.1f} tok/s", flush=True)

    if args.profile:  # a step of the profile is one token: GPU time and kernels per token, the span's gaps host time
        from kernel_profile import print_profile, profile_kernels
        for name, (make, rows) in variants.items():
            if rows == 1:
                prof = profile_kernels(lambda: [None for _ in make()], 1)
                if "error" not in prof:
                    prof = {**prof, "tokens": n, "kernels_per_token": prof["kernels_per_step"] / n,
                            "kernel_ms_per_token": prof["kernel_ms_per_step"] / n, "span_ms_per_token": prof["span_ms_per_step"] / n}
                    print(f"  {name}: per token {prof['kernel_ms_per_token']:.3f} ms of GPU kernels, "
                          f"{prof['kernels_per_token']:.1f} kernels, {prof['span_ms_per_token']:.3f} ms span")
                print_profile(name + " (one generation)", prof)
                results[name]["kernel_profile"] = prof
    ref, mine, eager = results["mlx-lm, batch 1"], results["ours, batch 1"], results["ours eager, batch 1"]
    agree = sum(a == b for a, b in zip(greedy["ours, batch 1"], greedy["mlx-lm, batch 1"]))
    report = {
        "device": mx.device_info().get("device_name", "?"),
        "mlx": mx.__version__,
        "mlx_lm": mlx_lm.__version__,
        "python": platform.python_version(),
        "model": str(args.model),
        "model_config": ours.config.to_dict(),
        "config": {k: getattr(args, k) for k in ("prompt_len", "new_tokens", "batch", "reps", "seed")} | {"dtype": str(dtype)},
        "results": results,
        "ratios_ours_over_mlx_lm": {"prefill": mine["prefill_tok_per_s"] / ref["prefill_tok_per_s"],
                                    "decode": mine["decode_tok_per_s"] / ref["decode_tok_per_s"],
                                    "decode_eager": eager["decode_tok_per_s"] / ref["decode_tok_per_s"]},
        "greedy_tokens_agreeing": f"{agree}/{n}",
        "command": "python bench/decode.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    r = report["ratios_ours_over_mlx_lm"]
    print(f"ours / mlx-lm at batch 1: prefill {r['prefill']:.2f}x, decode {r['decode']:.2f}x "
          f"(eager {r['decode_eager']:.2f}x) | "
          f"greedy tokens agreeing {agree}/{n} | {report['device']} | {dtype}")
    write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
