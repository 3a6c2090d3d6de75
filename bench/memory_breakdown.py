"""Where the training step's memory and time go: peak memory above the resting state (weights,
optimizer state) and wall time of the step's parts, each measured alone.

    python bench/memory_breakdown.py --depth 12 --batch 8 --seq-len 2048 --vocab 65536

A diagnostic companion of bench/train_step.py (same model, same dtype rules); it prints one
table. Parts: one attention call (fwd+bwd), one Block (fwd+bwd), the trunk (all blocks, fwd+bwd
against a random projection of the last hidden state), the head + loss on a fixed hidden state,
the whole forward+backward, and the compiled TrainStep. Eager unless the row says compiled.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from benchjson import write_json

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402

GIB = 1024**3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=65536)
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--parts", default="attn,attn-module,mlp,block,trunk,head,optim,fwdbwd,fwdbwd-compiled,step")
    p.add_argument("--json", default=None, help="write the rows here")
    args = p.parse_args()

    from mlxchat.gpt import GPT, LOSS_ENV, GPTConfig, chunked_cross_entropy, chunked_loss_sum, loss_kernel

    forced_kernel = os.environ.get(LOSS_ENV)
    from mlxchat.optim import OptimConfig, build_optimizer
    from mlxchat.train import TrainStep

    on_gpu = mx.default_device() == mx.gpu
    dtype = getattr(mx, args.dtype if args.dtype != "auto" else ("bfloat16" if on_gpu else "float32"))
    cfg = GPTConfig.from_depth(args.depth, vocab_size=args.vocab, sequence_len=args.seq_len)
    model = GPT(cfg, compute_dtype=dtype)
    model.init_weights(0)
    B, T, C = args.batch, args.seq_len, cfg.n_embd
    x = mx.random.randint(0, args.vocab, (B, T))
    y = mx.random.randint(0, args.vocab, (B, T))
    r = mx.random.normal((B, T, C)).astype(dtype)
    h_fixed = mx.random.normal((B, T, C)).astype(dtype)
    mx.eval(x, y, r, h_fixed)
    parts = args.parts.split(",")
    print(f"device {mx.device_info().get('device_name', '?')} | mlx {mx.__version__} | depth {args.depth} "
          f"B {B} T {T} V {args.vocab} | {dtype} | weights {model.num_params() * 4 / GIB:.2f} GiB fp32")
    rows = []

    def measure(name, fn):
        try:
            mx.eval(fn())  # warm-up (compilation)
            mx.synchronize()
            mx.clear_cache()
            base = mx.get_active_memory()
            mx.reset_peak_memory()
            times = []
            for _ in range(args.reps):
                t0 = time.perf_counter()
                mx.eval(fn())
                mx.synchronize()
                times.append(time.perf_counter() - t0)
            peak = mx.get_peak_memory() - base
            rows.append((name, peak / GIB, sorted(times)[len(times) // 2] * 1000, ""))
        except Exception as e:  # e.g. out of memory: report and go on
            rows.append((name, float("nan"), float("nan"), f"{type(e).__name__}: {str(e)[:60]}"))
        print(f"  {rows[-1][0]:<46} {rows[-1][1]:8.2f} GiB {rows[-1][2]:9.1f} ms {rows[-1][3]}", flush=True)

    if "attn" in parts:
        H, D = cfg.n_head, cfg.head_dim
        q, k, v = (mx.random.normal((B, H, T, D)).astype(dtype) for _ in range(3))
        mx.eval(q, k, v)

        def attn_loss(q, k, v):
            o = mx.fast.scaled_dot_product_attention(q, k, v, scale=D**-0.5, mask="causal")
            return (o.astype(mx.float32) * 1e-3).sum()

        attn_vg = mx.value_and_grad(attn_loss, argnums=(0, 1, 2))
        measure("attention fwd+bwd (1 layer)", lambda: attn_vg(q, k, v))
        del q, k, v
    if "attn-module" in parts:
        att = model.transformer.h[0].attn
        att_vg = nn.value_and_grad(att, lambda a, hh: (a(hh) * r).astype(mx.float32).sum())
        measure("attention module fwd+bwd (1 layer)", lambda: att_vg(att, h_fixed))
    if "mlp" in parts:
        mlp = model.transformer.h[0].mlp
        mlp_vg = nn.value_and_grad(mlp, lambda a, hh: (a(hh, residual=hh) * r).astype(mx.float32).sum())  # residual as a block passes it
        measure("MLP fwd+bwd (1 layer)", lambda: mlp_vg(mlp, h_fixed))
    if "block" in parts:
        block = model.transformer.h[0]
        block_vg = nn.value_and_grad(block, lambda b, hh: (b(hh) * r).astype(mx.float32).sum())
        measure("Block fwd+bwd (1 layer)", lambda: block_vg(block, h_fixed))
    if "trunk" in parts:
        trunk_vg = nn.value_and_grad(model, lambda m, a: (m.hidden(a) * r).astype(mx.float32).sum())
        measure(f"trunk fwd+bwd ({args.depth} layers)", lambda: trunk_vg(model, x))
    if "head" in parts:
        heads = {  # the training loss (gradient formed in the forward) and RL's per-token losses
            "training": nn.value_and_grad(model, lambda m, hh: chunked_loss_sum(m, hh, y) / y.size),
            "per-token": nn.value_and_grad(model, lambda m, hh: chunked_cross_entropy(m, hh, y).mean()),
        }
        for kernel in ("portable", "fused"):  # MLXCHAT_LOSS is read at every call
            os.environ[LOSS_ENV] = kernel
            for use, head_vg in heads.items():
                measure(f"head+loss fwd+bwd ({kernel}, {use})", lambda head_vg=head_vg: head_vg(model, h_fixed))
        os.environ.pop(LOSS_ENV)
        if forced_kernel:
            os.environ[LOSS_ENV] = forced_kernel
    vg = nn.value_and_grad(model, lambda m, a, b: m(a, b))
    if "fwdbwd" in parts:
        measure("forward+backward", lambda: vg(model, x, y))
    if "fwdbwd-compiled" in parts:
        cvg = mx.compile(lambda a, b: vg(model, a, b), inputs=model.state, outputs=model.state)
        measure("forward+backward compiled", lambda: cvg(x, y))
    if "optim" in parts:
        from mlx.utils import tree_map

        from mlxchat.optim import NanoMuon

        grads = tree_map(lambda w: mx.random.normal(w.shape) * 1e-3, model.trainable_parameters())
        mx.eval(grads)
        for label, ns_dtype in (("fp32", mx.float32), ("bf16", mx.bfloat16)):
            opt = build_optimizer(model, OptimConfig(), 10**6)
            for o in opt.optimizers:
                if isinstance(o, NanoMuon):  # batched Newton-Schulz; nanochat runs it in bfloat16
                    o.ns_dtype = ns_dtype
            opt.init(model.trainable_parameters())
            mx.eval(opt.state)
            params = model.trainable_parameters()
            upd = mx.compile(lambda g, prm, opt=opt: opt.apply_gradients(g, prm), inputs=opt.state, outputs=opt.state)
            measure(f"optimizer update, batched NS in {label} (compiled)", lambda upd=upd: upd(grads, params))
    if "step" in parts:
        opt = build_optimizer(model, OptimConfig(), 10**6)
        opt.init(model.trainable_parameters())
        mx.eval(opt.state)
        step = TrainStep(model, opt, 1, 1.0, 1)

        def run_step():
            step(iter([(x, y)]))
            return model.parameters()

        with step.running():  # as train_loop runs its steps
            measure("TrainStep compiled (fwd+bwd+Muon)", run_step)

    print(f"\n{'part':<46} {'peak above rest':>16} {'median':>10}   (the step's loss kernel: {loss_kernel()})")
    for name, gib, ms, err in rows:
        print(f"{name:<46} {gib:12.2f} GiB {ms:8.1f} ms {err}")
    if args.json:
        report = {"device": mx.device_info().get("device_name", "?"), "mlx": mx.__version__, "dtype": str(dtype),
                  "config": {k: getattr(args, k) for k in ("depth", "batch", "seq_len", "vocab", "reps")},
                  "loss_kernel": loss_kernel(), "command": "python bench/memory_breakdown.py " + " ".join(sys.argv[1:]),
                  "rows": [{"part": n, "peak_above_rest_gib": g, "median_ms": t, "error": e} for n, g, t, e in rows]}
        write_json(args.json, report)


if __name__ == "__main__":
    main()
