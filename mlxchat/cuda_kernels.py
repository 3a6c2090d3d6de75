"""Fused CUDA kernels for the training step's elementwise work, through `mx.fast.cuda_kernel`.

Why: on an H200 the d12 step's GEMMs and attention take as long as torch's, but the passes
between them did not (bench/README.md, kernel profile): the softcap and cross-entropy over 2^32
logits took ~38 ms a step in five MLX kernels, each norm read its input twice (MLX's RMSNorm, then
the row scale its backward keeps), and the rotary embedding was two passes plus transposes. Each
kernel here reads its rows once, into registers (the loss kernel twice: a 128 KB row does not fit).

Every kernel has a portable equivalent in `mlxchat.gpt`, which Metal and the CPU run; `available()`
says whether these can be used (the CUDA backend, on the default GPU device, unless
MLXCHAT_CUDA_KERNELS=0). `tests/test_cuda_kernels.py` checks them against the portable path where
a CUDA GPU is present: CI has none, so its run on the H200 is recorded in bench/README.md.
"""

from __future__ import annotations

import functools
import os

import mlx.core as mx

ENV = "MLXCHAT_CUDA_KERNELS"  # "0" turns them off: the portable kernels run instead

WARP = 32
LOSS_THREADS = 512  # one block per row of logits
NORM_ROWS_PER_BLOCK = 8  # one warp per row
# Rounds of rows a warp of the rotary/QK-norm kernels loads before computing (each round G rows side
# by side; see _ROPE_NORM_SOURCE). The backward loads twice as much a row.
ROPE_ROUNDS = 2
ROPE_VJP_ROUNDS = 1

_HEADER = """
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack { T v[N]; };

// tanh through one fast exp (tanh x = 1 − 2/(e^{2x} + 1)): absolute error ~1e-6, far below a 16-bit
// float's rounding; the loss kernel took 12.1 against 12.9 ms a d12 step with tanhf. fp32 keeps tanhf.
template <typename T>
__device__ __forceinline__ float softcap_tanh(float x) {
  if constexpr (sizeof(T) == 4) {
    return tanhf(x);
  } else {
    const float e = __expf(2.0f * fminf(fmaxf(x, -10.0f), 10.0f));
    return 1.0f - __fdividef(2.0f, e + 1.0f);
  }
}

// The softcap's tanh where only a 16-bit gradient is made of it: the hardware's tanh.approx (one
// instruction, relative error ≤ 2^-11, under the bf16 result's own 2^-9). The loss kernel's gradient
// pass took 0.705 against 0.814 ms a 4096 × 65536 chunk on an H100 with it, its largest error
// against the fp32 reference unchanged (bench/results/gpu_loss_kernel_variants_s11.json).
template <typename T>
__device__ __forceinline__ float gradient_tanh(float x) {
  if constexpr (sizeof(T) == 4) {
    return tanhf(x);
  } else {
    float y;
    asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
  }
}

// Rows of an array normed along its last axis: the product of the other axes.
template <typename Shape>
__device__ __forceinline__ int leading_rows(const Shape& shape, int ndim) {
  int rows = 1;
  for (int a = 0; a < ndim - 1; ++a) rows *= shape[a];
  return rows;
}

__device__ __forceinline__ float warp_sum(float x) {
  #pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffff, x, o);
  return x;
}

__device__ __forceinline__ float warp_max(float x) {
  #pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, o));
  return x;
}

// The sum of x over each aligned group of L lanes (L a power of two ≤ 32), in every lane of the group.
template <int L>
__device__ __forceinline__ float lane_group_sum(float x) {
  #pragma unroll
  for (int o = L / 2; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffff, x, o);
  return x;
}

// The sum (MAX false) or maximum (MAX true) of x over a block of BLOCK threads, in every thread.
template <int BLOCK, bool MAX>
__device__ __forceinline__ float block_reduce(float x, float* scratch) {
  x = MAX ? warp_max(x) : warp_sum(x);
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = x;
  __syncthreads();
  x = threadIdx.x < BLOCK / 32 ? scratch[threadIdx.x] : (MAX ? -3.0e38f : 0.0f);
  if (threadIdx.x < 32) x = MAX ? warp_max(x) : warp_sum(x);
  if (threadIdx.x == 0) scratch[0] = x;
  __syncthreads();
  x = scratch[0];
  __syncthreads();
  return x;
}

// The packs at p + base + r·stride (r < R) that lie below end, into out[r]: a thread's loads of a
// round, issued together before it computes on or stores any of them (the compiler cannot move a load
// above a store through another pointer). R is a tuning constant; R = 1 streams.
template <int R, typename T, int N>
__device__ __forceinline__ void load_round(Pack<T, N>* out, const T* p, size_t base, size_t stride, size_t end) {
  #pragma unroll
  for (int r = 0; r < R; ++r) {
    const size_t i = base + r * stride;
    if (i < end) out[r] = *reinterpret_cast<const Pack<T, N>*>(p + i);
  }
}
"""

