"""The CUDA loss kernel (`cuda_kernels.softcap_cross_entropy`) against variants, on one loss chunk
(4096 x 65536 bf16, 1/97 of the rows ignored).

    python bench/loss_kernel.py --json results/gpu_loss_kernel.json     # MLX's CUDA backend only

  current   the kernel as the model runs it, at 256, 512 (its LOSS_THREADS) and 1024 threads a row
  held      each row read once: its 16-byte packs stay on chip between the two passes, the first REGS
            of a thread's packs in registers, the rest in dynamic shared memory
            (`mx.fast.cuda_kernel(shared_memory=...)`, up to 227 KB a block on sm_90). The eleventh
            session's all-in-registers kernel could not launch (no launch bounds: over 64K registers a
            block); these fit (ptxas: 31-164 registers). Thirteenth session: no faster.
  rounds    the current kernel's two passes, each loading ROUND packs a thread before it computes on
            them (more loads in flight, a thread's exps independent of its next loads)
Outputs are compared with the current kernel's; nothing asserts.
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402
from benchjson import write_json  # noqa: E402

from mlxchat import cuda_kernels as ck  # noqa: E402
from mlxchat import gpt

HELD = r"""
  constexpr int N = 16 / sizeof(T);
  constexpr int PACKS = V / N;
  constexpr int ITEMS = (PACKS + BLOCK - 1) / BLOCK;
  using P = Pack<T, N>;
  extern __shared__ P spill[];
  const int row = blockIdx.x;
  const int tid = threadIdx.x;
  const P* zr = reinterpret_cast<const P*>(z + (size_t)row * V);
  P* dr = reinterpret_cast<P*>(dz + (size_t)row * V);
  const int target = targets[row];
  __shared__ float partial[BLOCK / 32];
  P held[REGS > 0 ? REGS : 1];
  float s = 0.0f;
  #pragma unroll
  for (int k = 0; k < ITEMS; ++k) {
    const int p = k * BLOCK + tid;
    if (ITEMS * BLOCK == PACKS || p < PACKS) {
      const P x = zr[p];
      if (k < REGS) held[k < REGS ? k : 0] = x; else spill[(k - REGS) * BLOCK + tid] = x;
      #pragma unroll
      for (int j = 0; j < N; ++j) s += __expf(CAP * softcap_tanh<T>(static_cast<float>(x.v[j]) / CAP));
    }
  }
  const float lse = logf(block_reduce<BLOCK, false>(s, partial));
  const float g = target < 0 ? 0.0f : weights[row];
  if (tid == 0) losses[row] = target < 0 ? 0.0f : lse - CAP * softcap_tanh<T>(static_cast<float>(z[(size_t)row * V + target]) / CAP);
  #pragma unroll
  for (int k = 0; k < ITEMS; ++k) {
    const int p = k * BLOCK + tid;
    if (ITEMS * BLOCK == PACKS || p < PACKS) {
      const P x = k < REGS ? held[k < REGS ? k : 0] : spill[(k - REGS) * BLOCK + tid];
      P out;
      #pragma unroll
      for (int j = 0; j < N; ++j) {
        const float t = gradient_tanh<T>(static_cast<float>(x.v[j]) / CAP);
        const float q = __expf(CAP * t - lse) - (p * N + j == target ? 1.0f : 0.0f);
        out.v[j] = static_cast<T>(q * g * (1.0f - t * t));
      }
      dr[p] = out;
    }
  }
"""


# The current kernel's start (its ignored rows included), then its two passes in rounds.
ROUNDS = ck._LOSS_SOURCE[: ck._LOSS_SOURCE.index("  float s = 0.0f;")] + r"""
  float s = 0.0f;
  for (int base = tid * N; base < V; base += BLOCK * N * ROUND) {
    Pack<T, N> x[ROUND];
    load_round<ROUND>(x, zr, base, BLOCK * N, V);
    #pragma unroll
    for (int r = 0; r < ROUND; ++r) {
      if (base + r * BLOCK * N < V) {
        #pragma unroll
        for (int j = 0; j < N; ++j) s += __expf(CAP * softcap_tanh<T>(static_cast<float>(x[r].v[j]) / CAP));
      }
    }
  }
  const float lse = logf(block_reduce<BLOCK, false>(s, partial));
  if (tid == 0) losses[row] = lse - CAP * softcap_tanh<T>(static_cast<float>(zr[target]) / CAP);
  const float g = weights[row];
  for (int base = tid * N; base < V; base += BLOCK * N * ROUND) {
    Pack<T, N> x[ROUND];
    load_round<ROUND>(x, zr, base, BLOCK * N, V);
    #pragma unroll
    for (int r = 0; r < ROUND; ++r) {
      const int i = base + r * BLOCK * N;
      if (i < V) {
        Pack<T, N> out;
        #pragma unroll
        for (int j = 0; j < N; ++j) {
          const float t = gradient_tanh<T>(static_cast<float>(x[r].v[j]) / CAP);
          const float q = __expf(CAP * t - lse) - (i + j == target ? 1.0f : 0.0f);
          out.v[j] = static_cast<T>(q * g * (1.0f - t * t));
        }
        *reinterpret_cast<Pack<T, N>*>(dr + i) = out;
      }
    }
  }
