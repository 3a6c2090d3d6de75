"""Nightly evaluation of the newest published model: every evaluation that has data, into a history.

Val bits per byte and greedy samples always; CORE when `<home>/evals/` holds the eval data;
ChatCORE's tasks when the model is a chat stage. Each run appends one row to
`<home>/eval_history.parquet` and publishes Prefect artifacts: the recent trend (table and a
plot, `<home>/eval_trend.png`) and the samples. `--serve` keeps a process serving the deployment
`nightly-eval/nightly-eval` on a cron schedule (default 03:00 every day).

    python flows/nightly_eval.py                 # evaluate once
    python flows/nightly_eval.py --serve         # evaluate every night
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flows import runtime  # noqa: E402
from mlxchat.blas import ensure_fast_blas  # noqa: E402
from mlxchat.common import MlxchatError, home  # noqa: E402

NAME = "nightly-eval"
DEFAULT_CRON = "0 3 * * *"


def build_flow():
    from prefect import flow

    from mlxchat.evaluation.published import latest_published
    from mlxchat.rundir import Home
    from tasks import nightly as T
    from tasks.artifacts import label_flow_run

    @flow(name=NAME, log_prints=True)
    def nightly_eval(model: str | None = None, source: str = "smoke", batch_size: int = 4, seq_len: int = 256,
                     eval_tokens: int = 16384, max_tokens: int = 16, max_per_task: int = -1,
                     chat_max_new_tokens: int = 512, root: str | None = None) -> dict:
        """`model` None picks the newest published model when the run starts, so a scheduled
        run always scores whatever the last speedrun published."""
        root = str(home(root))
        model_dir = model or str(latest_published(Home(Path(root))))
        label_flow_run(f"nightly {Path(model_dir).name}", ["mlxchat", "nightly", f"model:{Path(model_dir).name}"])
        result = T.evaluate_published(model_dir, source, batch_size, seq_len, eval_tokens, max_tokens, root,
                                      max_per_task, chat_max_new_tokens)
        return {**T.record_history(result, root), "val_bpb": result["val_bpb"], "model_dir": model_dir}

    return nightly_eval


def register_deployment(flow, cron: str = DEFAULT_CRON, parameters: dict | None = None):
    """Create (or update) the deployment server-side without serving it, and return its id.

    What `--serve` registers too, minus the blocking loop: the deployment and its schedule
    exist, and runs wait for a `serve` process to pick them up."""
    return flow.to_deployment(name=NAME, cron=cron, parameters=parameters or {}).apply()


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # run as a script: fix the BLAS before MLX loads (re-executes once)
        ensure_fast_blas()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="published model folder (default: the newest under <home>/published/)")
    parser.add_argument("--source", default="smoke", help="text source of the validation split")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--max-per-task", type=int, default=-1,
                        help="CORE / ChatCORE: at most this many problems per task (-1: all, as nanochat)")
    parser.add_argument("--chat-max-new-tokens", type=int, default=512)
    parser.add_argument("--home", help="run directory root (default $MLXCHAT_HOME or ./artifacts)")
    parser.add_argument("--serve", action="store_true", help="serve the deployment on --cron (blocks)")
    parser.add_argument("--cron", default=DEFAULT_CRON)
    args = parser.parse_args(argv)
    if args.home:
        os.environ["MLXCHAT_HOME"] = args.home
    root = home()
    params = {"model": args.model, "source": args.source, "batch_size": args.batch_size, "seq_len": args.seq_len,
              "eval_tokens": args.eval_tokens, "max_per_task": args.max_per_task,
              "chat_max_new_tokens": args.chat_max_new_tokens, "root": str(root)}
    runtime.prepare(root)
    try:
        if not args.serve:  # a scheduled run looks for the model when it starts, not now
            from mlxchat.evaluation.published import latest_published
            from mlxchat.rundir import Home

            if args.model and not (Path(args.model) / "model.safetensors").exists():
                raise MlxchatError(f"no published model in {args.model} (model.safetensors is missing)")
            params["model"] = args.model or str(latest_published(Home(root)))
        nightly_eval = build_flow()
        runtime.wait_until_ready()
        if args.serve:
            nightly_eval.serve(name=NAME, cron=args.cron, parameters=params)
            return 0
        result = nightly_eval(**params)
    except MlxchatError as e:
        return runtime.finish(f"error: {e}", 2)
    return runtime.finish(f"nightly-eval: {result['model_dir']} val bpb {result['val_bpb']:.4f} "
                          f"({result['rows']} rows in {result['history']})", 0)


if __name__ == "__main__":
    sys.exit(main())
