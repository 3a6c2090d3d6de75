"""The CORE metric (DCLM paper) with nanochat's semantics, on a bundle in the DCLM layout.

A bundle is `core.yaml` (the `icl_tasks` list: label, dataset_uri, num_fewshot,
icl_task_type, continuation_delimiter), `eval_meta_data.csv` (random baselines) and
`eval_data/<category>/<task>.jsonl`. The official bundle has 22 tasks; the PyPI pack
(mlxchat.evaluation.pack) carries the subset it can source, so the metric is named after
what was actually measured: "CORE" only for all 22 official tasks, else "CORE-pack (N/22)".

Prompts, few-shot sampling (random.Random(1234 + idx), the item itself excluded), the
left-truncation and the scoring follow nanochat's core_eval.py so numbers are comparable.
Unlike nanochat, several examples share one forward pass: rows are padded on the right,
and a causal model's losses at the real positions do not depend on the padding. On the CPU a
forward's rows are split over the cores (`cpu_shards`).
"""
from __future__ import annotations

import csv
import json
import math
import random
from pathlib import Path

import mlx.core as mx
import yaml

from mlxchat import cpu_shards
from mlxchat.common import MlxchatError, get_logger, read_json
from mlxchat.distributed import my_share, sum_over_ranks, world
from mlxchat.evaluation.pack import CORE_TASKS
from mlxchat.gpt import token_losses

log = get_logger(__name__)

TASK_TYPES = ("multiple_choice", "schema", "language_modeling")