# Rows of logits z (R × V) against targets: per row the loss lse(c) − c[target] of the softcapped
# logits c = CAP·tanh(z/CAP), and d loss/d z = (softmax(c) − onehot)·(1 − tanh²)·g[row]. The
# softcap bounds c to ±CAP, so exp(c) cannot overflow and the sum needs no running maximum.
# Rows whose target is negative (ignored) get loss 0 and a zero gradient.
_LOSS_SOURCE = """
  constexpr int N = 16 / sizeof(T);
  const int row = blockIdx.x;
  const int tid = threadIdx.x;
  const T* zr = z + (size_t)row * V;
  T* dr = dz + (size_t)row * V;
  const int target = targets[row];
  __shared__ float partial[BLOCK / 32];
  if (target < 0) {
    Pack<T, N> zero;
    #pragma unroll
    for (int j = 0; j < N; ++j) zero.v[j] = static_cast<T>(0.0f);
    for (int i = tid * N; i < V; i += BLOCK * N) *reinterpret_cast<Pack<T, N>*>(dr + i) = zero;
    if (tid == 0) losses[row] = 0.0f;
    return;
  }
  float s = 0.0f;
  for (int i = tid * N; i < V; i += BLOCK * N) {
    Pack<T, N> x = *reinterpret_cast<const Pack<T, N>*>(zr + i);
    #pragma unroll
    for (int j = 0; j < N; ++j) s += __expf(CAP * softcap_tanh<T>(static_cast<float>(x.v[j]) / CAP));
  }
  const float lse = logf(block_reduce<BLOCK, false>(s, partial));
  if (tid == 0) losses[row] = lse - CAP * softcap_tanh<T>(static_cast<float>(zr[target]) / CAP);
  const float g = weights[row];
  for (int i = tid * N; i < V; i += BLOCK * N) {
    Pack<T, N> x = *reinterpret_cast<const Pack<T, N>*>(zr + i);
    Pack<T, N> out;
    #pragma unroll
    for (int j = 0; j < N; ++j) {
      const float t = gradient_tanh<T>(static_cast<float>(x.v[j]) / CAP);
      const float p = __expf(CAP * t - lse) - (i + j == target ? 1.0f : 0.0f);
      out.v[j] = static_cast<T>(p * g * (1.0f - t * t));
    }
    *reinterpret_cast<Pack<T, N>*>(dr + i) = out;
  }
"""

# RMSNorm of rows x (R × D), one warp per row held in registers: y = x·r and the row scale
# r = 1/sqrt(mean(x²) + EPS) that the backward keeps instead of x.
_NORM_SOURCE = """
  constexpr int N = 4;
  constexpr int PER_LANE = D / (32 * N);
  const int rows = leading_rows(x_shape, x_ndim);
  const int row = blockIdx.x * (BLOCK / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const T* xr = x + (size_t)row * D;
  T* yr = y + (size_t)row * D;
  Pack<T, N> v[PER_LANE];
  float ss = 0.0f;
  #pragma unroll
  for (int k = 0; k < PER_LANE; ++k) {
    v[k] = *reinterpret_cast<const Pack<T, N>*>(xr + (k * 32 + lane) * N);
    #pragma unroll
    for (int j = 0; j < N; ++j) { const float f = static_cast<float>(v[k].v[j]); ss += f * f; }
  }
  const float rs = rsqrtf(warp_sum(ss) / D + EPS);
  #pragma unroll
  for (int k = 0; k < PER_LANE; ++k) {
    Pack<T, N> o;
    #pragma unroll
    for (int j = 0; j < N; ++j) o.v[j] = static_cast<T>(static_cast<float>(v[k].v[j]) * rs);
    *reinterpret_cast<Pack<T, N>*>(yr + (k * 32 + lane) * N) = o;
  }
  if (lane == 0) r[row] = rs;
"""

# The RMSNorm backward from its output: dx = r·(dy − y·mean(dy·y)), one warp per row; with ADD, plus
# the residual stream's own cotangent `res` (x feeds a norm and the next residual add).
_NORM_VJP_SOURCE = """
  constexpr int N = 4;
  constexpr int PER_LANE = D / (32 * N);
  const int rows = leading_rows(y_shape, y_ndim);
  const int row = blockIdx.x * (BLOCK / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const size_t base = (size_t)row * D;
  Pack<T, N> yv[PER_LANE], gv[PER_LANE];
  float dot = 0.0f;
  #pragma unroll
  for (int k = 0; k < PER_LANE; ++k) {
    const size_t at = base + (k * 32 + lane) * N;
    yv[k] = *reinterpret_cast<const Pack<T, N>*>(y + at);
    gv[k] = *reinterpret_cast<const Pack<T, N>*>(dy + at);
    #pragma unroll
    for (int j = 0; j < N; ++j) dot += static_cast<float>(yv[k].v[j]) * static_cast<float>(gv[k].v[j]);
  }
  const float mean = warp_sum(dot) / D;
  const float rs = r[row];
  #pragma unroll
  for (int k = 0; k < PER_LANE; ++k) {
    Pack<float, N> o;
    #pragma unroll
    for (int j = 0; j < N; ++j)
      o.v[j] = rs * (static_cast<float>(gv[k].v[j]) - static_cast<float>(yv[k].v[j]) * mean);
    if constexpr (ADD) {
      const Pack<T, N> rv = *reinterpret_cast<const Pack<T, N>*>(res + base + (k * 32 + lane) * N);
      #pragma unroll
      for (int j = 0; j < N; ++j) o.v[j] += static_cast<float>(rv.v[j]);
    }
    Pack<T, N> out;
    #pragma unroll
    for (int j = 0; j < N; ++j) out.v[j] = static_cast<T>(o.v[j]);
    *reinterpret_cast<Pack<T, N>*>(dx + base + (k * 32 + lane) * N) = out;
  }
"""

