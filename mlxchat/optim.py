"""nanochat's optimizer setup in MLX: Muon for the block matrices, AdamW for wte and lm_head.

Built from `mlx.optimizers` (Muon, AdamW, MultiOptimizer, clip_grad_norm). Checked against
nanochat's `muon.py` / `gpt.setup_optimizers`:
- Muon's momentum update (lerp towards the gradient), Nesterov blend, quintic Newton–Schulz
  (3.4445, −4.7750, 2.0315) on the Frobenius-normalised update and the max(1, rows/cols)^0.5
  scale are the same. Differences we correct: MLX defaults to weight decay 0.01 (nanochat: 0),
  and keeps momentum as a Python float, which `mx.compile` would freeze — `NanoMuon` keeps it
  in the optimizer state so nanochat's 0.85→0.95 warm-up reaches the compiled step.
  nanochat runs Newton–Schulz in bfloat16; here it runs in the gradient's dtype (fp32 master
  gradients), which is at least as accurate.
- torch's AdamW bias-corrects; MLX's only with `bias_correction=True`, which we set.
- LR and momentum schedules are functions of the optimizer's own step counter, so they live in
  the optimizer state and resume exactly from a checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_reduce


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
    """`mlx.optimizers.Muon` with its momentum in the optimizer state (so it can be scheduled)."""

    def __init__(self, learning_rate, momentum: float | Callable):
        super().__init__(learning_rate, momentum=0.95, weight_decay=0.0, nesterov=True, ns_steps=5)
        self._maybe_schedule("momentum", momentum)

    @property
    def momentum(self):
        return self.state["momentum"]

    @momentum.setter
    def momentum(self, value):
        self.state["momentum"] = mx.array(value)


def build_optimizer(model: nn.Module, cfg: OptimConfig, num_iterations: int) -> optim.MultiOptimizer:
    """AdamW(lm_head), AdamW(wte), Muon(block matrices) with nanochat's LRs; the AdamW LRs are
    scaled by (n_embd/768)^-0.5 because they were tuned at width 768."""
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
    )
    return optim.MultiOptimizer(
        [lm_head, embedding, muon],
        [lambda name, _: param_group(name) == "lm_head", lambda name, _: param_group(name) == "embedding"],
    )


def clip_gradients(grads: dict, max_norm: float):
    """Global-norm clipping (nanochat clips at 1.0); returns (grads, norm before clipping)."""
    if max_norm <= 0:
        return grads, mx.sqrt(tree_reduce(lambda acc, g: acc + (g * g).sum(), grads, 0.0))
    return optim.clip_grad_norm(grads, max_norm)
