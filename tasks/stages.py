"""One Prefect task per stage. Each calls `mlxchat.stages` and adds observability: logs through
the run logger, a live progress artifact while training, a metrics table, links to outputs."""

from __future__ import annotations

import time

from prefect import task
from prefect.artifacts import (
    create_link_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.logging import get_run_logger

from mlxchat import stages
from tasks.caching import stage_cache_key

CACHED = dict(cache_key_fn=stage_cache_key, persist_result=True)


def _table(key: str, metrics: dict, description: str) -> None:
    rows = [{"metric": k, "value": v} for k, v in metrics.items() if isinstance(v, (int, float, str)) or v is None]
    create_table_artifact(key=key, table=rows, description=description)


def _artifact_key(run: str, stage: str) -> str:
    return f"{run}-{stage}".lower().replace("_", "-")


@task(name="prepare-data", **CACHED)
def prepare_data(source: str, num_shards: int | None, root: str) -> dict:
    result = stages.prepare_data(source, num_shards, root=root)
    get_run_logger().info(f"data source {source}: {result['num_shards']} shards ({result['path']})")
    return result


@task(name="tokenizer-train", **CACHED)
def tokenizer_train(run: str, vocab_size: int, source: str, max_chars: int, data_fingerprint: str, root: str) -> dict:
    result = stages.train_tokenizer(run, vocab_size, source, max_chars, root=root)
    get_run_logger().info(f"tokenizer: vocab {result['vocab_size']} in {result['train_time_s']:.1f}s")
    _table(_artifact_key(run, "tokenizer-train"), result, "Tokenizer training")
    return result


@task(name="tokenizer-eval", **CACHED)
def tokenizer_eval(run: str, source: str, tokenizer_fingerprint: str, root: str) -> dict:
    result = stages.eval_tokenizer(run, source, root=root)
    rows = [{"text": name, **vals} for name, vals in result.items()]
    create_table_artifact(key=_artifact_key(run, "tokenizer-eval"), table=rows, description="Tokenizer compression")
    get_run_logger().info("tokenizer bytes/token: " + ", ".join(f"{k} {v['ratio']:.2f}" for k, v in result.items()))
    return result


class _Progress:
    """Feeds training progress into a Prefect progress artifact, at most every few seconds."""

    def __init__(self, run: str, stage: str, every_s: float = 3.0):
        self.logger = get_run_logger()
        self.id = create_progress_artifact(progress=0.0, key=_artifact_key(run, f"{stage}-progress"),
                                           description=f"{stage} training progress")
        self.every_s, self.last = every_s, 0.0

    def __call__(self, row: dict) -> None:
        now = time.monotonic()
        done = row["step"] == row["num_iterations"]
        if now - self.last < self.every_s and not done:
            return
        self.last = now
        update_progress_artifact(self.id, progress=100.0 * row["step"] / row["num_iterations"])
        self.logger.info(
            f"step {row['step']}/{row['num_iterations']} | loss {row['smooth_loss']:.4f} | "
            f"{row['tok_per_s']:,.0f} tok/s | ETA {row['eta_s'] / 60:.1f} min"
        )


def _train(run: str, stage: str, config: dict, inputs: dict, root: str, fresh: bool = False) -> dict:
    """Train one stage; `inputs` (fingerprints of the tokenizer, data and starting checkpoint)
    is only there for the cache key."""
    result = stages.train(run, stage, config, root=root, fresh=fresh, on_progress=_Progress(run, stage))
    if result["interrupted"]:
        raise RuntimeError(f"{stage}-train was interrupted at step {result['step']}; rerun the flow to resume")
    _table(_artifact_key(run, f"{stage}-train"), result["metrics"], f"{stage} training")
    create_link_artifact(key=_artifact_key(run, f"{stage}-checkpoint"), link=f"file://{result['checkpoint']}",
                         link_text=f"{stage} checkpoint (step {result['step']})")
    return result


base_train, mid_train, sft_train = (task(name=f"{stage}-train", **CACHED)(_train) for stage in ("base", "mid", "sft"))


@task(name="rl-train", **CACHED)
def rl_train(run: str, config: dict, inputs: dict, root: str, fresh: bool = False) -> dict:
    """RL from the SFT model; `inputs` (tokenizer, SFT checkpoint, eval data) is only there for the cache key."""
    result = stages.train_rl(run, config, root=root, fresh=fresh, on_progress=_Progress(run, "rl"))
    if result["interrupted"]:
        raise RuntimeError(f"rl-train was interrupted at step {result['step']}; rerun the flow to resume")
    _table(_artifact_key(run, "rl-train"), result["metrics"], "RL training (reward, pass@k)")
    create_link_artifact(key=_artifact_key(run, "rl-checkpoint"), link=f"file://{result['checkpoint']}",
                         link_text=f"rl checkpoint (step {result['step']})")
    return result


@task(name="prepare-evals", **CACHED)
def prepare_evals(source: str, root: str) -> dict:
    result = stages.prepare_evals(source, root=root)
    logger = get_run_logger()
    if result["skipped"]:
        logger.warning(f"evaluation data unavailable, CORE and ChatCORE will be skipped: {result['skipped']}")
    else:
        logger.info(f"evaluation data ready ({result['core_name']})")
        if result["warning"]:
            logger.warning(f"kept the existing evaluation data: {result['warning']}")
    return result


@task(name="base-eval", **CACHED)
def base_eval(run: str, eval_tokens: int, max_per_task: int, checkpoint_fingerprint: str, evals_fingerprint: str,
              root: str) -> dict:
    """Bits per byte, then CORE when there is evaluation data."""
    logger = get_run_logger()
    result = stages.eval_bpb(run, "base", eval_tokens, root=root)
    logger.info(f"base val bpb {result['val_bpb']:.4f}, train bpb {result['train_bpb']:.4f}")
    _table(_artifact_key(run, "base-eval"), result, "Base model bits per byte")
    if not evals_fingerprint:
        logger.warning("CORE skipped: no evaluation data (see prepare-evals)")
        return result
    core = stages.eval_core(run, "base", max_per_task, root=root)
    rows = [{"task": t, "accuracy": acc, "centered": core["centered"][t]} for t, acc in core["results"].items()]
    rows += [{"task": t, "accuracy": None, "centered": None, "skipped": why} for t, why in core["skipped"].items()]
    create_table_artifact(key=_artifact_key(run, "core"), table=rows,
                          description=f"{core['name']} of the base model: {core['core_metric']:.4f} "
                                      f"(at most {max_per_task} examples per task)")
    logger.info(f"{core['name']}: {core['core_metric']:.4f}")
    return {**result, "core_metric": core["core_metric"], "fingerprint": f"{result['fingerprint']}-{core['fingerprint']}"}


@task(name="chat-eval", **CACHED)
def chat_eval(run: str, checkpoints: dict, max_per_task: int, max_new_tokens: int, evals_fingerprint: str,
              root: str) -> dict:
    """ChatCORE of each chat stage (`checkpoints`: stage -> checkpoint fingerprint)."""
    logger, records = get_run_logger(), {}
    for stage in checkpoints:
        result = stages.eval_chat(run, stage, max_per_task, max_new_tokens, root=root)
        rows = [{"task": t, "accuracy": a, "centered": result["centered"][t], "problems": result["problems"][t]}
                for t, a in result["results"].items()]
        rows += [{"task": t, "accuracy": None, "centered": None, "problems": 0, "skipped": why}
                 for t, why in result["skipped"].items()]
        create_table_artifact(key=_artifact_key(run, f"chat-eval-{stage}"), table=rows,
                              description=f"ChatCORE tasks after {stage} (at most {max_per_task} problems each)")
        chatcore = result["chatcore"]
        logger.info(f"{stage}: ChatCORE {'%.4f' % chatcore if chatcore is not None else 'n/a (tasks skipped)'} | "
                    + ", ".join(f"{t} {a:.3f}" for t, a in result["results"].items()))
        records[stage] = {k: result[k] for k in ("path", "fingerprint", "chatcore")}
    return {"stages": records, "fingerprint": "-".join(r["fingerprint"] for r in records.values())}


@task(name="sample", **CACHED)
def sample(run: str, checkpoints: dict, max_tokens: int, root: str) -> dict:
    """Greedy samples of every trained stage (`checkpoints`: stage -> checkpoint fingerprint)."""
    logger, records = get_run_logger(), {}
    for stage in checkpoints:
        result = stages.sample(run, stage, max_tokens=max_tokens, root=root)
        for s in result["samples"]:
            logger.info(f"{stage}: {s['prompt']!r} -> {s['completion']!r}")
        create_table_artifact(key=_artifact_key(run, f"samples-{stage}"), table=result["samples"],
                              description=f"Samples after {stage} (greedy)")
        records[stage] = {k: v for k, v in result.items() if k != "samples"}
    return {"stages": records, "fingerprint": "-".join(r["fingerprint"] for r in records.values())}


@task(name="publish", **CACHED)
def publish(run: str, stage: str, checkpoint_fingerprint: str, eval_fingerprint: str, root: str) -> dict:
    result = stages.publish(run, stage, root=root)
    get_run_logger().info(f"published {stage} model to {result['out_dir']}")
    create_link_artifact(key=_artifact_key(run, f"published-{stage}"), link=f"file://{result['out_dir']}",
                         link_text=f"mlx-lm model folder ({stage}, step {result.get('step')})")
    return result