# Rotary embedding then RMSNorm of q or k straight from its projection: rows x (B × T × H × D) in,
# y in the same layout and the row scale r out, so the rotated copy is never written. Attention
# reads y through a transposed view (B × H × T × D strides of B × T × H × D), as nanochat's torch
# hands cuDNN its q, k, v. As mx.fast.rope (non-traditional) at positions 0…T−1:
# θ = t·inv_freq[i], (x1, x2) of a pair (i, i + D/2) → (x1·cos θ − x2·sin θ, x1·sin θ + x2·cos θ).
# Each lane loads 16 bytes of each half of a row (P elements of x1, P of x2), so a row takes
# L = D / 2P lanes and a warp G = 32 / L rows side by side, RPW such rounds all loaded before any
# is computed. (With 4-byte loads, a lane per pair of elements, a d20 step's forward and backward
# took 5.5 and 7.9 ms on the H200, about half the memory's rate.)
_ROPE_NORM_SOURCE = """
  constexpr int P = 16 / sizeof(T_);
  constexpr int L = D / (2 * P);
  constexpr int G = 32 / L;
  const int B = x_shape[0], T = x_shape[1], H = x_shape[2];
  const int rows = B * T * H;
  const int lane = threadIdx.x % 32;
  const int g = lane / L, i0 = (lane % L) * P;
  const int first = (blockIdx.x * (BLOCK / 32) + threadIdx.x / 32) * RPW * G;
  Pack<T_, P> a[RPW], c[RPW];
  #pragma unroll
  for (int k = 0; k < RPW; ++k) {  // all loads first: RPW rows' worth in flight per lane
    const int row = first + k * G + g;
    if (row < rows) {
      a[k] = *reinterpret_cast<const Pack<T_, P>*>(x + (size_t)row * D + i0);
      c[k] = *reinterpret_cast<const Pack<T_, P>*>(x + (size_t)row * D + D / 2 + i0);
    }
  }
  #pragma unroll
  for (int k = 0; k < RPW; ++k) {  // every lane runs every round: the sums shuffle across lanes
    const int row = first + k * G + g;
    const int t = (row / H) % T;
    float r1[P], r2[P];
    float ss = 0.0f;
    #pragma unroll
    for (int j = 0; j < P; ++j) {
      float sn, cs;
      sincosf(static_cast<float>(t) * inv_freq[i0 + j], &sn, &cs);
      const float x1 = row < rows ? static_cast<float>(a[k].v[j]) : 0.0f;
      const float x2 = row < rows ? static_cast<float>(c[k].v[j]) : 0.0f;
      r1[j] = x1 * cs - x2 * sn;
      r2[j] = x1 * sn + x2 * cs;
      ss += r1[j] * r1[j] + r2[j] * r2[j];
    }
    const float rs = rsqrtf(lane_group_sum<L>(ss) / D + EPS);
    if (row < rows) {
      Pack<T_, P> o1, o2;
      #pragma unroll
      for (int j = 0; j < P; ++j) { o1.v[j] = static_cast<T_>(r1[j] * rs); o2.v[j] = static_cast<T_>(r2[j] * rs); }
      *reinterpret_cast<Pack<T_, P>*>(y + (size_t)row * D + i0) = o1;
      *reinterpret_cast<Pack<T_, P>*>(y + (size_t)row * D + D / 2 + i0) = o2;
      if (i0 == 0) r[row] = rs;
    }
  }
"""

# Its backward: the norm's, dn = r·(dy − y·mean(dy·y)), then the inverse rotation; y, dy and dx
# all in the projection's layout (B × T × H × D), lanes and rows as the forward.
_ROPE_NORM_VJP_SOURCE = """
  constexpr int P = 16 / sizeof(T_);
  constexpr int L = D / (2 * P);
  constexpr int G = 32 / L;
  const int B = y_shape[0], T = y_shape[1], H = y_shape[2];
  const int rows = B * T * H;
  const int lane = threadIdx.x % 32;
  const int g = lane / L, i0 = (lane % L) * P;
  const int first = (blockIdx.x * (BLOCK / 32) + threadIdx.x / 32) * RPW * G;
  Pack<T_, P> y1[RPW], y2[RPW], g1[RPW], g2[RPW];
  #pragma unroll
  for (int k = 0; k < RPW; ++k) {
    const int row = first + k * G + g;
    if (row < rows) {
      const size_t at = (size_t)row * D + i0;
      y1[k] = *reinterpret_cast<const Pack<T_, P>*>(y + at);
      y2[k] = *reinterpret_cast<const Pack<T_, P>*>(y + at + D / 2);
      g1[k] = *reinterpret_cast<const Pack<T_, P>*>(dy + at);
      g2[k] = *reinterpret_cast<const Pack<T_, P>*>(dy + at + D / 2);
    }
  }
  #pragma unroll
  for (int k = 0; k < RPW; ++k) {
    const int row = first + k * G + g;
    const bool live = row < rows;
    const int t = (row / H) % T;
    float dot = 0.0f;
    #pragma unroll
    for (int j = 0; j < P; ++j)
      if (live) dot += static_cast<float>(y1[k].v[j]) * static_cast<float>(g1[k].v[j])
                     + static_cast<float>(y2[k].v[j]) * static_cast<float>(g2[k].v[j]);
    const float mean = lane_group_sum<L>(dot) / D;
    if (!live) continue;
    const float rs = r[row];
    Pack<T_, P> o1, o2;
    #pragma unroll
    for (int j = 0; j < P; ++j) {
      float sn, cs;
      sincosf(static_cast<float>(t) * inv_freq[i0 + j], &sn, &cs);
      const float n1 = rs * (static_cast<float>(g1[k].v[j]) - static_cast<float>(y1[k].v[j]) * mean);
      const float n2 = rs * (static_cast<float>(g2[k].v[j]) - static_cast<float>(y2[k].v[j]) * mean);
      o1.v[j] = static_cast<T_>(n1 * cs + n2 * sn);
      o2.v[j] = static_cast<T_>(n2 * cs - n1 * sn);
    }
    *reinterpret_cast<Pack<T_, P>*>(dx + (size_t)row * D + i0) = o1;
    *reinterpret_cast<Pack<T_, P>*>(dx + (size_t)row * D + D / 2 + i0) = o2;
  }
"""

