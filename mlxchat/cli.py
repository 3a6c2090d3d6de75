"""`mlxchat` console script: every stage runnable without Prefect.

Parsing only: each subcommand maps its flags onto a stage function and prints the result.
User errors (`MlxchatError`) print as one line and exit with status 2. `train` and `eval`
with `--np N` or `--hosts HOSTFILE` run data-parallel: this process starts `mlx.launch`
(`mlxchat.launch`), every rank runs the same command, and rank 0's result is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from contextlib import nullcontext

from mlxchat.common import HOME_ENV, MlxchatError
from mlxchat.launch import BACKENDS, EVENTS_ENV, PEER_LOST, Ranks, emit, launched_rank, run_mlxchat
from mlxchat.rundir import CHAT_MODEL_STAGE, CHAT_STAGES, LOOP_STAGES, MODEL_STAGES

# `mlxchat train` flags that map onto TrainConfig / OptimConfig fields; unset flags keep the
# stage's nanochat defaults (presets.stage_defaults).
TRAIN_FLAGS = ("depth", "max_steps", "device_batch_size", "total_batch_size", "examples_per_step", "seq_len",
               "checkpoint_every", "eval_every", "eval_tokens", "eval_steps", "dtype", "source", "seed")
OPTIM_FLAGS = ("matrix_lr", "embedding_lr", "unembedding_lr", "init_lr_frac")
LAUNCH_FLAGS = ("--np", "--hosts", "--backend")


def _add_launch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--np", type=int, default=1, help="data-parallel: this many processes (per host with --hosts)")
    p.add_argument("--hosts", metavar="HOSTFILE", help="data-parallel over the hosts of an mlx.launch hostfile")
    p.add_argument("--backend", choices=BACKENDS, help="mlx.launch backend (default: the hostfile's, else ring; nccl with CUDA)")


def _without_launch_flags(argv: list[str]) -> list[str]:
    """The command line each rank runs: the same, less the flags that asked for the launch."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg.split("=", 1)[0] in LAUNCH_FLAGS:
            skip = "=" not in arg
        else:
            out.append(arg)
    return out


# What each `mlxchat train` flag means (its default is the stage's, shown beside it).
TRAIN_HELP = {
    "depth": "model depth (n_layer); width is 64 x depth, heads of 128",
    "max_steps": "optimizer steps, at least 1; left out: the horizon (base: 20 tokens per parameter; mid, SFT: one epoch)",
    "device_batch_size": "sequences (SFT: conversations) per forward pass",
    "total_batch_size": "tokens per optimizer step, reached by gradient accumulation (base, mid)",
    "examples_per_step": "conversations per optimizer step (SFT; 0: use --total-batch-size)",
    "seq_len": "tokens per sequence",
    "checkpoint_every": "write a checkpoint every K steps (0: only at the end)",
    "eval_every": "validate every K steps (0: never)",
    "eval_tokens": "validation tokens per evaluation",
    "eval_steps": "validation batches per evaluation (0: from --eval-tokens)",
    "seed": "random seed (initialisation, data order)",
    "dtype": "weights and activations (''/unset: bfloat16 on a GPU, float32 on the CPU)",
    "source": "training text: base smoke | hub[:owner/name] | dir:PATH; mid, SFT smoke | hub",
    "matrix_lr": "Muon learning rate (block matrices)",
    "embedding_lr": "AdamW learning rate of the token embedding",
    "unembedding_lr": "AdamW learning rate of lm_head",
    "init_lr_frac": "every learning rate scaled by this (SFT: 0.02)",
}


# `mlxchat train rl` flags that map onto RLConfig fields, and what they mean
RL_FLAGS = ("num_samples", "max_new_tokens", "temperature", "top_k", "eval_examples", "train_size")
RL_HELP = {
    "num_samples": "rollouts per question",
    "max_new_tokens": "longest rollout, in tokens",
    "temperature": "sampling temperature of the rollouts",
    "top_k": "rollouts sample among this many likeliest tokens",
    "eval_examples": "test problems for pass@k",
    "train_size": "training problems (smoke: generated arithmetic; GSM8K train has 7,473)",
}


