"""The engine: cached decoding equals full forwards, sampling is seeded, rows are independent."""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from mlxchat import engine
from mlxchat.common import MlxchatError
from mlxchat.engine import KVCache, complete_prompts, generate, generate_batch, make_cache, render_samples_markdown, sample_prompts
from mlxchat.gpt import GPT, GPTConfig

TINY = GPTConfig(sequence_len=128, vocab_size=256, n_layer=2, n_head=2, n_kv_head=1, n_embd=64)
PROMPT = [1, 17, 42, 99, 3, 250, 7]


@pytest.fixture(scope="module")
def model():
    """A random tiny model. nanochat's init zeroes lm_head and every c_proj (constant logits),
    so those get small noise: without it every decoding path would agree trivially."""
    m = GPT(TINY)
    m.init_weights(0)
    key = mx.random.key(1)
    noisy = []
    for i, (name, p) in enumerate(tree_flatten(m.parameters())):
        if name == "lm_head.weight" or name.endswith("c_proj.weight"):
            p = mx.random.normal(p.shape, scale=0.05, key=mx.random.split(key, i + 1)[i])
        noisy.append((name, p))
    m.update(tree_unflatten(noisy))
    mx.eval(m.parameters())
    return m


def full_forward_greedy(model, prompt, n):
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(mx.argmax(model(mx.array([seq]))[0, -1]).item()))
    return seq[len(prompt):]


def test_cached_decoding_equals_full_forward(model):
    n = 40
    reference = full_forward_greedy(model, PROMPT, n)
    assert len(set(reference)) > 3, "the test model should not be degenerate"
    full_logits = model(mx.array([PROMPT + reference]))[0]
    cache = make_cache(model, 1, len(PROMPT) + n)
    logits = model(mx.array([PROMPT]), cache=cache)[0, -1]
    for i, token in enumerate(reference):
        np.testing.assert_allclose(np.array(logits), np.array(full_logits[len(PROMPT) - 1 + i]), atol=1e-4)
        assert int(mx.argmax(logits).item()) == token
        logits = model(mx.array([[token]]), cache=cache)[0, -1]
    assert [c[0] for c in generate(model, PROMPT, n, temperature=0.0)] == reference


def test_multi_token_prefill_after_cached_prefix_equals_full_forward(model):
    seq = PROMPT + [5, 6, 7, 8, 9, 10, 11]
    full = model(mx.array([seq]))[0]
    cache = make_cache(model, 1, 4)  # too small on purpose: the cache grows while keeping the prefix
    model(mx.array([seq[:4]]), cache=cache)
    rest = model(mx.array([seq[4:]]), cache=cache)[0]
    assert cache[0].offset == len(seq)
    np.testing.assert_allclose(np.array(rest), np.array(full[4:]), atol=1e-4)


def test_cache_grows_in_steps_and_keeps_contents():
    c = KVCache(1, 1, 2, 3, mx.float32)
    first = mx.arange(6, dtype=mx.float32).reshape(1, 1, 3, 2)
    c.update_and_fetch(first, first)
    k, _ = c.update_and_fetch(mx.ones((1, 1, 2, 2)), mx.ones((1, 1, 2, 2)))
    assert c.keys.shape[2] == KVCache.step and c.offset == 5
    np.testing.assert_array_equal(np.array(k[:, :, :3]), np.array(first))


class Eager:
    """The same model behind a plain object: the engine decodes it eagerly, one forward a token."""

    def __init__(self, model):
        self.model, self.config, self.compute_dtype = model, model.config, model.compute_dtype

    def __call__(self, idx, cache=None):
        return self.model(idx, cache=cache)


@pytest.mark.parametrize("settings", [
    dict(temperature=0.0),
    dict(temperature=1.0, seed=3),
    dict(temperature=0.8, top_k=7, num_samples=4, seed=11),
])
def test_the_compiled_decode_step_samples_what_the_eager_forward_samples(model, settings):
    """The compiled step (a GPT) and the eager forward (a GPT with `compiled=False`, anything else)
    give the same tokens from the same seed: the same logits, the same keys split in the same order."""
    steps = list(generate(model, PROMPT, 30, **settings))
    assert steps == list(generate(model, PROMPT, 30, compiled=False, **settings))
    assert steps == list(generate(Eager(model), PROMPT, 30, **settings))
    assert len({tuple(s) for s in steps}) > 3, "the test model should not be degenerate"