# Σ x² over many arrays in one launch (the gradient norm that clipping needs): each block sums one
# CHUNK-element slice of one array x (`_block_owner` sets x, its first block and its size) and writes
# its partial sum, so the total (a sum of the partials) comes out the same on every run. A thread
# reads 16-byte packs, ROUND of them at a time, where its array is aligned and the slice whole packs.
_SUM_OF_SQUARES_SOURCE = """
  const size_t start = (size_t)(blockIdx.x - first) * CHUNK;
  const size_t end = start + CHUNK < size ? start + CHUNK : size;
  float s = 0.0f;
  constexpr int N = 16 / sizeof(T);
  if (reinterpret_cast<size_t>(x) % 16 == 0 && (end - start) % N == 0) {
    for (size_t base = start + N * threadIdx.x; base < end; base += N * BLOCK * ROUND) {
      Pack<T, N> xp[ROUND];
      load_round<ROUND>(xp, x, base, N * BLOCK, end);
      #pragma unroll
      for (int r = 0; r < ROUND; ++r) {
        if (base + N * BLOCK * r < end) {
          #pragma unroll
          for (int j = 0; j < N; ++j) {
            const float v = static_cast<float>(xp[r].v[j]);
            s += v * v;
          }
        }
      }
    }
  } else {
    #pragma unroll 4
    for (size_t i = start + threadIdx.x; i < end; i += BLOCK) {
      const float v = static_cast<float>(x[i]);
      s += v * v;
    }
  }
  __shared__ float scratch[BLOCK / 32];
  s = block_reduce<BLOCK, false>(s, scratch);
  if (threadIdx.x == 0) partials[blockIdx.x] = s;
"""

def _matrix_group_pass(setup: str, loads: tuple[tuple[str, str, str], ...], body: str) -> str:
    """The loop Muon's per-group kernels share, written once so that `bench/group_kernels.py`'s ROUND
    varies both alike: a block's CHUNK of matrix k, 4 elements a pack, a thread loading ROUND packs of
    each input before it stores any (`loads`: element type, pack array, source pointer). `setup` runs
    once a block; `body` handles pack r, whose first element is i."""
    packs = "\n".join([f"    Pack<{t}, 4> {name}[ROUND];" for t, name, _ in loads]
                       + [f"    load_round<ROUND>({name}, {src}, base, 4 * BLOCK, end);" for _, name, src in loads])
    return f"""
  const size_t start = (size_t)(blockIdx.x - first) * CHUNK;
  const size_t end = start + CHUNK < SIZE ? start + CHUNK : SIZE;
{setup}
  for (size_t base = start + 4 * threadIdx.x; base < end; base += 4 * BLOCK * ROUND) {{
{packs}
    #pragma unroll
    for (int r = 0; r < ROUND; ++r) {{
      const size_t i = base + 4 * BLOCK * r;
      if (i < end) {{
{body}
      }}
    }}
  }}
"""


# Muon's Nesterov momentum over a group of same-size matrices (`nesterov_momentum`): matrix k's
# gradient g, velocity v and new velocity v_out (`matrix_group_start` sets them); scalars =
# (momentum m, the gradients' clipping scale s).
_NESTEROV_SOURCE = _matrix_group_pass(
    setup="""\
  TU* u = stack + (size_t)k * SIZE;
  const float m = scalars[0], s = scalars[1];""",
    loads=(("TG", "gp", "g"), ("float", "vp", "v")),
    body="""\
        Pack<float, 4> vn;
        Pack<TU, 4> un;
        #pragma unroll
        for (int j = 0; j < 4; ++j) {
          const float gj = static_cast<float>(gp[r].v[j]) * s;
          vn.v[j] = m * vp[r].v[j] + (1.0f - m) * gj;
          un.v[j] = static_cast<TU>(gj * (1.0f - m) + vn.v[j] * m);
        }
        *reinterpret_cast<Pack<float, 4>*>(v_out + i) = vn;
        *reinterpret_cast<Pack<TU, 4>*>(u + i) = un;""")

# Muon's parameter step over the same group (`orthogonal_step`): p ← p − lr·u for each matrix p and
# its slice u of the Newton–Schulz stack, in fp32 arithmetic; the same blocks as the momentum pass.
_ORTHOGONAL_STEP_SOURCE = _matrix_group_pass(
    setup="""\
  const TU* u = stack + (size_t)k * SIZE;
  const float lr = scalars[0];""",
    loads=(("TP", "pp", "p"), ("TU", "up", "u")),
    body="""\
        Pack<TP, 4> out;
        #pragma unroll
        for (int j = 0; j < 4; ++j) out.v[j] = static_cast<TP>(static_cast<float>(pp[r].v[j]) - lr * static_cast<float>(up[r].v[j]));
        *reinterpret_cast<Pack<TP, 4>*>(p_out + i) = out;""")


