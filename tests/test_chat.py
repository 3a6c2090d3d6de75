"""Chat sessions: loading a run's chat checkpoint, streaming replies (whole characters only,
calculator calls readable and kept as tool parts), the terminal REPL and `mlxchat chat`."""

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from chatrun import RUN, ScriptedModel, make_chat_run

from mlxchat import cli
from mlxchat.calculator import calculator_tool
from mlxchat.chat_session import TOOL_MARKS, ChatModel, chat_repl, load_chat_model, render_prompt, stream_reply
from mlxchat.common import MlxchatError
from mlxchat.engine import generate_batch
from mlxchat.gpt import GPTConfig

HELLO = [{"role": "user", "content": "Hello there!"}]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat_home")
    make_chat_run(root)
    return root


@pytest.fixture(scope="module")
def chat(home):
    return load_chat_model(RUN, "sft", root=home)


def scripted(chat, script):
    """The run's tokenizer with a model that says `script` (token ids)."""
    tok = chat.tokenizer
    config = GPTConfig(sequence_len=128, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=1, n_embd=16)
    return ChatModel(ScriptedModel(config, script), tok, RUN, "sft", 1)


def test_loads_the_latest_sft_checkpoint(chat):
    assert (chat.run, chat.stage, chat.step) == (RUN, "sft", 1)
    assert chat.model.config.vocab_size == chat.tokenizer.vocab_size


def test_missing_chat_checkpoint_says_how_to_train_it(home):
    with pytest.raises(MlxchatError, match=r"no mid checkpoint yet.*mlxchat train mid --run tiny"):
        load_chat_model(RUN, "mid", root=home)
    with pytest.raises(MlxchatError, match="nope"):
        load_chat_model("nope", root=home)


def test_reply_is_the_engine_generation_decoded(chat):
    """Greedy pieces join to exactly what the engine generates for the same prompt (calculator
    on), cut at the stop token, with the tool tokens shown as their marks: streaming loses and
    adds nothing."""
    tok = chat.tokenizer
    pieces = list(stream_reply(chat, HELLO, temperature=0.0, max_tokens=24))
    stop = (tok.encode_special("<|assistant_end|>"), tok.bos_id)
    (tokens,) = generate_batch(chat.model, render_prompt(tok, HELLO), 24, temperature=0.0, stop_tokens=stop,
                               tool=calculator_tool(tok))
    marks = {tok.encode_special(name): mark for name, mark in TOOL_MARKS.items()}
    expected, run = "", []
    for t in tokens + [None]:
        if t is None or t in marks:
            expected += tok.decode(run) + (marks[t] if t is not None else "")
            run = []
        else:
            run.append(t)
    assert len(pieces) > 1
    assert "".join(pieces) == expected


def test_multibyte_characters_are_never_split(chat):
    """'é' and '🙂' span several byte-level tokens: no piece carries half a character."""
    tok = chat.tokenizer
    text = "Café 🙂 naïve"
    ids = tok.encode(text)
    assert len(ids) > len(text.encode()) // 2, "the tiny tokenizer should split these characters"
    pieces = list(stream_reply(scripted(chat, ids + [tok.encode_special("<|assistant_end|>")]), HELLO, max_tokens=99))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert len(pieces) > 3  # streamed, not one block at the end


def test_calculator_call_shows_readably_and_comes_back_as_tool_parts(chat):
    tok = chat.tokenizer
    sp = tok.encode_special
    junk = [tok.encode("fox")[0]] * (len(tok.encode("84")) + 2)  # where the calculator's answer goes
    script = [*tok.encode("Let me see. "), sp("<|python_start|>"), *tok.encode("12*7"), sp("<|python_end|>"),
              *junk, *tok.encode(" So 84."), sp("<|assistant_end|>")]
    parts = []
    reply = "".join(stream_reply(scripted(chat, script), HELLO, max_tokens=99, parts=parts))
    assert reply == "Let me see. <<12*7=84>> So 84."
    assert parts == [{"type": "text", "text": "Let me see. "}, {"type": "python", "text": "12*7"},
                     {"type": "python_output", "text": "84"}, {"type": "text", "text": " So 84."}]


