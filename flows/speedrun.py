"""nanochat's speedrun as one Prefect flow: data -> tokenizer -> eval data -> base-train -> base-eval (bpb, CORE)
-> mid-train -> sft-train [-> rl-train with --rl] -> chat-eval (ChatCORE) -> sample -> publish -> report.

Every pipeline step (mlxchat.pipeline.STEPS) is a cached task (see tasks/caching.py): a rerun
reuses finished steps, and a killed training step resumes from its latest checkpoint.
`--only`/`--from` run a subset (the steps before must already have results), `--force STEP`
recomputes a step and everything after it. `--np N` (N local processes) or `--hosts HOSTFILE` runs the training and
evaluation stages data-parallel through `mlx.launch` (`--backend ring|jaccl|nccl|mpi`).

    python flows/speedrun.py --preset smoke
    python flows/speedrun.py --preset smoke --np 2
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flows import runtime  # noqa: E402
from mlxchat.blas import ensure_fast_blas  # noqa: E402
from mlxchat.common import MlxchatError, check_run_name, home  # noqa: E402
from mlxchat.runlock import run_lock  # noqa: E402


def build_flow():
    from prefect import flow
    from prefect.logging import get_run_logger
    from prefect.states import Cancelled
    from prefect.utilities.annotations import quote

    from mlxchat import pipeline
    from mlxchat.launch import Ranks
    from mlxchat.rundir import CHAT_MODEL_STAGE, CHAT_STAGES, LOOP_STAGES
    from tasks.artifacts import label_flow_run, publish_report
    from tasks.caching import cache_key, key_settings
    from tasks.steps import TASKS

    @flow(name="speedrun", log_prints=True)
    def speedrun(preset: str = "smoke", run: str | None = None, depth: int | None = None,
                 only: str | None = None, start: str | None = None, force: str | None = None,
                 max_steps: int | None = None, vocab_size: int | None = None, rl: bool = False, np: int = 1,
                 hosts: str | None = None, backend: str | None = None):
        p, run = validate(preset, run, depth, only, start, force, max_steps, vocab_size, rl, np, hosts, backend)
        ranks = Ranks(np, hosts, backend).to_dict()
        root = str(home())
        selection = pipeline.select(only, start, force, optional=rl)
        pipeline.write_run_json(run, p.to_dict(), root=root)
        label_flow_run(f"{run} ({preset}, d{p.base.depth})", ["mlxchat", f"run:{run}", f"preset:{preset}", f"depth:{p.base.depth}"])
        records: dict[str, dict] = {}
        states: dict = {}

        def fp(name: str) -> str:
            return records[name]["fingerprint"]

        def trained(stages) -> dict:
            """stage -> checkpoint fingerprint, for the model stages this run trains."""
            return {s: fp(f"{s}-train") for s in stages if f"{s}-train" in records}

        def tokenizer_and_data() -> dict:
            return {"tokenizer": fp("tokenizer-train"), "data": fp("prepare-data")}

        # Each step's arguments: its settings and the fingerprints of the outputs it reads (its
        # cache key); read when the step's turn comes, from the records of the steps before it.
        arguments = {
            "prepare-data": lambda: dict(source=p.source, num_shards=p.num_shards),
            "tokenizer-train": lambda: dict(run=run, vocab_size=p.vocab_size, source=p.source,
                                            max_chars=p.tokenizer_max_chars, data_fingerprint=fp("prepare-data")),
            "tokenizer-eval": lambda: dict(run=run, source=p.source, tokenizer_fingerprint=fp("tokenizer-train")),
            "prepare-evals": lambda: dict(source=p.evals),
            "base-train": lambda: dict(run=run, stage="base", config=p.base.to_dict(), inputs=tokenizer_and_data(), ranks=ranks),
            # an empty eval-data fingerprint: prepare-evals found no data (and says why), CORE is skipped
            "base-eval": lambda: dict(run=run, eval_tokens=p.bpb_eval_tokens, max_per_task=p.max_per_task,
                                      checkpoint_fingerprint=fp("base-train"), evals_fingerprint=fp("prepare-evals"),
                                      with_core=bool(fp("prepare-evals")), ranks=ranks),
            "mid-train": lambda: dict(run=run, stage="mid", config=p.mid.to_dict(), ranks=ranks, inputs={
                **tokenizer_and_data(), "base": fp("base-train"), **pipeline.mixture_inputs("mid", p.mid.source, root)}),
            "sft-train": lambda: dict(run=run, stage="sft", config=p.sft.to_dict(), ranks=ranks, inputs={
                **tokenizer_and_data(), "mid": fp("mid-train"), **pipeline.mixture_inputs("sft", p.sft.source, root)}),
            # optional, as nanochat's speedrun leaves chat_rl commented out
            "rl-train": lambda: dict(run=run, config=p.rl.to_dict(), inputs={
                "tokenizer": fp("tokenizer-train"), "sft": fp("sft-train"), "evals": fp("prepare-evals")}),
            "chat-eval": lambda: dict(run=run, checkpoints=trained(CHAT_STAGES), max_per_task=p.max_per_task,
                                      max_new_tokens=p.chat_max_new_tokens, evals_fingerprint=fp("prepare-evals"),
                                      ranks=ranks),
            "sample": lambda: dict(run=run, checkpoints=trained(LOOP_STAGES), max_tokens=p.sample_max_tokens),
            "publish": lambda: dict(run=run, stage=CHAT_MODEL_STAGE, checkpoint_fingerprint=fp(f"{CHAT_MODEL_STAGE}-train"),
                                    eval_fingerprint=records["base-eval"].get("fingerprint", "")),
            "report": lambda: dict(run=run, inputs={k: v.get("fingerprint") for k, v in records.items()}),
        }

        def run_step(step: pipeline.Step, kwargs: dict):
            """Run one pipeline step, or reuse its result: only while its record was made with
            the same key (settings, input fingerprints, code) and its outputs still hold what
            was written. Downstream steps key on the fingerprint of those outputs. Returns the
            task's state."""
            name = step.name
            key = cache_key(name, kwargs)
            record, why = pipeline.reuse_problem(name, run, key, p.source, p.num_shards, root=root)
            forced = name in selection.forced
            if forced:
                why = f"--force {force}"
            if why is not None and record is not None:
                get_run_logger().info(f"{name}: recomputing: {why}")
            # --force recomputes for real: a training step ignores its checkpoints too
            extra = {"fresh": True} if forced and step.trains else {}
            # The graph's edges are the steps whose outputs this one's arguments name (by
            # fingerprint). Prefect would also link any object it has seen in a result (by id, so a
            # shared dict key like "fingerprint" links to the last task that returned it):
            # arguments are quoted, and the finished steps are waited for as futures, which
            # Prefect does not look inside.
            upstream = [finished(states[s]) for s in upstream_of(kwargs, records) if s in states]
            state = TASKS[name].with_options(refresh_cache=why is not None)(
                **{k: quote(v) for k, v in kwargs.items()}, **extra, wait_for=upstream, return_state=True)
            if state.is_cancelled():
                return state
            states[name], result = state, state.result()
            if why is not None or state.name != "Cached":
                record = pipeline.record_step(name, run, key, key_settings(kwargs), p.source, p.num_shards, root=root)
            records[name] = {**result, "fingerprint": record["fingerprint"]}
            return state

        for step in selection.included:
            if step.name not in selection.run:  # --only/--from: an earlier step's results must be there
                records[step.name] = pipeline.existing_output(step.name, run, p.source, p.num_shards, root=root)
                continue
            state = run_step(step, {**arguments[step.name](), "root": root})
            if state.is_cancelled():  # a training step stopped on Ctrl-C, after writing a checkpoint
                return Cancelled(message=state.message)
        if "report" in records:  # also on a rerun of cache hits, whose tasks publish nothing
            publish_report(run, records["report"])
        return records

    return speedrun


