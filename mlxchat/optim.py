"""nanochat's optimizer setup in MLX: Muon for the block matrices, AdamW for wte and lm_head.

Built from `mlx.optimizers` (Muon, AdamW, MultiOptimizer); clipping as `clip_grad_norm`. Checked against
nanochat's `muon.py` / `gpt.setup_optimizers`:
- Muon's momentum update (lerp towards the gradient), Nesterov blend, quintic Newton–Schulz
  (3.4445, −4.7750, 2.0315) on the Frobenius-normalised update and the max(1, rows/cols)^0.5
  scale are the same. Differences we correct: MLX defaults to weight decay 0.01 (nanochat: 0),
  and keeps momentum as a Python float, which `mx.compile` would freeze — `NanoMuon` keeps it
  in the optimizer state so nanochat's 0.85→0.95 warm-up reaches the compiled step.
  nanochat runs Newton–Schulz in bfloat16, batched over same-shape matrices; so do we when the
  model computes in bfloat16 (GPUs); on the CPU (fp32 compute) it runs in fp32.
- torch's AdamW bias-corrects; MLX's only with `bias_correction=True`, which we set.
- LR and momentum schedules are functions of the optimizer's own step counter, so they live in
  the optimizer state and resume exactly from a checkpoint.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map, tree_merge

from mlxchat import cuda_kernels


@dataclass(frozen=True)
class OptimConfig:
    matrix_lr: float = 0.02  # Muon
    embedding_lr: float = 0.2  # AdamW, wte
    unembedding_lr: float = 0.004  # AdamW, lm_head
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # global norm; 0 disables
    warmup_ratio: float = 0.0
    warmdown_ratio: float = 0.2
    final_lr_frac: float = 0.0
    momentum_warmup_steps: int = 300  # Muon momentum 0.85 -> 0.95; 0 = constant 0.95 (SFT)
    init_lr_frac: float = 1.0  # every LR scaled by this (SFT fine-tunes at 2% of the base LRs)


class WithOptim:
    """`to_dict` / `from_dict` for a dataclass of training settings holding an `optim: OptimConfig`:
    checkpoints and run.json keep them as plain dicts, and the nested config comes back typed."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        return cls(**{**d, "optim": OptimConfig(**d.get("optim", {}))})


def param_group(name: str) -> str:
    """Which optimizer owns a parameter: 'lm_head', 'embedding' or 'matrix' (Muon)."""
    if name.startswith("lm_head."):
        return "lm_head"
    if name.startswith("transformer.wte."):
        return "embedding"
    if name.startswith("transformer.h."):
        return "matrix"
    raise ValueError(f"parameter {name} belongs to no optimizer group")


def lr_multiplier(step, num_iterations: int, cfg: OptimConfig):
    """nanochat's schedule: optional linear warm-up, constant, linear warm-down to final_lr_frac.

    Works on Python numbers and on MLX arrays (inside the compiled step)."""
    warmup = round(cfg.warmup_ratio * num_iterations)
    warmdown = round(cfg.warmdown_ratio * num_iterations)
    warm = (step + 1) / max(warmup, 1)
    progress = (num_iterations - step) / max(warmdown, 1)
    down = progress * 1.0 + (1 - progress) * cfg.final_lr_frac
    if isinstance(step, mx.array):
        return mx.where(step < warmup, warm, mx.where(step <= num_iterations - warmdown, 1.0, down))
    if step < warmup:
        return warm
    return 1.0 if step <= num_iterations - warmdown else down


def muon_momentum(step, warmup_steps: int = 300):
    """nanochat: momentum rises linearly from 0.85 to 0.95 over the first 300 steps (base and
    mid-training); SFT (warmup_steps 0) keeps Muon's constant 0.95."""
    if warmup_steps <= 0:
        return mx.array(0.95) if isinstance(step, mx.array) else 0.95
    frac = mx.minimum(step / warmup_steps, 1.0) if isinstance(step, mx.array) else min(step / warmup_steps, 1.0)
    return (1 - frac) * 0.85 + frac * 0.95


