"""CORE: nanochat's prompts, few-shot sampling, scoring and centering, on a bundle written here."""

import json

import mlx.core as mx
import numpy as np
import pytest
import yaml
from mlx.utils import tree_flatten, tree_unflatten

from mlxchat.evaluation import core
from mlxchat.gpt import GPT, GPTConfig
from mlxchat.tokenizer import Tokenizer

MC = {"query": "Q: sky?", "choices": ["red", "blue"], "gold": 1}
SCHEMA = {"context_options": ["Ann helped Bo so Ann", "Ann helped Bo so Bo"], "continuation": "said thanks.", "gold": 1}
LM = {"context": "The cat sat on the  ", "continuation": "mat"}


class CharTokenizer:
    """One token per character (id = ord), BOS = 0: token spans map one-to-one onto text."""

    bos_id = 0

    def encode(self, text, prepend=None):
        if isinstance(text, list):
            return [self.encode(t, prepend) for t in text]
        return ([prepend] if prepend is not None else []) + [ord(c) for c in text]


class HeadlessModel:
    """A stand-in whose `hidden` states are already its head's outputs (CORE reads `hidden` and
    `lm_head`, then softcaps), so a subclass sets its logits directly."""

    @staticmethod
    def lm_head(h):
        return h


class RepeatModel(HeadlessModel):
    """Logits that predict the current character again: a context ending in the continuation's
    first character makes that continuation cheaper (what schema scoring must notice)."""

    def hidden(self, ids):
        return (ids[..., None] == mx.arange(256)).astype(mx.float32) * 5.0


class FavourModel(HeadlessModel):
    """Logits that always predict the character `fav`: it 'prefers' continuations made of it."""

    def __init__(self, fav: str, vocab: int = 256):
        self.fav, self.vocab = ord(fav), vocab

    def hidden(self, ids):
        b, t = ids.shape
        return mx.broadcast_to((mx.arange(self.vocab) == self.fav).astype(mx.float32) * 5.0, (b, t, self.vocab))


@pytest.fixture(scope="module")
def tok():
    text = "The cat sat on the mat. Q: sky? red blue Answer: yes no. Ann helped Bo so said thanks. " * 20
    return Tokenizer.train_from_iterator(iter([text]), 300)


@pytest.fixture(scope="module")
def model():
    cfg = GPTConfig(sequence_len=128, vocab_size=300, n_layer=2, n_head=2, n_kv_head=1, n_embd=64)
    m = GPT(cfg)
    m.init_weights(0)
    key = mx.random.key(3)  # nanochat zeroes lm_head/c_proj: add noise so the options differ
    params = [(n, mx.random.normal(p.shape, scale=0.05, key=mx.random.split(key, i + 1)[i])
               if n == "lm_head.weight" or n.endswith("c_proj.weight") else p)
              for i, (n, p) in enumerate(tree_flatten(m.parameters()))]
    m.update(tree_unflatten(params))
    mx.eval(m.parameters())
    return m


def meta(kind, shots=0, delim=" "):
    return {"label": "t", "task_type": kind, "num_fewshot": shots, "continuation_delimiter": delim}


def test_prompts_render_as_nanochat_templates():
    shot = {"query": "Q: grass?", "choices": ["green", "pink"], "gold": 0}
    assert core.render_prompts(MC, "multiple_choice", "\nAnswer: ", [shot]) == [
        "Q: grass?\nAnswer: green\n\nQ: sky?\nAnswer: red", "Q: grass?\nAnswer: green\n\nQ: sky?\nAnswer: blue"]
    assert core.render_prompts(SCHEMA, "schema", " ", []) == [
        "Ann helped Bo so Ann said thanks.", "Ann helped Bo so Bo said thanks."]
    shot_lm = {"context": " A dog ", "continuation": "barks"}
    assert core.render_prompts(LM, "language_modeling", " ", [shot_lm]) == [
        "A dog barks\n\nThe cat sat on the", "A dog barks\n\nThe cat sat on the mat"]


def test_token_spans_cover_exactly_the_continuations():
    t = CharTokenizer()
    rows, spans = core.build_example(0, [MC], meta("multiple_choice"), t, None)
    texts = ["".join(map(chr, r[s:e])) for r, (s, e) in zip(rows, spans)]
    assert rows[0][0] == 0 and texts == ["red", "blue"]  # BOS first; common prefix ends after "Q: sky? "
    rows, spans = core.build_example(0, [SCHEMA], meta("schema"), t, None)
    assert ["".join(map(chr, r[s:e])) for r, (s, e) in zip(rows, spans)] == [" said thanks.", " said thanks."]
    rows, spans = core.build_example(0, [LM], meta("language_modeling"), t, None)
    (r,), ((s, e),) = rows, spans
    # nanochat strips the prompt without the continuation, so the delimiter's space is scored too
    assert "".join(map(chr, r[1:s])) == "The cat sat on the" and "".join(map(chr, r[s:e])) == " mat"


