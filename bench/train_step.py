"""Training-step throughput: mlxchat's compiled step against references measured in the same run.

    python bench/train_step.py --depth 4 --batch 8 --seq-len 256 --vocab 8192 --dtype float32
    python bench/train_step.py --depth 12 --batch 32 --seq-len 2048 --torch --nanochat-src /tmp/nanochat

Variants (each runs in its own subprocess, so one that crashes or runs out of memory is reported
as such and its allocations never count against the next):

  ours        mlxchat: GPT (chunked loss) + nanochat's optimizer (Muon + AdamW, clipping),
              the compiled `mlxchat.train.TrainStep`.
  mlx-naive   the "straightforward MLX port": the same GPT, full (B·T × vocab) fp32 logits into
              `nn.losses.cross_entropy`, `nn.value_and_grad` + `optimizer.update`, no mx.compile,
              plain AdamW, no clipping.
  torch       (with --torch) nanochat's own PyTorch code, imported at run time from
              --nanochat-src: its GPT, `setup_optimizers`, and the step of scripts/base_train.py
              (torch.compile'd model unless --no-torch-compile; bf16 autocast unless --dtype float32).

  ours-queued `ours` timed as `mlxchat.train`'s loop runs it: step k+1 is queued before step k's
              loss is read, so building the next graph on the host overlaps the GPU's work
              (MLX builds a step's graph before its first kernel runs; torch launches as it goes).
              A step's time is the interval between loss reads; the last includes the wait for
              the final update, so the total is the run's wall time.

Diagnostic variants (name them in --variants): ours-fwdbwd (compiled forward+backward only, no
optimizer), ours-update (the compiled step's other half alone: clipping and the optimizer update
on one fixed set of gradients; its tok/s counts the batch's tokens, so fwdbwd + update times
are the step's when the two do not overlap), ours-adamw (compiled step with plain AdamW in place of Muon), ours-nocompile (the
same computation as `ours`, eager), ours-fused-loss / ours-portable-loss (`ours` with the loss
kernel forced: `MLXCHAT_LOSS`; plain `ours` takes the cuda one on MLX's CUDA backend, the fused
one on Metal, the portable one on CPU), ours-ckpt (`ours` with `mx.checkpoint` per block, `--checkpoint-blocks`).

MFU = FLOPs/token (nanochat's estimate, 6·N + attention) × tok/s / peak. On CUDA the peak is
the device's dense bf16 rate (H100/H200: 989 TFLOP/s, nanochat's figure). On CPU it is measured
here: the best fp32 `mx.matmul` rate of a 2048³ product, so CPU MFU is "fraction of what a big
GEMM reaches on this machine". The roofline line divides that peak by the step's FLOPs per token,
Muon's Newton–Schulz included: no implementation of this step runs faster, so a ratio against
another one cannot exceed roofline ÷ its tok/s. Peak memory is `mx.get_peak_memory()` (MLX) or
`torch.cuda.max_memory_allocated()` (torch on CUDA), reset after the warm-up steps, so it is the
steady-state peak of a training step including weights and optimizer state. torch on CPU has no
allocator statistics: its column shows the process's max RSS, marked "(rss)".

`--profile-steps K` runs K more steps under torch's profiler (CUDA only) and prints where their GPU
time went, kernel by kernel (`kernel_profile.py`), for ours and torch alike.

This is a benchmark, never a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

from benchjson import write_json
from kernel_profile import print_profile, profile_kernels

REPO = Path(__file__).resolve().parent.parent
MAIN_VARIANTS = ("ours", "mlx-naive")
ALL_VARIANTS = ("ours", "mlx-naive", "torch", "ours-queued", "ours-fwdbwd", "ours-update", "ours-adamw", "ours-nocompile",
                "ours-fused-loss", "ours-portable-loss", "ours-ckpt")
LOSS_VARIANTS = {"ours-fused-loss": "fused", "ours-portable-loss": "portable"}  # variant -> MLXCHAT_LOSS
PEAK_BF16 = {"H100": 989e12, "H200": 989e12}  # dense bf16, as nanochat's MFU
GIB = 1024**3


# ----------------------------------------------------------------------------------- arguments
def _source_commit(src: Path) -> str:
    """The nanochat commit measured: an exported tree's COMMIT file, else its own git HEAD. A tree
    exported inside another checkout (untracked) would otherwise report that checkout's HEAD."""
    if (src / "COMMIT").is_file():
        return (src / "COMMIT").read_text().strip()
    try:
        top = subprocess.run(["git", "-C", str(src), "rev-parse", "--show-toplevel", "HEAD"],
                             capture_output=True, text=True).stdout.split()
    except OSError:
        return ""
    return top[1] if len(top) == 2 and Path(top[0]).resolve() == src.resolve() else ""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--batch", type=int, default=8, help="device batch size (sequences)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="compute dtype; auto = bfloat16 on GPU, float32 on CPU")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "gpu"))
    p.add_argument("--variants", default=None,
                   help=f"comma list from {','.join(ALL_VARIANTS)}; default ours,mlx-naive (+torch with --torch)")
    p.add_argument("--torch", action="store_true", help="also run nanochat's PyTorch code (needs --nanochat-src)")
    p.add_argument("--nanochat-src", default=None, help="a nanochat checkout (commit c75fe54); imported, never copied")
    p.add_argument("--torch-compile", action=argparse.BooleanOptionalAction, default=True,
                   help="torch.compile nanochat's model, as scripts/base_train.py does (default on)")
    p.add_argument("--mlx-cache-limit", type=int, default=None,
                   help="mx.set_cache_limit(BYTES) before building any MLX variant (ours raises it on CPU itself)")
    p.add_argument("--mlx-memory-limit-gib", type=float, default=None,
                   help="mx.set_memory_limit: past it MLX's scheduler waits for queued GPU work to finish")
    p.add_argument("--loss-chunk-log2", type=int, default=0,
                   help="logits per loss chunk as a power of two (0: mlxchat.gpt's defaults)")
    p.add_argument("--peak-flops", type=float, default=0.0, help="override the MFU denominator (FLOP/s)")
    p.add_argument("--timeout", type=int, default=1200, help="seconds per variant")
    p.add_argument("--profile-steps", type=int, default=0,
                   help="after the timed steps, run this many more under torch's profiler (CUDA): GPU time by kernel")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write all results here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.variants is None:
        a.variants = list(MAIN_VARIANTS) + (["torch"] if a.torch else [])
    else:
        a.variants = [v.strip() for v in a.variants.split(",") if v.strip()]
        bad = [v for v in a.variants if v not in ALL_VARIANTS]
        if bad:
            p.error(f"unknown variant(s) {bad}; choose from {ALL_VARIANTS}")
        if a.torch and "torch" not in a.variants:
            a.variants.append("torch")
    if "torch" in a.variants and not a.nanochat_src:
        p.error("the torch variant needs --nanochat-src DIR (a nanochat checkout at c75fe54)")
    return a