def _add_train_args(p: argparse.ArgumentParser) -> None:
    from mlxchat.presets import stage_defaults
    from mlxchat.rl import RLConfig

    defaults = {stage: stage_defaults(stage) for stage in LOOP_STAGES}

    def shown(flag: str) -> str:
        values = {s: getattr(c.optim if flag in OPTIM_FLAGS else c, flag) for s, c in defaults.items()}
        text = {s: repr(v) if isinstance(v, str) else f"{v:,}" if isinstance(v, int) else f"{v:g}" for s, v in values.items()}
        same = len(set(text.values())) == 1
        return text["base"] if same else ", ".join(f"{s} {t}" for s, t in text.items())

    p.add_argument("stage", choices=MODEL_STAGES, help="base: pretraining; mid: mid-training (from base); "
                   "sft: supervised fine-tuning (from mid); rl: nanochat's chat_rl (from sft)")
    p.add_argument("--run", required=True, help="run name (its directory: <home>/runs/RUN)")
    for flag in TRAIN_FLAGS + OPTIM_FLAGS:
        kind = {"dtype": str, "source": str}.get(flag, float if flag in OPTIM_FLAGS else int)
        extra = {"choices": ["", "float32", "bfloat16", "float16"]} if flag == "dtype" else {}
        p.add_argument(f"--{flag.replace('_', '-')}", type=kind, help=f"{TRAIN_HELP[flag]} (default: {shown(flag)})",
                       **extra)
    p.add_argument("--fresh", action="store_true", help="ignore existing checkpoints and start over")
    p.add_argument("--checkpoint-blocks", action="store_true",
                   help="recompute each block's activations in the backward: less memory, ~1/3 more compute")
    p.add_argument("--config", help="the whole training config as JSON (as run.json's preset holds a stage's); flags override it")
    _add_launch_args(p)
    rl = p.add_argument_group("rl (nanochat's chat_rl; with the shared flags above that RL has)")
    for flag, kind in (("num_samples", int), ("max_new_tokens", int), ("temperature", float), ("top_k", int),
                       ("eval_examples", int), ("train_size", int)):
        rl.add_argument(f"--{flag.replace('_', '-')}", type=kind, help=f"{RL_HELP[flag]} (default: {getattr(RLConfig(), flag):g})")
    p.epilog = ("Defaults: a run the flow made (runs/RUN/run.json) trains with its saved settings; otherwise "
                "nanochat's, as listed. A flag given overrides either. Rerunning resumes from the latest checkpoint.")


def saved_train_config(run: str, stage: str, root=None) -> dict | None:
    """The stage's settings as the flow saved them in run.json, or None for a run it did not make."""
    from mlxchat.common import read_json
    from mlxchat.rundir import run_dir

    path = run_dir(run, root).run_json
    if not path.exists():
        return None
    saved = (read_json(path, "run settings").get("preset") or {}).get(stage)
    return saved if isinstance(saved, dict) else None


def rl_config(args: argparse.Namespace):
    """The run's saved RL settings (run.json) or chat_rl's defaults, with the flags the user gave."""
    from dataclasses import fields, replace

    from mlxchat.rl import RLConfig

    saved = saved_train_config(args.run, "rl", getattr(args, "home", None))
    cfg = RLConfig.from_dict(saved) if saved else RLConfig()
    names = {f.name for f in fields(RLConfig)}
    foreign = [k for k in TRAIN_FLAGS if k not in names and getattr(args, k) is not None]
    if foreign:  # e.g. --depth: RL keeps the SFT model's shape
        raise MlxchatError(f"mlxchat train rl takes no --{foreign[0].replace('_', '-')}; see mlxchat train --help")
    optim = replace(cfg.optim, **{k: getattr(args, k) for k in OPTIM_FLAGS if getattr(args, k) is not None})
    given = {k: getattr(args, k) for k in TRAIN_FLAGS + RL_FLAGS if k in names and getattr(args, k) is not None}
    return replace(cfg, optim=optim, **given)


