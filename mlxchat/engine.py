"""Inference: a KV cache, sampling, and token-level generation, as nanochat's engine.

The engine works on token ids only; `sample_prompts` is the one place that touches text, for
the fixed prompts training prints (and writes to `samples/<stage>.md`) after each stage.

Generation prefills the prompt once at batch 1, then repeats the cache to `num_samples` rows
and decodes all rows together, one token per step. Every row samples its own first token
(nanochat broadcasts a single one, leaving a TODO), so rows are independent from the start.
The prefill computes the head for the last position only, and without a tool the next step is
queued on the device before the current tokens are read back, so the host's per-token work
(sampling bookkeeping, stop checks, the caller's) overlaps the model's; each decode step, the
forward and the sampling, is one compiled function over a fixed-size cache.

Greedy continuations of several prompts decode together (`generate_prompts`, ChatCORE's
generative tasks): each prompt is prefilled alone, and each row then writes, rotates and attends
at its own position.

Tool use (nanochat's calculator) plugs in through `tool`: after each sampled token it sees the
row's tokens so far and returns tokens to force into that row next (e.g. `<|output_start|>`,
the result, `<|output_end|>`); forced tokens go through the model like sampled ones, so the
cache stays consistent with what the row says.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Iterator, Sequence

import mlx.core as mx
import mlx.nn as nn

from mlxchat.common import MlxchatError
from mlxchat.gpt import KeyPrefix

# nanochat's base_train sample prompts: a glance at facts, reasoning and arithmetic per stage.
SAMPLE_PROMPTS = [
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "My favorite color is",
    "If 5*x + 3 = 13, then x is",
]

# A tool sees a row's tokens (prompt + generated) after each sampled token and returns tokens
# to force into that row next (an empty list for none).
Tool = Callable[[list[int]], list[int]]


class KVCache:
    """One layer's keys and values, preallocated as (B, n_kv_head, capacity, head_dim).

    Writing into a preallocated buffer costs one slice update per step instead of a
    concatenation that copies the whole history (quadratic over a generation). If a caller
    writes past the capacity, the buffer grows by whole `step`s, as mlx-lm's cache does.
    Follows mlx-lm's protocol (`offset`, `make_mask`, `update_and_fetch`), which `gpt.py` relies on.
    """

    step = 256

    def __init__(self, batch_size: int, n_kv_head: int, head_dim: int, capacity: int, dtype: mx.Dtype):
        shape = (batch_size, n_kv_head, max(1, capacity), head_dim)
        self.keys = mx.zeros(shape, dtype)
        self.values = mx.zeros(shape, dtype)
        self.offset = 0

    def make_mask(self, T: int) -> str | None:
        """The mask for T new queries over what `update_and_fetch` returns: "causal" is aligned
        bottom-right, so a prefill chunk also sees the cached prefix; one query sees it all."""
        return "causal" if T > 1 else None

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append (B, n_kv_head, T, head_dim) keys/values; return everything cached so far."""
        prev, end = self.offset, self.offset + keys.shape[2]
        if end > self.keys.shape[2]:
            self._grow(end)
        self.keys[..., prev:end, :] = keys
        self.values[..., prev:end, :] = values
        self.offset = end
        return self.keys[..., :end, :], self.values[..., :end, :]

    def _grow(self, needed: int) -> None:
        B, H, _, D = self.keys.shape
        capacity = -(-needed // self.step) * self.step
        grown = []
        for old in (self.keys, self.values):
            new = mx.zeros((B, H, capacity, D), old.dtype)
            new[..., : self.offset, :] = old[..., : self.offset, :]
            grown.append(new)
        self.keys, self.values = grown

    def repeat_batch(self, n: int) -> None:
        """Turn a batch-1 cache (a prefilled prompt) into n identical rows to decode apart."""
        if self.keys.shape[0] != 1:
            raise MlxchatError(f"only a batch-1 cache can be repeated, this one has {self.keys.shape[0]} rows")
        self.keys = mx.repeat(self.keys, n, axis=0)
        self.values = mx.repeat(self.values, n, axis=0)


class FixedKVCache:
    """One layer's cache inside the compiled decode step: the whole buffer every step and the
    write position as an array, so every step has the same shapes and the same graph, which
    `mx.compile` traces once per generation. Its mask is the written prefix (`KeyPrefix`): on CUDA
    one kernel reads only that prefix; elsewhere the price is attending over the whole buffer (the
    prompt plus `max_tokens`), with the positions not yet written masked out.

    The offset is one position for every row, or one per row (B,) where the rows continue prompts
    of different lengths (`generate_prompts`): each row then writes at its own position (a scatter
    instead of a slice update), rotates its query at it and sees its own prefix."""

    def __init__(self, keys: mx.array, values: mx.array, offset: mx.array):
        self.keys, self.values, self.offset = keys, values, offset

    def make_mask(self, T: int) -> KeyPrefix:
        return KeyPrefix(self.offset + T)  # one query: T is 1 here

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        if self.offset.ndim == 0:
            start = self.offset.reshape(1)
            self.keys = mx.slice_update(self.keys, keys, start, axes=(2,))
            self.values = mx.slice_update(self.values, values, start, axes=(2,))
        else:
            at = mx.broadcast_to(self.offset.reshape(-1, 1, 1, 1), keys.shape)
            self.keys = mx.put_along_axis(self.keys, at, keys, axis=2)
            self.values = mx.put_along_axis(self.values, at, values, axis=2)
        self.offset = self.offset + keys.shape[2]
        return self.keys, self.values


def make_cache(model, batch_size: int, max_len: int) -> list[KVCache]:
    """One KVCache per layer, sized for `max_len` tokens in the model's compute dtype."""
    c = model.config
    return [KVCache(batch_size, c.n_kv_head, c.head_dim, max_len, model.compute_dtype) for _ in range(c.n_layer)]


def sample_next_token(logits: mx.array, temperature: float, top_k: int | None, key: mx.array | None) -> mx.array:
    """Next token per row (B,) from (B, V) logits: argmax at temperature 0, else a draw from
    softmax(logits / temperature), restricted to the top_k logits when top_k is set."""
    if temperature == 0.0:
        return mx.argmax(logits, axis=-1)
    if top_k is not None and top_k < logits.shape[-1]:
        idx = mx.argpartition(-logits, kth=top_k - 1, axis=-1)[:, :top_k]
        vals = mx.take_along_axis(logits, idx, axis=-1)
        choice = mx.random.categorical(vals / temperature, axis=-1, key=key)
        return mx.take_along_axis(idx, choice[:, None], axis=-1)[:, 0]
    return mx.random.categorical(logits / temperature, axis=-1, key=key)


class _Row:
    """One sample's state: its tokens, the tokens a tool queued to force next, and whether it
    has emitted a stop token."""

    def __init__(self, tokens: list[int]):
        self.tokens = tokens
        self.forced: deque[int] = deque()
        self.done = False
        self.last_forced = False

    def advance(self, sampled: int, stop: set[int], tool: Tool | None) -> int:
        """Take the next token (a queued forced one before the sampled one) and return it."""
        forced = bool(self.forced)
        token = self.forced.popleft() if forced else sampled
        self.tokens.append(token)
        self.last_forced = forced
        if token in stop:
            self.done = True
        elif tool is not None and not forced:
            self.forced.extend(tool(self.tokens))
        return token


def generate(
    model,
    tokens: list[int],
    max_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 42,
    num_samples: int = 1,
    stop_tokens: Sequence[int] = (),
    tool: Tool | None = None,
    with_forced: bool = False,
    compiled: bool = True,
) -> Iterator[list[int]]:
    """Yield, per step, the next token of each of `num_samples` rows continuing `tokens`
    (with `with_forced`, a pair: the tokens and whether each was forced by the tool).

    Stops after `max_tokens` steps or once every row has emitted one of `stop_tokens`. A row
    that has stopped keeps decoding (the batch stays rectangular) until the others stop, so
    consumers truncate each row at its first stop token (as `generate_batch` does).
    Sampling draws from keys split off `seed`, so equal arguments give equal samples.
    `model` is a GPT (any `nn.Module` with its call: decoded by one compiled step a token,
    `_compiled_decode`, unless `compiled` is False), or anything with its `__call__(idx, cache)`,
    `config` and `compute_dtype` (decoded eagerly, its own forward per token).
    """
    _check_arguments(tokens, max_tokens, temperature, top_k, num_samples)
    cache = make_cache(model, 1, len(tokens) + max_tokens)
    logits = _prefill_logits(model, tokens, cache)
    if num_samples > 1:
        for layer in cache:
            layer.repeat_batch(num_samples)
        logits = mx.repeat(logits, num_samples, axis=0)
    decode = (_compiled_decode if compiled and isinstance(model, nn.Module) else _eager_decode)(
        model, cache, temperature, top_k)
    rows = [_Row(list(tokens)) for _ in range(num_samples)]
    yield from _decode_rows(decode, logits, rows, max_tokens, temperature, top_k, seed, stop_tokens, tool, with_forced)


def generate_prompts(model: nn.Module, prompts: list[list[int]], max_tokens: int, stop_tokens: Sequence[int] = (),
                     tool: Tool | None = None, with_forced: bool = False) -> Iterator[list[int]]:
    """`generate` of several prompts at once, greedy, one row each: per step, the next token of
    every row (with `with_forced`, a pair as `generate`'s). Each row is what `generate` gives its
    prompt alone at temperature 0, up to the rounding of batched matmuls.

    Why: on the CPU and on a GPU alike a decode step costs nearly the same for one row as for
    eight (its time is launches and weight reads), so greedy evaluations that decode one prompt
    at a time (ChatCORE's generative tasks) leave most of it unused. Each prompt is prefilled
    alone, as `generate` does, and its keys and values copied into its row of one buffer; the
    compiled decode step then runs with an offset per row (`FixedKVCache`)."""
    if not prompts:
        raise MlxchatError("generate_prompts needs at least one prompt")
    if not isinstance(model, nn.Module):
        raise MlxchatError("generate_prompts decodes an mlx.nn model (a GPT); decode any other one prompt at a time (generate)")
    for tokens in prompts:
        _check_arguments(tokens, max_tokens, 0.0, None, 1)
    cache = make_cache(model, len(prompts), max(len(t) for t in prompts) + max_tokens)
    logits = []
    for i, tokens in enumerate(prompts):
        alone = make_cache(model, 1, len(tokens))
        logits.append(_prefill_logits(model, tokens, alone))
        for layer, own in zip(cache, alone):
            layer.keys[i : i + 1, :, : len(tokens)] = own.keys[:, :, : len(tokens)]
            layer.values[i : i + 1, :, : len(tokens)] = own.values[:, :, : len(tokens)]
    for layer in cache:
        layer.offset = [len(t) for t in prompts]
    decode = _compiled_decode(model, cache, 0.0, None)
    rows = [_Row(list(tokens)) for tokens in prompts]
    yield from _decode_rows(decode, mx.concatenate(logits), rows, max_tokens, 0.0, None, 0, stop_tokens, tool, with_forced)


def _decode_rows(decode: Decode, logits: mx.array, rows: list[_Row], max_tokens: int, temperature: float,
                 top_k: int | None, seed: int, stop_tokens: Sequence[int], tool: Tool | None,
                 with_forced: bool) -> Iterator[list[int]]:
    """The decode loop of `generate` and `generate_prompts`, from the prefilled logits (B, V)."""
    stop = set(stop_tokens)
    sampled, key = _sample(logits, mx.random.key(seed), temperature, top_k)
    for step in range(max_tokens):
        # Without a tool every row's next input is its sampled token, so from the second token on
        # the next step is queued on the device before this one's tokens reach the host (as
        # mlx-lm's generate_step overlaps them). Not for the first token: a step queued behind
        # the prefill delays it (on the shared 2-core CPU, d4, 128 prompt tokens, best of 12:
        # 117 vs 30 ms). With a tool a row's next token may be a forced one, so each step waits.
        pipelined = tool is None and step > 0
        if pipelined and step + 1 < max_tokens:
            queued, key = decode(sampled, key)
            mx.async_eval(queued)
        column = [row.advance(tok, stop, tool) for row, tok in zip(rows, sampled.tolist())]
        yield (column, [row.last_forced for row in rows]) if with_forced else column
        if all(row.done for row in rows) or step + 1 == max_tokens:
            return
        if pipelined:
            sampled = queued
        else:  # uint32 as sampled tokens are, so the compiled step sees one signature
            sampled, key = decode(mx.array(column, dtype=mx.uint32), key)


# decode(tokens (B,), key) -> (each row's next token (B,), the key to split next): feeds the rows'
# last tokens through the model, advancing the cache, and samples.
Decode = Callable[[mx.array, mx.array], tuple[mx.array, mx.array]]


def _sample(logits: mx.array, key: mx.array, temperature: float, top_k: int | None) -> tuple[mx.array, mx.array]:
    """`sample_next_token` with a key split off `key`, and the key to split next. Greedy
    splits none: per token that would be work for nothing."""
    if temperature == 0.0:
        return sample_next_token(logits, temperature, top_k, None), key
    key, subkey = mx.random.split(key)
    return sample_next_token(logits, temperature, top_k, subkey), key


def _forward_and_sample(model, tokens: mx.array, cache: list, key: mx.array, temperature: float,
                        top_k: int | None) -> tuple[mx.array, mx.array]:
    return _sample(model(tokens[:, None], cache=cache)[:, -1, :], key, temperature, top_k)


def _eager_decode(model, cache: list[KVCache], temperature: float, top_k: int | None) -> Decode:
    """The model's own forward per token, over caches that grow: for a model that is no `nn.Module`
    (a wrapper, a test's stand-in), and to measure the compiled step against (`bench/decode.py`)."""
    def decode(tokens: mx.array, key: mx.array) -> tuple[mx.array, mx.array]:
        return _forward_and_sample(model, tokens, cache, key, temperature, top_k)
    return decode


def _compiled_decode(model: nn.Module, cache: list[KVCache], temperature: float, top_k: int | None) -> Decode:
    """The forward of one token per row and its sampling as one `mx.compile`d step over
    FixedKVCaches holding the prefilled buffers: per token the host makes one call instead of
    building a graph of ~300 primitives in Python, and the step's elementwise work is fused.
    Traced once per generation (a few ms, about one eager step), with the weights captured as
    they are then: a model trained between generations (RL, the samples after each stage)
    decodes with its weights of the moment, and no step flattens the model's parameter tree
    to pass them in (`inputs=model.state`: ~0.05 ms a token at d4, ~0.3 at d20 on the CPU)."""

    def step(tokens, keys, values, offset, key):
        layers = [FixedKVCache(k, v, offset) for k, v in zip(keys, values)]
        nxt, key = _forward_and_sample(model, tokens, layers, key, temperature, top_k)
        return nxt, [c.keys for c in layers], [c.values for c in layers], layers[0].offset, key

    compiled = mx.compile(step)
    state = [[layer.keys for layer in cache], [layer.values for layer in cache], mx.array(cache[0].offset)]
    for layer in cache:  # the step alone holds the buffers, so its slice updates write them in place
        layer.keys = layer.values = None

    def decode(tokens: mx.array, key: mx.array) -> tuple[mx.array, mx.array]:
        nxt, state[0], state[1], state[2], key = compiled(tokens, *state, key)
        return nxt, key
    return decode


def _prefill_logits(model, tokens: list[int], cache: list[KVCache]) -> mx.array:
    """The prompt's last-position logits (1, V), filling the cache. A GPT runs its head on that
    position only (the (T × vocab) head is skipped for the rest); a model without `hidden` and
    `logits` (a wrapper, a test's stand-in) runs whole."""
    idx = mx.array([tokens])
    if hasattr(model, "hidden") and hasattr(model, "logits"):
        return model.logits(model.hidden(idx, cache=cache)[:, -1, :])
    return model(idx, cache=cache)[:, -1, :]


def generate_batch(model, tokens: list[int], max_tokens: int, return_masks: bool = False, **kwargs):
    """Each row's generated tokens (prompt excluded), cut before its first stop token.
    Takes `generate`'s keyword arguments. With `return_masks`, also each row's mask as
    nanochat's engine returns it: 1 for a sampled token, 0 for one the tool forced (RL trains
    only on what the model chose)."""
    columns = generate(model, tokens, max_tokens, with_forced=True, **kwargs)
    return _cut_at_stop(columns, kwargs.get("num_samples", 1), set(kwargs.get("stop_tokens", ())), return_masks)


def complete_prompts(model: nn.Module, prompts: list[list[int]], max_tokens: int, stop_tokens: Sequence[int] = (),
                     tool: Tool | None = None) -> list[list[int]]:
    """Each prompt's greedy continuation (prompt excluded), cut before its first stop token:
    `generate_batch(model, prompt, max_tokens, temperature=0.0, ...)` for each prompt, decoded
    together (`generate_prompts`)."""
    columns = generate_prompts(model, prompts, max_tokens, stop_tokens, tool, with_forced=True)
    return _cut_at_stop(columns, len(prompts), set(stop_tokens), False)


def _cut_at_stop(columns, rows: int, stop: set[int], return_masks: bool):
    """Each row's tokens from `(column, forced)` steps up to its first stop token, and with
    `return_masks` their masks (1 sampled, 0 forced)."""
    results: list[list[int]] = [[] for _ in range(rows)]
    masks: list[list[int]] = [[] for _ in range(rows)]
    finished = [False] * rows
    for column, forced in columns:
        for i, token in enumerate(column):
            if finished[i]:
                continue
            if token in stop:
                finished[i] = True
            else:
                results[i].append(token)
                masks[i].append(0 if forced[i] else 1)
    return (results, masks) if return_masks else results


def sample_prompts(
    model, tokenizer, prompts: Sequence[str], max_tokens: int = 16, temperature: float = 0.0, top_k: int | None = None
) -> list[dict]:
    """Complete each prompt (one row each); a `<|bos|>` ends a completion, as it ends a document."""
    samples = []
    for prompt in prompts:
        ids = tokenizer.encode(prompt, prepend=tokenizer.bos_id)
        (completion,) = generate_batch(
            model, ids, max_tokens, temperature=temperature, top_k=top_k, stop_tokens=(tokenizer.bos_id,)
        )
        samples.append({"prompt": prompt, "completion": tokenizer.decode(completion)})
    return samples


def render_samples_markdown(stage: str, samples: list[dict], chat: bool = False) -> str:
    """`samples/<stage>.md`: each prompt and its completion apart (for a chat stage, as a user
    turn and the assistant's reply), verbatim in a fenced block (the fence is longer than any
    backtick run in the text, so model output cannot break out)."""
    parts = [f"# Samples after {stage}\n"]
    for sample in samples:
        if chat:
            text = f"User: {sample['prompt']}\nAssistant: {sample['completion']}"
        else:  # the prompt and what the model added, on lines of their own
            text = f"Prompt: {sample['prompt']}\nCompletion: {sample['completion']}"
        fence = "`" * max(3, _longest_backtick_run(text) + 1)
        parts.append(f"{fence}text\n{text}\n{fence}\n")
    return "\n".join(parts)


def _longest_backtick_run(text: str) -> int:
    longest = run = 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    return longest


def _check_arguments(tokens, max_tokens, temperature, top_k, num_samples) -> None:
    if not tokens or not all(isinstance(t, int) for t in tokens):
        raise MlxchatError("generate needs a non-empty list of int token ids as the prompt")
    if max_tokens < 1:
        raise MlxchatError(f"max_tokens must be >= 1, got {max_tokens}")
    if temperature < 0:
        raise MlxchatError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise MlxchatError(f"top_k must be >= 1 or None, got {top_k}")
    if num_samples < 1:
        raise MlxchatError(f"num_samples must be >= 1, got {num_samples}")