# ------------------------------------------------------------------------------------- helpers
def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def random_batches(args, n: int = 4):
    """n distinct (inputs, targets) pairs of random token ids (never zeros), as numpy int64."""
    import numpy as np

    rng = np.random.default_rng(args.seed)
    out = []
    for _ in range(n):
        seq = rng.integers(0, args.vocab, size=(args.batch, args.seq_len + 1), dtype=np.int64)
        out.append((seq[:, :-1].copy(), seq[:, 1:].copy()))
    return out


def summarize(times: list[float], tokens_per_step: int) -> dict:
    times_sorted = sorted(times)
    median = times_sorted[len(times) // 2]
    return {
        "step_times_s": times,
        "median_step_s": median,
        "min_step_s": times_sorted[0],
        "tok_per_s": tokens_per_step * len(times) / sum(times),
        "tok_per_s_median": tokens_per_step / median,
    }


# ------------------------------------------------------------------------------- MLX workers
def mlx_setup(args):
    import mlx.core as mx

    if args.device == "cpu":
        mx.set_default_device(mx.cpu)
    elif args.device == "gpu":
        mx.set_default_device(mx.gpu)
    sys.path.insert(0, str(REPO))
    return mx


def mlx_device_name(mx) -> str:
    if mx.default_device() == mx.gpu:
        try:
            return mx.device_info().get("device_name", "gpu")
        except Exception:
            return "gpu"
    try:
        return "cpu: " + mx.device_info().get("device_name", platform.processor())
    except Exception:
        return "cpu"


def run_mlx(args, variant: str) -> dict:
    if variant in LOSS_VARIANTS:
        import os

        os.environ["MLXCHAT_LOSS"] = LOSS_VARIANTS[variant]
    mx = mlx_setup(args)
    if args.mlx_cache_limit is not None:
        mx.set_cache_limit(args.mlx_cache_limit)
    if args.mlx_memory_limit_gib is not None:
        mx.set_memory_limit(int(args.mlx_memory_limit_gib * 2**30))
    import mlx.nn as nn
    import mlx.optimizers as optim

    from mlxchat import cudnn_attention, gpt
    from mlxchat.gpt import GPT, GPTConfig, loss_kernel

    if args.loss_chunk_log2:
        gpt.FUSED_LOSS_CHUNK_ELEMENTS = gpt.LOSS_CHUNK_ELEMENTS = 1 << args.loss_chunk_log2
    from mlxchat.optim import NanoOptimizer, OptimConfig, build_optimizer
    from mlxchat.train import TrainStep

    dtype = getattr(mx, args.dtype)
    cfg = GPTConfig.from_depth(args.depth, vocab_size=args.vocab, sequence_len=args.seq_len)
    mx.random.seed(args.seed)
    model = GPT(cfg, compute_dtype=dtype, checkpoint_blocks=variant == "ours-ckpt")
    model.init_weights(args.seed)
    q = mx.zeros((1, cfg.n_head, args.seq_len, cfg.head_dim), dtype=dtype)
    kv = mx.zeros((1, cfg.n_kv_head, args.seq_len, cfg.head_dim), dtype=dtype)
    attention = "cudnn-extension" if cudnn_attention.runs_for(q, kv, kv) else "mlx"
    batches = [(mx.array(x, dtype=mx.int32), mx.array(y, dtype=mx.int32)) for x, y in random_batches(args)]
    mx.eval(batches)
    ocfg = OptimConfig()
    horizon = 10**6  # constant LR: the warm-down is far away

    def cycle():
        i = 0
        while True:
            yield batches[i % len(batches)]
            i += 1

    it = cycle()
    train_step = None

    if variant in ("ours", "ours-queued", "ours-adamw", "ours-ckpt", *LOSS_VARIANTS):
        if variant != "ours-adamw":
            optimizer = build_optimizer(model, ocfg, horizon)
        else:
            optimizer = NanoOptimizer([optim.AdamW(1e-3, betas=[0.8, 0.95], eps=1e-10, weight_decay=0.0, bias_correction=True)])
        optimizer.init(model.trainable_parameters())
        train_step = TrainStep(model, optimizer, 1, ocfg.grad_clip, 1)

        def step():
            loss, _ = train_step(it)
            return loss

    elif variant == "ours-nocompile":
        optimizer = build_optimizer(model, ocfg, horizon)
        optimizer.init(model.trainable_parameters())
        loss_and_grad = nn.value_and_grad(model, lambda m, x, y: m(x, y))

        def step():
            loss, grads = loss_and_grad(model, *next(it))
            norm = optimizer.clip_and_update(model, grads, ocfg.grad_clip)
            mx.eval(loss, norm, model.parameters(), optimizer.state)
            return loss.item()

    elif variant == "ours-fwdbwd":
        loss_and_grad = nn.value_and_grad(model, lambda m, x, y: m(x, y))
        fwdbwd = mx.compile(lambda x, y: loss_and_grad(model, x, y), inputs=model.state, outputs=model.state)

        def step():
            loss, grads = fwdbwd(*next(it))
            mx.eval(loss, grads)
            return loss.item()

    elif variant == "ours-update":
        optimizer = build_optimizer(model, ocfg, horizon)
        optimizer.init(model.trainable_parameters())
        train_step = TrainStep(model, optimizer, 1, ocfg.grad_clip, 1)
        _, grads = train_step._grads(*next(it))
        mx.eval(grads)

        def step():
            norm = train_step._apply(grads)
            mx.eval(norm, model.parameters(), optimizer.state)
            return norm.item()  # the gradient norm stands in for the loss: there is no forward

    elif variant == "mlx-naive":
        optimizer = optim.AdamW(learning_rate=1e-3)

        def loss_fn(m, x, y):
            logits = m(x)  # (B, T, V) fp32, softcapped: the full tensor
            return nn.losses.cross_entropy(logits, y, reduction="mean")

        loss_and_grad = nn.value_and_grad(model, loss_fn)

        def step():
            loss, grads = loss_and_grad(model, *next(it))
            optimizer.update(model, grads)
            mx.eval(loss, model.parameters(), optimizer.state)
            return loss.item()

    else:
        raise ValueError(variant)

    # timed as the loop runs its steps: inside TrainStep.running() (a sharded CPU step: OpenBLAS at one thread)
    with train_step.running() if train_step is not None else contextlib.nullcontext():
        warm, warm_times = [], []
        for _ in range(args.warmup):  # the first step includes compilation
            t0 = time.perf_counter()
            warm.append(step())
            warm_times.append(time.perf_counter() - t0)
        mx.synchronize()
        mx.reset_peak_memory()
        times, losses = [], []
        if variant == "ours-queued":
            t0 = time.perf_counter()
            pending = train_step.dispatch(it)
            for i in range(args.steps):
                following = train_step.dispatch(it) if i + 1 < args.steps else None
                losses.append(pending[0].item())
                if following is None:
                    mx.eval(pending, model.parameters(), optimizer.state)
                times.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                pending = following
        else:
            for _ in range(args.steps):
                t0 = time.perf_counter()
                losses.append(step())
                times.append(time.perf_counter() - t0)
    peak = mx.get_peak_memory()
    return {
        **summarize(times, args.batch * args.seq_len),
        **({"kernel_profile": profile_kernels(step, args.profile_steps)} if args.profile_steps else {}),
        "peak_memory_bytes": peak,
        "memory_source": "mx.get_peak_memory",
        "max_rss_bytes": max_rss_bytes(),
        "losses": warm + losses,
        "warmup_step_times_s": warm_times,
        "flops_per_token": model.estimate_flops(),
        "update_flops_per_step": newton_schulz_flops(model),
        "num_params": model.num_params(),
        "device_name": mlx_device_name(mx),
        "framework": f"mlx {mx.__version__}" + (" + cuDNN attention extension" if attention == "cudnn-extension" else ""),
        "loss_kernel": loss_kernel(),
        "attention": attention,  # a failed extension build falls back to MLX's with only a warning: say which ran
    }


def newton_schulz_flops(model, steps: int = 5) -> int:
    """FLOPs of Muon's Newton–Schulz in one update (`optim.newton_schulz`: per iteration on an m×n
    matrix, m ≤ n, the Gram product 2m²n, its square 2m³, the product back 2m²n). nanochat's 6·N
    leaves the update out; on a small model it is a fifth of the step's work, so the roofline
    below counts it."""
    from mlx.utils import tree_flatten

    from mlxchat.optim import param_group

    total = 0
    for name, p in tree_flatten(model.parameters()):
        if param_group(name) == "matrix":
            m, n = sorted(p.shape)
            total += steps * (4 * m * m * n + 2 * m**3)
    return total


def run_peak(args) -> dict:
    """Best fp32 GEMM rate of a 2048³ mx.matmul on the CPU (the MFU denominator there)."""
    mx = mlx_setup(args)
    n = 2048
    a = mx.random.normal((n, n), key=mx.random.key(1))
    b = mx.random.normal((n, n), key=mx.random.key(2))
    mx.eval(a, b)
    best = 0.0
    for _ in range(6):
        t0 = time.perf_counter()
        mx.eval(a @ b)
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return {"peak_flops": best, "source": f"measured: best of 6 fp32 mx.matmul {n}x{n}x{n} on {mlx_device_name(mx)}",
            "device_name": mlx_device_name(mx), "framework": f"mlx {mx.__version__}"}


def run_device_info(args) -> dict:
    try:
        mx = mlx_setup(args)
    except ImportError:  # no MLX here: only the torch variant can run
        import torch

        cuda = torch.cuda.is_available() and args.device != "cpu"
        return {"device_name": torch.cuda.get_device_name() if cuda else "cpu", "is_gpu": cuda, "mlx": None}
    return {"device_name": mlx_device_name(mx), "is_gpu": mx.default_device() == mx.gpu, "mlx": mx.__version__}


# ----------------------------------------------------------------------------- torch worker
def run_torch(args) -> dict:
    """nanochat's model, optimizers and training step, as scripts/base_train.py runs them."""
    from contextlib import nullcontext

    src = Path(args.nanochat_src).resolve()
    if not (src / "nanochat" / "gpt.py").is_file():
        raise SystemExit(f"--nanochat-src {src} has no nanochat/gpt.py: point it at a nanochat checkout")
    sys.path.insert(0, str(src))
    import torch
    from nanochat.gpt import GPT, GPTConfig

    cuda = torch.cuda.is_available() and args.device != "cpu"
    device = torch.device("cuda" if cuda else "cpu")
    device_type = device.type
    torch.manual_seed(args.seed)
    if cuda:
        torch.set_float32_matmul_precision("high")  # nanochat's compute_init
    autocast = (torch.amp.autocast(device_type=device_type, dtype=torch.bfloat16)
                if args.dtype == "bfloat16" else nullcontext())
    depth = args.depth
    model_dim = depth * 64
    num_heads = max(1, (model_dim + 127) // 128)
    kwargs = dict(sequence_len=args.seq_len, vocab_size=args.vocab, n_layer=depth, n_head=num_heads,
                  n_kv_head=num_heads, n_embd=model_dim)
    with torch.device("meta"):
        model = GPT(GPTConfig(**kwargs))
    model.to_empty(device=device)
    model.init_weights()
    orig_model = model
    if args.torch_compile:
        model = torch.compile(model, dynamic=False)
    flops_per_token = orig_model.estimate_flops()
    num_params = sum(p.numel() for p in orig_model.parameters())
    optimizers = orig_model.setup_optimizers()
    adamw_optimizer, muon_optimizer = optimizers
    batches = [(torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)) for x, y in random_batches(args)]
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    grad_clip = 1.0
    state = {"i": 0}

    def step():
        i = state["i"]
        state["i"] += 1
        x, y = batches[i % len(batches)]
        with autocast:
            loss = model(x, y)
        train_loss = loss.detach()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(orig_model.parameters(), grad_clip)
        lrm = 1.0
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * lrm
        frac = min(i / 300, 1)
        for group in muon_optimizer.param_groups:
            group["momentum"] = (1 - frac) * 0.85 + frac * 0.95
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        sync()
        return train_loss.item()

    warm, warm_times = [], []
    for _ in range(args.warmup):  # the first step includes torch.compile
        t0 = time.perf_counter()
        warm.append(step())
        warm_times.append(time.perf_counter() - t0)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if cuda else max_rss_bytes()
    profiled = {"kernel_profile": profile_kernels(step, args.profile_steps)} if args.profile_steps else {}
    commit = _source_commit(src)
    return {
        **summarize(times, args.batch * args.seq_len),
        **profiled,
        "peak_memory_bytes": peak,
        "memory_source": "torch.cuda.max_memory_allocated" if cuda else "max RSS of the process",
        "max_rss_bytes": max_rss_bytes(),
        "losses": warm + losses,
        "warmup_step_times_s": warm_times,
        "flops_per_token": flops_per_token,
        "num_params": num_params,
        "device_name": torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)",
        "framework": f"torch {torch.__version__}" + (" + torch.compile" if args.torch_compile else " (eager)"),
        "nanochat_commit": commit or None,
        "nanochat_src": str(src),
    }