class NanoMuon(optim.Muon):
    """`mlx.optimizers.Muon` with its momentum in the optimizer state (so it can be scheduled),
    and Newton–Schulz run once per group of same-shape matrices instead of once per matrix.

    Batching is nanochat's: a model has few distinct matrix shapes (d12: 768×768 ×48, 3072×768 and
    768×3072 ×12 each), so stacking them turns ~70 small matmul chains into 3 batched ones. Tall
    matrices iterate on XᵀX instead of being transposed into the wide group: the same result
    (Muon's transpose, undone), without two transposing copies per matrix a step. `ns_dtype` is
    the dtype Newton–Schulz runs in (nanochat: bfloat16 on GPUs); the momentum pass writes each
    update in it, on CUDA straight into the group's stack (`_nesterov_stack`)."""

    def __init__(self, learning_rate, momentum: float | Callable, ns_dtype: mx.Dtype = mx.float32):
        super().__init__(learning_rate, momentum=0.95, weight_decay=0.0, nesterov=True, ns_steps=5)
        self._maybe_schedule("momentum", momentum)
        self.ns_dtype = ns_dtype

    @property
    def momentum(self):
        return self.state["momentum"]

    @momentum.setter
    def momentum(self, value):
        self.state["momentum"] = mx.array(value)

    def apply_gradients(self, gradients: dict, parameters: dict, gradient_scale: mx.array | None = None,
                        streams: list | None = None):
        """`Optimizer.apply_gradients` with `Muon.apply_single`'s arithmetic, per shape group: the
        momentum update of every member, then one batched Newton–Schulz. `gradient_scale`
        (clipping's, `NanoOptimizer.clip_and_update`) multiplies the gradients inside the momentum
        pass, so a clipped gradient is never written out. With several `streams` (the CPU's,
        `cpu_shards`) each group's matrices are dealt out among them, each share's chain on its
        own stream: the same values, on every core."""
        if not self._initialized:
            self.init(gradients)
        for param, scheduler in self._schedulers.items():
            self.state[param] = scheduler(self.step)
        self.state["step"] = self.step + 1

        members: list[tuple[mx.array, dict]] = []
        params: list[mx.array] = []

        def collect(gradient, state, parameter):
            members.append((gradient, state))
            params.append(parameter)
            return len(members) - 1

        slots = tree_map(collect, gradients, self.state, parameters)
        if any(g.ndim != 2 for g, _ in members):
            raise ValueError("NanoMuon orthogonalises matrices only; give it 2-D parameters")
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (g, _) in enumerate(members):
            groups.setdefault(g.shape, []).append(i)
        updated: list[mx.array] = [None] * len(members)  # type: ignore[list-item]
        streams = streams_or_default(streams)
        for (rows, cols), group in groups.items():
            lr = self.learning_rate.astype(mx.float32) * max(1, rows / cols) ** 0.5
            for k, stream in enumerate(streams[: len(group)]):
                share = group[k :: len(streams)]
                with mx.stream(stream):
                    X = newton_schulz(self._nesterov_stack([members[i] for i in share], gradient_scale), self.ns_steps)
                    for i, p in zip(share, self._orthogonal_step([params[i] for i in share], X, lr)):
                        updated[i] = p
        return tree_map(lambda slot: updated[slot], slots)

    @staticmethod
    def _orthogonal_step(params: list[mx.array], X: mx.array, lr: mx.array) -> list[mx.array]:
        """Each parameter minus lr times its slice of the orthogonalised stack X. On CUDA one kernel
        does a whole group (`cuda_kernels.orthogonal_step`); elsewhere `orthogonal_step_per_matrix`."""
        if cuda_kernels.available() and cuda_kernels.orthogonal_step_fits(params, X):
            return cuda_kernels.orthogonal_step(params, X, lr)
        return orthogonal_step_per_matrix(params, X, lr)

    def _nesterov_stack(self, members: list[tuple[mx.array, dict]], scale: mx.array | None) -> mx.array:
        """Update each member's momentum v ← m·v + (1−m)·g and return the stack of their Nesterov
        updates g·(1−m) + v·m in `ns_dtype` (n × rows × cols). On CUDA one kernel does a whole
        group (`cuda_kernels.nesterov_momentum`): MLX fuses each matrix's arithmetic into a kernel
        of its own, 3× slower than the bytes it moves, and then copies the updates into the stack."""
        grads, velocities = [g for g, _ in members], [s["v"] for _, s in members]
        m = self.momentum
        if cuda_kernels.available() and cuda_kernels.nesterov_momentum_fits(grads, velocities):
            velocities, stack = cuda_kernels.nesterov_momentum(
                grads, velocities, m, mx.array(1.0) if scale is None else scale, self.ns_dtype)
        else:
            updates = []
            for i, g in enumerate(grads):
                g = g if scale is None else g * scale
                velocities[i] = m * velocities[i] + (1 - m) * g
                updates.append((g * (1 - m) + velocities[i] * m).astype(self.ns_dtype))
            stack = mx.stack(updates)
        for (_, state), v in zip(members, velocities):
            state["v"] = v
        return stack


