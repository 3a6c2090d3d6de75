"""One Prefect task per pipeline step (named by `mlxchat.pipeline.STEPS`). Each calls `mlxchat.pipeline` and adds observability: logs through
the run logger, a live view while training, a metrics table, where the outputs are (tasks/artifacts.py).

Training and evaluation tasks take `ranks` (`mlxchat.launch.Ranks` as a dict): with more than
one, the task runs the stage's `mlxchat` command under `mlx.launch` instead of in-process,
rank 0's progress and log lines feed the same live view and logger, and a failing rank fails
the task with its message. The number of ranks is not part of the cache key: the results are
those of one process."""

from __future__ import annotations

import json

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.logging import get_run_logger
from prefect.states import Cancelled

from mlxchat import pipeline
from mlxchat.launch import Ranks, run_mlxchat
from mlxchat.rundir import LOOP_STAGES
from mlxchat.train import stage_validation
from tasks.artifacts import LiveTraining, metric_rows, publish_location, rounded
from tasks.artifacts import artifact_key as _artifact_key
from tasks.caching import stage_cache_key

CACHED = dict(cache_key_fn=stage_cache_key, persist_result=True)


def step_task(name: str):
    """The Prefect task of pipeline step `name` (a name the step table does not have fails at import)."""
    return task(name=pipeline.step(name).name, **CACHED)


def _table(key: str, metrics: dict, description: str) -> None:
    create_table_artifact(key=key, table=metric_rows(metrics), description=description)


@step_task("prepare-data")
def prepare_data(source: str, num_shards: int | None, root: str) -> dict:
    result = pipeline.prepare_data(source, num_shards, root=root)
    get_run_logger().info(f"data source {source}: {result['num_shards']} shards ({result['path']})")
    return result


@step_task("tokenizer-train")
def tokenizer_train(run: str, vocab_size: int, source: str, max_chars: int, data_fingerprint: str, root: str) -> dict:
    result = pipeline.train_tokenizer(run, vocab_size, source, max_chars, root=root)
    get_run_logger().info(f"tokenizer: vocab {result['vocab_size']} in {result['train_time_s']:.1f}s")
    _table(_artifact_key(run, "tokenizer-train"), result, "Tokenizer training")
    return result


@step_task("tokenizer-eval")
def tokenizer_eval(run: str, source: str, tokenizer_fingerprint: str, root: str) -> dict:
    result = pipeline.eval_tokenizer(run, source, root=root)
    rows = [{"text": name, **{k: rounded(v) for k, v in vals.items()}} for name, vals in result.items()]
    create_table_artifact(key=_artifact_key(run, "tokenizer-eval"), table=rows, description="Tokenizer compression")
    get_run_logger().info("tokenizer bytes/token: " + ", ".join(f"{k} {v['ratio']:.2f}" for k, v in result.items()))
    return result


def _in_ranks(ranks: dict | None, root: str, args: list[str], here, on_progress=None):
    """`here()` in this process, or `mlxchat <args>` on every rank when `ranks` asks for several."""
    spread = Ranks(**(ranks or {}))
    if not spread.distributed:
        return here()
    logger = get_run_logger()
    logger.info(f"launching {spread.size} ranks: mlxchat {' '.join(args)}")
    return run_mlxchat(["--home", root, *args], spread, on_progress=on_progress, on_output=logger.info)


def _train(run: str, stage: str, config: dict, inputs: dict, root: str, fresh: bool = False,
           ranks: dict | None = None) -> dict:
    """Train one stage; `inputs` (fingerprints of the tokenizer, data and starting checkpoint)
    is only there for the cache key."""
    live = LiveTraining(run, stage, stage_validation(stage).metric, get_run_logger())
    args = ["train", stage, "--run", run, "--config", json.dumps(config), *(["--fresh"] if fresh else [])]
    result = _in_ranks(ranks, root, args, lambda: pipeline.train(run, stage, config, root=root, fresh=fresh,
                                                                on_progress=live), on_progress=live)
    if result["interrupted"]:  # Ctrl-C: a checkpoint was written; the run ends Cancelled, not Failed
        return Cancelled(message=f"{stage}-train stopped at step {result['step']} of {result['num_iterations']}; "
                                 f"rerun the flow to resume from {result['checkpoint']}")
    _table(_artifact_key(run, f"{stage}-train"), result["metrics"], f"{stage} training")
    publish_location(_artifact_key(run, f"{stage}-checkpoint"), f"{stage} checkpoint (step {result['step']})",
                     result["checkpoint"], {"sample from it": f"mlxchat --home {root} sample --run {run} --stage {stage}",
                                            "train further (resumes here)": f"mlxchat --home {root} train {stage} --run {run}"})
    return result