def test_a_model_changed_between_generations_decodes_with_its_new_weights(model):
    """The compiled step is traced per generation, so it never decodes with the weights of an
    earlier one (RL samples from a model it updates between generations)."""
    changed = GPT(TINY)
    changed.update(model.parameters())
    before = generate_batch(changed, PROMPT, 20, temperature=0.0)
    changed.update({"lm_head": {"weight": -model.lm_head.weight}})
    after = generate_batch(changed, PROMPT, 20, temperature=0.0)
    assert after != before and after == generate_batch(Eager(changed), PROMPT, 20, temperature=0.0)


def test_top_k_1_equals_greedy(model):
    greedy = generate_batch(model, PROMPT, 20, temperature=0.0)
    assert generate_batch(model, PROMPT, 20, temperature=1.5, top_k=1, seed=3) == greedy


def test_seed_makes_sampling_reproducible(model):
    a = generate_batch(model, PROMPT, 30, temperature=1.0, seed=7)
    assert generate_batch(model, PROMPT, 30, temperature=1.0, seed=7) == a
    assert generate_batch(model, PROMPT, 30, temperature=1.0, seed=8) != a


def test_top_k_samples_stay_within_the_top_k(model):
    tokens = generate_batch(model, PROMPT, 1, temperature=1.0, top_k=5, num_samples=64)
    top5 = set(np.argsort(-np.array(model(mx.array([PROMPT]))[0, -1]))[:5].tolist())
    assert {row[0] for row in tokens} <= top5


def test_num_samples_rows_are_independent(model):
    rows = generate_batch(model, PROMPT, 20, temperature=1.0, num_samples=4, seed=0)
    assert len(rows) == 4 and all(len(r) == 20 for r in rows)
    assert len({tuple(r) for r in rows}) == 4, "rows sampled with separate noise should differ"
    # Greedy rows are identical: the repeated cache holds the same prompt for every row.
    greedy = generate_batch(model, PROMPT, 10, temperature=0.0, num_samples=3)
    assert greedy[0] == greedy[1] == greedy[2] == generate_batch(model, PROMPT, 10, temperature=0.0)[0]


def test_stop_tokens_end_generation(model):
    (greedy,) = generate_batch(model, PROMPT, 30, temperature=0.0)
    stop = greedy[5]
    cut = greedy.index(stop)
    steps = list(generate(model, PROMPT, 30, temperature=0.0, stop_tokens=(stop,)))
    assert len(steps) == cut + 1 and steps[-1] == [stop]
    assert generate_batch(model, PROMPT, 30, temperature=0.0, stop_tokens=(stop,)) == [greedy[:cut]]


def test_generation_runs_until_every_row_has_stopped(model):
    rows = generate_batch(model, PROMPT, 25, temperature=1.0, num_samples=3, seed=5)
    stop = rows[0][2]  # row 0 stops by step 3; the others run on until they emit it (or the end)
    steps = list(generate(model, PROMPT, 25, temperature=1.0, num_samples=3, seed=5, stop_tokens=(stop,)))
    last_stop = max((r.index(stop) if stop in r else 24) for r in rows)
    assert len(steps) == last_stop + 1
    assert generate_batch(model, PROMPT, 25, temperature=1.0, num_samples=3, seed=5, stop_tokens=(stop,)) == [
        r[: r.index(stop)] if stop in r else r for r in rows
    ]