def test_real_tokenizer_spans_decode_to_the_choices(tok):
    rows, spans = core.build_example(0, [MC], meta("multiple_choice", delim="\nAnswer: "), tok, None)
    for r, (s, e), choice in zip(rows, spans, MC["choices"]):
        assert tok.decode(r[1:]) == f"Q: sky?\nAnswer: {choice}" and tok.decode(r[s:e]).strip() == choice


def test_fewshot_is_deterministic_and_excludes_the_item():
    data = [{"query": f"q{i}", "choices": ["a", "b"], "gold": 0} for i in range(6)]
    t = CharTokenizer()
    for idx in range(6):
        first = core.build_example(idx, data, meta("multiple_choice", shots=5), t, None)
        assert first == core.build_example(idx, data, meta("multiple_choice", shots=5), t, None)
        text = "".join(map(chr, first[0][0][1:]))
        others = [f"q{i} a\n\n" for i in range(6) if i != idx]
        assert all(text.count(o) == 1 for o in others) and text.count(f"q{idx}") == 1 and text.endswith(f"q{idx} a")
    # a different item index means a different seed, so another order of the same shots
    orders = {"".join(map(chr, core.build_example(i, data, meta("multiple_choice", shots=3), t, None)[0][0])) for i in range(6)}
    assert len(orders) == 6


def test_scoring_picks_lowest_mean_loss_and_exact_greedy_match():
    t, m = CharTokenizer(), FavourModel("a")
    mc = [{"query": "x", "choices": ["bbb", "aaa"], "gold": 1}, {"query": "y", "choices": ["aa", "ab"], "gold": 1}]
    assert core.evaluate_task(m, t, mc, meta("multiple_choice")) == 0.5
    schema = [{"context_options": ["xb", "xa"], "continuation": "aaaa", "gold": g} for g in (1, 0)]
    assert core.evaluate_task(RepeatModel(), t, schema, meta("schema", delim="")) == 0.5
    lm = [{"context": "zz", "continuation": "aaa"}, {"context": "zz", "continuation": "aab"}]
    assert core.evaluate_task(m, t, lm, meta("language_modeling", delim="")) == 0.5


def test_mean_not_sum_of_losses():
    """A long continuation of favoured tokens plus one miss beats a short all-miss one only by the mean."""
    t, m = CharTokenizer(), FavourModel("a")
    data = [{"query": "q", "choices": ["b", "aaaaaaaab"], "gold": 1}]
    assert core.evaluate_task(m, t, data, meta("multiple_choice", delim="a")) == 1.0


def test_centered_accuracy():
    assert core.centered(0.25, 25) == pytest.approx(0.0)
    assert core.centered(1.0, 62) == pytest.approx(1.0)
    assert core.centered(0.5, 25) == pytest.approx((0.5 - 0.25) / 0.75)


def test_batched_equals_one_by_one(model, tok):
    data = [{"query": f"Q: the cat {i}?", "choices": ["red", "blue mat", "sat on the"], "gold": i % 3} for i in range(9)]
    m = meta("multiple_choice", shots=2)
    examples = [core.build_example(idx, data, m, tok, None)[0] for idx in range(len(data))]
    alone = [loss for rows in examples for loss in core._forward(model, rows, tok.bos_id)[0]]
    rows = [r for ex in examples for r in ex]
    together = core._forward(model, rows, tok.bos_id)[0]
    assert len({len(r) for r in rows}) > 1  # padding really happens
    for a, b, row in zip(alone, together, rows):
        assert b[: len(row) - 1] == pytest.approx(a[: len(row) - 1], abs=1e-4)
    assert core.evaluate_task(model, tok, data, m, batch_tokens=1) == core.evaluate_task(model, tok, data, m, batch_tokens=1 << 20)


def test_forward_scores_rows_as_the_models_softcapped_logits():
    """CORE's forward gives each position's loss under the model's own (softcapped) logits and its
    argmax: what nanochat scores, though the losses come from the head's raw outputs."""
    model = GPT(GPTConfig(sequence_len=32, vocab_size=300, n_layer=2, n_head=2, n_kv_head=2, n_embd=32))
    model.init_weights(0)
    model.lm_head.weight = mx.random.normal(model.lm_head.weight.shape, key=mx.random.key(3))  # not nanochat's zeros
    rows = [[5, 17, 99, 250, 3, 3, 42], [8, 1, 2]]
    losses, preds = core._forward(model, rows, 0)
    for row, loss, pred in zip(rows, losses, preds):
        logits = np.array(model(mx.array([row]))[0], dtype=np.float64)
        log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        expected = [-log_probs[i, row[i + 1]] for i in range(len(row) - 1)]
        assert loss[: len(row) - 1] == pytest.approx(expected, rel=1e-5, abs=1e-5)
        assert pred[: len(row)] == logits.argmax(-1).tolist()


