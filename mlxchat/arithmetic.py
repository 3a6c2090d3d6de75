"""exp and tanh as multiply-adds, for bounded arguments, on MLX's CPU backend.

Why: without Apple's Accelerate, MLX's CPU `exp` and `tanh` are one libm call a lane on Linux
(`mlx/backend/cpu/simd`): ~12 ns an `exp` and 8–20 ns a `tanh` on a 2-core EPYC, while a compiled
multiply-add costs ~0.3 ns. Where the argument is known to be bounded — the softcapped logits
(±15) and the attention scores of QK-normed heads (±√head_dim) — a polynomial compiles into the
surrounding elementwise kernel and nothing is materialised (bench/README.md, eighteenth and
nineteenth sessions). Both take a `scale` folded into their coefficients, so exp(scale·x) and
tanh(scale·x) cost no extra pass.
"""

from __future__ import annotations

import math

import mlx.core as mx

# exp(y) for |y| ≤ EXP_BOUND as P(y / 32)^32: P is e^x's Taylor polynomial of degree 8
# (x = y / 32, |x| ≤ 0.5: truncation 0.5⁹/9! ≈ 5e-9), raised to the 32nd power by five squarings.
EXP_BOUND = 16.0
_EXP_SQUARINGS = 5
_EXP_DEGREE = 8

# tanh(u) ≈ u·P(u²)/Q(u²) for |u| ≤ 9: degrees 6 and 3 in u², fitted here by iteratively
# reweighted least squares towards the least maximum error on [0, 9] (3.5e-8 in float64).
_TANH_P = (
    0.9999999944740242, 0.1310789850118707, 0.0031306760771658195, 1.143470718368673e-05,
    -2.136671958106557e-08, 5.828297208177085e-11, -9.899134799774532e-14,
)
_TANH_Q = (1.0, 0.4644122858592348, 0.024601485665477926, 0.00025851120826541826)


def exp(x: mx.array, scale: float = 1.0) -> mx.array:
    """exp(scale·x) for |scale·x| ≤ EXP_BOUND, within 4.5e-6 relative of float64 (MLX's fp32
    `exp` of the rounded product: 1.4e-6); NaN stays NaN. Outside the bound it is wrong: callers
    hold the bound (the softcap, QK norm)."""
    coefficients = [(scale / 2**_EXP_SQUARINGS) ** k / math.factorial(k) for k in range(_EXP_DEGREE + 1)]
    p = coefficients[-1]
    for c in reversed(coefficients[:-1]):
        p = p * x + c
    for _ in range(_EXP_SQUARINGS):
        p = mx.square(p)
    return p


def tanh(x: mx.array, scale: float = 1.0) -> mx.array:
    """tanh(scale·x) for any x within 4.3e-7 absolute of float64, from multiply-adds, one divide
    and two clips: u² is capped at 81, where the ratio is tanh(9) = 1 in fp32, so larger |u| gives
    |u|/9 > 1, clipped to ±1 (±inf included); NaN stays NaN.

    The polynomials go by Estrin's scheme (powers s², s⁴ shared) rather than Horner's: MLX's CPU
    compiler splits a chain deeper than its fusion limit into kernels that keep chunk-sized
    temporaries (+27% of the d4 step's peak; bench/README.md, eighteenth session)."""
    s = mx.minimum(x * x * (scale * scale), 81.0)
    s2 = s * s
    p = (_TANH_P[0] + _TANH_P[1] * s) + s2 * (_TANH_P[2] + _TANH_P[3] * s) + s2 * s2 * (
        (_TANH_P[4] + _TANH_P[5] * s) + s2 * _TANH_P[6])
    q = (_TANH_Q[0] + _TANH_Q[1] * s) + s2 * (_TANH_Q[2] + _TANH_Q[3] * s)
    return mx.clip(x * scale * p / q, -1.0, 1.0)
