"""The model's skinny GEMMs in every layout MLX can be asked for, against torch's cuBLAS in the same run.

Why: at d12's shapes (M = B*T = 65536 rows against 768/3072 columns) MLX's matmul measured 0.51-0.61x
torch's, while a square GEMM is 0.88x. The layout (which operand is transposed, whether the product is
computed transposed, 2-D vs 3-D batched) changes which cuBLASLt kernel the heuristic picks, so each
candidate is timed here before any of it is built into the model.

Each GEMM is one of the training step's: forward `x @ W.T`, the input gradient `dy @ W`, and the weight
gradient `dy.T @ x` (a K = 65536 reduction).
"""

import argparse
import json
import time

import mlx.core as mx


def shapes(dim, rows, vocab):
    """(name, M, N, K) of the step's GEMMs: out[M, N] = a[M, K] @ b[K, N]."""
    hidden = 4 * dim
    return [
        ("fc fwd  x@Wfc.T", rows, hidden, dim),
        ("proj fwd h@Wproj.T", rows, dim, hidden),
        ("qkv fwd x@Wq.T", rows, dim, dim),
        ("fc dX  dh@Wfc", rows, dim, hidden),
        ("fc dW  dh.T@x", hidden, dim, rows),
        ("proj dW dy.T@h", dim, hidden, rows),
        ("head fwd (chunk 16384)", 16384, vocab, dim),
    ]


def mlx_candidates(M, N, K, dtype, batch):
    """Ways to get out[M, N] from operands stored as the model stores them."""
    a = mx.random.normal((M, K)).astype(dtype)
    w_nk = mx.random.normal((N, K)).astype(dtype)  # nn.Linear's layout (out, in)
    w_kn = mx.contiguous(w_nk.T)                   # the same weight stored (in, out)
    a_km = mx.contiguous(a.T)                      # the operand stored transposed (for dW)
    mx.eval(a, w_nk, w_kn, a_km)
    c = {
        "a @ w_nk.T": lambda: a @ w_nk.T,
        "a @ w_kn": lambda: a @ w_kn,
        "(w_nk @ a.T).T": lambda: (w_nk @ a.T).T,
        "a_km.T @ w_kn": lambda: a_km.T @ w_kn,
        "addmm(0, a, w_nk.T)": lambda: mx.addmm(mx.zeros((N,), dtype), a, w_nk.T),
    }
    if M % batch == 0 and M >= batch * 128:
        a3 = a.reshape(batch, M // batch, K)
        c["3-D a @ w_nk.T"] = lambda: a3 @ w_nk.T
    if K % batch == 0 and K >= batch * 128:  # split-K: batched partial products, then a sum
        ak = a.reshape(M, batch, K // batch).transpose(1, 0, 2)
        wk = w_kn.reshape(batch, K // batch, N)
        c["split-K sum"] = lambda: (ak @ wk).sum(axis=0)
    return c


def time_mlx(fn, reps):
    """Median of `reps` timings of 5 back-to-back products (one eval), in seconds per product."""
    mx.eval(fn())
    times = []
    for _ in range(reps):
        mx.synchronize()
        t = time.perf_counter()
        mx.eval([fn() for _ in range(5)])
        mx.synchronize()
        times.append((time.perf_counter() - t) / 5)
    return sorted(times)[len(times) // 2]


def time_torch(M, N, K, reps):
    import torch

    a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
    fn = lambda: a @ w.t()  # noqa: E731  (F.linear's product)
    fn()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) / 5)
    return sorted(times)[len(times) // 2]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--rows", type=int, default=65536, help="B*T")
    p.add_argument("--vocab", type=int, default=65536)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--batch", type=int, default=32, help="leading dim of the 3-D / split-K variants")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--torch", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    dtype = getattr(mx, args.dtype)
    rows = []
    for name, M, N, K in shapes(args.dim, args.rows, args.vocab):
        flop = 2 * M * N * K
        row = {"gemm": name, "M": M, "N": N, "K": K, "mlx": {}}
        if args.torch:
            row["torch_tflops"] = flop / time_torch(M, N, K, args.reps) / 1e12
        for cand, fn in mlx_candidates(M, N, K, dtype, args.batch).items():
            row["mlx"][cand] = flop / time_mlx(fn, args.reps) / 1e12
        best = max(row["mlx"], key=row["mlx"].get)
        ref = row.get("torch_tflops")
        print(f"{name:26s} M{M} N{N} K{K}" + (f"  torch {ref:6.1f}" if ref else ""))
        for cand, tf in row["mlx"].items():
            ratio = f"  {tf / ref:5.2f}x torch" if ref else ""
            print(f"    {cand:22s} {tf:6.1f} TFLOP/s{ratio}{'  <- best' if cand == best else ''}")
        rows.append(row)
        mx.clear_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": mx.device_info().get("device_name"), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
