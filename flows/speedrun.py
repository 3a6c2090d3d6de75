"""nanochat's speedrun as one Prefect flow: data -> tokenizer -> eval data -> base-train -> base-eval (bpb, CORE)
-> mid-train -> sft-train [-> rl-train with --rl] -> chat-eval (ChatCORE) -> sample -> publish -> report.

Every stage is a cached task (see tasks/caching.py): a rerun reuses finished stages, and a
killed training stage resumes from its latest checkpoint. `--only`/`--from` run a subset
(the stages before must already have results), `--force STAGE` recomputes a stage and
everything after it.

    python flows/speedrun.py --preset smoke
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flows import runtime  # noqa: E402
from mlxchat.common import MlxchatError, home  # noqa: E402


def build_flow():
    from prefect import flow

    from mlxchat import presets, stages
    from tasks import stages as T
    from tasks.report import report

    @flow(name="speedrun", log_prints=True)
    def speedrun(preset: str = "smoke", run: str | None = None, depth: int | None = None,
                 only: str | None = None, start: str | None = None, force: str | None = None,
                 max_steps: int | None = None, rl: bool = False) -> dict:
        p = presets.resolve(preset, depth, max_steps)
        run = run or p.name
        root = str(home())
        order = stages.STAGES
        for name, value in (("--only", only), ("--from", start), ("--force", force)):
            if value is not None and value not in order:
                raise MlxchatError(f"{name} {value!r} is not a stage; stages: {', '.join(order)}")
            if value == "rl-train" and not rl:
                raise MlxchatError(f"{name} rl-train needs --rl (the flow runs RL only when asked)")
        first = order.index(start) if start else 0
        selected = {only} if only else set(order[first:])
        forced = set(order[order.index(force):]) if force else set()
        stages.write_run_json(run, p.to_dict(), root=root)
        records: dict[str, dict] = {}

        last = max(order.index(s) for s in selected)

        class AllSelectedDone(Exception):
            """Stages after the last selected one are neither run nor required."""

        def step(name: str, fn, **kwargs) -> dict:
            if order.index(name) > last:
                raise AllSelectedDone
            if name not in selected:
                records[name] = stages.existing_output(name, run, p.source, p.num_shards, root=root)
            else:
                extra = {"fresh": True} if (name == force and "fresh" in fn.fn.__code__.co_varnames) else {}
                missing = stages.stage_output(name, run, p.source, p.num_shards, root=root, fingerprint=False) is None
                records[name] = fn.with_options(refresh_cache=name in forced or missing)(**kwargs, **extra)
            return records[name]

        def compose(step) -> None:
            data = step("prepare-data", T.prepare_data, source=p.source, num_shards=p.num_shards, root=root)
            tok = step("tokenizer-train", T.tokenizer_train, run=run, vocab_size=p.vocab_size, source=p.source,
                       max_chars=p.tokenizer_max_chars, data_fingerprint=data["fingerprint"], root=root)
            step("tokenizer-eval", T.tokenizer_eval, run=run, source=p.source, tokenizer_fingerprint=tok["fingerprint"], root=root)
            evals = step("prepare-evals", T.prepare_evals, source=p.evals, root=root)
            inputs = {"tokenizer": tok["fingerprint"], "data": data["fingerprint"]}
            base = step("base-train", T.base_train, run=run, stage="base", config=p.base.to_dict(), inputs=inputs, root=root)
            bpb = step("base-eval", T.base_eval, run=run, eval_tokens=p.bpb_eval_tokens, max_per_task=p.max_per_task,
                       checkpoint_fingerprint=base["fingerprint"], evals_fingerprint=evals["fingerprint"], root=root)
            mid = step("mid-train", T.mid_train, run=run, stage="mid", config=p.mid.to_dict(),
                       inputs={**inputs, "base": base["fingerprint"]}, root=root)
            sft = step("sft-train", T.sft_train, run=run, stage="sft", config=p.sft.to_dict(),
                       inputs={**inputs, "mid": mid["fingerprint"]}, root=root)
            checkpoints = {"base": base["fingerprint"], "mid": mid["fingerprint"], "sft": sft["fingerprint"]}
            chat = {k: checkpoints[k] for k in ("mid", "sft")}
            if rl:  # optional, as nanochat's speedrun leaves chat_rl commented out
                chat["rl"] = step("rl-train", T.rl_train, run=run, config=p.rl.to_dict(),
                                  inputs={"tokenizer": tok["fingerprint"], "sft": sft["fingerprint"],
                                          "evals": evals["fingerprint"]}, root=root)["fingerprint"]
            step("chat-eval", T.chat_eval, run=run, checkpoints=chat, max_per_task=p.max_per_task,
                 max_new_tokens=p.chat_max_new_tokens, evals_fingerprint=evals["fingerprint"], root=root)
            step("sample", T.sample, run=run, checkpoints=checkpoints, max_tokens=p.sample_max_tokens, root=root)
            step("publish", T.publish, run=run, stage=stages.CHAT_MODEL_STAGE, checkpoint_fingerprint=sft["fingerprint"],
                 eval_fingerprint=bpb.get("fingerprint", ""), root=root)
            step("report", report, run=run, inputs={k: v.get("fingerprint") for k, v in records.items()}, root=root)

        try:
            compose(step)
        except AllSelectedDone:
            pass
        return records

    return speedrun


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="smoke", help="tiny | smoke | d12 | d20")
    parser.add_argument("--run", help="run name (default: the preset's name)")
    parser.add_argument("--depth", type=int)
    parser.add_argument("--max-steps", type=int, help="override the preset's base-training steps")
    parser.add_argument("--home", help="run directory root (default $MLXCHAT_HOME or ./artifacts)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--only", metavar="STAGE")
    group.add_argument("--from", dest="start", metavar="STAGE")
    parser.add_argument("--force", metavar="STAGE", help="recompute STAGE and everything after it")
    parser.add_argument("--rl", action="store_true", help="add rl-train after SFT (nanochat's chat_rl on GSM8K)")
    args = parser.parse_args(argv)
    if args.home:
        os.environ["MLXCHAT_HOME"] = args.home
    runtime.prepare(home())
    speedrun = build_flow()
    try:
        runtime.wait_until_ready()
        records = speedrun(preset=args.preset, run=args.run, depth=args.depth, only=args.only, start=args.start,
                           force=args.force, max_steps=args.max_steps, rl=args.rl)
    except MlxchatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report = records.get("report", {}).get("path")
    print(f"speedrun finished: {report or 'done'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