def test_tool_forces_tokens_into_the_row_and_the_cache(model):
    """The hook tool use (issue 4) builds on: after a trigger token the tool's reply is forced,
    then sampling resumes from a cache that has seen the forced tokens."""
    (greedy,) = generate_batch(model, PROMPT, 12, temperature=0.0)
    trigger, forced = greedy[2], [200, 201, 202]

    def tool(tokens):  # fires once, so the rest of the row is plain greedy decoding
        return forced if tokens[-1] == trigger and forced[0] not in tokens else []

    (out,) = generate_batch(model, PROMPT, 12, temperature=0.0, tool=tool)
    head = greedy[: greedy.index(trigger) + 1]
    assert out[: len(head) + 3] == head + forced
    resumed = full_forward_greedy(model, PROMPT + head + forced, 12 - len(head) - 3)
    assert out[len(head) + 3 :] == resumed


@pytest.fixture(scope="module")
def sharp_model(model):
    """The tiny model with a head 20× larger: its greedy choices have margins far above the
    rounding by which a batched matmul differs from a single row's."""
    sharp = GPT(TINY)
    sharp.update(tree_unflatten(tree_flatten(model.parameters())))
    sharp.lm_head.weight = model.lm_head.weight * 20
    mx.eval(sharp.parameters())
    return sharp


def test_prompts_decoded_together_continue_as_each_alone(sharp_model):
    """`complete_prompts`: prompts of different lengths in one batch, each row writing, rotating and
    attending at its own position, give each prompt's greedy continuation alone; a tool's forced
    tokens and the stop tokens act on their own row."""
    prompts = [PROMPT, [5], PROMPT[:3] + [9] * 8, [200, 3]]
    alone = [generate_batch(sharp_model, p, 10, temperature=0.0)[0] for p in prompts]
    assert len({tuple(a) for a in alone}) == len(prompts)  # rows that differ: a mixed-up row would show
    assert complete_prompts(sharp_model, prompts, 10) == alone
    trigger, forced, stop = alone[0][2], [200, 201, 202], alone[1][4]

    def tool(tokens):
        return forced if tokens[-1] == trigger and forced[1] not in tokens else []

    alone = [generate_batch(sharp_model, p, 10, temperature=0.0, tool=tool, stop_tokens=(stop,))[0] for p in prompts]
    assert forced[1] in alone[0] and len(alone[1]) == 4  # the tool fired in row 0, row 1 stopped early
    assert complete_prompts(sharp_model, prompts, 10, stop_tokens=(stop,), tool=tool) == alone


def test_bad_arguments_are_one_line_errors(model):
    with pytest.raises(MlxchatError, match="temperature"):
        next(generate(model, PROMPT, 4, temperature=-1.0))
    with pytest.raises(MlxchatError, match="non-empty"):
        next(generate(model, [], 4))
    with pytest.raises(MlxchatError, match="at least one prompt"):
        complete_prompts(model, [], 4)
    with pytest.raises(MlxchatError, match="non-empty"):
        complete_prompts(model, [PROMPT, []], 4)
    with pytest.raises(MlxchatError, match="one prompt at a time"):
        complete_prompts(lambda idx, cache=None: idx, [PROMPT], 4)


class _ByteTokenizer:
    bos_id = 255

    def encode(self, text, prepend=None):
        return ([prepend] if prepend is not None else []) + list(text.encode()[:200])

    def decode(self, ids):
        return bytes(i for i in ids if i < 255).decode(errors="replace")


def test_sample_prompts_and_markdown(model):
    samples = sample_prompts(model, _ByteTokenizer(), engine.SAMPLE_PROMPTS[:2], max_tokens=5)
    assert [s["prompt"] for s in samples] == engine.SAMPLE_PROMPTS[:2]
    assert all(isinstance(s["completion"], str) for s in samples)
    md = render_samples_markdown("base", [{"prompt": "Say ", "completion": "```x```"}])
    assert md.startswith("# Samples after base\n")
    assert "````text\nPrompt: Say \nCompletion: ```x```\n````" in md  # apart: where the model began is visible
    chat = render_samples_markdown("sft", [{"prompt": "Who are you?", "completion": "I'm mlxchat."}], chat=True)
    assert "```text\nUser: Who are you?\nAssistant: I'm mlxchat.\n```" in chat