base_train, mid_train, sft_train = (step_task(f"{stage}-train")(_train) for stage in LOOP_STAGES)


@step_task("rl-train")
def rl_train(run: str, config: dict, inputs: dict, root: str, fresh: bool = False) -> dict:
    """RL from the SFT model; `inputs` (tokenizer, SFT checkpoint, eval data) is only there for the cache key."""
    live = LiveTraining(run, "rl", "reward", get_run_logger())
    result = pipeline.train_rl(run, config, root=root, fresh=fresh, on_progress=live)
    if result["interrupted"]:  # Ctrl-C: a checkpoint was written; the run ends Cancelled, not Failed
        return Cancelled(message=f"rl-train stopped at step {result['step']} of {result['num_iterations']}; "
                                 f"rerun the flow to resume from {result['checkpoint']}")
    _table(_artifact_key(run, "rl-train"), result["metrics"], "RL training (reward, pass@k)")
    publish_location(_artifact_key(run, "rl-checkpoint"), f"rl checkpoint (step {result['step']})", result["checkpoint"],
                     {"chat with it": f"mlxchat --home {root} chat --run {run} --stage rl",
                      "train further (resumes here)": f"mlxchat --home {root} train rl --run {run}"})
    return result


@step_task("prepare-evals")
def prepare_evals(source: str, root: str) -> dict:
    result = pipeline.prepare_evals(source, root=root)
    logger = get_run_logger()
    if result["skipped"]:
        logger.warning(f"evaluation data unavailable, CORE and ChatCORE will be skipped: {result['skipped']}")
    else:
        logger.info(f"evaluation data ready ({result['core_name']})")
        if result["warning"]:
            logger.warning(f"kept the existing evaluation data: {result['warning']}")
    return result


@step_task("base-eval")
def base_eval(run: str, eval_tokens: int, max_per_task: int, checkpoint_fingerprint: str, evals_fingerprint: str,
              with_core: bool, root: str, ranks: dict | None = None) -> dict:
    """Bits per byte, then CORE `with_core` (when there is evaluation data); the fingerprints
    are only there for the cache key."""
    logger = get_run_logger()
    result = _in_ranks(ranks, root, ["eval", "bpb", "--run", run, "--stage", "base", "--eval-tokens", str(eval_tokens)],
                       lambda: pipeline.eval_bpb(run, "base", eval_tokens, root=root))
    logger.info(f"base val bpb {result['val_bpb']:.4f}, train bpb {result['train_bpb']:.4f}")
    _table(_artifact_key(run, "base-eval"), result, "Base model bits per byte")
    if not with_core:
        why = "no evaluation data (see prepare-evals; run: mlxchat data prepare-evals)"
        logger.warning(f"CORE skipped: {why}")
        create_markdown_artifact(key=_artifact_key(run, "core"), markdown=f"CORE skipped: {why}\n",
                                 description="CORE of the base model: skipped")
        return result
    core = _in_ranks(ranks, root, ["eval", "core", "--run", run, "--stage", "base", "--max-per-task", str(max_per_task)],
                     lambda: pipeline.eval_core(run, "base", max_per_task, root=root))
    rows = [{"task": t, "accuracy": rounded(acc), "centered": rounded(core["centered"][t]), "note": ""}
            for t, acc in core["results"].items()]
    rows += [{"task": t, "accuracy": None, "centered": None, "note": f"skipped: {why}"} for t, why in core["skipped"].items()]
    create_table_artifact(key=_artifact_key(run, "core"), table=rows,
                          description=f"{core['name']} of the base model: {core['core_metric']:.4f} "
                                      f"(at most {max_per_task} examples per task)")
    logger.info(f"{core['name']}: {core['core_metric']:.4f}")
    return {**result, "core_metric": core["core_metric"], "fingerprint": f"{result['fingerprint']}-{core['fingerprint']}"}