def validate(preset: str, run: str | None, depth: int | None, only: str | None, start: str | None,
             force: str | None, max_steps: int | None, vocab_size: int | None, rl: bool = False, np: int = 1,
             hosts: str | None = None, backend: str | None = None):
    """The flow's arguments checked (one-line MlxchatError otherwise): (resolved preset, run name).
    Across ranks, a stage's micro-batch is halved where the global batch would not divide."""
    from mlxchat import pipeline, presets
    from mlxchat.launch import Ranks
    from mlxchat.rundir import LOOP_STAGES

    p = presets.resolve(preset, depth, max_steps, vocab_size)
    pipeline.select(only, start, force, optional=rl)
    spread = Ranks(np, hosts, backend)
    spread.check()
    if spread.distributed:
        fitted = {s: presets.fit_to_ranks(getattr(p, s), spread.size) for s in LOOP_STAGES}
        for s, cfg in fitted.items():
            if cfg != getattr(p, s):
                print(f"{s}: micro-batch {getattr(p, s).device_batch_size} -> {cfg.device_batch_size} rows so that "
                      f"the global batch divides among {spread.size} ranks")
        p = replace(p, **fitted)
    return p, check_run_name(run or p.name)


def upstream_of(arguments, records: dict[str, dict]) -> list[str]:
    """The steps whose output fingerprints appear anywhere in a task's arguments."""
    owner = {r["fingerprint"]: name for name, r in records.items() if r and r.get("fingerprint")}
    found: list[str] = []

    def visit(value) -> None:
        if isinstance(value, dict):
            for v in value.values():
                visit(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                visit(v)
        elif isinstance(value, str) and value in owner and owner[value] not in found:
            found.append(owner[value])

    visit(arguments)
    return found


def finished(state):
    """A task run's final state as the (done) future Prefect's `wait_for` takes."""
    from concurrent.futures import Future

    from prefect.futures import PrefectConcurrentFuture

    done = Future()
    done.set_result(state)
    return PrefectConcurrentFuture(state.state_details.task_run_id, done)


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # run as a script: fix the BLAS before MLX loads (re-executes once)
        ensure_fast_blas()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="smoke", help="tiny | smoke | d12 | d20")
    parser.add_argument("--run", help="run name (default: the preset's name)")
    parser.add_argument("--depth", type=int)
    parser.add_argument("--max-steps", type=int, help="override the preset's base-training steps")
    parser.add_argument("--vocab-size", type=int, help="override the preset's tokenizer vocabulary size")
    parser.add_argument("--home", help="run directory root (default $MLXCHAT_HOME or ./artifacts)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--only", metavar="STEP", help="run only this pipeline step (the steps before it must have results)")
    group.add_argument("--from", dest="start", metavar="STEP", help="run this pipeline step and every one after it")
    parser.add_argument("--force", metavar="STEP", help="recompute STEP and every step after it (training from scratch)")
    parser.add_argument("--rl", action="store_true", help="add rl-train after SFT (nanochat's chat_rl on GSM8K)")
    parser.add_argument("--np", type=int, default=1, help="train and evaluate on this many local processes (per host with --hosts)")
    parser.add_argument("--hosts", metavar="HOSTFILE", help="train and evaluate on the hosts of an mlx.launch hostfile")
    parser.add_argument("--backend", help="mlx.launch backend: ring | jaccl | nccl | mpi (default: the hostfile's, else MLX's)")
    args = parser.parse_args(argv)
    if args.home:
        os.environ["MLXCHAT_HOME"] = args.home
    options = dict(preset=args.preset, run=args.run, depth=args.depth, only=args.only, start=args.start,
                   force=args.force, max_steps=args.max_steps, vocab_size=args.vocab_size, rl=args.rl, np=args.np,
                   hosts=args.hosts, backend=args.backend)
    try:
        _, run = validate(**options)  # every bad argument is one line, before Prefect creates a flow run
        with run_lock(run, command="flows/speedrun.py " + " ".join(argv if argv is not None else sys.argv[1:])):
            runtime.prepare(home())
            speedrun = build_flow()
            runtime.wait_until_ready()
            state = speedrun(**options, return_state=True)
            if state.is_cancelled():
                return runtime.finish(f"cancelled: {state.message}", 130)
            records = state.result()
    except MlxchatError as e:
        return runtime.finish(f"error: {e}", 2)
    report = records.get("report", {}).get("path")
    return runtime.finish(f"speedrun finished: {report or 'done'}", 0)


if __name__ == "__main__":
    sys.exit(main())
