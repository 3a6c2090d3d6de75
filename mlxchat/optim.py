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
from mlx.utils import tree_flatten, tree_map, tree_reduce

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
    the dtype Newton–Schulz runs in (nanochat: bfloat16 on GPUs); each update is cast to it
    in the momentum's own pass, so the stack is built in bf16 on GPUs."""

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

    def apply_gradients(self, gradients: dict, parameters: dict):
        """`Optimizer.apply_gradients` with `Muon.apply_single`'s arithmetic, split in two passes:
        the momentum update per matrix, then Newton–Schulz per shape group."""
        if not self._initialized:
            self.init(gradients)
        for param, scheduler in self._schedulers.items():
            self.state[param] = scheduler(self.step)
        self.state["step"] = self.step + 1

        updates: list[mx.array] = []

        def nesterov_update(gradient, state):
            v = self.momentum * state["v"] + (1 - self.momentum) * gradient
            state["v"] = v
            updates.append((gradient * (1 - self.momentum) + v * self.momentum).astype(self.ns_dtype))
            return len(updates) - 1

        slots = tree_map(nesterov_update, gradients, self.state)
        orthogonal = self._orthogonalize(updates)

        def apply(slot, parameter):
            update = orthogonal[slot].astype(parameter.dtype)
            lr = self.learning_rate.astype(parameter.dtype) * max(1, update.shape[-2] / update.shape[-1]) ** 0.5
            return parameter - lr * update

        return tree_map(apply, slots, parameters)

    def _orthogonalize(self, updates: list[mx.array]) -> list[mx.array]:
        if any(u.ndim != 2 for u in updates):
            raise ValueError("NanoMuon orthogonalises matrices only; give it 2-D parameters")
        groups: dict[tuple[int, int], list[int]] = {}
        for i, u in enumerate(updates):
            groups.setdefault(u.shape, []).append(i)
        out: list[mx.array] = [None] * len(updates)  # type: ignore[list-item]
        for members in groups.values():
            X = newton_schulz(mx.stack([updates[i] for i in members]), self.ns_steps)
            # split, not X[j]: an integer index is a gather kernel per matrix (72 a d12 step on
            # the H200, 2.2 ms), a split only views the stack.
            for x, i in zip(mx.split(X, len(members)), members):
                out[i] = x.squeeze(0)
        return out


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
    return optim.MultiOptimizer(
        [lm_head, embedding, muon],
        [lambda name, _: param_group(name) == "lm_head", lambda name, _: param_group(name) == "embedding"],
    )


def clip_gradients(grads: dict, max_norm: float):
    """Global-norm clipping (nanochat clips at 1.0, as `optim.clip_grad_norm`); returns (grads,
    norm before clipping). On CUDA the norm is one kernel over every gradient
    (`cuda_kernels.sum_of_squares`): per array, MLX runs a squaring pass and a two-pass
    reduction, ~370 kernels a d20 step (5 ms on an H100)."""
    leaves = [g for _, g in tree_flatten(grads)]
    if cuda_kernels.available() and cuda_kernels.sum_of_squares_fits(leaves):
        norm = mx.sqrt(cuda_kernels.sum_of_squares(leaves))
    else:
        norm = mx.sqrt(tree_reduce(lambda acc, g: acc + (g * g).sum(), grads, 0.0))
    if max_norm <= 0:
        return grads, norm
    scale = mx.minimum(max_norm / (norm + 1e-6), 1.0)
    return tree_map(lambda g: g * scale, grads), norm