@step_task("chat-eval")
def chat_eval(run: str, checkpoints: dict, max_per_task: int, max_new_tokens: int, evals_fingerprint: str,
              root: str, ranks: dict | None = None) -> dict:
    """ChatCORE of each chat stage (`checkpoints`: stage -> checkpoint fingerprint)."""
    logger, records = get_run_logger(), {}
    for stage in checkpoints:
        args = ["eval", "chat", "--run", run, "--stage", stage, "--max-per-task", str(max_per_task),
                "--max-new-tokens", str(max_new_tokens)]
        result = _in_ranks(ranks, root, args, lambda: pipeline.eval_chat(run, stage, max_per_task, max_new_tokens, root=root))
        rows = [{"task": t, "accuracy": rounded(a), "centered": rounded(result["centered"][t]),
                 "problems": result["problems"][t], "note": ""} for t, a in result["results"].items()]
        rows += [{"task": t, "accuracy": None, "centered": None, "problems": 0, "note": f"skipped: {why}"}
                 for t, why in result["skipped"].items()]
        chatcore = result["chatcore"]
        rows.append({"task": "ChatCORE", "accuracy": None, "centered": rounded(chatcore), "problems": None,
                     "note": "" if chatcore is not None else "skipped: needs all six tasks"})
        create_table_artifact(key=_artifact_key(run, f"chat-eval-{stage}"), table=rows,
                              description=f"ChatCORE tasks after {stage} (at most {max_per_task} problems each)")
        logger.info(f"{stage}: ChatCORE {'%.4f' % chatcore if chatcore is not None else 'n/a (tasks skipped)'} | "
                    + ", ".join(f"{t} {a:.3f}" for t, a in result["results"].items()))
        records[stage] = {k: result[k] for k in ("path", "fingerprint", "chatcore")}
    return {"stages": records, "fingerprint": "-".join(r["fingerprint"] for r in records.values())}


@step_task("sample")
def sample(run: str, checkpoints: dict, max_tokens: int, root: str) -> dict:
    """Greedy samples of every trained stage (`checkpoints`: stage -> checkpoint fingerprint)."""
    logger, records = get_run_logger(), {}
    for stage in checkpoints:
        result = pipeline.sample(run, stage, max_tokens=max_tokens, root=root)
        for s in result["samples"]:
            logger.info(f"{stage}: {s['prompt']!r} -> {s['completion']!r}")
        create_table_artifact(key=_artifact_key(run, f"samples-{stage}"), table=result["samples"],
                              description=f"Samples after {stage} (greedy)")
        records[stage] = {k: v for k, v in result.items() if k != "samples"}
    return {"stages": records, "fingerprint": "-".join(r["fingerprint"] for r in records.values())}


@step_task("publish")
def publish(run: str, stage: str, checkpoint_fingerprint: str, eval_fingerprint: str, root: str) -> dict:
    result = pipeline.publish(run, stage, root=root)
    get_run_logger().info(f"published {stage} model to {result['out_dir']}")
    publish_location(_artifact_key(run, f"published-{stage}"), f"mlx-lm model folder ({stage}, step {result.get('step')})",
                     result["out_dir"], {"generate with mlx-lm": f"python -m mlx_lm generate --model {result['out_dir']} --prompt \"The\"",
                                         "chat with it": f"mlxchat --home {root} chat --run {run} --stage {stage}"})
    return result


@step_task("report")
def report(run: str, inputs: dict, root: str) -> dict:
    """The report card; `inputs` (every step's fingerprint) is only there for the cache key."""
    return pipeline.report(run, root=root)


TASKS = {"prepare-data": prepare_data, "tokenizer-train": tokenizer_train, "tokenizer-eval": tokenizer_eval,
         "prepare-evals": prepare_evals, "base-train": base_train, "base-eval": base_eval, "mid-train": mid_train,
         "sft-train": sft_train, "rl-train": rl_train, "chat-eval": chat_eval, "sample": sample, "publish": publish,
         "report": report}
assert list(TASKS) == pipeline.STEP_NAMES, "one task per pipeline step, in the table's order"
