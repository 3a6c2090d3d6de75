"""nanochat's GPT (Oct 2025) in MLX.

Notable features, as nanochat:
- rotary embeddings (no positional embeddings), QK norm, untied wte / lm_head
- relu^2 MLP, parameter-free RMSNorm (also right after the token embedding), no biases
- logits softcap 15·tanh(x/15), GQA through n_kv_head

Parameter names follow nanochat (`transformer.wte.weight`, `transformer.h.{i}.attn.c_q.weight`,
`lm_head.weight`, ...) so checkpoints map 1:1 onto nanochat's and mlx-lm's `nanochat` model.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import asdict, dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlxchat import arithmetic, cpu_attention, cuda_kernels, cudnn_attention
from mlxchat.common import MlxchatError

SOFTCAP = 15.0
ROPE_BASE = 10000.0
# mlx-lm's nanochat model uses eps 1e-5; matching it makes a published model's logits agree.
NORM_EPS = 1e-5
# Rows of the (rows × vocab) fp32 logits materialised at once by the chunked loss (≈ 1 GiB at vocab 65536).
LOSS_CHUNK_ELEMENTS = 1 << 28
# The fused loss holds a chunk's logits and logit gradient in the compute dtype and one fp32 copy
# (its softcap). 2^28 (16 chunks at B32×2048, vocab 65536) peaked 3 GiB lower than 2^29 on an H200
# at the same speed (bench/README.md).
FUSED_LOSS_CHUNK_ELEMENTS = 1 << 28
# Chunks of the head's weight gradient summed in the compute dtype before the fp32 sum
# (`_head_gradients`): each partial sum is rounded to bf16 once per chunk, as each chunk's own
# gradient was, so the rounding stays within a few chunks' magnitude.
HEAD_CHUNKS_PER_SUM = 4
LOSS_ENV = "MLXCHAT_LOSS"
LOSS_KERNELS = ("cuda", "fused", "portable")


@dataclass(frozen=True)
class GPTConfig:
    sequence_len: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768

    @classmethod
    def from_depth(cls, depth: int, vocab_size: int = 65536, sequence_len: int = 2048) -> "GPTConfig":
        """nanochat's single dial: dim = 64·depth, head_dim 128 (ceil-divided heads), no GQA."""
        if depth < 1:
            raise MlxchatError(f"--depth must be >= 1, got {depth}")
        model_dim = depth * 64
        n_head = max(1, (model_dim + 127) // 128)
        return cls(sequence_len, vocab_size, depth, n_head, n_head, model_dim).validated()

    def validated(self) -> "GPTConfig":
        if self.n_embd % self.n_head:
            raise MlxchatError(
                f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}: choose a head count that divides it"
            )
        if (self.n_embd // self.n_head) % 2:
            raise MlxchatError(f"head dim {self.n_embd // self.n_head} must be even for rotary embeddings")
        if self.n_kv_head > self.n_head or self.n_head % self.n_kv_head:
            raise MlxchatError(f"n_kv_head {self.n_kv_head} must divide n_head {self.n_head}")
        return self

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def norm(x: mx.array) -> mx.array:
    """Parameter-free RMSNorm."""
    return mx.fast.rms_norm(x, None, NORM_EPS)


def block_norm(cache: Any):
    """The norm a block applies: without a KV cache (training, evaluation) the one whose backward
    keeps its output (`norm_keeping_output`); decoding skips its extra row-scale pass."""
    return norm if cache is not None else norm_keeping_output


def norm_keeping_output(x: mx.array) -> mx.array:
    """`norm` whose backward keeps its output and row scale instead of its input (`_rms_norm`)."""
    return _rms_norm(x)[0]


def residual_and_norm(x: mx.array, cache: Any) -> tuple[mx.array, mx.array]:
    """(x, norm(x)) for a block's branch, x its residual: in training one backward pass forms the
    gradient of both uses of x, d x = d residual + norm's backward (`_residual_rms_norm`), instead
    of the norm's backward and then a separate add over the residual stream."""
    if cache is not None:
        return x, norm(x)
    x, y, _ = _residual_rms_norm(x)
    return x, y


@mx.custom_function
def _rms_norm(x: mx.array) -> tuple[mx.array, mx.array]:
    """(RMSNorm of x, its per-row scale 1/rms): a backward that keeps the output, not the input.

    Every norm's output is kept anyway (by the matmuls or the attention that read it), so the
    backward recovers the input from it, x = y / r, for MLX's fused RMSNorm backward: one row
    scale kept instead of the input, i.e. the residual stream twice per block and q and k before
    their norm. (The closed form dx = r·(dy − y·mean(dy·y)) keeps the same but measured 5% slower
    on an H200: it is several unfused kernels.)"""
    return _norm_and_scale(x)


@_rms_norm.vjp
def _rms_norm_vjp(primals, cotangents, outputs):
    return _norm_backward(*outputs, cotangents[0])


@mx.custom_function
def _residual_rms_norm(x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    """(x itself, RMSNorm of x, its row scale), differentiated as `_rms_norm` plus x's own
    cotangent, added inside the norm's backward kernel on CUDA. Returning x costs nothing: a
    custom function's outputs share their buffers."""
    return (x, *_norm_and_scale(x))


@_residual_rms_norm.vjp
def _residual_rms_norm_vjp(primals, cotangents, outputs):
    return _norm_backward(outputs[1], outputs[2], cotangents[1], cotangents[0])


def _norm_and_scale(x: mx.array) -> tuple[mx.array, mx.array]:
    if _cuda_norm(x):  # one pass for both outputs (`cuda_kernels.rms_norm`)
        return cuda_kernels.rms_norm(x, NORM_EPS)
    r = mx.rsqrt(mx.mean(mx.square(x.astype(mx.float32)), axis=-1, keepdims=True) + NORM_EPS)
    return mx.fast.rms_norm(x, None, NORM_EPS), r


def _norm_backward(y: mx.array, r: mx.array, dy: mx.array, residual: mx.array | None = None) -> mx.array:
    """d x of the norm from its output y and row scale r, plus `residual` (x's other cotangent)."""
    if _cuda_norm(y):
        return cuda_kernels.rms_norm_vjp(y, r, dy, residual)
    x = (y.astype(mx.float32) / r).astype(y.dtype)  # the input back, for the fused RMSNorm backward
    dx = mx.vjp(norm, [x], [dy])[1][0]
    return dx if residual is None else dx + residual


def _cuda_norm(x: mx.array) -> bool:
    return cuda_kernels.available() and cuda_kernels.norm_fits(x)


class CastLinear(nn.Linear):
    """A bias-free Linear that computes in its input's dtype.

    Master weights stay fp32 (so the optimizer math is fp32) while matmuls run in the
    activation dtype (bfloat16 on GPUs): MLX's equivalent of nanochat's torch autocast. In
    training mode (nn.Module's default) it is differentiated by hand and its weight gradient comes
    back in that dtype (`_linear`); in eval mode (`model.eval()`, as the inference loaders set)
    the same ops run plain, without a custom function's per-call host work (~20–50 µs, which a
    small model's eager per-token forward feels)."""

    def __init__(self, in_dims: int, out_dims: int):
        super().__init__(in_dims, out_dims, bias=False)

    def __call__(self, x: mx.array, residual: mx.array | None = None) -> mx.array:
        """x @ W.T, plus `residual` inside the GEMM (its epilogue on CUDA: no separate add pass).
        Both run on rows (B·T × n), so the weight gradient is one GEMM over every row."""
        rows = x.reshape(-1, x.shape[-1])
        if residual is None:
            y = (_linear if self.training else _cast_matmul)(rows, self.weight)[0]
        else:
            onto = _linear_onto if self.training else _cast_matmul_onto
            y = onto(rows, self.weight, residual.reshape(-1, self.weight.shape[0]))[0]
        return y.reshape(*x.shape[:-1], self.weight.shape[0])


def _cast_matmul(x: mx.array, w: mx.array) -> tuple[mx.array, mx.array]:
    """(x @ Wᵀ in x's dtype, W cast to it)."""
    wc = w.astype(x.dtype)
    return x @ wc.T, wc


def _cast_matmul_onto(x: mx.array, w: mx.array, residual: mx.array) -> tuple[mx.array, mx.array]:
    """(residual + x @ Wᵀ through `mx.addmm`, W cast)."""
    wc = w.astype(x.dtype)
    return mx.addmm(residual, x, wc.T), wc


_linear = mx.custom_function(_cast_matmul)  # differentiated by hand (`_linear_backward`)
_linear_onto = mx.custom_function(_cast_matmul_onto)  # differentiated as `_linear`


@_linear.vjp
def _linear_vjp(primals, cotangents, outputs):
    return _linear_backward(primals[0], outputs[1], cotangents[0])


@_linear_onto.vjp
def _linear_onto_vjp(primals, cotangents, outputs):
    return (*_linear_backward(primals[0], outputs[1], cotangents[0]), cotangents[0])


def _linear_backward(x: mx.array, wc: mx.array, dy: mx.array) -> tuple[mx.array, mx.array]:
    """(d x, d W) of y = x @ Wᵀ."""
    return dy @ wc, _weight_gradient(dy, x)


def _weight_gradient(dy: mx.array, x: mx.array) -> mx.array:
    """d W = dyᵀ·x: one GEMM into W's own (out × in) layout, left in the compute dtype. Autodiff
    forms (xᵀ·dy)ᵀ, a transposed view that the cast back to W's fp32 then copies twice (a cast and
    a transposing copy per matrix, 6 ms of a d20 step on an H100). The bf16 values are what
    autodiff casts up exactly, so the optimizer sees the same numbers (`optim.add_gradients` sums
    micro-batches in fp32)."""
    return dy.T @ x


def _cast_qkv(x: mx.array, wq: mx.array, wk: mx.array, wv: mx.array) -> tuple[mx.array, ...]:
    """(q, k, v) = x @ Wq/k/vᵀ on rows, and the three weights cast (`_cast_matmul`)."""
    ws = [w.astype(x.dtype) for w in (wq, wk, wv)]
    return (*(x @ w.T for w in ws), *ws)


# Its backward chains x's three gradient products through `mx.addmm` (each added in the next
# GEMM's epilogue) instead of summing them in a separate pass over the residual width.
_qkv = mx.custom_function(_cast_qkv)


@_qkv.vjp
def _qkv_vjp(primals, cotangents, outputs):
    x, ws, dys = primals[0], outputs[3:], cotangents[:3]
    dx = dys[0] @ ws[0]
    for dy, w in zip(dys[1:], ws[1:]):
        dx = mx.addmm(dx, dy, w)
    return (dx, *(_weight_gradient(dy, x) for dy in dys))


@dataclass(frozen=True)
class KeyPrefix:
    """An attention mask that shows every query the first `length` keys (an int32 array: one length,
    or one per row) and no others: the compiled decode step's, over a whole cache buffer of which
    only a prefix is written."""

    length: mx.array


def attend(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: Any) -> mx.array:
    """`mx.fast.scaled_dot_product_attention`; causal attention through cuDNN with a top-left mask
    where that extension runs (`cudnn_attention`: MLX's own asks cuDNN for a slower one), on the CPU
    with an arithmetic softmax (`cpu_attention`: q and k are QK-normed, so the scores are bounded); and a
    KeyPrefix mask: one CUDA kernel that reads only the prefix (`cuda_kernels.decode_attention`)
    where it fits, else the same prefix as a bool mask."""
    if isinstance(mask, str) and mask == "causal" and cudnn_attention.runs_for(q, k, v):
        return cudnn_attention.causal(q, k, v, scale)
    if cpu_attention.runs_for(q, k, mask):
        return cpu_attention.causal(q, k, v, scale)
    if isinstance(mask, KeyPrefix):
        if mask.length.ndim == 0 and cuda_kernels.available() and cuda_kernels.decode_attention_fits(q, k):
            return cuda_kernels.decode_attention(q, k, v, mask.length, scale)
        mask = mx.arange(k.shape[2]) < mask.length.reshape(-1, 1, 1, 1)  # one length, or one a row
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.c_q = CastLinear(config.n_embd, config.n_head * self.head_dim)
        self.c_k = CastLinear(config.n_embd, config.n_kv_head * self.head_dim)
        self.c_v = CastLinear(config.n_embd, config.n_kv_head * self.head_dim)
        self.c_proj = CastLinear(config.n_embd, config.n_embd)
        half = self.head_dim // 2
        # Negated frequencies turn mx.fast.rope's rotation into nanochat's (y1 = x1·cos + x2·sin).
        self._freqs = -mx.exp(mx.arange(0.0, half, dtype=mx.float32) * (math.log(ROPE_BASE) / half))
        self._inv_freqs = mx.reciprocal(self._freqs)  # the angles per position, as mx.fast.rope forms them

    def __call__(self, x: mx.array, cache: Any = None, residual: mx.array | None = None) -> mx.array:
        """Attention of x; with `residual`, residual + that (added by the output projection's GEMM)."""
        B, T, _ = x.shape
        q, k, v = self._project(x)
        q = q.reshape(B, T, self.n_head, self.head_dim)
        k = k.reshape(B, T, self.n_kv_head, self.head_dim)
        v = v.reshape(B, T, self.n_kv_head, self.head_dim).transpose(0, 2, 1, 3)
        q, k = self._rope_norm(q, cache), self._rope_norm(k, cache)  # rotary, then QK norm
        mask = "causal"
        if cache is not None:  # the cache knows which of what it returns this step may see
            mask = cache.make_mask(T)
            k, v = cache.update_and_fetch(k, v)
        y = attend(q, k, v, self.head_dim**-0.5, mask)
        y = y.transpose(0, 2, 1, 3).reshape(B, T, -1)
        return self.c_proj(y) if residual is None else project_onto(self.c_proj, y, residual)

    def _project(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """q, k, v of x: one custom function for CastLinears in training (`_qkv`), the same ops
        plain in eval mode (see CastLinear), else each layer (quantized)."""
        layers = (self.c_q, self.c_k, self.c_v)
        if all(type(layer) is CastLinear for layer in layers):
            project = _qkv if self.training else _cast_qkv
            return project(x.reshape(-1, x.shape[-1]), *(layer.weight for layer in layers))[:3]
        return tuple(layer(x) for layer in layers)

    def _rope_norm(self, x: mx.array, cache: Any) -> mx.array:
        """Rotary embedding then QK norm of a projection (B, T, heads, head_dim), returned as
        (B, heads, T, head_dim): one CUDA kernel each way in training (`_cuda_rope_norm`), whose
        output keeps the projection's layout and is handed to attention transposed, as v is."""
        if cache is None and cuda_kernels.available() and cuda_kernels.rope_norm_fits(x):
            return _cuda_rope_norm(x, self._inv_freqs)[0].transpose(0, 2, 1, 3)
        offset = 0 if cache is None else cache.offset
        rope = dict(dims=self.head_dim, traditional=False, base=None, scale=1.0, offset=offset, freqs=self._freqs)
        return block_norm(cache)(mx.fast.rope(x.transpose(0, 2, 1, 3), **rope))


@mx.custom_function
def _cuda_rope_norm(x: mx.array, inv_freq: mx.array) -> tuple[mx.array, mx.array]:
    """`cuda_kernels.rope_norm`, whose backward keeps its output and row scale, as `_rms_norm`."""
    return cuda_kernels.rope_norm(x, inv_freq, NORM_EPS)


@_cuda_rope_norm.vjp
def _cuda_rope_norm_vjp(primals, cotangents, outputs):
    y, r = outputs
    inv_freq = primals[1]
    return cuda_kernels.rope_norm_vjp(y, r, cotangents[0], inv_freq), mx.zeros_like(inv_freq)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = CastLinear(config.n_embd, 4 * config.n_embd)
        self.c_proj = CastLinear(4 * config.n_embd, config.n_embd)

    def __call__(self, x: mx.array, residual: mx.array) -> mx.array:
        """residual + the MLP of x, the add inside the output projection's GEMM."""
        return project_onto(self.c_proj, squared_relu(self.c_fc(x)), residual)


def project_onto(linear: nn.Module, x: mx.array, residual: mx.array) -> mx.array:
    """residual + linear(x): inside the GEMM for a CastLinear, a separate add for any other
    layer (e.g. a quantized one)."""
    return linear(x, residual) if isinstance(linear, CastLinear) else residual + linear(x)


@mx.custom_function
def squared_relu(h: mx.array) -> mx.array:
    """relu(h)², whose backward reads its output instead of h: d h = g·2·relu(h) = g·2·√(relu(h)²).

    The projection after it keeps relu(h)² for its weight gradient anyway, so nothing else of the
    MLP is kept: autodiff would keep h (and relu(h)) as well, and recomputing relu² from a kept h
    reads h and writes relu² again in the backward. One elementwise pass, reading relu(h)² and g
    and writing d h, in fp32 arithmetic (√ of a bf16 square is within 2^-10 of relu(h))."""
    return nn.relu2(h)


@squared_relu.vjp
def _squared_relu_vjp(primals, cotangent, output):
    return (2 * mx.sqrt(output.astype(mx.float32)) * cotangent.astype(mx.float32)).astype(cotangent.dtype)


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.attn = CausalSelfAttention(config)
        self.mlp = MLP(config)

    def __call__(self, x: mx.array, cache: Any = None) -> mx.array:
        x, xn = residual_and_norm(x, cache)
        x = self.attn(xn, cache, residual=x)
        x, xn = residual_and_norm(x, cache)
        return self.mlp(xn, residual=x)


class Transformer(nn.Module):
    """Holds `wte` and `h` so parameter paths read `transformer.wte…`, `transformer.h.{i}…`."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.h = [Block(config) for _ in range(config.n_layer)]


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, compute_dtype: mx.Dtype = mx.float32, checkpoint_blocks: bool = False):
        super().__init__()
        self.config = config.validated()
        self.compute_dtype = compute_dtype
        # Recompute each block's activations in the backward instead of keeping them (mx.checkpoint):
        # ~1/3 more compute for a fraction of the activation memory, for when memory binds (a Mac).
        self.checkpoint_blocks = checkpoint_blocks
        self.transformer = Transformer(config)
        self.lm_head = CastLinear(config.n_embd, config.vocab_size)  # untied from wte

    def init_weights(self, seed: int = 0) -> None:
        """nanochat's init: N(0, 1/√fan_in·min(1, √(fan_out/fan_in))) linears, N(0,1) embedding,
        zero lm_head and zero c_proj (every block starts as the identity)."""
        key = mx.random.key(seed)
        new = {}
        for i, (name, p) in enumerate(sorted(nn.utils.tree_flatten(self.parameters()))):
            k = mx.random.fold_in(key, i) if hasattr(mx.random, "fold_in") else mx.random.split(key, i + 1)[i]
            if name == "lm_head.weight" or name.endswith("c_proj.weight"):
                new[name] = mx.zeros(p.shape, mx.float32)
            elif name == "transformer.wte.weight":
                new[name] = mx.random.normal(p.shape, key=k)
            else:
                fan_out, fan_in = p.shape
                std = 1.0 / math.sqrt(fan_in) * min(1.0, math.sqrt(fan_out / fan_in))
                new[name] = mx.random.normal(p.shape, scale=std, key=k)
        self.update(nn.utils.tree_unflatten(list(new.items())))
        mx.eval(self.parameters())

    def num_params(self) -> int:
        return sum(p.size for _, p in nn.utils.tree_flatten(self.parameters()))

    def estimate_flops(self) -> int:
        """FLOPs per token (PaLM appendix B), as nanochat: 6·(non-embedding params) + attention."""
        c = self.config
        nparams_embedding = self.transformer.wte.weight.size
        return 6 * (self.num_params() - nparams_embedding) + 12 * c.n_layer * c.n_head * c.head_dim * c.sequence_len

    def hidden(self, idx: mx.array, cache: list | None = None) -> mx.array:
        """The trunk: final normalised hidden states (B, T, C) in the compute dtype."""
        n = block_norm(cache)
        x = n(self.transformer.wte(idx).astype(self.compute_dtype))
        for i, block in enumerate(self.transformer.h):
            if cache is None and self.checkpoint_blocks:
                x = nn.utils.checkpoint(block)(x)
            else:
                x = block(x, None if cache is None else cache[i])
        return n(x)

    def logits(self, h: mx.array) -> mx.array:
        """lm_head + softcap, in fp32, the softcap's cast, divide, tanh and multiply fused into one
        kernel (`_fused_softcap`): per decoded token they are launches, not work."""
        return _fused_softcap(self.lm_head(h))

    def __call__(
        self, idx: mx.array, targets: mx.array | None = None, cache: list | None = None, reduction: str = "mean"
    ) -> mx.array:
        """Logits (B, T, V) without targets; with targets the loss (targets < 0 are ignored):
        'mean' over valid tokens — the training loss, whose head gradient is formed in the same
        pass (`chunked_loss_sum`) —, 'sum' (the same, for a shard of a batch whose mean the caller
        forms: `cpu_shards`), or 'none' for per-token losses (B, T), which evaluations use."""
        h = self.hidden(idx, cache)
        if targets is None:
            return self.logits(h)
        if reduction == "none":
            return chunked_cross_entropy(self, h, targets)
        loss = chunked_loss_sum(self, h, targets)
        return loss if reduction == "sum" else loss / valid_target_count(targets)


def valid_target_count(targets: mx.array) -> mx.array:
    """The training loss's denominator: how many targets are not ignored (< 0), at least 1."""
    return mx.maximum((targets >= 0).sum(), 1)


def loss_kernel() -> str:
    """Which per-chunk loss the training forward/backward uses, chosen at run time.

    'cuda': on MLX's CUDA backend, `cuda_kernels.softcap_cross_entropy`: a chunk's losses and
    logit gradient in one kernel, two reads of the bf16 logits and one write (the training loss;
    per-token losses under autodiff take it for their gradient only).
    'fused': `mx.fast.cross_entropy` (one kernel, fp32 accumulation, on Metal and CUDA) on the
    softcapped logits, and a backward that is one elementwise pass over the logits (the
    log-sum-exp comes from the forward's loss, so no softmax reduction is recomputed).
    'portable': MLX ops only, which is what the CPU runs (there `mx.fast.cross_entropy` falls back to
    the same unfused ops), the softcap's tanh and the exps as arithmetic: the training loss forms a
    chunk's losses and gradient together (`_portable_losses_and_dlogits`), per-token losses
    recompute them in the backward (`_portable_losses`, `_portable_dlogits`).
    `MLXCHAT_LOSS=cuda|fused|portable` overrides the choice (benchmarks, tests)."""
    forced = os.environ.get(LOSS_ENV, "")
    if forced:
        if forced not in LOSS_KERNELS:
            raise MlxchatError(f"{LOSS_ENV}={forced!r}: expected one of {', '.join(LOSS_KERNELS)} (or unset)")
        if forced == "cuda" and not cuda_kernels.available():
            raise MlxchatError(f"{LOSS_ENV}=cuda needs MLX's CUDA backend on the default GPU: unset it or pick fused")
        return forced
    if cuda_kernels.available():
        return "cuda"
    return "fused" if hasattr(mx.fast, "cross_entropy") and mx.default_device() == mx.gpu else "portable"


def _chunk_rows(model: "GPT", rows: int, kernel: str) -> int:
    budget = LOSS_CHUNK_ELEMENTS if kernel == "portable" else FUSED_LOSS_CHUNK_ELEMENTS
    return max(1, min(rows, budget // model.config.vocab_size))


def chunked_cross_entropy(model: "GPT", h: mx.array, targets: mx.array) -> mx.array:
    """Per-token losses (B, T), computing lm_head → softcap → cross-entropy a block of rows at a
    time so the full (B·T × vocab) fp32 logits never exist: at B32×2048×65536 they have more
    than 2^32 elements (MLX crashes) and dominate memory.

    The chunks run one after another in the forward and in the backward pass (see
    `_sequential_chunk_losses`); the backward recomputes each chunk's logits instead of keeping
    them alive. With a single portable chunk, plain autodiff keeps the logits (no recomputation)."""
    B, T, C = h.shape
    rows = B * T
    h2, t2 = h.reshape(rows, C), targets.reshape(rows)
    kernel = loss_kernel()
    chunk = _chunk_rows(model, rows, kernel)
    head = model.lm_head
    if kernel == "portable" and chunk >= rows:
        return token_losses(head(h2), t2).reshape(B, T)
    if not isinstance(head, CastLinear):  # e.g. a quantized head: checkpointed autodiff per chunk
        chunk_fn = nn.utils.checkpoint(head, lambda hh, tt: token_losses(head(hh), tt))
        parts = [chunk_fn(h2[s : s + chunk], t2[s : s + chunk]) for s in range(0, rows, chunk)]
        return mx.concatenate(parts).reshape(B, T)
    return _sequential_chunk_losses(chunk, kernel)(h2, t2, head.weight).reshape(B, T)


def chunked_loss_sum(model: "GPT", h: mx.array, targets: mx.array) -> mx.array:
    """The sum of the per-token losses (targets < 0 ignored), with the head's gradient formed
    chunk by chunk in the same pass (`_loss_sum_with_gradient`): the training loss.

    Against `chunked_cross_entropy` under autodiff this computes each chunk's logits once instead
    of twice (3 head GEMMs, not 4) and frees them before the next chunk, so only one chunk's
    logits exist at any time; the price is that a forward-only call pays for the gradient too,
    which is why evaluations take reduction='none'."""
    if not isinstance(model.lm_head, CastLinear):
        return chunked_cross_entropy(model, h, targets).sum()
    B, T, C = h.shape
    kernel = loss_kernel()
    fn = _loss_sum_with_gradient(_chunk_rows(model, B * T, kernel), kernel)
    return fn(h.reshape(B * T, C), targets.reshape(B * T), model.lm_head.weight)[0]


def _head_gradients(h: mx.array, weight: mx.array, chunk: int, dlogits) -> tuple[mx.array, mx.array]:
    """(d h, d weight) of `h @ weight.T` a chunk of rows at a time, given `dlogits(z, start)`, the
    gradient at one chunk's logits `z`.

    Why `mx.depends`: MLX evaluates a graph breadth-first, so independent chunks would all run
    side by side with every chunk's (chunk × vocab) temporaries alive at once — chunking would save
    nothing (measured: d12 B8×2048 on an H100 peaked at 32 GiB, more than the unchunked port).
    Each chunk's logits wait for the previous chunk's d h *and* the running d weight: the two
    consumers of its logit gradient, which is freed only once both have run.

    d weight sums HEAD_CHUNKS_PER_SUM chunks in the compute dtype, each added in the next one's
    GEMM epilogue (`mx.addmm`: fp32 arithmetic, one rounding), and only those partial sums in
    fp32: a pass over the fp32 weight gradient per chunk (16 at d20, 4 ms on an H100) becomes
    one per group."""
    w = weight.astype(h.dtype)
    dh_parts, dw, partial = [], None, None
    for i, s in enumerate(range(0, h.shape[0], chunk)):
        hh = h[s : s + chunk]
        if dh_parts:
            hh = mx.depends(hh, [dw if partial is None else partial, dh_parts[-1]])
        dz = dlogits(hh @ w.T, s)
        dh_parts.append(dz @ w)
        partial = dz.T @ hh if partial is None else mx.addmm(partial, dz.T, hh)
        if (i + 1) % HEAD_CHUNKS_PER_SUM == 0 or s + chunk >= h.shape[0]:
            dw = partial.astype(mx.float32) if dw is None else dw + partial.astype(mx.float32)
            partial = None
    return mx.concatenate(dh_parts), dw.astype(weight.dtype)


def _kernels(kernel: str):
    """(chunk losses, chunk logit gradient) of the kernel `loss_kernel` picked."""
    if kernel == "cuda":
        return _fused_losses, _cuda_dlogits
    return (_fused_losses, _fused_dlogits) if kernel == "fused" else (_portable_losses, _portable_dlogits)


@functools.lru_cache(maxsize=None)
def _sequential_chunk_losses(chunk: int, kernel: str):
    """Per-row losses of `h @ weight.T` (softcapped) against targets, `chunk` rows at a time, with
    a hand-written backward that recomputes each chunk's logits; `kernel` ('fused' or 'portable',
    see `loss_kernel`) picks how a chunk's loss and logit gradient are computed.

    The forward chains each chunk after the previous one's losses, the backward as
    `_head_gradients`, so only one chunk's temporaries exist at a time. The backward reuses tanh
    for the softcap's derivative and forms softmax − onehot directly, instead of differentiating
    through them."""
    chunk_losses, chunk_dlogits = _kernels(kernel)

    @mx.custom_function
    def losses(h, targets, weight):
        w = weight.astype(h.dtype)
        parts = []
        for s in range(0, h.shape[0], chunk):
            hh = h[s : s + chunk]
            if parts:
                hh = mx.depends(hh, parts[-1])
            parts.append(chunk_losses(hh @ w.T, targets[s : s + chunk]))
        return mx.concatenate(parts)

    @losses.vjp
    def losses_vjp(primals, cotangent, output):
        h, targets, weight = primals

        def dlogits(z, s):
            e = s + chunk
            return chunk_dlogits(z, targets[s:e], cotangent[s:e], output[s:e])

        dh, dw = _head_gradients(h, weight, chunk, dlogits)
        return dh, mx.zeros_like(targets), dw

    return losses


@functools.lru_cache(maxsize=None)
def _loss_sum_with_gradient(chunk: int, kernel: str):
    """(sum of the per-row losses, d sum / d h, d sum / d weight) of `h @ weight.T` (softcapped)
    against targets, `chunk` rows at a time, the gradient formed right after each chunk's losses
    while its logits are at hand (as Liger-Kernel's fused linear cross-entropy); the vjp only
    scales the two gradients by the incoming cotangent, a scalar."""
    chunk_losses, chunk_dlogits = _kernels(kernel)

    @mx.custom_function
    def loss_sum(h, targets, weight):
        sums = []

        def dlogits(z, s):
            tt = targets[s : s + chunk]
            if kernel == "cuda" and cuda_kernels.loss_fits(z):
                losses, dz = cuda_kernels.softcap_cross_entropy(z, tt, mx.ones(tt.shape, mx.float32), SOFTCAP)
            elif kernel == "portable":
                losses, dz = _portable_losses_and_dlogits(z, tt)
            else:
                losses = chunk_losses(z, tt)
                dz = chunk_dlogits(z, tt, mx.ones_like(losses), losses)
            sums.append(losses.sum())
            return dz

        dh, dw = _head_gradients(h, weight, chunk, dlogits)
        return functools.reduce(mx.add, sums), dh, dw

    @loss_sum.vjp
    def loss_sum_vjp(primals, cotangents, outputs):
        h, targets, weight = primals
        g = cotangents[0]
        return (outputs[1].astype(mx.float32) * g).astype(h.dtype), mx.zeros_like(targets), (outputs[2] * g).astype(weight.dtype)

    return loss_sum


def _softcap_softmax_gradient(p: mx.array, t: mx.array, targets: mx.array, g: mx.array, dtype: mx.Dtype) -> mx.array:
    """d loss / d z = (softmax − onehot(targets))·g[row]·(1 − tanh²), given the softmax p of the
    softcapped logits and t = tanh(z / SOFTCAP) (d softcap(z)/dz = 1 − t²), in `dtype`."""
    onehot = mx.arange(p.shape[-1]) == targets[..., None]
    return ((p - onehot) * g[..., None] * (1 - t * t)).astype(dtype)


@mx.compile
def _portable_losses_and_dlogits(z: mx.array, targets: mx.array) -> tuple[mx.array, mx.array]:
    """One chunk's losses and d Σ losses / d z from MLX ops, with one tanh and one exp a logit
    (`arithmetic.tanh`, `arithmetic.exp`, not libm): the training loss on the CPU, where
    `_portable_losses` then `_portable_dlogits` computed both twice.

    Why: without Apple's Accelerate, MLX's CPU kernels run one lane at a time (`mlx/backend/cpu/simd`
    on Linux: tanh ~8–20 ns a logit on a 2-core EPYC, exp ~12), so the transcendentals were most of
    a d4 step there: one 2048 × 8192 chunk took 876 ms as the two passes, 475 ms so, and the
    arithmetic forms took the d4 step from ~2,150 to ~2,390 tok/s at the same peak (bench/README.md,
    eighteenth session). As in the CUDA kernel, the softcap bounds the logits to ±SOFTCAP, so the
    sum of their exps needs no running maximum (at most vocab·e^SOFTCAP: 2e11 at 65,536, far inside
    fp32). Ignored rows (targets < 0) give 0 and zeros."""
    valid = targets >= 0
    safe = mx.where(valid, targets, 0)
    t = arithmetic.tanh(z.astype(mx.float32), 1 / SOFTCAP)
    e = arithmetic.exp(t, SOFTCAP)
    total = e.sum(axis=-1, keepdims=True)
    picked = SOFTCAP * mx.take_along_axis(t, safe[:, None], axis=-1)[:, 0]
    losses = mx.where(valid, mx.log(total[:, 0]) - picked, 0.0)
    return losses, _softcap_softmax_gradient(e / total, t, safe, valid.astype(mx.float32), z.dtype)


@mx.compile
def _portable_losses(z: mx.array, targets: mx.array) -> mx.array:
    """Per-position losses of the head's raw outputs z (..., vocab) against targets (...; < 0
    ignored, giving 0), the softcap's tanh and the log-sum-exp's exp as arithmetic
    (`arithmetic.tanh`, `arithmetic.exp`): per-token losses on the CPU (CORE, bpb, SFT's validation
    loss, RL).

    Why: there MLX's `tanh` and `exp` are libm calls a lane, 8–20 ns a logit each, which at d4
    with an 8,192 vocabulary cost more than the forward's GEMMs. The softcap bounds the logits to
    ±SOFTCAP, so no running maximum is needed (see `_portable_losses_and_dlogits`); the target's
    logit is softcapped on its own so that only the exps are materialised. Compiled for each shape
    (CORE's rows change width with every example: ~25 ms a new one at 2 × 120 × 8,192, against 67
    for MLX's ops), not shapeless, whose kernels ran 4.5× slower here."""
    valid = targets >= 0
    safe = mx.where(valid, targets, 0)
    t = arithmetic.tanh(z.astype(mx.float32), 1 / SOFTCAP)
    picked = arithmetic.tanh(mx.take_along_axis(z, safe[..., None], axis=-1)[..., 0].astype(mx.float32), 1 / SOFTCAP)
    return mx.where(valid, mx.log(arithmetic.exp(t, SOFTCAP).sum(axis=-1)) - SOFTCAP * picked, 0.0)


@mx.compile
def _portable_dlogits(z: mx.array, targets: mx.array, cotangent: mx.array, losses: mx.array) -> mx.array:
    """d loss / d z for one chunk in one elementwise pass over z, with `_portable_losses`'s
    arithmetic tanh and exp: the forward's loss gives the log-sum-exp back (as `_fused_dlogits`),
    so the softmax needs no reduction. Ignored rows get lse = +inf, i.e. a zero gradient. Any
    leading shape (rows, or CORE's and RL's batch × positions)."""
    valid = targets >= 0
    safe = mx.where(valid, targets, 0)
    picked = arithmetic.tanh(mx.take_along_axis(z, safe[..., None], axis=-1).astype(mx.float32), 1 / SOFTCAP)
    lse = mx.where(valid[..., None], losses[..., None] + SOFTCAP * picked, mx.inf)
    t = arithmetic.tanh(z.astype(mx.float32), 1 / SOFTCAP)
    p = arithmetic.exp(t, SOFTCAP) * mx.exp(-lse)
    g = mx.where(valid, cotangent, 0.0).astype(mx.float32)
    return _softcap_softmax_gradient(p, t, safe, g, z.dtype)


@mx.custom_function
def _portable_token_losses(z: mx.array, targets: mx.array) -> mx.array:
    """`_portable_losses` of one chunk of rows under autodiff: its vjp is `_portable_dlogits`,
    so only z is kept for the backward, not the softcap's and log-sum-exp's intermediates."""
    return _portable_losses(z, targets)


@_portable_token_losses.vjp
def _portable_token_losses_vjp(primals, cotangent, output):
    z, targets = primals
    return _portable_dlogits(z, targets, cotangent, output), mx.zeros_like(targets)


@mx.compile
def _fused_losses(z: mx.array, targets: mx.array) -> mx.array:
    """One chunk's losses: the softcap (fused with the cast into one elementwise kernel by
    mx.compile) feeding `mx.fast.cross_entropy`; ignored targets (< 0) give 0."""
    valid = targets >= 0
    return mx.where(valid, mx.fast.cross_entropy(_softcap(z), mx.where(valid, targets, 0)), 0.0)


@mx.compile
def _fused_dlogits(z: mx.array, targets: mx.array, cotangent: mx.array, losses: mx.array) -> mx.array:
    """d loss / d z for one chunk in a single elementwise pass over z: the forward's loss gives
    the log-sum-exp back (lse = loss + softcapped target logit), so softmax needs no reduction.
    Ignored rows get lse = +inf, i.e. probability 0 and a zero gradient."""
    valid = targets >= 0
    safe = mx.where(valid, targets, 0)
    picked = _softcap(mx.take_along_axis(z, safe[:, None], axis=-1))
    lse = mx.where(valid[:, None], losses[:, None] + picked, mx.inf)
    t = mx.tanh(z.astype(mx.float32) / SOFTCAP)
    p = mx.exp(SOFTCAP * t - lse)
    g = mx.where(valid, cotangent, 0.0).astype(mx.float32)
    return _softcap_softmax_gradient(p, t, safe, g, z.dtype)


def _cuda_dlogits(z: mx.array, targets: mx.array, cotangent: mx.array, losses: mx.array) -> mx.array:
    """`_fused_dlogits` as one CUDA kernel (`cuda_kernels.softcap_cross_entropy`), where z fits it."""
    if not cuda_kernels.loss_fits(z):
        return _fused_dlogits(z, targets, cotangent, losses)
    return cuda_kernels.softcap_cross_entropy(z, targets, cotangent, SOFTCAP)[1]


def _softcap(logits: mx.array) -> mx.array:
    return SOFTCAP * mx.tanh(logits.astype(mx.float32) / SOFTCAP)


@functools.partial(mx.compile, shapeless=True)
def _fused_softcap(logits: mx.array) -> mx.array:
    """`_softcap` as one elementwise kernel (the same fp32 ops, so the same values)."""
    return _softcap(logits)


def _losses_of_logits(logits: mx.array, targets: mx.array) -> mx.array:
    targets = mx.stop_gradient(targets)
    valid = targets >= 0
    safe = mx.where(valid, targets, 0)
    picked = mx.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    return mx.where(valid, mx.logsumexp(logits, axis=-1) - picked, 0.0)


def token_losses(z: mx.array, targets: mx.array) -> mx.array:
    """Per-position losses (targets < 0 give 0) of the head's raw outputs z (..., vocab), under
    autodiff too: on the CPU ('portable') with arithmetic tanh and exp (`_portable_token_losses`),
    elsewhere the softcapped fp32 logits' log-sum-exp. CORE scores its rows with it, taking the
    argmax of z itself (the softcap is monotonic)."""
    if loss_kernel() == "portable":
        return _portable_token_losses(z, targets)
    return _losses_of_logits(_fused_softcap(z), targets)
