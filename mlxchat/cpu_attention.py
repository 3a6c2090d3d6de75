"""Causal attention on the CPU with the softmax's exp as arithmetic.

Why: on the CPU `mx.fast.scaled_dot_product_attention` is MLX's unfused fallback, two GEMMs
around a softmax whose `exp` is one libm call a lane on Linux (~18 ns a score on a 2-core EPYC):
at CORE's shapes of the smoke model (2 rows × 200 tokens, 2 heads of 128) that softmax took 2.9
of attention's 4.1 ms, and attention ~40% of the forward (bench/README.md, nineteenth session).
nanochat's heads are QK-normed — q and k are RMS-normed (no weight) and rotated, so |q| and |k|
are at most √head_dim — so every score q·k·head_dim^-½ lies within ±√head_dim. The softmax then
needs neither a running maximum nor libm (`arithmetic.exp`, scale folded in) and is one compiled
kernel; its backward is another, from the probabilities (a custom vjp).
"""

from __future__ import annotations

import functools

import mlx.core as mx

from mlxchat import arithmetic


def runs_for(q: mx.array, k: mx.array, mask) -> bool:
    """Whether causal attention over these QK-normed (B, H, T, D) arrays goes through `causal`:
    on the CPU, in fp32, queries and keys of one length (top-left and bottom-right causal masks
    agree) and √D within the arithmetic exp's bound; else MLX's attention runs."""
    return (isinstance(mask, str) and mask == "causal" and mx.default_device() == mx.cpu
            and q.dtype == k.dtype == mx.float32 and q.shape[2] == k.shape[2]
            and q.shape[-1] ** 0.5 <= arithmetic.EXP_BOUND)


def causal(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    """softmax(q kᵀ · scale, causal) v for (B, H, T, D) queries and (B, KV, T, D) keys and values,
    H a multiple of KV (grouped-query heads share their key and value)."""
    B, H, T, D = q.shape
    KV = k.shape[1]
    if H != KV:  # each key head serves H / KV query heads: broadcast it instead of repeating it
        q, k, v = q.reshape(B, KV, H // KV, T, D), k[:, :, None], v[:, :, None]
    p = _causal_softmax(scale)(q @ k.swapaxes(-1, -2))
    return (p @ v).reshape(B, H, T, D)


@functools.lru_cache(maxsize=None)
def _causal_softmax(scale: float):
    """softmax(scale · s) over the last axis with s[i, j] for j > i masked out, and its vjp from
    the probabilities alone: scale · p ⊙ (g − Σ g ⊙ p)."""

    @mx.compile
    def forward(s):
        rows, cols = s.shape[-2], s.shape[-1]
        causal_mask = mx.arange(rows)[:, None] >= mx.arange(cols)[None, :]
        e = mx.where(causal_mask, arithmetic.exp(s, scale), 0.0)
        return e / e.sum(axis=-1, keepdims=True)

    @mx.compile
    def backward(p, g):
        return scale * p * (g - (g * p).sum(axis=-1, keepdims=True))

    @mx.custom_function
    def softmax(s):
        return forward(s)

    @softmax.vjp
    def softmax_vjp(primals, cotangent, output):
        return backward(output, cotangent)

    return softmax