def test_left_truncation_keeps_the_continuation():
    t = CharTokenizer()
    data = [{"context": "x" * 50, "continuation": "abc"}]
    (row,), ((s, e),) = core.build_example(0, data, meta("language_modeling"), t, 10)
    assert len(row) == 10 and "".join(map(chr, row[s:e])) == " abc"


def write_bundle(root, tasks):
    bundle = root / "core"
    cfg = []
    for label, kind, shots, rows in tasks:
        uri = f"cat/{label}.jsonl"
        if rows is not None:
            (bundle / "eval_data" / "cat").mkdir(parents=True, exist_ok=True)
            (bundle / "eval_data" / uri).write_text("".join(json.dumps(r) + "\n" for r in rows))
        cfg.append({"label": label, "dataset_uri": uri, "num_fewshot": [shots], "icl_task_type": kind})
    bundle.mkdir(parents=True, exist_ok=True)
    (bundle / "core.yaml").write_text(yaml.safe_dump({"icl_tasks": cfg}))
    (bundle / "eval_meta_data.csv").write_text("Eval Task,Random baseline\nmc,50\nsc,50\nlm,0\ngone,25\n")
    return bundle


def test_evaluate_core_on_a_tiny_bundle(tmp_path, model, tok):
    mc = [{"query": f"Q: the cat {i}?", "choices": ["red", "blue"], "gold": i % 2} for i in range(6)]
    sc = [dict(SCHEMA, gold=i % 2) for i in range(4)]
    lm = [{"context": "The cat sat on the", "continuation": "mat"}] * 3
    bundle = write_bundle(tmp_path, [("mc", "multiple_choice", 2, mc), ("sc", "schema", 0, sc),
                                     ("lm", "language_modeling", 1, lm), ("gone", "multiple_choice", 0, None)])
    out = core.evaluate_core(model, tok, bundle, max_per_task=4)
    assert set(out["results"]) == {"mc", "sc", "lm"} and out["skipped"]["gone"].startswith("skipped (")
    assert out["skipped"]["winograd"].startswith("skipped (") and len(out["skipped"]) == 1 + 22
    assert out["name"] == "CORE-pack (3/22)"
    for label, base in (("mc", 50), ("sc", 50), ("lm", 0)):
        assert out["centered"][label] == pytest.approx(core.centered(out["results"][label], base))
        assert out["results"][label] in {k / 4 for k in range(5)} or label == "lm" and out["results"][label] in {k / 3 for k in range(4)}
    assert out["core_metric"] == pytest.approx(sum(out["centered"].values()) / 3)


def test_eval_core_stage_and_cli_write_core_json(smoke_root, tmp_path, capsys):
    import shutil

    from mlxchat import pipeline
    from mlxchat.cli import main
    from mlxchat.common import MlxchatError
    from mlxchat.train import TrainConfig, train_base

    home = tmp_path / "home"
    shutil.copytree(smoke_root / "data", home / "data")
    pipeline.train_tokenizer("r", vocab_size=300, max_chars=100_000, root=home)
    train_base("r", TrainConfig(depth=2, seq_len=64, device_batch_size=2, total_batch_size=128, eval_tokens=256,
                                dtype="float32", max_steps=1, eval_every=0, checkpoint_every=1), root=home)
    with pytest.raises(MlxchatError, match="prepare-evals"):
        pipeline.eval_core("r", root=home)
    mc = [{"query": f"Q: the cat {i}?", "choices": ["red", "blue"], "gold": i % 2} for i in range(6)]
    write_bundle(home / "evals", [("mc", "multiple_choice", 1, mc)])
    result = pipeline.eval_core("r", "base", max_per_task=4, root=home)
    saved = json.loads((home / "runs" / "r" / "eval" / "core.json").read_text())["base"]
    assert saved["results"] == result["results"] and set(saved["results"]) == {"mc"} and saved["max_per_task"] == 4
    assert saved["name"] == "CORE-pack (1/22)" and saved["core_metric"] == pytest.approx(saved["centered"]["mc"])
    assert main(["--home", str(home), "eval", "core", "--run", "r", "--max-per-task", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["max_per_task"] == 2


def test_identical_choices_do_not_crash_and_cannot_win():
    """PIQA has items whose two solutions are the same text: nothing past the shared prefix."""
    t, m = CharTokenizer(), FavourModel("a")
    data = [{"query": "q", "choices": ["ab", "ab", "aa"], "gold": 2}, {"query": "q", "choices": ["b", "b"], "gold": 1}]
    assert core.evaluate_task(m, t, data, meta("multiple_choice")) == 0.5