# One query per row and head against the first `length[0]` keys of a whole cache buffer, one block
# per (row, head): scores into shared memory (a thread a key), their softmax, then the weighted sum
# of values (a thread a 16-byte pack of a value row, the rows split over BLOCK / (D / N) groups).
_DECODE_ATTENTION_SOURCE = """
  constexpr int N = 16 / sizeof(T);
  constexpr int PACKS = D / N;
  constexpr int GROUPS = BLOCK / PACKS;
  __shared__ float qs[D];
  __shared__ float s[L];
  __shared__ float part[GROUPS][D];
  __shared__ float scratch[BLOCK / 32];
  const int bh = blockIdx.x;
  const int kv_row = (bh / H) * HKV + (bh % H) / (H / HKV);
  const T* kb = keys + (size_t)kv_row * L * D;
  const T* vb = values + (size_t)kv_row * L * D;
  const int n = min(length[0], L);
  for (int i = threadIdx.x; i < D; i += BLOCK) qs[i] = static_cast<float>(q[(size_t)bh * D + i]) * SCALE;
  __syncthreads();
  float m = -3.0e38f;
  #pragma unroll 2
  for (int j = threadIdx.x; j < n; j += BLOCK) {
    const Pack<T, N>* kr = reinterpret_cast<const Pack<T, N>*>(kb + (size_t)j * D);
    float acc = 0.0f;
    #pragma unroll
    for (int p = 0; p < PACKS; ++p) {
      const Pack<T, N> k = kr[p];
      #pragma unroll
      for (int e = 0; e < N; ++e) acc += static_cast<float>(k.v[e]) * qs[p * N + e];
    }
    s[j] = acc;
    m = fmaxf(m, acc);
  }
  m = block_reduce<BLOCK, true>(m, scratch);
  float l = 0.0f;
  for (int j = threadIdx.x; j < n; j += BLOCK) {
    const float e = __expf(s[j] - m);
    s[j] = e;
    l += e;
  }
  l = block_reduce<BLOCK, false>(l, scratch);
  const int p = threadIdx.x % PACKS;
  const int g = threadIdx.x / PACKS;
  float acc[N];
  #pragma unroll
  for (int e = 0; e < N; ++e) acc[e] = 0.0f;
  #pragma unroll 8
  for (int j = g; j < n; j += GROUPS) {
    const Pack<T, N> v = reinterpret_cast<const Pack<T, N>*>(vb + (size_t)j * D)[p];
    const float w = s[j];
    #pragma unroll
    for (int e = 0; e < N; ++e) acc[e] += w * static_cast<float>(v.v[e]);
  }
  #pragma unroll
  for (int e = 0; e < N; ++e) part[g][p * N + e] = acc[e];
  __syncthreads();
  for (int i = threadIdx.x; i < D; i += BLOCK) {
    float o = 0.0f;
    #pragma unroll
    for (int r = 0; r < GROUPS; ++r) o += part[r][i];
    out[(size_t)bh * D + i] = static_cast<T>(o / l);
  }
"""

FLOAT_TYPES = (mx.bfloat16, mx.float16, mx.float32)
# 256 threads: at 512 the unrolled loops' registers exceed a block's 64K ("too many resources requested").
DECODE_ATTENTION_THREADS = 256
DECODE_ATTENTION_MAX_KEYS = 8192  # the scores live in shared memory: 32 KB of the 48 KB a block may hold


def available() -> bool:
    """True where these kernels run: MLX's CUDA backend with the GPU as the default device."""
    return os.environ.get(ENV, "1") != "0" and mx.cuda.is_available() and mx.default_device() == mx.gpu


def loss_fits(z: mx.array) -> bool:
    """Whether `softcap_cross_entropy` takes these logits: 16-byte rows of a float type."""
    return z.ndim == 2 and z.dtype in FLOAT_TYPES and (z.shape[1] * z.dtype.size) % 16 == 0


def norm_fits(x: mx.array) -> bool:
    """Whether `rms_norm` takes these rows: a width that splits into 32 lanes × 4 (≤ 64 per lane)."""
    d = x.shape[-1]
    return x.dtype in FLOAT_TYPES and d % (WARP * 4) == 0 and d <= WARP * 4 * 16


def decode_attention_fits(q: mx.array, keys: mx.array) -> bool:
    """Whether `decode_attention` takes one query (B × H × 1 × D) over this buffer (B × HKV × L × D):
    16-byte rows, D ≤ 256 in packs that tile the block, L ≤ DECODE_ATTENTION_MAX_KEYS."""
    if q.ndim != 4 or q.shape[2] != 1 or q.dtype not in FLOAT_TYPES or keys.dtype != q.dtype:
        return False
    d, packs = q.shape[-1], q.shape[-1] * q.dtype.size // 16
    return (d * q.dtype.size % 16 == 0 and d <= 256 and DECODE_ATTENTION_THREADS % packs == 0
            and q.shape[1] % keys.shape[1] == 0 and keys.shape[2] <= DECODE_ATTENTION_MAX_KEYS)


def rope_norm_fits(x: mx.array) -> bool:
    """Whether `rope_norm` takes this projection (B × T × H × D): a row's halves in whole 16-byte
    packs, on a number of lanes that divides a warp (bf16: D of 32·2^k up to 512; fp32: up to 256)."""
    if x.ndim != 4 or x.dtype not in FLOAT_TYPES:
        return False
    d = x.shape[-1]
    return d >= 32 and d % (2 * _rope_per_lane(x.dtype)) == 0 and _rope_lanes(x.dtype, d) in (1, 2, 4, 8, 16, 32)


@functools.cache
def _kernel(name: str, inputs: tuple[str, ...], outputs: tuple[str, ...], source: str, **constants: float):
    """The compiled kernel; float constants go into its source (template arguments are ints,
    bools and dtypes only), so each value is its own kernel."""
    consts = "".join(f"  constexpr float {k} = {float(v)!r}f;\n" for k, v in constants.items())
    return mx.fast.cuda_kernel(name=name, input_names=list(inputs), output_names=list(outputs),
                               source=consts + source, header=_HEADER)


