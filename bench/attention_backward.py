"""Causal attention forward and backward alone: MLX's cuDNN path against torch's, at the model's shapes.

Why: in the d20 step's kernel profile (`gpu_d20_b32_s7.json`) cuDNN's flash backward kernel, the same
`knob_26` kernel in both, takes 3.5 ms a call under MLX and 1.9 ms under torch, while the forward
kernels take the same time and the step's kernels barely overlap (480 ms of kernels in a 473 ms span), so
concurrency does not explain it. Timed alone, the two sides show whether the gap lives in the call
itself or in what runs around it in the step. Measured alone (`gpu_attention_backward_d{12,20}.json`): it
lives in the call, 1.70x torch's backward at both shapes with equal forwards. MLX asks cuDNN for a
bottom-right aligned causal mask (`set_causal_mask_bottom_right`; torch a top-left one, the same mask
for T_q = T_kv) and runs the plan as a native cuDNN CUDA graph (`populate_cuda_graph`; torch executes
it): the next suspects. The bias row shows MLX's causal backward does skip the masked tiles.

Rows (each the median of --reps, after a warm-up; GPU time by the host clock after a sync):
  mlx causal   mx.fast.scaled_dot_product_attention(mask="causal"), q, k, v as the model hands them
               (B, H, T, D) views of (B, T, H, D) buffers; forward, and forward + backward
  mlx bias     the same with the causal mask as an additive array (cuDNN's bias input: no tile skipping),
               the cost of a backward that skips nothing
  torch cudnn  F.scaled_dot_product_attention(is_causal=True) under the cuDNN backend, the same layout
  cudnn top-left / bottom-right   the backward alone through cuDNN's own frontend (`nvidia-cudnn-frontend`,
               where installed) on torch's buffers, with torch's causal mask and with MLX's, and the
               behaviour note MLX selects (SUPPORTS_CUDA_GRAPH_NATIVE_API): which of MLX's two
               departures costs the time. Measured (`gpu_attention_backward_d20_s8.json`): the mask, with the
               same plan on both (engine 2 under cuDNN 9.14, engine 6 under 9.19; KERNEL_CFG 26); the note costs nothing.
  ours cpu     `mlxchat.cpu_attention.causal` (two GEMMs around an arithmetic softmax; nineteenth session),
               where it runs: on the CPU in fp32 (`--dtype float32`); `mlx causal / ours` is the speedup.
The backward's share is (forward + backward) - forward. Nothing asserts; on a machine without CUDA the
torch rows say so and the MLX rows run on the default device. q and k are RMS-normed, as the model's are.

    python bench/attention_backward.py --batch 32 --heads 10 --seq-len 2048 --head-dim 128 --json OUT
    LD_PRELOAD=.../libopenblas.so.0 python bench/attention_backward.py --batch 4 --heads 2 --seq-len 256 \
        --head-dim 128 --dtype float32 --json OUT    # the CPU's d4 training shard
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from benchjson import write_json

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--heads", type=int, default=10)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def flops(b: int, h: int, t: int, d: int) -> tuple[float, float]:
    """Causal forward and backward FLOPs (half the T x T square; the backward is 2.5x the forward)."""
    fwd = 4 * b * h * t * t * d / 2
    return fwd, 2.5 * fwd


def time_it(fn, reps: int, sync) -> float:
    """Median seconds of `fn()` over `reps`, each waited for."""
    sync(fn())
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def mlx_rows(args) -> dict:
    from mlxchat import cpu_attention

    b, h, t, d = args.batch, args.heads, args.seq_len, args.head_dim
    dtype = getattr(mx, args.dtype)
    keys = mx.random.split(mx.random.key(0), 4)
    q, k, v, do = (mx.random.normal((b, t, h, d), key=key).astype(dtype).transpose(0, 2, 1, 3) for key in keys)
    q, k = (mx.fast.rms_norm(x, None, 1e-6) for x in (q, k))
    bias = mx.where(mx.arange(t)[:, None] >= mx.arange(t)[None, :], 0.0, -float("inf")).astype(dtype)
    mx.eval(q, k, v, do, bias)
    scale = d ** -0.5
    rows = {}
    attentions = {name: lambda q, k, v, mask=mask: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
                  for name, mask in (("mlx causal", "causal"), ("mlx bias", bias))}
    if cpu_attention.runs_for(q, k, "causal"):
        attentions["ours cpu"] = lambda q, k, v: cpu_attention.causal(q, k, v, scale)
    else:
        rows["ours cpu"] = {"error": "runs on the CPU in fp32 only (--dtype float32)"}
    for name, fwd in attentions.items():
        grads = mx.compile(lambda q, k, v, do, fwd=fwd: mx.vjp(fwd, (q, k, v), (do,))[1])
        f = time_it(lambda fwd=fwd: fwd(q, k, v), args.reps, mx.eval)
        fb = time_it(lambda grads=grads: grads(q, k, v, do), args.reps, mx.eval)
        rows[name] = {"forward_ms": f * 1e3, "forward_backward_ms": fb * 1e3, "backward_ms": (fb - f) * 1e3}
    return rows


def torch_row(args) -> dict:
    try:
        import torch
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return {"error": "torch is not installed"}
    if not torch.cuda.is_available():
        return {"error": "no CUDA device visible to torch"}
    b, h, t, d = args.batch, args.heads, args.seq_len, args.head_dim
    q, k, v, do = (torch.randn(b, t, h, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(4))
    q, k, v = (x.requires_grad_() for x in (q, k, v))

    def sync(_):
        torch.cuda.synchronize()

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        def fwd():
            with torch.no_grad():
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        def fwd_bwd():
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return torch.autograd.grad(out, (q, k, v), do)

        f, fb = time_it(fwd, args.reps, sync), time_it(fwd_bwd, args.reps, sync)
    return {"forward_ms": f * 1e3, "forward_backward_ms": fb * 1e3, "backward_ms": (fb - f) * 1e3,
            "torch": torch.__version__}


def cudnn_rows(args) -> dict:
    """The backward alone through cuDNN's frontend: torch's causal mask against MLX's bottom-right one."""
    try:
        import cudnn
        import torch
    except ImportError:
        return {"cudnn frontend": {"error": "torch or nvidia-cudnn-frontend is not installed"}}
    if not torch.cuda.is_available():
        return {"cudnn frontend": {"error": "no CUDA device visible to torch"}}
    b, h, t, d = args.batch, args.heads, args.seq_len, args.head_dim
    q, k, v, do, o = (torch.randn(b, t, h, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(5))
    stats = torch.empty(b, h, t, 1, device="cuda", dtype=torch.float32)
    grads = [torch.empty_like(x) for x in (q, k, v)]
    handle = cudnn.create_handle()
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)

    def plan(op, inputs, outputs, mask, native=False):
        """(run, the plan's engine and knobs) of `op(graph, *input tensors)` bound to these buffers."""
        g = cudnn.pygraph(io_data_type=cudnn.data_type.BFLOAT16, intermediate_data_type=cudnn.data_type.FLOAT,
                          compute_data_type=cudnn.data_type.FLOAT, handle=handle)
        ins = [g.tensor_like(x) for x in inputs]
        outs = op(g, *ins, attn_scale=d ** -0.5, **mask)
        for tensor, buf in zip(outs, outputs):
            tensor.set_output(True).set_data_type(cudnn.data_type.FLOAT if buf.dtype == torch.float32 else
                                                  cudnn.data_type.BFLOAT16)
            tensor.set_dim(list(buf.size())).set_stride(list(buf.stride()))
        g.validate()
        g.build_operation_graph()
        g.create_execution_plans([cudnn.heur_mode.A])
        if native:
            g.select_behavior_notes([cudnn.behavior_note.SUPPORTS_CUDA_GRAPH_NATIVE_API])
        g.check_support()
        g.build_plans()
        pack = dict(zip(ins + list(outs), list(inputs) + list(outputs)))
        ws = torch.empty(max(g.get_workspace_size(), 1), device="cuda", dtype=torch.uint8)
        return (lambda: g.execute(pack, ws, handle=handle)), g.get_engine_and_knobs_at_index(0)

    def forward(g, q, k, v, **kw):
        return g.sdpa(name="fwd", q=q, k=k, v=v, generate_stats=True, **kw)

    def backward(g, q, k, v, o, do, stats, **kw):
        return g.sdpa_backward(name="bwd", q=q, k=k, v=v, o=o, dO=do, stats=stats, **kw)

    rows = {}
    for name, mask in (("top-left", {"use_causal_mask": True}), ("bottom-right", {"use_causal_mask_bottom_right": True})):
        plan(forward, (q, k, v), (o, stats), mask)[0]()  # the forward's O and stats for the backward
        for native in (False, True):
            run, (engine, knobs) = plan(backward, (q, k, v, o, do, stats), grads, mask, native)
            ms = time_it(run, args.reps, lambda _: torch.cuda.synchronize()) * 1e3
            rows[f"cudnn {name}" + (" native" if native else "")] = {
                "backward_ms": ms, "plan": f"engine {engine} {dict((str(k), v) for k, v in knobs.items())}",
                "cudnn": cudnn.backend_version()}
    return rows