def test_prompt_keeps_the_newest_turn_of_a_long_conversation(chat):
    tok = chat.tokenizer
    long = [{"role": "user", "content": "word " * 3000}, {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "last question"}]
    ids = render_prompt(tok, long)
    assert len(ids) > 2048
    assert ids[-1] == tok.encode_special("<|assistant_start|>")
    tail = [*tok.encode("last question"), tok.encode_special("<|user_end|>"), tok.encode_special("<|assistant_start|>")]
    assert ids[-len(tail):] == tail
    with pytest.raises(MlxchatError, match="end with a user message"):
        render_prompt(tok, long[:2])


def test_repl_keeps_the_conversation_clears_and_quits(chat):
    """Turn 2's prompt holds turn 1's reply with the calculator exchange as tool tokens;
    'clear' starts over; 'quit' leaves before the last line."""
    tok = chat.tokenizer
    sp = tok.encode_special
    junk = [tok.encode("fox")[0]] * (len(tok.encode("84")) + 2)
    script = [sp("<|python_start|>"), *tok.encode("12*7"), sp("<|python_end|>"), *junk, *tok.encode(" ok"),
              sp("<|assistant_end|>")]
    session = scripted(chat, script)
    out = io.StringIO()
    chat_repl(session, io.StringIO("What is 12*7?\nAnd then?\nclear\nHi\nquit\nnever read\n"), out, seed=3)
    transcript = out.getvalue()
    assert transcript.count("Assistant: <<12*7=84>> ok\n") == 3
    assert "(conversation cleared)" in transcript
    first, second, third = session.model.prompts
    expected_turn = [sp("<|python_start|>"), *tok.encode("12*7"), sp("<|python_end|>"), sp("<|output_start|>"),
                     *tok.encode("84"), sp("<|output_end|>"), *tok.encode(" ok"), sp("<|assistant_end|>")]
    assert second[: len(first) - 1] == first[:-1]
    assert second[len(first):len(first) + len(expected_turn)] == expected_turn
    assert third == render_prompt(tok, [{"role": "user", "content": "Hi"}])


def test_cli_answers_once_and_streams(home, chat, capsys):
    rc = cli.main(["--home", str(home), "chat", "--run", RUN, "-p", "Hello there!", "--temperature", "0",
                   "--max-tokens", "16"])
    assert rc == 0
    expected = "".join(stream_reply(chat, HELLO, temperature=0.0, max_tokens=16, seed=0))
    assert capsys.readouterr().out == expected + "\n"


def test_cli_without_chat_checkpoint_exits_2_with_one_line(home, capsys):
    assert cli.main(["--home", str(home), "chat", "--run", RUN, "--stage", "mid", "-p", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "mlxchat train mid --run tiny" in err


def test_serve_without_chat_checkpoint_exits_2_before_listening(home, capsys):
    assert cli.main(["--home", str(home), "serve", "--run", RUN, "--stage", "mid", "--port", "1"]) == 2
    assert "no mid checkpoint yet" in capsys.readouterr().err


def test_cli_repl_on_stdin(home):
    """The console script end to end: a conversation piped in, replies out, 'exit' leaves."""
    env = {**os.environ, "PYTHONPATH": str(Path(cli.__file__).parents[1])}
    proc = subprocess.run(
        [sys.executable, "-m", "mlxchat.cli", "--home", str(home), "chat", "--run", RUN, "--max-tokens", "8",
         "--seed", "1"],
        input="Hello there!\nWhat is 12 * 7?\nexit\n", capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"mlxchat {RUN}/sft (step 1).")
    assert proc.stdout.count("Assistant: ") == 2