def softcap_cross_entropy(z: mx.array, targets: mx.array, weights: mx.array, cap: float) -> tuple[mx.array, mx.array]:
    """(per-row losses fp32, d Σ weights·losses / d z in z's dtype) of softcapped logits z (R × V)."""
    rows, vocab = z.shape
    kernel = _kernel("mlxchat_softcap_xent", ("z", "targets", "weights"), ("losses", "dz"), _LOSS_SOURCE, CAP=cap)
    losses, dz = kernel(
        inputs=[z, targets.astype(mx.int32), weights.astype(mx.float32)],
        template=[("T", z.dtype), ("V", vocab), ("BLOCK", LOSS_THREADS)],
        grid=(rows * LOSS_THREADS, 1, 1), threadgroup=(LOSS_THREADS, 1, 1),
        output_shapes=[(rows,), z.shape], output_dtypes=[mx.float32, z.dtype])
    return losses, dz


# Arrays a kernel may take as pointers: CUDA passes a kernel's parameters in 4 KB (8 bytes a pointer).
KERNEL_POINTERS = 400


def _block_owner(first_blocks: list[int], declarations: str, leaf) -> str:
    """Kernel source that finds which of several arrays a block works on, from the first block of
    each (ascending): a binary tree of comparisons of blockIdx.x whose leaf i is `leaf(i)`, a few
    statements setting the declared variables (that array's pointers, first block, size).
    Why not a table of the pointers indexed by the array's number: a local array indexed at run time
    lives in each thread's stack, so every thread stores the whole table before its first load (2.4 KB
    a thread for d20's 122 gradients, more bytes than its share of the data)."""
    def tree(lo: int, hi: int, indent: str) -> str:
        if hi - lo == 1:
            return f"{indent}{leaf(lo)}\n"
        mid = (lo + hi) // 2
        return (f"{indent}if (blockIdx.x < {first_blocks[mid]}u) {{\n" + tree(lo, mid, indent + "  ")
                + f"{indent}}} else {{\n" + tree(mid, hi, indent + "  ") + f"{indent}}}\n")

    return f"  {declarations}\n" + tree(0, len(first_blocks), "  ")


SUM_OF_SQUARES_THREADS = 256
SUM_OF_SQUARES_CHUNK = 1 << 16  # elements a block sums: 256 KB of fp32, a few µs of a GPU's bandwidth
SUM_OF_SQUARES_MAX_ARRAYS = KERNEL_POINTERS  # a pointer each
# 16-byte packs a thread loads before it adds them up: 1, 2, 4 and 8 took 0.78 / 0.81 / 0.55 / 0.80 ms over d20's
# gradients on an H100 (bench/group_kernels.py, one run; pointer tables in the stack: 1.85–1.99 ms), 0.26 ms in the step
SUM_OF_SQUARES_ROUND = 1


def sum_of_squares_fits(arrays: list[mx.array]) -> bool:
    """Whether `sum_of_squares` takes these: 1 to SUM_OF_SQUARES_MAX_ARRAYS non-empty arrays of one float type."""
    return (0 < len(arrays) <= SUM_OF_SQUARES_MAX_ARRAYS and all(a.size > 0 for a in arrays)
            and arrays[0].dtype in FLOAT_TYPES and all(a.dtype == arrays[0].dtype for a in arrays))


