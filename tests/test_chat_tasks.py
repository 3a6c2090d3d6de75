"""Conversation tasks and the mid/SFT mixtures: hub datasets read through a FakeHub serving
small parquet files in the real layouts, the offline generators, the eval pack, and what the
tokenizer trains on when it renders them."""

import json
import os
import re
import socket
import sys
from pydoc_data.topics import topics

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mlxchat.common import MlxchatError
from mlxchat.conversations import (
    ARC,
    GSM8K,
    MMLU,
    Arithmetic,
    CustomJSON,
    HumanEval,
    SimpleSpelling,
    SmolTalk,
    SpellingBee,
    Task,
    TaskMixture,
    TaskSequence,
    build_mixture,
    identity_path,
    mixture_fingerprint,
    render_mc,
)  # fmt: skip
from mlxchat.conversations.gsm8k import solution_parts
from mlxchat.conversations.mixtures import IDENTITY_VAL
from mlxchat.tokenizer import Tokenizer

GSM_ANSWER = (
    "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\n"
    "Working 50 minutes, she earned 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10"
)


class ListTask(Task):
    def __init__(self, items, **kwargs):
        super().__init__(**kwargs)
        self.items = items

    def num_examples(self):
        return len(self.items)

    def get_example(self, index):
        return {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": self.items[index]}]}


def answers(task):
    return [task[i]["messages"][-1]["content"] for i in range(len(task))]


def key(conversation):
    return json.dumps(conversation["messages"], sort_keys=True)


# -- base ----------------------------------------------------------------------------------------


def test_render_mc_is_nanochats_exact_format():
    text = render_mc("What is 2+2?", ["A", "B", "C"], ["3", "4", "5"])
    assert text == (
        "Multiple Choice question: What is 2+2?\n- 3=A\n- 4=B\n- 5=C\n\n"
        "Respond only with the letter of the correct answer."
    )


def test_task_slices_are_views_over_the_examples():
    task = ListTask(list("abcdefghij"), start=2, stop=9, step=3)
    assert answers(task) == ["c", "f", "i"]
    assert len(ListTask(list("abc"), stop=10)) == 3  # a stop past the end is clipped
    with pytest.raises(IndexError):
        task[3]
    with pytest.raises(MlxchatError, match="slice"):
        ListTask([], start=5, stop=2)


def test_mixture_is_a_fixed_shuffle_and_listing_a_task_twice_oversamples_it():
    a, b = ListTask(list("abcde")), ListTask(list("xyz"))
    first, again = TaskMixture([a, b, b]), TaskMixture([a, b, b])
    assert answers(first) == answers(again)
    assert sorted(answers(first)) == sorted(list("abcde") + list("xyz") * 2)
    assert answers(first) != list("abcde") + list("xyzxyz")  # shuffled, not concatenated
    assert answers(TaskSequence([a, b])) == list("abcdexyz")


# -- offline generators --------------------------------------------------------------------------


@pytest.fixture
def words(tmp_path):
    path = tmp_path / "words"
    vocabulary = sorted({w.lower() for text in list(topics.values())[:40] for w in re.findall(r"[A-Za-z]{3,12}", text)})
    path.write_text("\n".join(vocabulary + ["Paris", "café", "o'clock"]) + "\n")
    return path


def test_simple_spelling_spells_words_of_its_split_only(words):
    train, val = SimpleSpelling(200, "train", words), SimpleSpelling(200, "val", words)
    spelled = {}
    for task in (train, val):
        for i in range(len(task)):
            user, assistant = task[i]["messages"]
            word = user["content"].removeprefix("Spell the word: ")
            assert re.fullmatch(r"[a-z]+", word)
            assert assistant["content"] == word + ":" + ",".join(word)
            spelled.setdefault(task.split, set()).add(word)
    assert spelled["train"].isdisjoint(spelled["val"])
    assert SimpleSpelling(5, "train", words)[3] == train[3]  # deterministic per index


def test_spelling_bee_counts_by_hand_and_with_python_consistently(words):
    task = SpellingBee(300, "train", words)
    for i in range(len(task)):
        conversation = task[i]
        parts = conversation["messages"][1]["content"]
        assert [p["type"] for p in parts] == ["text", "text", "python", "python_output", "text"]
        word, letter = re.fullmatch(r"'([a-z]+)'\.count\('([a-z])'\)", parts[2]["text"]).groups()
        count = word.count(letter)
        assert eval(parts[2]["text"]) == count and parts[3]["text"] == str(count)
        assert parts[0]["text"].endswith(f"This gives us {count}.") and f"{word}:{','.join(word)}" in parts[0]["text"]
        assert task.evaluate(conversation, f"so the answer is\n#### {count}")
        assert not task.evaluate(conversation, f"#### {count + 1}")
    val_words = {re.search(r"'([a-z]+)'", SpellingBee(100, "val", words)[i]["messages"][1]["content"][2]["text"])[1]
                 for i in range(100)}  # fmt: skip
    train_words = {re.search(r"'([a-z]+)'", task[i]["messages"][1]["content"][2]["text"])[1] for i in range(300)}
    assert val_words.isdisjoint(train_words)


def test_missing_word_list_file_names_the_packaged_alternative(tmp_path):
    with pytest.raises(MlxchatError, match="english-words"):
        SimpleSpelling(10, "train", tmp_path / "nowords")


def test_packaged_word_list_needs_no_os_file_and_is_the_same_in_every_process():
    """The default list comes from the pinned pip package (no /usr/share/dict/words), sorted, so
    example i is the same conversation whatever the process's string hash seed."""
    import subprocess

    code = "from mlxchat.conversations import SpellingBee; print(SpellingBee(50, 'train')[7]['messages'][0]['content'])"
    out = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert len(out) == 1 and out.pop().strip()
    assert len(SimpleSpelling(10, "train").words) > 100_000


def test_arithmetic_tool_calls_and_answers_are_correct():
    for split in ("train", "val"):
        task = Arithmetic(400, split)
        for i in range(len(task)):
            conversation = task[i]
            parts = conversation["messages"][1]["content"]
            calls = [(p["text"], q["text"]) for p, q in zip(parts, parts[1:]) if p["type"] == "python"]
            assert calls and all(q["type"] == "python_output" for p, q in zip(parts, parts[1:]) if p["type"] == "python")
            for expr, output in calls:
                assert re.fullmatch(r"[0-9+\-*/]+", expr)
                assert str(eval(expr)) == output  # exactly what the calculator tool returns
            final = float(calls[-1][1])
            assert parts[-1]["text"].endswith(f"#### {int(final) if final.is_integer() else final}")
            assert task.evaluate(conversation, f"#### {parts[-1]['text'].rsplit(' ', 1)[1]}")
            assert not task.evaluate(conversation, "#### 123456789")
    train = {key(c) for c in (Arithmetic(400, "train")[i] for i in range(400))}
    val = {key(c) for c in (Arithmetic(400, "val")[i] for i in range(400))}
    assert len(train) > 350 and train.isdisjoint(val)


def test_identity_conversations_are_valid_and_about_mlxchat():
    task = CustomJSON(identity_path())
    assert 100 <= len(task) <= 200
    mentions = sum("mlxchat" in json.dumps(task[i]).lower() for i in range(len(task)))
    assert mentions > len(task) // 2


def test_custom_json_names_the_bad_line(tmp_path):
    path = tmp_path / "conv.jsonl"
    good = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(good[:1]) + "\n")
    with pytest.raises(MlxchatError, match=r"conv\.jsonl:3"):
        CustomJSON(path)
    path.write_text(json.dumps([{"role": "system", "content": "be brief"}] + good) + "\n")
    assert CustomJSON(path)[0]["messages"][0]["role"] == "system"