# ----------------------------------------------------------------------------- orchestration
def worker_main(args) -> None:
    if args.worker == "torch":
        res = run_torch(args)
    elif args.worker == "peak":
        res = run_peak(args)
    elif args.worker == "info":
        res = run_device_info(args)
    else:
        res = run_mlx(args, args.worker)
    print("RESULT " + json.dumps(res), flush=True)


def spawn(args, argv: list[str], name: str) -> dict:
    """Run one worker in a fresh process; a crash or timeout becomes an error entry."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--worker", name]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.timeout}s"}
    wall = time.perf_counter() - t0
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            res = json.loads(line[len("RESULT "):])
            res["wall_s"] = wall
            return res
    if proc.returncode < 0:
        sig = signal.Signals(-proc.returncode).name
        why = f"crashed ({sig})"
    else:
        why = f"failed (exit {proc.returncode})"
    tail = "\n".join((proc.stderr or "").strip().splitlines()[-6:])
    return {"error": why, "stderr_tail": tail}


def fmt_bytes(b) -> str:
    return "-" if b is None else f"{b / GIB:.2f} GiB"


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker:
        if args.dtype == "auto":
            raise SystemExit("internal: workers get a resolved dtype")
        worker_main(args)
        return {}
    raw = list(sys.argv[1:] if argv is None else argv)

    info = spawn(args, raw + ["--dtype", "float32"], "info")
    if "error" in info:
        raise SystemExit(f"could not start MLX: {info['error']}\n{info.get('stderr_tail', '')}")
    on_gpu = info["is_gpu"] and args.device != "cpu"
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if on_gpu else "float32")
    wargs = raw + ["--dtype", dtype]  # argparse: the last --dtype wins

    if args.peak_flops > 0:
        peak, peak_src = args.peak_flops, "given by --peak-flops"
    elif on_gpu:
        peak = next((v for k, v in PEAK_BF16.items() if k in info["device_name"]), 0.0)
        peak_src = f"{info['device_name']}: dense bf16 datasheet rate" if peak else "unknown GPU: no MFU"
    else:
        r = spawn(args, wargs, "peak")
        peak, peak_src = r.get("peak_flops", 0.0), r.get("source", r.get("error", "?"))

    print(f"device: {info['device_name']} | mlx {info['mlx'] or '(not installed)'} | python {platform.python_version()} | dtype {dtype}")
    print(f"config: depth {args.depth} | batch {args.batch} x seq {args.seq_len} | vocab {args.vocab} | "
          f"{args.warmup} warm-up + {args.steps} timed steps")
    print(f"MFU peak: {peak / 1e12:.3f} TFLOP/s ({peak_src})", flush=True)

    results = {}
    for v in args.variants:
        print(f"  running {v} ...", end=" ", flush=True)
        results[v] = r = spawn(args, wargs, v)
        if "error" in r:
            print(r["error"])
            if r.get("stderr_tail"):
                print("    " + r["stderr_tail"].replace("\n", "\n    "))
        else:
            first = r.get("warmup_step_times_s") or [float("nan")]
            print(f"{r['tok_per_s']:,.0f} tok/s (first step {first[0]:.1f}s, {r['wall_s']:.0f}s wall)", flush=True)
        if "error" not in r:
            r["mfu"] = r["flops_per_token"] * r["tok_per_s"] / peak if peak else None

    base = results.get("ours", {})
    head = f"{'variant':<15} {'tok/s':>10} {'median':>10} {'MFU':>7} {'peak mem':>14} {'ours ×':>8}  {'loss first→last':<17} framework"
    print()
    print(head)
    print("-" * len(head))
    for v, r in results.items():
        if "error" in r:
            print(f"{v:<15} {r['error']}")
            continue
        ratio = base["tok_per_s"] / r["tok_per_s"] if "tok_per_s" in base else None
        mem = fmt_bytes(r["peak_memory_bytes"]) + (" (rss)" if r["memory_source"].startswith("max RSS") else "")
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        loss = f"{r['losses'][0]:.3f}→{r['losses'][-1]:.3f}"
        print(f"{v:<15} {r['tok_per_s']:>10,.0f} {r['tok_per_s_median']:>10,.0f} {mfu:>7} {mem:>14} "
              f"{'' if ratio is None else f'{ratio:.2f}':>8}  {loss:<17} {r['framework']}")
    print(f"('ours ×' = ours tok/s ÷ that row's; MFU against {peak / 1e12:.3f} TFLOP/s: {peak_src})")
    roofline = None
    if peak and "update_flops_per_step" in base:
        # the most tok/s any implementation of this step reaches at the peak: what a ratio can be
        tokens = args.batch * args.seq_len
        flops = base["flops_per_token"] + base["update_flops_per_step"] / tokens
        roofline = peak / flops
        print(f"roofline: {roofline:,.0f} tok/s at the peak ({base['flops_per_token'] / 1e6:.1f} MFLOP/token "
              f"forward+backward + {base['update_flops_per_step'] / tokens / 1e6:.1f} Newton–Schulz); "
              f"ours reaches {base['tok_per_s'] / roofline:.0%} of it"
              + "".join(f", {v} {r['tok_per_s'] / roofline:.0%}" for v, r in results.items()
                        if v != "ours" and "tok_per_s" in r))
    for v, r in results.items():
        if "kernel_profile" in r:
            print_profile(v, r["kernel_profile"])

    report = {
        "config": {k: getattr(args, k) for k in ("depth", "batch", "seq_len", "vocab", "steps", "warmup", "seed",
                                                  "torch_compile", "nanochat_src")} | {"dtype": dtype},
        "device": info["device_name"],
        "mlx": info["mlx"],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "peak_flops": peak,
        "peak_flops_source": peak_src,
        "roofline_tok_per_s": roofline,
        "results": results,
        "ratios_ours_over": {v: base["tok_per_s"] / r["tok_per_s"] for v, r in results.items()
                             if "tok_per_s" in r and "tok_per_s" in base and v != "ours"},
        "command": "python bench/train_step.py " + " ".join(raw),
    }
    write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