def main(argv=None) -> dict:
    args = parse_args(argv)
    rows = {**mlx_rows(args), "torch cudnn": torch_row(args), **cudnn_rows(args)}
    fwd_flops, bwd_flops = flops(args.batch, args.heads, args.seq_len, args.head_dim)
    print(f"B {args.batch} | H {args.heads} | T {args.seq_len} | D {args.head_dim} | {args.dtype} | {mx.default_device()}")
    for name, r in rows.items():
        if "error" in r:
            print(f"  {name:<12} {r['error']}")
            continue
        if "forward_ms" not in r:
            print(f"  {name:<26} backward {r['backward_ms']:7.3f} ms ({bwd_flops / r['backward_ms'] / 1e9:6.1f} TFLOP/s)   "
                  f"{r['plan']}, cuDNN {r['cudnn']}")
            continue
        print(f"  {name:<12} forward {r['forward_ms']:7.3f} ms ({fwd_flops / r['forward_ms'] / 1e9:8.3f} TFLOP/s)   "
              f"backward {r['backward_ms']:7.3f} ms ({bwd_flops / max(r['backward_ms'], 1e-9) / 1e9:8.3f} TFLOP/s)")
    if "forward_ms" in rows["ours cpu"]:
        mlx, ours = rows["mlx causal"], rows["ours cpu"]
        rows["mlx causal / ours"] = {key: mlx[key] / ours[key] for key in ("forward_ms", "forward_backward_ms")}
        print(f"  mlx causal / ours cpu: forward {rows['mlx causal / ours']['forward_ms']:.2f}x, "
              f"forward + backward {rows['mlx causal / ours']['forward_backward_ms']:.2f}x")
    report = {"device": mx.device_info().get("device_name", "?"), "mlx": mx.__version__,
              "config": vars(args), "results": rows,
              "command": "python bench/attention_backward.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