def sum_of_squares(arrays: list[mx.array]) -> mx.array:
    """Σ x² over every element of every array (fp32 scalar): one kernel, whatever their number."""
    chunk, sizes = SUM_OF_SQUARES_CHUNK, [a.size for a in arrays]
    first, blocks = [], 0
    for n in sizes:
        first.append(blocks)
        blocks += -(-n // chunk)
    names = tuple(f"x{i}" for i in range(len(arrays)))
    owner = _block_owner(first, "const T* x; unsigned int first; size_t size;",
                         lambda i: f"x = {names[i]}; first = {first[i]}u; size = {sizes[i]};")
    kernel = _kernel("mlxchat_sum_of_squares", names, ("partials",),
                     f"  constexpr int CHUNK = {chunk};\n" + owner + _SUM_OF_SQUARES_SOURCE)
    (partials,) = kernel(
        inputs=arrays,
        template=[("T", arrays[0].dtype), ("BLOCK", SUM_OF_SQUARES_THREADS), ("ROUND", SUM_OF_SQUARES_ROUND)],
        grid=(blocks * SUM_OF_SQUARES_THREADS, 1, 1), threadgroup=(SUM_OF_SQUARES_THREADS, 1, 1),
        output_shapes=[(blocks,)], output_dtypes=[mx.float32])
    return partials.sum()


# Muon's per-group kernels (`nesterov_momentum`, `orthogonal_step`): one launch for a group of same-shape
# matrices, each block one chunk of one matrix (`matrix_group_start`).
MATRIX_GROUP_THREADS = 256
MATRIX_GROUP_CHUNK = 1 << 14  # elements a block updates: 16 per thread, 4 at a time
MATRIX_GROUP_MAX_ARRAYS = 128  # at most three pointers each (gradient, velocity, new velocity): under KERNEL_POINTERS
# packs a thread loads before it stores any: 1, 2, 4 and 8 took 2.81 / 2.85 / 2.83 / 2.78 ms for d20's groups
# on an H100 (bench/group_kernels.py; pointer tables in the stack: 4.73–5.35 ms)
NESTEROV_ROUND = 1
# the same for `orthogonal_step`: 2.66 / 2.25 / 2.55 / 2.54 ms for d20's groups on an H100 (MLX per matrix: 5.03 ms)
ORTHOGONAL_STEP_ROUND = 1


def matrix_group_start(n: int, size: int, pointers: str, leaf) -> tuple[str, int]:
    """The start of a kernel over a group of n same-size matrices, one MATRIX_GROUP_CHUNK of one matrix a
    block (Muon's per-group kernels): the constants SIZE and CHUNK, and the block's matrix k, its first
    block and `pointers` (declarations that leaf(k) sets); with the number of blocks the group needs."""
    blocks_per = -(-size // MATRIX_GROUP_CHUNK)
    owner = _block_owner([k * blocks_per for k in range(n)], f"{pointers} unsigned int first; int k;",
                         lambda k: f"{leaf(k)} first = {k * blocks_per}u; k = {k};")
    return f"  constexpr size_t SIZE = {size};\n  constexpr int CHUNK = {MATRIX_GROUP_CHUNK};\n" + owner, n * blocks_per


def _matrix_group_fits(arrays: list[mx.array]) -> bool:
    """Whether a group kernel takes these: 1 to MATRIX_GROUP_MAX_ARRAYS arrays of one float type and
    one shape, whose size is a multiple of 4 (a thread's pack)."""
    if not 0 < len(arrays) <= MATRIX_GROUP_MAX_ARRAYS:
        return False
    shape, dtype = arrays[0].shape, arrays[0].dtype
    return dtype in FLOAT_TYPES and arrays[0].size % 4 == 0 and all(a.shape == shape and a.dtype == dtype for a in arrays)


def nesterov_momentum_fits(grads: list[mx.array], velocities: list[mx.array]) -> bool:
    """Whether `nesterov_momentum` takes this group: gradients `_matrix_group_fits` takes, with fp32
    velocities of their shape."""
    return (_matrix_group_fits(grads) and len(velocities) == len(grads)
            and all(v.shape == grads[0].shape and v.dtype == mx.float32 for v in velocities))


def nesterov_momentum(grads: list[mx.array], velocities: list[mx.array], momentum: mx.array, scale: mx.array,
                      dtype: mx.Dtype) -> tuple[list[mx.array], mx.array]:
    """Muon's momentum over a group of same-shape matrices in one kernel: with g = scale·grad,
    v ← m·v + (1−m)·g (fp32) and the update g·(1−m) + v·m, written in `dtype` straight into one
    (n × rows × cols) stack for the batched Newton–Schulz. Returns (new velocities, stack)."""
    n = len(grads)
    g_names = tuple(f"g{i}" for i in range(n))
    v_names = tuple(f"v{i}" for i in range(n))
    o_names = tuple(f"v_out{i}" for i in range(n))
    start, blocks = matrix_group_start(n, grads[0].size, "const TG* g; const float* v; float* v_out;",
                                       lambda k: f"g = {g_names[k]}; v = {v_names[k]}; v_out = {o_names[k]};")
    kernel = _kernel("mlxchat_nesterov_momentum", (*g_names, *v_names, "scalars"), (*o_names, "stack"), start + _NESTEROV_SOURCE)
    scalars = mx.stack([momentum.astype(mx.float32), scale.astype(mx.float32)])
    outs = kernel(
        inputs=[*grads, *velocities, scalars],
        template=[("TG", grads[0].dtype), ("TU", dtype), ("BLOCK", MATRIX_GROUP_THREADS), ("ROUND", NESTEROV_ROUND)],
        grid=(blocks * MATRIX_GROUP_THREADS, 1, 1), threadgroup=(MATRIX_GROUP_THREADS, 1, 1),
        output_shapes=[grads[0].shape] * n + [(n, *grads[0].shape)], output_dtypes=[mx.float32] * n + [dtype])
    return list(outs[:n]), outs[n]


def orthogonal_step_fits(params: list[mx.array], stack: mx.array) -> bool:
    """Whether `orthogonal_step` takes this group: parameters `_matrix_group_fits` takes, and their
    (n × rows × cols) float stack."""
    return (_matrix_group_fits(params) and stack.shape == (len(params), *params[0].shape)
            and stack.dtype in FLOAT_TYPES)


def orthogonal_step(params: list[mx.array], stack: mx.array, lr: mx.array) -> list[mx.array]:
    """Muon's step over a group of same-shape matrices in one kernel: params[k] − lr·stack[k], in
    fp32 arithmetic and the parameters' dtype, where MLX runs one kernel per matrix (120 a d20 step:
    5.03 ms against 2.66 for d20's groups on an H100, `bench/group_kernels.py`)."""
    n = len(params)
    p_names, o_names = tuple(f"p{i}" for i in range(n)), tuple(f"p_out{i}" for i in range(n))
    start, blocks = matrix_group_start(n, params[0].size, "const TP* p; TP* p_out;",
                                       lambda k: f"p = {p_names[k]}; p_out = {o_names[k]};")
    kernel = _kernel("mlxchat_orthogonal_step", (*p_names, "stack", "scalars"), o_names, start + _ORTHOGONAL_STEP_SOURCE)
    return list(kernel(
        inputs=[*params, stack, lr.astype(mx.float32).reshape(1)],
        template=[("TP", params[0].dtype), ("TU", stack.dtype), ("BLOCK", MATRIX_GROUP_THREADS), ("ROUND", ORTHOGONAL_STEP_ROUND)],
        grid=(blocks * MATRIX_GROUP_THREADS, 1, 1), threadgroup=(MATRIX_GROUP_THREADS, 1, 1),
        output_shapes=[params[0].shape] * n, output_dtypes=[params[0].dtype] * n))


def decode_attention(q: mx.array, keys: mx.array, values: mx.array, length: mx.array, scale: float) -> mx.array:
    """softmax(scale · q·Kᵀ)·V of one query per row and head (B × H × 1 × D) over the first `length`
    keys of whole cache buffers (B × HKV × L × D; H a multiple of HKV): the compiled decode step's
    attention in one kernel, where MLX's fused ones take no array mask (one cuBLAS product each
    side, a select and a softmax), and over the written keys only instead of the whole buffer."""
    B, H, _, D = q.shape
    hkv, capacity = keys.shape[1], keys.shape[2]
    kernel = _kernel("mlxchat_decode_attention", ("q", "keys", "values", "length"), ("out",),
                     _DECODE_ATTENTION_SOURCE, SCALE=scale)
    (out,) = kernel(
        inputs=[q, keys, values, length.astype(mx.int32).reshape(1)],
        template=[("T", q.dtype), ("D", D), ("L", capacity), ("H", H), ("HKV", hkv),
                  ("BLOCK", DECODE_ATTENTION_THREADS)],
        grid=(B * H * DECODE_ATTENTION_THREADS, 1, 1), threadgroup=(DECODE_ATTENTION_THREADS, 1, 1),
        output_shapes=[q.shape], output_dtypes=[q.dtype])
    return out


def rms_norm(x: mx.array, eps: float) -> tuple[mx.array, mx.array]:
    """(RMSNorm of x over its last axis, the fp32 row scale 1/rms with a trailing axis of 1)."""
    d = x.shape[-1]
    rows = x.size // d
    kernel = _kernel("mlxchat_rms_norm", ("x",), ("y", "r"), _NORM_SOURCE, EPS=eps)
    y, r = kernel(
        inputs=[x], template=_norm_template(x.dtype, d),
        grid=(rows * WARP, 1, 1), threadgroup=(NORM_ROWS_PER_BLOCK * WARP, 1, 1),
        output_shapes=[x.shape, (*x.shape[:-1], 1)], output_dtypes=[x.dtype, mx.float32])
    return y, r


def rms_norm_vjp(y: mx.array, r: mx.array, dy: mx.array, residual: mx.array | None = None) -> mx.array:
    """d x of `rms_norm` from its output y, its row scale r and the cotangent dy, plus `residual`
    (another cotangent of x) when given, in the same pass."""
    d = y.shape[-1]
    rows = y.size // d
    kernel = _kernel("mlxchat_rms_norm_vjp", ("y", "r", "dy", "res"), ("dx",), _NORM_VJP_SOURCE)
    add = residual is not None
    (dx,) = kernel(
        inputs=[y, r, dy.astype(y.dtype), (residual if add else dy).astype(y.dtype)],
        template=[*_norm_template(y.dtype, d), ("ADD", add)],
        grid=(rows * WARP, 1, 1), threadgroup=(NORM_ROWS_PER_BLOCK * WARP, 1, 1),
        output_shapes=[y.shape], output_dtypes=[y.dtype])
    return dx


def _norm_template(dtype: mx.Dtype, d: int) -> list:
    return [("T", dtype), ("D", d), ("BLOCK", NORM_ROWS_PER_BLOCK * WARP)]


def rope_norm(x: mx.array, inv_freq: mx.array, eps: float) -> tuple[mx.array, mx.array]:
    """(RMSNorm(rope(x)), its fp32 row scale), both in x's layout B × T × H × D, at positions
    0…T−1 with the rotation of `mx.fast.rope(…, freqs=1/inv_freq)`."""
    B, T, H, D = x.shape
    kernel = _kernel("mlxchat_rope_norm", ("x", "inv_freq"), ("y", "r"), _ROPE_NORM_SOURCE, EPS=eps)
    y, r = kernel(
        inputs=[x, inv_freq.astype(mx.float32)], template=_rope_template(x.dtype, D, ROPE_ROUNDS),
        grid=(_rope_warps(x.dtype, D, B * T * H, ROPE_ROUNDS) * WARP, 1, 1), threadgroup=(NORM_ROWS_PER_BLOCK * WARP, 1, 1),
        output_shapes=[x.shape, (B, T, H, 1)], output_dtypes=[x.dtype, mx.float32])
    return y, r


def rope_norm_vjp(y: mx.array, r: mx.array, dy: mx.array, inv_freq: mx.array) -> mx.array:
    """d x of `rope_norm` from its output y, its row scale r and the cotangent dy (all B × T × H × D)."""
    B, T, H, D = y.shape
    kernel = _kernel("mlxchat_rope_norm_vjp", ("y", "r", "dy", "inv_freq"), ("dx",), _ROPE_NORM_VJP_SOURCE)
    (dx,) = kernel(
        inputs=[y, r, dy.astype(y.dtype), inv_freq.astype(mx.float32)],
        template=_rope_template(y.dtype, D, ROPE_VJP_ROUNDS),
        grid=(_rope_warps(y.dtype, D, B * T * H, ROPE_VJP_ROUNDS) * WARP, 1, 1), threadgroup=(NORM_ROWS_PER_BLOCK * WARP, 1, 1),
        output_shapes=[(B, T, H, D)], output_dtypes=[y.dtype])
    return dx


def _rope_template(dtype: mx.Dtype, d: int, rows_per_warp: int) -> list:
    return [("T_", dtype), ("D", d), ("BLOCK", NORM_ROWS_PER_BLOCK * WARP), ("RPW", rows_per_warp)]


def _rope_per_lane(dtype: mx.Dtype) -> int:
    """P of the rotary kernels: elements of each half of a row a lane loads, 16 bytes."""
    return 16 // dtype.size


def _rope_lanes(dtype: mx.Dtype, d: int) -> int:
    """L of the rotary kernels: the lanes one row of width d takes."""
    return d // (2 * _rope_per_lane(dtype))


def _rope_warps(dtype: mx.Dtype, d: int, rows: int, rounds: int) -> int:
    """Warps for `rows`: each takes 32 / L rows side by side, `rounds` times."""
    return -(-rows // (WARP // _rope_lanes(dtype, d) * rounds))