def streams_or_default(streams: list | None) -> list:
    """The streams work is spread over (`cpu_shards`' on the CPU), or the default one alone."""
    return streams or [mx.default_stream(mx.default_device())]


def orthogonal_step_per_matrix(params: list[mx.array], X: mx.array, lr: mx.array) -> list[mx.array]:
    """Muon's parameter step in MLX ops, one matrix at a time (the portable path, and what
    `bench/group_kernels.py` times the CUDA kernel against): through a split, since an integer index
    X[j] is a gather kernel per matrix (72 a d12 step on the H200, 2.2 ms) where a split only views
    the stack."""
    return [p - lr.astype(p.dtype) * x.squeeze(0).astype(p.dtype) for p, x in zip(params, mx.split(X, len(params)))]


def newton_schulz(X: mx.array, steps: int) -> mx.array:
    """Muon's quintic Newton–Schulz (3.4445, −4.7750, 2.0315) on a stack of same-shape matrices
    (n, rows, cols), each normalised by its own Frobenius norm: `Muon`'s per-matrix iteration,
    batched. Wide matrices iterate on X·Xᵀ (rows × rows), tall ones on Xᵀ·X (cols × cols), which is
    Muon's transpose-iterate-transpose without the transposes. The scalar terms ride in `mx.addmm`
    (GEMM epilogues on CUDA: two elementwise passes over each stack fewer per iteration)."""
    a, b, c = (3.4445, -4.7750, 2.0315)
    # The norm is taken in fp32: its sum of squares over a whole matrix is where bf16 loses.
    norms = mx.linalg.norm(X.astype(mx.float32), axis=(-2, -1), keepdims=True)
    X = X / (norms + 1e-7).astype(X.dtype)
    tall = X.shape[-2] > X.shape[-1]
    for _ in range(steps):
        A = X.swapaxes(-1, -2) @ X if tall else X @ X.swapaxes(-1, -2)
        B = mx.addmm(A, A, A, alpha=c, beta=b)  # b·A + c·A·A
        X = mx.addmm(X, X, B, beta=a) if tall else mx.addmm(X, B, X, beta=a)  # a·X + X·B | B·X
    return X