def render_prompts(item: dict, task_type: str, delimiter: str, fewshot: list[dict]) -> list[str]:
    """The full texts to score for one item, as nanochat's Jinja templates render them.

    multiple_choice: one shared context, one prompt per choice; schema: one prompt per
    context option, shared continuation; language_modeling: [prompt without, prompt with]
    the continuation (contexts trimmed, so the first is a clean token prefix of the second).
    """
    if task_type == "multiple_choice":
        shots = "".join(f"{ex['query']}{delimiter}{ex['choices'][ex['gold']]}\n\n" for ex in fewshot)
        return [f"{shots}{item['query']}{delimiter}{choice}".strip() for choice in item["choices"]]
    if task_type == "schema":
        shots = "".join(f"{ex['context_options'][ex['gold']]}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
        return [f"{shots}{option}{delimiter}{item['continuation']}".strip() for option in item["context_options"]]
    if task_type == "language_modeling":
        shots = "".join(f"{ex['context'].strip()}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
        without = f"{shots}{item['context'].strip()}{delimiter}"
        return [without.strip(), (without + item["continuation"]).strip()]
    raise MlxchatError(f"unsupported icl_task_type {task_type!r}; use one of {', '.join(TASK_TYPES)}")


def common_length(seqs: list[list[int]], direction: str) -> int:
    """Length of the common token prefix ('left') or suffix ('right') of the sequences."""
    n = min(len(s) for s in seqs)
    for i in range(n):
        j = i if direction == "left" else -1 - i
        if any(s[j] != seqs[0][j] for s in seqs):
            return i
    return n


def build_example(idx: int, data: list[dict], meta: dict, tokenizer, max_seq_len: int | None):
    """Token rows and [start, end) continuation spans of example `idx`, as nanochat builds them."""
    item = data[idx]
    fewshot = []
    if meta["num_fewshot"] > 0:
        rng = random.Random(1234 + idx)
        others = [i for i in range(len(data)) if i != idx]
        # nanochat draws shots from the (possibly --max-per-task cropped) data and would crash
        # when it holds fewer than num_fewshot others; a smoke run with tiny N takes all it has
        fewshot = [data[i] for i in rng.sample(others, min(meta["num_fewshot"], len(others)))]
    prompts = render_prompts(item, meta["task_type"], meta["continuation_delimiter"], fewshot)
    tokens = tokenizer.encode(prompts, prepend=tokenizer.bos_id)
    if meta["task_type"] == "multiple_choice":
        start = common_length(tokens, "left")
        spans = [(start, len(t)) for t in tokens]
    elif meta["task_type"] == "schema":
        suffix = common_length(tokens, "right")
        spans = [(len(t) - suffix, len(t)) for t in tokens]
    else:
        without, with_ = tokens
        if len(without) >= len(with_) or with_[: len(without)] != without:
            raise MlxchatError(f"{meta['label']} item {idx}: the context does not tokenize to a prefix of context+continuation")
        tokens, spans = [with_], [(len(without), len(with_))]
    if max_seq_len:
        cropped = []
        for t, (s, e) in zip(tokens, spans):
            crop = max(0, len(t) - max_seq_len)
            cropped.append((t[crop:], (max(1, s - crop), e - crop)))
        tokens, spans = [c[0] for c in cropped], [c[1] for c in cropped]
    return tokens, spans


def _forward(model, rows: list[list[int]], pad_id: int, streams: list | None = None):
    """Per-position next-token losses and argmax predictions of right-padded rows, the rows
    split over `streams` (default: the current stream alone)."""
    width = max(len(r) for r in rows)
    ids = mx.array([r + [pad_id] * (width - len(r)) for r in rows], dtype=mx.int32)

    def scored(ids):
        z = model.lm_head(model.hidden(ids))
        targets = mx.concatenate([ids[:, 1:], ids[:, :1]], axis=1)
        return token_losses(z, targets), mx.argmax(z, axis=-1)

    parts = cpu_shards.on_row_shards(scored, (ids,), streams)
    mx.eval(parts)
    return [row for losses, _ in parts for row in losses.tolist()], [row for _, preds in parts for row in preds.tolist()]


def _score(meta: dict, item: dict, rows, spans, losses, preds) -> bool:
    """nanochat's decision: lowest mean continuation loss (MC/schema), or exact greedy match (LM)."""
    if meta["task_type"] == "language_modeling":
        (row,), ((s, e),), (pred,) = rows, spans, preds
        return pred[s - 1 : e - 1] == row[s:e]
    # An option with no tokens past the shared prefix (identical choices occur in PIQA) has
    # nothing to score and cannot win; nanochat divides by zero there.
    means = [sum(loss[s - 1 : e - 1]) / (e - s) if e > s else math.inf for loss, (s, e) in zip(losses, spans)]
    return means.index(min(means)) == item["gold"]


def evaluate_task(model, tokenizer, data: list[dict], meta: dict, batch_tokens: int = 4096,
                  max_seq_len: int | None = None) -> float:
    """Accuracy on one task; examples are packed into forwards of at most ~batch_tokens tokens.
    Data-parallel ranks score every world-th example and add up their counts: each example's
    few-shot draw depends only on its index, so the split changes no answer."""
    correct, pending, pending_tokens = 0, [], 0
    streams = cpu_shards.shard_streams(world().size())

    def flush():
        nonlocal correct
        rows = [r for _, toks, _ in pending for r in toks]
        losses, preds = _forward(model, rows, tokenizer.bos_id, streams)
        at = 0
        for idx, toks, spans in pending:
            n = len(toks)
            correct += _score(meta, data[idx], toks, spans, losses[at : at + n], preds[at : at + n])
            at += n
        pending.clear()

    with cpu_shards.OneBlasThreadPerShard(streams):
        for idx in my_share(len(data)):
            toks, spans = build_example(idx, data, meta, tokenizer, max_seq_len)
            size = len(toks) * max(len(t) for t in toks)
            if pending and pending_tokens + size > batch_tokens:
                flush()
                pending_tokens = 0
            pending.append((idx, toks, spans))
            pending_tokens += size
        if pending:
            flush()
    return sum_over_ranks([correct])[0] / len(data) if data else 0.0


def centered(accuracy: float, random_baseline: float) -> float:
    """Accuracy rescaled so chance is 0 and perfect is 1 (baseline in percent, as DCLM gives it)."""
    return (accuracy - 0.01 * random_baseline) / (1.0 - 0.01 * random_baseline)


def load_bundle(bundle_dir: str | Path) -> tuple[list[dict], dict[str, float], str]:
    """Task list, random baselines and the honest metric name of a bundle directory."""
    bundle = Path(bundle_dir)
    cfg_path, meta_path = bundle / "core.yaml", bundle / "eval_meta_data.csv"
    for p in (cfg_path, meta_path):
        if not p.exists():
            raise MlxchatError(f"{p} is missing; run: mlxchat data prepare-evals")
    try:
        tasks = yaml.safe_load(cfg_path.read_text())["icl_tasks"]
    except (yaml.YAMLError, KeyError, TypeError) as e:
        raise MlxchatError(f"{cfg_path} is not a DCLM core.yaml with icl_tasks ({e}); rebuild it: mlxchat data prepare-evals --force") from None
    with open(meta_path, newline="") as f:
        baselines = {row["Eval Task"]: float(row["Random baseline"]) for row in csv.DictReader(f)}
    name = "CORE"
    prov = bundle.parent / "PROVENANCE.json"
    if prov.exists():
        name = read_json(prov, "eval provenance").get("core_name", name)
    return tasks, baselines, name


def evaluate_core(model, tokenizer, bundle_dir: str | Path, max_per_task: int = -1, batch_tokens: int = 4096,
                  max_seq_len: int | None = None) -> dict:
    """CORE over every task of the bundle; a task whose data is absent is skipped with its reason."""
    tasks, baselines, name = load_bundle(bundle_dir)
    if max_seq_len is None:
        max_seq_len = getattr(getattr(model, "config", None), "sequence_len", None)
    results, centered_results, skipped = {}, {}, {}
    for task in tasks:
        label = task["label"]
        meta = {"label": label, "task_type": task["icl_task_type"], "num_fewshot": task["num_fewshot"][0],
                "continuation_delimiter": task.get("continuation_delimiter", " ")}
        path = Path(bundle_dir) / "eval_data" / task["dataset_uri"]
        if not path.exists():
            skipped[label] = f"skipped (no data: {path.name} not in the bundle)"
            continue
        if label not in baselines:
            skipped[label] = "skipped (no random baseline in eval_meta_data.csv)"
            continue
        with open(path) as f:
            data = [json.loads(line) for line in f if line.strip()]
        random.Random(1337).shuffle(data)  # nanochat shuffles so that a prefix is a fair subsample
        if max_per_task > 0:
            data = data[:max_per_task]
        acc = evaluate_task(model, tokenizer, data, meta, batch_tokens, max_seq_len)
        results[label] = acc
        centered_results[label] = centered(acc, baselines[label])
        log.info("%s: accuracy %.4f centered %.4f (%d examples)", label, acc, centered_results[label], len(data))
    listed = {t["label"] for t in tasks}
    for label in CORE_TASKS:  # the official tasks this bundle lacks are named, not silently dropped
        if label not in listed:
            skipped[label] = "skipped (no data: not in this bundle; the PyPI pack has no source for it)"
    core = sum(centered_results.values()) / len(centered_results) if centered_results else float("nan")
    if name == "CORE" and len(results) < len(CORE_TASKS):
        name = f"CORE-pack ({len(results)}/{len(CORE_TASKS)})"
    return {"name": name, "results": results, "centered": centered_results, "core_metric": core, "skipped": skipped}
