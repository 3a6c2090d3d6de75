"""The optimizer's multi-array CUDA kernels at ROUND = 1, 2, 4 and 8 packs a thread loaded before it stores.

    python bench/group_kernels.py --json results/gpu_group_kernels.json     # MLX's CUDA backend only

Why: in the thirteenth session's d20 profile (H100) these kernels moved their bytes at a fraction of
HBM's ~3.3 TB/s: `sum_of_squares` over the bf16 gradients 1.92 ms for 1.12 GB (0.6 TB/s), `nesterov_momentum`
3.94 ms for 4.7 GB (1.2 TB/s), and a one-launch Muon parameter step 2.89 ms for 3.9 GB (1.4 TB/s, slower
than MLX's 120 per-matrix kernels at 2.29 ms, so it was reverted). Loading ROUND packs (16-byte packs for
the norm) before storing any did not help (fourteenth session: ROUND 1 was as fast as any). What ptxas
showed instead: each kernel built its array-pointer table in every thread's stack (2.4 KB a thread), now
replaced by `cuda_kernels._block_owner`'s tree of comparisons. With the tree (fifteenth session, H100):
`sum_of_squares` 0.78 ms, `nesterov_momentum` 2.81 ms, the parameter step 2.66 ms against MLX's 5.03, which
brought it back as `cuda_kernels.orthogonal_step`. Shapes are d20's Muon groups (80 of 1280×1280, 20 of 1280×5120, 20 of
5120×1280). Outputs are compared with ROUND 1's (the norm: relative difference, another summation
order) or MLX's ops; nothing asserts. Times are the wall time of one `mx.eval` (host work included).
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402
from benchjson import write_json  # noqa: E402
from loss_kernel import cuda_bench_args, median_ms  # noqa: E402

from mlxchat import cuda_kernels as ck  # noqa: E402
from mlxchat.optim import orthogonal_step_per_matrix  # noqa: E402

ROUNDS = (1, 2, 4, 8)  # packs a thread loads before it stores


@contextlib.contextmanager
def round_of(name: str, packs: int):
    """`cuda_kernels`' constant `name` (a kernel's ROUND template argument) set to `packs` while inside."""
    original = getattr(ck, name)
    setattr(ck, name, packs)
    try:
        yield
    finally:
        setattr(ck, name, original)


def nesterov(grads, velocities, momentum, scale, dtype, packs: int):
    """`cuda_kernels.nesterov_momentum` at ROUND = packs."""
    with round_of("NESTEROV_ROUND", packs):
        return ck.nesterov_momentum(grads, velocities, momentum, scale, dtype)


def sum_of_squares(arrays, packs: int):
    """`cuda_kernels.sum_of_squares` at ROUND = packs."""
    with round_of("SUM_OF_SQUARES_ROUND", packs):
        return ck.sum_of_squares(arrays)


def orthogonal_step(params, stack, lr, packs: int | None):
    """Each params[k] − lr·stack[k]: `cuda_kernels.orthogonal_step` at ROUND = packs, or Muon's portable
    path, MLX's ops per matrix (None)."""
    if packs is None:
        return orthogonal_step_per_matrix(params, stack, lr)
    with round_of("ORTHOGONAL_STEP_ROUND", packs):
        return ck.orthogonal_step(params, stack, lr)


def max_difference(a: list[mx.array], b: list[mx.array]) -> float:
    return max(float(mx.abs(x.astype(mx.float32) - y.astype(mx.float32)).max()) for x, y in zip(a, b))


def main(argv=None) -> dict:
    args = cuda_bench_args(argv, __doc__)
    if args is None:
        return {}
    groups = [((1280, 1280), 80), ((1280, 5120), 20), ((5120, 1280), 20)]  # d20's Muon groups
    key = iter(range(10**6))

    def normal(shape, dtype=mx.float32):
        return mx.random.normal(shape, key=mx.random.key(next(key))).astype(dtype)

    data = [(shape, [normal(shape, mx.bfloat16) for _ in range(n)], [normal(shape) for _ in range(n)],
             [normal(shape) for _ in range(n)], normal((n, *shape), mx.bfloat16)) for shape, n in groups]
    mx.eval(data)
    m, scale, lr = mx.array(0.95), mx.array(0.5), mx.array(0.02)
    elements = sum(n * shape[0] * shape[1] for shape, n in groups)
    res: dict = {"elements": elements}

    def row(name, f, bytes_per_element, reference=None, relative=False):
        try:
            ms, _ = median_ms(f)
            out = {"ms": ms, "TB_per_s": elements * bytes_per_element / ms / 1e9}
            if reference is not None:
                a, b = f(), reference()
                d = max_difference(a if isinstance(a, list) else [a], b if isinstance(b, list) else [b])
                out["max_difference"] = d / (float(mx.abs(b).max()) if relative else 1.0)
        except Exception as e:  # a variant that cannot launch is a result too
            out = {"error": str(e)[:300]}
        res[name] = out
        print(f"{name:32s} {out}", flush=True)

    all_grads = [g for _, gs, _, _, _ in data for g in gs]
    for packs in ROUNDS:
        row(f"sum_of_squares, rounds of {packs}", lambda: sum_of_squares(all_grads, packs), 2,
            reference=lambda: sum_of_squares(all_grads, 1), relative=True)

    def each_group(f):
        return lambda: [x for _, gs, vs, ps, st in data for x in f(gs, vs, ps, st)]

    def nest(packs):
        def one(gs, vs, ps, st):
            velocities, stack = nesterov(gs, vs, m, scale, mx.bfloat16, packs)
            return [*velocities, stack]
        return each_group(one)

    for packs in ROUNDS:
        row(f"nesterov, rounds of {packs}", nest(packs), 12, reference=nest(1))

    def ortho(packs):
        return each_group(lambda gs, vs, ps, st: orthogonal_step(ps, st, lr, packs))

    row("orthogonal step, MLX per matrix", ortho(None), 10)
    for packs in ROUNDS:
        row(f"orthogonal step, rounds of {packs}", ortho(packs), 10, reference=ortho(None))
    write_json(args.json, {"device": mx.device_info().get("device_name"), "results": res})
    return res


if __name__ == "__main__":
    main()