class NanoOptimizer(optim.MultiOptimizer):
    """nanochat's three optimizers (`build_optimizer`), updated through `clip_and_update`, which
    hands clipping's scale to Muon's momentum pass instead of scaling every gradient first."""

    def clip_and_update(self, model: nn.Module, gradients: dict, max_norm: float, streams: list | None = None) -> mx.array:
        """Global-norm clipping at `max_norm` (0: none; nanochat clips at 1.0, with the formula
        of `optim.clip_grad_norm`), then one update; returns the norm before clipping. Given
        several `streams` (the CPU's, `cpu_shards`), the AdamW groups take turns on them and Muon
        deals its matrices out among them."""
        streams = streams_or_default(streams)
        norm = global_norm(gradients)
        scale = mx.minimum(max_norm / (norm + 1e-6), 1.0) if max_norm > 0 else None
        tree: dict = {}
        for k, (opt, grads) in enumerate(zip(self.optimizers, self._split_dictionary(gradients))):
            if isinstance(opt, NanoMuon):
                tree = tree_merge(tree, opt.apply_gradients(grads, model, gradient_scale=scale, streams=streams))
            else:
                with mx.stream(streams[k % len(streams)]):
                    scaled = grads if scale is None else tree_map(lambda g: g * scale, grads)
                    tree = tree_merge(tree, opt.apply_gradients(scaled, model))
        model.update(tree)
        return norm


def build_optimizer(model: nn.Module, cfg: OptimConfig, num_iterations: int) -> optim.MultiOptimizer:
    """AdamW(lm_head), AdamW(wte), Muon(block matrices) with nanochat's LRs; the AdamW LRs are
    scaled by (n_embd/768)^-0.5 because they were tuned at width 768. Newton–Schulz runs in
    bfloat16 when the model computes in it (GPUs, as nanochat), else in fp32."""
    scale = (model.config.n_embd / 768) ** -0.5

    def scheduled(base_lr: float):
        base_lr = base_lr * cfg.init_lr_frac
        return lambda step: base_lr * lr_multiplier(step.astype(mx.float32), num_iterations, cfg)

    adamw = dict(betas=[0.8, 0.95], eps=1e-10, weight_decay=cfg.weight_decay, bias_correction=True)
    lm_head = optim.AdamW(scheduled(cfg.unembedding_lr * scale), **adamw)
    embedding = optim.AdamW(scheduled(cfg.embedding_lr * scale), **adamw)
    muon = NanoMuon(
        scheduled(cfg.matrix_lr),
        momentum=lambda step: muon_momentum(step.astype(mx.float32), cfg.momentum_warmup_steps),
        ns_dtype=mx.bfloat16 if model.compute_dtype == mx.bfloat16 else mx.float32,
    )
    return NanoOptimizer(
        [lm_head, embedding, muon],
        [lambda name, _: param_group(name) == "lm_head", lambda name, _: param_group(name) == "embedding"],
    )


def global_norm(grads: dict) -> mx.array:
    """√(Σ g²) over every gradient, in fp32. On CUDA one kernel per gradient dtype
    (`cuda_kernels.sum_of_squares`): per array, MLX runs a squaring pass and a two-pass
    reduction, ~370 kernels a d20 step (5 ms on an H100)."""
    leaves = [g for _, g in tree_flatten(grads)]
    by_dtype: dict[mx.Dtype, list[mx.array]] = {}
    for g in leaves:
        by_dtype.setdefault(g.dtype, []).append(g)
    if cuda_kernels.available() and all(cuda_kernels.sum_of_squares_fits(gs) for gs in by_dtype.values()):
        return mx.sqrt(sum(cuda_kernels.sum_of_squares(gs) for gs in by_dtype.values()))
    total = mx.array(0.0)
    for g in (g.astype(mx.float32) for g in leaves):
        total = total + (g * g).sum()
    return mx.sqrt(total)


def add_gradients(total: dict | None, grads: dict) -> dict:
    """total + grads in fp32 (the master weights' dtype): the block matrices' gradients arrive in
    the compute dtype (`gpt._weight_gradient`), and micro-batches summed in bf16 would lose bits."""
    if total is None:
        return tree_map(lambda g: g.astype(mx.float32), grads)
    return tree_map(lambda t, g: t + g.astype(mx.float32), total, grads)
