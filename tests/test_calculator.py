"""The calculator: nanochat's arithmetic and `.count`, nothing else, bounded in time and size;
and its engine hook, whose answer is forced into the row right after `<|python_end|>`."""

import threading

import pytest
from chatrun import TEXT, ScriptedModel

from mlxchat.calculator import MAX_EXPRESSION_CHARS, calculate, calculator_tool
from mlxchat.engine import generate_batch
from mlxchat.gpt import GPTConfig
from mlxchat.tokenizer import Tokenizer


@pytest.mark.parametrize("expr, value", [
    ("12*7", 84),
    (" (1 + 2) * 3 - 4 ", 5),
    ("7/2", 3.5),
    ("7//2", 3),
    ("-3 + +2", -1),
    ("1,000 * 3", 3000),  # commas in numbers are dropped, as nanochat does
    ("0.1 + 0.2", 0.1 + 0.2),
    ("'strawberry'.count('r')", 3),
    ('"banana".count("an")', 2),
    ("99999999999999999999 * 99999999999999999999", 99999999999999999999 ** 2),
])
def test_computes_what_nanochat_computes(expr, value):
    assert calculate(expr) == value


@pytest.mark.parametrize("expr", [
    "__import__('os').system('true')",
    "open('/etc/passwd').read()",
    "().__class__.__bases__[0].__subclasses__()",
    "'a'.__class__",
    "'abc'.upper()",
    "x.count('a')",
    "print(1)",
    "2**10",
    "9**9**9",
    "pow(9, 99)",
    "'a' * 10**9",
    "'a' * 1000000000",
    "[1, 2][0]",
    "(lambda: 1)()",
    "[x for x in range(10)]",
    "1 if 1 else 2",
    "1 < 2",
    "7 % 3",
    "'ab'.count(x='a')",
    "'ab'.count('a', 1)",  # bounds: the comma is dropped first, as in nanochat
    "'ab'.count(1)",
    "1/0",
    "1e308 * 10 / 0",
    "",
    "12 *",
    "1+" * (MAX_EXPRESSION_CHARS // 2) + "1",
    "(" * 500 + "1" + ")" * 500,
    "True + 1",
    "None",
    "b'x'.count(b'x')",
])
def test_refuses_everything_else(expr):
    assert calculate(expr) is None


def test_the_largest_products_allowed_are_exact_and_printable():
    """Without `**`, an expression of the maximum length builds at most about that many
    digits: exact, and short enough for str() (which refuses ints over 4300 digits)."""
    expr = "*".join(["9" * 99] * 10)
    assert len(expr) <= MAX_EXPRESSION_CHARS
    assert calculate(expr) == int("9" * 99) ** 10
    assert len(str(calculate(expr))) < 4300


def test_time_limit_works_off_the_main_thread():
    """nanochat's SIGALRM cannot fire in a worker thread; the walker's deadline can."""
    results = []
    thread = threading.Thread(target=lambda: results.append((calculate("1+2", time_limit_s=-1), calculate("1+2"))))
    thread.start()
    thread.join()
    assert results == [(None, 3)]


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train_from_iterator(TEXT, vocab_size=400)


def test_tool_answers_after_python_end(tokenizer):
    tok = tokenizer
    sp = tok.encode_special
    tool = calculator_tool(tok)
    call = [tok.bos_id, sp("<|assistant_start|>"), sp("<|python_start|>"), *tok.encode("12*7"), sp("<|python_end|>")]
    assert tool(call) == [sp("<|output_start|>"), *tok.encode("84"), sp("<|output_end|>")]
    assert tool(call[:-1]) == []  # not at <|python_end|> yet
    assert tool(call[:2] + call[3:]) == []  # no <|python_start|>
    refused = [sp("<|python_start|>"), *tok.encode("__import__('os')"), sp("<|python_end|>")]
    assert tool(refused) == []
    # only the latest call counts, not text from an earlier, answered one
    again = call + [sp("<|output_start|>"), *tok.encode("84"), sp("<|output_end|>"), sp("<|python_end|>")]
    assert tool(again) == []


def test_engine_injects_the_answer_and_generation_continues(tokenizer):
    tok = tokenizer
    sp = tok.encode_special
    junk = tok.encode("fox")[0]
    expr, answer, after = tok.encode("12*7"), tok.encode("84"), tok.encode(" It is 84.")
    forced = [sp("<|output_start|>"), *answer, sp("<|output_end|>")]
    script = [sp("<|python_start|>"), *expr, sp("<|python_end|>"), *[junk] * len(forced), *after,
              sp("<|assistant_end|>")]
    prompt = tok.render_for_completion({"messages": [{"role": "user", "content": "What is 12 * 7?"},
                                                     {"role": "assistant", "content": ""}]})
    config = GPTConfig(sequence_len=128, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=1, n_embd=16)
    model = ScriptedModel(config, script)
    (out,) = generate_batch(model, prompt, 40, temperature=0.0, stop_tokens=(sp("<|assistant_end|>"),),
                            tool=calculator_tool(tok))
    call = [sp("<|python_start|>"), *expr, sp("<|python_end|>")]
    assert out == call + forced + after
    assert junk not in out