def train_config(args: argparse.Namespace):
    """--config, else the run's saved settings (run.json), else the stage's nanochat defaults, with the
    flags the user gave."""
    from dataclasses import replace

    from mlxchat.presets import stage_defaults
    from mlxchat.train import TrainConfig

    if args.max_steps is not None and args.max_steps < 1:
        raise MlxchatError(f"--max-steps must be positive, got {args.max_steps} (leave it out for the Chinchilla horizon)")
    given_rl = [k for k in RL_FLAGS if getattr(args, k) is not None]
    if given_rl:
        raise MlxchatError(f"--{given_rl[0].replace('_', '-')} is an RL setting: use it with mlxchat train rl")
    if args.config:
        try:
            cfg = TrainConfig.from_dict({**json.loads(args.config), "stage": args.stage})
        except (ValueError, TypeError) as e:
            raise MlxchatError(f"--config is not a training config as JSON ({e})") from None
    else:
        saved = saved_train_config(args.run, args.stage, getattr(args, "home", None))
        cfg = TrainConfig.from_dict({**saved, "stage": args.stage}) if saved else stage_defaults(args.stage)
    optim = replace(cfg.optim, **{k: getattr(args, k) for k in OPTIM_FLAGS if getattr(args, k) is not None})
    cfg = replace(cfg, optim=optim, **{k: getattr(args, k) for k in TRAIN_FLAGS if getattr(args, k) is not None})
    return replace(cfg, checkpoint_blocks=True) if getattr(args, "checkpoint_blocks", False) else cfg


def _add_sampling_args(p: argparse.ArgumentParser, what: str = "") -> None:
    """Unset flags keep the chat module's (or, for serve, nanochat chat_web's) defaults; they
    are not imported here because that loads MLX."""
    prefix = f"{what}; " if what else ""
    p.add_argument("--temperature", type=float, help=f"{prefix}0 answers greedily")
    p.add_argument("--top-k", type=int, help=f"{prefix}sample among this many likeliest tokens")
    p.add_argument("--max-tokens", type=int, help=f"{prefix}longest reply, in tokens")


def _sampling(args: argparse.Namespace) -> dict:
    return {k: getattr(args, k) for k in ("temperature", "top_k", "max_tokens") if getattr(args, k) is not None}


def run_chat(args: argparse.Namespace) -> None:
    """`mlxchat chat`: one answer to -p, or a conversation on stdin; text streams to stdout."""
    from mlxchat.chat_session import chat_repl, load_chat_model, stream_reply

    chat = load_chat_model(args.run, args.stage, root=args.home)
    sampling = _sampling(args)
    if args.prompt is None:
        chat_repl(chat, sys.stdin, sys.stdout, seed=random.randrange(2**31) if args.seed is None else args.seed,
                  **sampling)
        return
    for piece in stream_reply(chat, [{"role": "user", "content": args.prompt}], seed=args.seed, **sampling):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


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

    ev = sub.add_parser("eval", help="evaluate a stage's latest checkpoint, or a published model (the nightly evaluation)")
    ev.add_argument("metric", choices=["bpb", "core", "chat", "published"],
                    help="bpb: bits per byte; core: CORE (or CORE-pack); chat: ChatCORE's six tasks; published: every "
                         "evaluation that has data on a published model, appended to <home>/eval_history.parquet")
    ev.add_argument("--run", help="the run (bpb, core, chat)")
    ev.add_argument("--model", help="published: the model folder (default: the newest under <home>/published/)")
    ev.add_argument("--source", default="smoke", help="published: text source of the validation split")
    ev.add_argument("--batch-size", type=int, default=4, help="published: rows per bpb forward")
    ev.add_argument("--seq-len", type=int, default=256, help="published: tokens per bpb row")
    ev.add_argument("--max-tokens", type=int, default=16, help="published: tokens per greedy sample")
    ev.add_argument("--stage", help="default: base for bpb and core, sft for chat")
    ev.add_argument("--eval-tokens", type=int, help="bpb, published: validation tokens (published: 16384 by default)")
    ev.add_argument("--max-per-task", type=int, default=-1, help="at most this many problems per task (-1: all)")
    ev.add_argument("--max-new-tokens", type=int, default=512, help="chat, published: generation budget per answer")
    _add_launch_args(ev)
    sm = sub.add_parser("sample", help="complete nanochat's sample prompts with a stage's checkpoint")
    sm.add_argument("--run", required=True)
    sm.add_argument("--stage", default="base")
    sm.add_argument("--prompt", action="append", help="a prompt (repeatable; default: nanochat's list)")
    sm.add_argument("--max-tokens", type=int, default=32)
    sm.add_argument("--temperature", type=float, default=0.0)
    sm.add_argument("--top-k", type=int)

    ch = sub.add_parser("chat", help="talk to a chat stage's model in the terminal (streams the replies)")
    ch.add_argument("--run", required=True)
    ch.add_argument("--stage", default=CHAT_MODEL_STAGE, choices=CHAT_STAGES)
    ch.add_argument("-p", "--prompt", help="answer this one message and exit (default: a conversation on stdin)")
    _add_sampling_args(ch)
    ch.add_argument("--seed", type=int, help="sampling seed (default: a fresh one each time)")

    srv = sub.add_parser("serve", help="web chat UI and nanochat's streaming chat API for a chat stage")
    srv.add_argument("--run", required=True)
    srv.add_argument("--stage", default=CHAT_MODEL_STAGE, choices=CHAT_STAGES)
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                     help="also answer web pages of this origin (e.g. https://example.com; * for any); repeatable")
    _add_sampling_args(srv, "default for requests that leave it out")

    pub = sub.add_parser("publish", help="write an mlx-lm loadable model folder from a stage's checkpoint")
    pub.add_argument("--run", required=True)
    pub.add_argument("--stage", default="base")
    pub.add_argument("--out", help="output folder (default <home>/published/<run>-<stage>)")
    _add_nanochat_args(sub)
    return parser


