"""Batched bf16 Newton–Schulz on the device: which formulation stays finite, how far from fp32, how fast.

Why: on the H200 our compiled step's loss went NaN at step 4 with Muon and never with AdamW; the
CPU (fp32 Newton–Schulz) never showed it. The candidates differ in the two places bf16 can lose
on a GPU: the Frobenius norm (a sum of squares over a whole matrix) and `mx.addmm`'s fused
alpha/beta epilogue on stacked (3-D) operands. `mlxchat.optim.newton_schulz` is the one kept.
"""

import argparse
import json
import time

import mlx.core as mx

from mlxchat.optim import newton_schulz

A_, B_, C_ = (3.4445, -4.7750, 2.0315)


def variant(norm_fp32: bool, addmm: bool):
    def ns(X, steps=5):
        n = mx.linalg.norm(X.astype(mx.float32) if norm_fp32 else X, axis=(-2, -1), keepdims=True)
        X = X / (n + 1e-7).astype(X.dtype)
        for _ in range(steps):
            A = X @ X.swapaxes(-1, -2)
            if addmm:
                B = mx.addmm(B_ * A, A, A, beta=1.0, alpha=C_)
                X = mx.addmm(A_ * X, B, X, beta=1.0, alpha=1.0)
            else:
                B = B_ * A + C_ * (A @ A)
                X = A_ * X + B @ X
        return X

    return ns


VARIANTS = {
    "addmm, bf16 norm (before)": variant(False, True),
    "addmm, fp32 norm": variant(True, True),
    "plain, bf16 norm": variant(False, False),
    "mlxchat.optim.newton_schulz": lambda X: newton_schulz(X, 5),
}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--scale", type=float, default=1e-3, help="gradient-like entry size")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    d, n = args.dim, args.depth
    stacks = {"square": (4 * n, d, d), "wide": (2 * n, d, 4 * d)}  # d12: 48 of 768², 24 of 768×3072
    rows = []
    for sname, shape in stacks.items():
        G = args.scale * mx.random.normal(shape, key=mx.random.key(0))
        ref = newton_schulz(G, 5)  # fp32
        mx.eval(ref)
        for vname, fn in VARIANTS.items():
            f = mx.compile(fn)
            out = f(G.astype(mx.bfloat16)).astype(mx.float32)
            mx.eval(out)
            times = []
            for _ in range(args.reps):
                mx.synchronize()
                t = time.perf_counter()
                mx.eval(f(G.astype(mx.bfloat16)))
                mx.synchronize()
                times.append(time.perf_counter() - t)
            row = {"stack": sname, "shape": shape, "variant": vname, "finite": bool(mx.isfinite(out).all().item()),
                   "max_abs_diff_vs_fp32": mx.abs(out - ref).max().item(), "ms": 1e3 * sorted(times)[len(times) // 2]}
            rows.append(row)
            print(f"{sname:6s} {str(shape):18s} {vname:30s} finite {row['finite']!s:5s} "
                  f"max|diff| {row['max_abs_diff_vs_fp32']:.4f}  {row['ms']:.2f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": mx.device_info().get("device_name"), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