"""


def launcher(kernel, block: int, template: list):
    """A call of `kernel` as the model calls its loss kernel: a block of BLOCK threads a row."""
    def call(z, t, w):
        rows, v = z.shape
        return kernel(inputs=[z, t, w], template=[("T", z.dtype), ("V", v), ("BLOCK", block), *template],
                      grid=(rows * block, 1, 1), threadgroup=(block, 1, 1),
                      output_shapes=[(rows,), z.shape], output_dtypes=[mx.float32, z.dtype])

    return call


def rounds_kernel(block: int, packs: int):
    """The `rounds` variant: BLOCK threads a row, each loading `packs` packs before computing on them."""
    return launcher(mx.fast.cuda_kernel(name="xent_rounds", input_names=["z", "targets", "weights"], output_names=["losses", "dz"],
                                        source=f"  constexpr float CAP = {gpt.SOFTCAP!r}f;\n  constexpr int ROUND = {packs};\n" + ROUNDS,
                                        header=ck._HEADER), block, [])


def current_kernel(block: int):
    """`cuda_kernels.softcap_cross_entropy` at BLOCK threads a row."""
    def call(z, t, w):
        original = ck.LOSS_THREADS
        ck.LOSS_THREADS = block
        try:
            return ck.softcap_cross_entropy(z, t, w, gpt.SOFTCAP)
        finally:
            ck.LOSS_THREADS = original

    return call


def held_kernel(block: int, regs: int, vocab: int, itemsize: int):
    """The `held` variant: BLOCK threads a row, REGS packs a thread in registers, the rest in shared memory."""
    items = (vocab // (16 // itemsize) + block - 1) // block
    kernel = mx.fast.cuda_kernel(name=f"xent_held_{block}_{regs}", input_names=["z", "targets", "weights"],
                                 output_names=["losses", "dz"], source=f"  constexpr float CAP = {gpt.SOFTCAP!r}f;\n" + HELD,
                                 header=ck._HEADER, shared_memory=max(0, items - regs) * block * 16)
    return launcher(kernel, block, [("REGS", regs)])


def median_ms(f, reps: int = 30) -> tuple[float, float]:
    """(median, min) milliseconds of `mx.eval(f())` after 3 untimed calls."""
    for _ in range(3):
        mx.eval(f())
    mx.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        mx.eval(f())
        times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times)[reps // 2], 1e3 * min(times)


def cuda_bench_args(argv, doc: str) -> argparse.Namespace | None:
    """A kernel benchmark's `--json` argument, or None (said in one line) where there is no CUDA GPU."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if not ck.available():
        print("needs MLX's CUDA backend (mlx-cuda) with the GPU as the default device: nothing measured")
        return None
    return args


def main(argv=None) -> dict:
    args = cuda_bench_args(argv, __doc__)
    if args is None:
        return {}
    rows, vocab = 4096, 65536
    z = (mx.random.normal((rows, vocab), key=mx.random.key(1)) * 4).astype(mx.bfloat16)
    t = mx.random.randint(0, vocab, (rows,), key=mx.random.key(2)).astype(mx.int32)
    t = mx.where(mx.arange(rows) % 97 == 0, -1, t)  # some ignored rows, as SFT's masks make
    w = mx.ones((rows,), mx.float32)
    mx.eval(z, t, w)
    cur_loss, cur_dz = ck.softcap_cross_entropy(z, t, w, gpt.SOFTCAP)
    mx.eval(cur_loss, cur_dz)
    calls = {"current": current_kernel(ck.LOSS_THREADS)}
    for block in (256, 1024):
        calls[f"current{block}"] = current_kernel(block)
    for block, packs in [(512, 2), (512, 4), (256, 4), (1024, 2)]:
        calls[f"rounds{block}_p{packs}"] = rounds_kernel(block, packs)
    for block, regs in [(1024, 0), (1024, 2), (1024, 4), (512, 0), (512, 4), (512, 8), (256, 8), (256, 16)]:
        calls[f"held{block}_r{regs}"] = held_kernel(block, regs, vocab, z.dtype.size)
    res = {}
    for name, call in calls.items():
        try:
            ms, ms_min = median_ms(lambda: call(z, t, w))
            loss, dz = call(z, t, w)
            res[name] = dict(ms=ms, ms_min=ms_min, loss_maxdiff=float(mx.abs(loss - cur_loss).max()),
                             dz_maxdiff=float(mx.abs(dz.astype(mx.float32) - cur_dz.astype(mx.float32)).max()),
                             dz_equal=bool(mx.array_equal(dz, cur_dz)))
        except Exception as e:  # a variant that cannot launch is a result too
            res[name] = {"error": str(e)[:300]}
        print(name, res[name], flush=True)
    write_json(args.json, {"device": mx.device_info().get("device_name"), "rows": rows, "vocab": vocab, "results": res})
    return res


if __name__ == "__main__":
    main()
