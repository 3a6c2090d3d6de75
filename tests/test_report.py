"""The report's summary table: real numbers where they exist, "skipped (reason)" where data could not be had."""

import json
import re

from mlxchat.report import summary_markdown, summary_rows
from mlxchat.rundir import Home


def _write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def test_summary_table_shows_numbers_and_says_why_a_cell_was_skipped(tmp_path):
    rdir = Home(tmp_path).run("r")
    (rdir.stage("base") / "latest").mkdir(parents=True)
    _write(rdir.eval_file("core"), {"base": {"name": "CORE-pack (14/22)", "core_metric": 0.0438, "max_per_task": 16}})
    results = {"ARC-Easy": 0.1875, "ARC-Challenge": 0.0625, "MMLU": 0.0625, "GSM8K": 0.0, "HumanEval": 0.0,
               "SpellingBee": 0.25}
    _write(rdir.chat_eval("sft"), {"results": results, "skipped": {}, "chatcore": -0.05, "max_per_task": 16})
    _write(rdir.chat_eval("mid"), {"results": {"SpellingBee": 0.5}, "chatcore": None, "max_per_task": 16,
                                                 "skipped": {"MMLU": "MMLU: mmlu.jsonl is missing; run mlxchat data prepare-evals"}})
    md = summary_markdown(summary_rows(rdir), "note")
    assert "| CORE-pack (14/22) | 0.0438 | - | - |" in md
    assert "| ARC-Easy | - | - | 0.1875 |" in md
    assert "| MMLU | - | skipped (no eval data: mlxchat data prepare-evals) | 0.0625 |" in md
    assert "| ChatCORE | - | skipped (needs all six tasks) | -0.0500 |" in md


def _core(rows):
    return next(r for r in rows if r["metric"] == "CORE")


def test_without_eval_data_core_says_skipped_once_base_is_trained(tmp_path):
    rdir = Home(tmp_path).run("r")
    assert _core(summary_rows(rdir))["BASE"] == "-"  # nothing trained yet: nothing to say
    (rdir.stage("base") / "latest").mkdir(parents=True)
    assert _core(summary_rows(rdir))["BASE"] == "skipped (no eval data: mlxchat data prepare-evals)"


def test_report_card_says_when_where_how_long_and_the_validation_bpb(tmp_path):
    from mlxchat.report import build_report

    run = Home(tmp_path).run("r")
    _write(run.run_json, {"run": "r", "hardware": {"chip": "Apple M3 Pro", "memory": "36.0 GiB", "MLX device": "gpu",
                                                        "GPU memory": "27.0 GiB"}})
    _write(run.timings, {"report": 0.5, "chat-eval/sft": 2.0, "mid-eval": 1.0, "tokenizer-train": 3.14159, "base-train": 187.6,
                         "chat-eval/mid": 3.0})
    _write(run.eval_file("bpb"), {"base": {"step": 120, "val_bpb": 1.234567, "train_bpb": 1.2, "eval_tokens": 16384}})
    report = build_report("r", root=tmp_path).read_text()
    header = next(line for line in report.splitlines() if line.startswith("Generated"))
    assert re.match(r"Generated \d{4}-\d\d-\d\d \d\d:\d\d UTC · total wall time 3m17s \(the steps' own, 5 steps\)",
                    header), header
    assert "Apple M3 Pro, 36.0 GiB memory, MLX on gpu (27.0 GiB)" in header
    assert "| val bpb | 1.2346 | - | - |" in report
    assert "| tokenizer-train | 3.1 s |" in report and "| base-train | 3m08s |" in report
    steps = [line.split("|")[1].strip() for line in report.split("Wall time per step", 1)[1].splitlines()
             if line.startswith("| ") and "---" not in line][1:]  # the table's rows, header dropped
    assert steps == ["tokenizer-train", "base-train", "chat-eval", "report", "mid-eval", "total"]  # the table's order
    assert "| chat-eval | 5.0 s |" in report  # its parts (one per model stage) summed
    assert "| eval_tokens | 16,384 |" in report


def test_rl_is_a_fourth_column_with_chatcore_after_rl(tmp_path):
    rdir = Home(tmp_path).run("r")
    results = {"ARC-Easy": 0.25, "ARC-Challenge": 0.0, "MMLU": 0.125, "GSM8K": 0.0625, "HumanEval": 0.0, "SpellingBee": 0.5}
    _write(rdir.chat_eval("sft"), {"results": results, "skipped": {}, "chatcore": -0.02, "max_per_task": 16})
    md = summary_markdown(summary_rows(rdir))
    assert "| Metric | BASE | MID | SFT | RL |" in md and "| GSM8K | - | - | 0.0625 | - |" in md  # no RL run: "-"
    _write(rdir.chat_eval("rl"), {"results": {**results, "GSM8K": 0.125}, "skipped": {}, "chatcore": 0.01})
    md = summary_markdown(summary_rows(rdir))
    assert "| GSM8K | - | - | 0.0625 | 0.1250 |" in md and "| ChatCORE | - | - | -0.0200 | 0.0100 |" in md