def _add_nanochat_args(sub) -> None:
    """`mlxchat import nanochat` / `mlxchat export nanochat`: nanochat's PyTorch checkpoints (needs torch)."""
    imp = sub.add_parser("import", help="a nanochat checkpoint + tokenizer into a run (needs: pip install 'mlxchat[torch]')")
    imp.add_argument("format", choices=["nanochat"])
    imp.add_argument("source", help="nanochat base dir (NANOCHAT_BASE_DIR) or a folder holding model_<step>.pt")
    imp.add_argument("--run", required=True)
    imp.add_argument("--stage", default="base", choices=MODEL_STAGES)
    imp.add_argument("--model-tag", help="checkpoint folder under <stage>_checkpoints (default: the deepest d<N>)")
    imp.add_argument("--step", type=int, help="default: the last step")
    exp = sub.add_parser("export", help="a stage as a nanochat base dir its checkpoint_manager loads (needs torch)")
    exp.add_argument("format", choices=["nanochat"])
    exp.add_argument("--run", required=True)
    exp.add_argument("--stage", default="sft", choices=MODEL_STAGES)
    exp.add_argument("--out", required=True, help="nanochat base dir to write into")


def run_command(args: argparse.Namespace) -> dict | list | None:
    """The command's result to print as JSON; None for the interactive ones (chat, serve),
    which write to the terminal themselves."""
    from mlxchat import pipeline

    root = args.home
    if args.command == "chat":
        return run_chat(args)
    if args.command == "serve":
        from mlxchat.web import Sampling, serve

        return serve(args.run, args.stage, args.host, args.port, root=root, defaults=Sampling(**_sampling(args)),
                     allow_origins=tuple(args.allow_origin))
    if args.command == "data":
        from mlxchat import corpus, hub_shards

        if args.action == "prepare-evals":
            from mlxchat.evaluation.pack import prepare_evals

            return prepare_evals(args.source, root=root, with_bigbench=args.with_bigbench, force=args.force)
        if args.action == "prepare-smoke":
            return {"path": str(corpus.prepare_smoke(root=root, force=args.force))}
        return {"shards": [str(p) for p in hub_shards.download(args.shards, root=root)]}
    if args.command == "tokenizer":
        if args.action == "train":
            return pipeline.train_tokenizer(args.run, args.vocab_size, args.source, args.max_chars, root=root)
        return pipeline.eval_tokenizer(args.run, args.source, root=root)
    if args.command == "train" and args.stage == "rl":
        result = pipeline.train_rl(args.run, rl_config(args).to_dict(), root=root, fresh=args.fresh)
        if result["interrupted"]:
            raise KeyboardInterrupt
        return result
    if args.command == "train":
        progress = (lambda row: emit("progress", row)) if os.environ.get(EVENTS_ENV) else None
        result = pipeline.train(args.run, args.stage, train_config(args).to_dict(), root=root, fresh=args.fresh,
                              on_progress=progress)
        if result["interrupted"]:
            raise KeyboardInterrupt
        return result
    if args.command == "sample":
        return pipeline.sample(args.run, args.stage, args.prompt, args.max_tokens, args.temperature, args.top_k, root=root)
    if args.command == "publish":
        return pipeline.publish(args.run, args.stage, args.out, root=root)
    if args.command in ("import", "export"):
        from mlxchat import nanochat_io

        if args.command == "import":
            return nanochat_io.import_nanochat(args.source, args.run, args.stage, args.model_tag, args.step, root=root)
        return nanochat_io.export_nanochat(args.run, args.stage, args.out, root=root)
    if args.command == "eval" and args.metric == "published":
        from mlxchat.evaluation.published import evaluate_and_record

        return evaluate_and_record(args.model, root=root, source=args.source, batch_size=args.batch_size,
                                   seq_len=args.seq_len, eval_tokens=args.eval_tokens or 16384,
                                   max_tokens=args.max_tokens, max_per_task=args.max_per_task,
                                   chat_max_new_tokens=args.max_new_tokens)
    if args.command == "eval":
        if args.metric == "core":
            return pipeline.eval_core(args.run, args.stage or "base", args.max_per_task, root=root)
        if args.metric == "chat":
            return pipeline.eval_chat(args.run, args.stage or "sft", args.max_per_task, args.max_new_tokens, root=root)
        return pipeline.eval_bpb(args.run, args.stage or "base", args.eval_tokens, root=root)
    raise AssertionError(args.command)