# -- mixtures ------------------------------------------------------------------------------------


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_smoke_mixtures_need_no_network_and_hold_out_validation(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    sizes = {}
    for kind in ("mid", "sft"):
        train, val = (build_mixture(kind, split, "smoke", root=tmp_path) for split in ("train", "val"))
        sizes[kind] = len(train)
        train_keys = {key(train[i]) for i in range(len(train))}
        assert all(key(val[i]) not in train_keys for i in range(len(val)))
        assert len(val) > 0
    assert 200 <= sizes["sft"] <= 400 and sizes["mid"] > 10 * sizes["sft"]
    assert not (tmp_path / "data").exists()  # nothing downloaded, nothing cached


def test_smoke_identity_split_is_by_position():
    val = build_mixture("sft", "val", "smoke")
    identity = CustomJSON(identity_path())
    held_out = {key(identity[i]) for i in range(len(identity) - IDENTITY_VAL, len(identity))}
    assert sum(key(val[i]) in held_out for i in range(len(val))) == IDENTITY_VAL


def test_mixture_fingerprint_identifies_the_data_without_building_it(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    prints = {(k, s, src): mixture_fingerprint(k, s, src) for k in ("mid", "sft") for s in ("train", "val")
              for src in ("smoke", "hub")}  # fmt: skip
    assert len(set(prints.values())) == len(prints)
    assert mixture_fingerprint("mid", "train", "smoke") == prints[("mid", "train", "smoke")]
    with pytest.raises(MlxchatError, match="mid or sft"):
        mixture_fingerprint("rl", "train", "smoke")


# -- hub datasets (FakeHub) ----------------------------------------------------------------------


def parquet(hub, repo, path, rows):
    buffer = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    hub.add_file(repo, path, buffer.getvalue().to_pybytes())


def chat(i, system=False):
    messages = [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]
    return {"messages": ([{"role": "system", "content": "be kind"}] if system else []) + messages, "source": "x"}


def mmlu_row(i):
    return {"question": f"mmlu {i}?", "subject": "astronomy", "choices": ["w", "x", "y", "z"], "answer": i % 4}


def arc_row(i, n=4):
    labels = list("ABCDE"[:n])
    return {"id": f"arc{i}", "question": f"arc {i}?", "choices": {"text": [f"c{j}" for j in range(n)], "label": labels},
            "answerKey": labels[i % n]}  # fmt: skip


@pytest.fixture
def hub(fake_hub):
    """The chat datasets in their real hub layouts, a few rows each."""
    parquet(fake_hub, "HuggingFaceTB/smol-smoltalk", "data/train-00000-of-00002.parquet", [chat(i) for i in range(6)])
    parquet(fake_hub, "HuggingFaceTB/smol-smoltalk", "data/train-00001-of-00002.parquet", [chat(i, True) for i in range(6, 10)])
    parquet(fake_hub, "HuggingFaceTB/smol-smoltalk", "data/test-00000-of-00001.parquet", [chat(100 + i) for i in range(4)])
    parquet(fake_hub, "cais/mmlu", "auxiliary_train/train-00000-of-00001.parquet", [{"train": mmlu_row(i)} for i in range(7)])
    parquet(fake_hub, "cais/mmlu", "all/test-00000-of-00001.parquet", [mmlu_row(50 + i) for i in range(5)])
    parquet(fake_hub, "cais/mmlu", "all/auxiliary_train-00000-of-00001.parquet", [mmlu_row(90)])  # must not match all/test
    gsm = [{"question": f"gsm {i}?", "answer": GSM_ANSWER} for i in range(3)]
    parquet(fake_hub, "openai/gsm8k", "main/train-00000-of-00001.parquet", gsm)
    parquet(fake_hub, "openai/gsm8k", "main/test-00000-of-00001.parquet", gsm[:2])
    parquet(fake_hub, "allenai/ai2_arc", "ARC-Easy/train-00000-of-00001.parquet", [arc_row(i) for i in range(4)])
    parquet(fake_hub, "allenai/ai2_arc", "ARC-Challenge/train-00000-of-00001.parquet", [arc_row(i, 5) for i in range(3)])
    return fake_hub


def test_hub_tasks_give_nanochats_conversations_in_its_shuffled_order(hub, tmp_path):
    smoltalk = SmolTalk("train", root=tmp_path)
    assert len(smoltalk) == 10
    order = np.random.default_rng(42).permutation(10)  # datasets' shuffle(seed=42), across both shards in order
    assert [smoltalk[i]["messages"][-1]["content"] for i in range(10)] == [f"answer {j}" for j in order]
    with_system = next(smoltalk[i] for i in range(10) if order[i] >= 6)
    assert with_system["messages"][0] == {"role": "system", "content": "be kind"}

    aux = MMLU("auxiliary_train", "train", root=tmp_path)
    assert len(aux) == 7
    row = mmlu_row(int(np.random.default_rng(42).permutation(7)[0]))
    assert aux[0] == {
        "messages": [
            {"role": "user", "content": render_mc(row["question"], "ABCD", row["choices"])},
            {"role": "assistant", "content": "ABCD"[row["answer"]]},
        ],
        "subject": "astronomy",
        "letters": ("A", "B", "C", "D"),
    }
    assert len(MMLU("all", "test", root=tmp_path)) == 5

    challenge = ARC("ARC-Challenge", "train", root=tmp_path)
    conversation = challenge[0]
    assert conversation["letters"] == list("ABCDE") and "- c4=E\n" in conversation["messages"][0]["content"]
    assert challenge.evaluate(conversation, conversation["messages"][1]["content"])

    gsm = GSM8K("main", "train", root=tmp_path)
    assert gsm[0]["messages"][1]["content"] == solution_parts(GSM_ANSWER)


def test_hub_mixtures_follow_nanochats_recipes(hub, tmp_path):
    identity = len(CustomJSON(identity_path()))
    sft = build_mixture("sft", "train", "hub", root=tmp_path)
    assert len(sft) == 4 + 3 + 3 + 10 + identity + 300 + 300
    assert len(build_mixture("sft", "val", "hub", root=tmp_path)) == 4
    mid = build_mixture("mid", "train", "hub", root=tmp_path)
    assert len(mid) == 10 + 7 + 3 + 2 * identity + 200_000 + 80_000
    assert len(build_mixture("mid", "val", "hub", root=tmp_path)) == 4 + 5 + 2
    cached = sorted(p.name for p in (tmp_path / "data" / "hub-datasets").rglob("*.parquet"))
    assert "auxiliary_train-00000-of-00001.parquet" not in cached  # only the files a recipe asks for


def test_unreachable_hub_is_one_line_naming_the_dataset_and_the_offline_source(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    with pytest.raises(MlxchatError) as e:
        SmolTalk("test", root=tmp_path)
    assert "HuggingFaceTB/smol-smoltalk" in str(e.value) and "--source smoke" in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_hub_repo_is_a_user_error(fake_hub, tmp_path):
    with pytest.raises(MlxchatError, match="openai/gsm8k"):
        GSM8K("main", "test", root=tmp_path)


# -- GSM8K, tool calls and the loss mask --------------------------------------------------------


def test_gsm8k_calculator_annotations_become_tool_parts_and_evaluate_reads_the_final_number():
    assert solution_parts(GSM_ANSWER) == [
        {"type": "text", "text": "Weng earns 12/60 = $"},
        {"type": "python", "text": "12/60"},
        {"type": "python_output", "text": "0.2"},
        {"type": "text", "text": "0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = $"},
        {"type": "python", "text": "0.2*50"},
        {"type": "python_output", "text": "10"},
        {"type": "text", "text": "10.\n#### 10"},
    ]
    task = GSM8K(rows=[{"question": "q", "answer": GSM_ANSWER.replace("#### 10", "#### 1,000")}])
    conversation = task[0]
    assert task.evaluate(conversation, "So she earned $1000.\n#### 1000")
    assert not task.evaluate(conversation, "#### 100")
    assert not task.evaluate(conversation, "she earned 1000")


def test_rendered_gsm8k_trains_the_calculator_calls_but_not_their_outputs():
    tok = Tokenizer.train_from_iterator(iter(list(topics.values())[:60]), 400)
    conversation = GSM8K(rows=[{"question": "How much?", "answer": GSM_ANSWER}])[0]
    ids, mask = tok.render_conversation(conversation)
    special = {name: tok.encode_special(name) for name in ("<|python_start|>", "<|python_end|>",
                                                            "<|output_start|>", "<|output_end|>")}  # fmt: skip
    for start, end, trained, texts in (("<|python_start|>", "<|python_end|>", 1, ["12/60", "0.2*50"]),
                                       ("<|output_start|>", "<|output_end|>", 0, ["0.2", "10"])):  # fmt: skip
        starts = [i for i, t in enumerate(ids) if t == special[start]]
        assert len(starts) == 2
        for s, text in zip(starts, texts):
            e = ids.index(special[end], s)
            assert ids[s + 1 : e] == tok.encode(text)
            assert set(mask[s : e + 1]) == {trained}
    final = tok.encode("10.\n#### 10")
    assert ids[-1 - len(final) : -1] == final and set(mask[-1 - len(final) :]) == {1}


# -- the eval pack -------------------------------------------------------------------------------


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_eval_tasks_read_the_eval_pack(tmp_path):
    pack = tmp_path / "evals" / "chat"
    write_jsonl(pack / "arc_easy.jsonl", [{"id": "e1", "question": "Sky?", "choices": ["red", "blue"],
                                           "labels": ["A", "B"], "answer": "B"}])  # fmt: skip
    write_jsonl(pack / "mmlu.jsonl", [mmlu_row(i) for i in range(3)])
    write_jsonl(pack / "gsm8k.jsonl", [{"question": "Weng?", "answer": GSM_ANSWER}])
    humaneval = {"task_id": "HumanEval/0", "prompt": "import math\n\ndef add(a, b):\n    \"\"\"Add.\"\"\"\n",
                 "canonical_solution": "    return a + b\n", "entry_point": "add",
                 "test": "def check(f):\n    assert f(2, 3) == 5\n"}  # fmt: skip
    write_jsonl(pack / "humaneval.jsonl", [humaneval])

    arc = ARC.from_pack(tmp_path, "ARC-Easy")
    assert arc[0]["messages"] == [{"role": "user", "content": render_mc("Sky?", ["A", "B"], ["red", "blue"])},
                                  {"role": "assistant", "content": "B"}]  # fmt: skip
    assert arc.eval_type == "categorical" and arc.evaluate(arc[0], "B") and not arc.evaluate(arc[0], "A")
    mmlu = MMLU.from_pack(tmp_path)
    assert len(mmlu) == 3 and {mmlu[i]["messages"][1]["content"] for i in range(3)} == {"A", "B", "C"}
    gsm = GSM8K.from_pack(tmp_path)
    assert gsm[0]["messages"][1]["content"] == solution_parts(GSM_ANSWER) and gsm.evaluate(gsm[0], "#### 10")

    he = HumanEval.from_pack(tmp_path)
    problem = he[0]
    assert problem["entry_point"] == "add" and problem["messages"][0]["content"] == humaneval["prompt"]
    good = "```python\ndef add(a, b):\n    return a + b\n```\nThis adds."
    assert he.evaluate(problem, good)  # in the sandbox
    assert not he.evaluate(problem, "def add(a, b):\n    return a - b")

    with pytest.raises(MlxchatError, match=r"arc_challenge\.jsonl.*mlxchat data prepare-evals"):
        ARC.from_pack(tmp_path, "ARC-Challenge")


def test_every_smoke_conversation_renders_with_something_to_train_on():
    tok = Tokenizer.train_from_iterator(iter(list(topics.values())[:60]), 400)
    for kind in ("mid", "sft"):
        for split in ("train", "val"):
            mixture = build_mixture(kind, split, "smoke")
            for i in range(len(mixture)):
                ids, mask = tok.render_conversation(mixture[i], max_tokens=10**6)
                assert 0 < sum(mask) < len(ids)


def test_the_chat_stages_keys_change_with_the_identity_file_and_the_word_list(tmp_path, monkeypatch):
    from mlxchat import pipeline
    from mlxchat.conversations import customjson, spelling

    identity, words = tmp_path / "identity.jsonl", tmp_path / "words"
    identity.write_bytes(customjson.identity_path().read_bytes())
    words.write_text("apple\nbanana\n")
    monkeypatch.setattr(customjson, "identity_path", lambda: identity)
    monkeypatch.setattr(spelling, "packaged_words_file", lambda: words)
    before = {stage: pipeline.mixture_inputs(stage, "smoke") for stage in ("mid", "sft")}
    identity.write_text(identity.read_text().replace("mlxchat", "mlxchat!", 1))
    edited = {stage: pipeline.mixture_inputs(stage, "smoke") for stage in ("mid", "sft")}
    assert all(edited[s]["mixture_train"] != before[s]["mixture_train"] for s in before)
    words.write_text("apple\ncherry\n")
    assert all(pipeline.mixture_inputs(s, "smoke")["mixture_train"] != edited[s]["mixture_train"] for s in before)