def _run_lock(args: argparse.Namespace, argv: list[str] | None):
    """The run's lock for the commands that write a run (see runlock.py); chat and serve only read."""
    if args.command not in ("tokenizer", "train", "eval", "sample", "publish"):
        return nullcontext()
    if args.command == "eval" and args.metric == "published":  # reads a published folder, writes the home's history
        return nullcontext()
    if args.command == "eval" and not args.run:
        raise MlxchatError(f"mlxchat eval {args.metric} needs --run RUN (the run whose stage to evaluate)")
    from mlxchat.runlock import run_lock

    command = "mlxchat " + " ".join(sys.argv[1:] if argv is None else argv)
    return run_lock(args.run, args.home, command=command, create=args.command == "tokenizer")


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the console script, not a caller in-process: fix the BLAS before MLX loads
        from mlxchat.blas import ensure_fast_blas

        ensure_fast_blas()
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.home:
        os.environ[HOME_ENV] = args.home
    rank = launched_rank()  # None: not started by mlx.launch
    who = "" if rank is None else f"rank {rank}: "
    try:
        ranks = Ranks(args.np, args.hosts, args.backend) if hasattr(args, "np") else Ranks()
        ranks.check()
        # The process that launched the ranks holds the run's lock for them (by hand, rank 0 does)
        locked = rank is None or (rank == 0 and not os.environ.get(EVENTS_ENV))
        with _run_lock(args, argv) if locked else nullcontext():
            if ranks.distributed and rank is None:
                result = run_mlxchat(_without_launch_flags(argv), ranks)
            else:
                result = run_command(args)
    except MlxchatError as e:
        print(f"error: {who}{e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{who}interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a crash: the launcher's caller learns which rank, the traceback follows
        if rank is not None and any(p in str(e) for p in PEER_LOST):
            print(f"error: {who}another rank went away ({e})", file=sys.stderr)
            return 1
        if rank is not None:
            print(f"error: {who}{type(e).__name__}: {e}", file=sys.stderr)
        raise
    if rank not in (None, 0) or result is None:
        return 0
    if os.environ.get(EVENTS_ENV):
        emit("result", result)
    else:
        print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
