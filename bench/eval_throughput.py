"""Evaluation throughput: CORE-style scoring and categorical (letter) evaluation, batched
against one example per forward, at several depths, in one run.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \
        python bench/eval_throughput.py --home DIR [--depths 4 12] [--examples 48]

DIR must hold the eval pack (`mlxchat --home DIR data prepare-evals`) and the smoke corpus
(`mlxchat --home DIR data prepare-smoke`); a 4,096-token tokenizer is trained on the corpus.
Models are randomly initialised: throughput does not depend on what they learned. Prints
examples/s and the batched / one-by-one ratio, also for greedy generation (ChatCORE's generative
tasks: 8 problems decoded together against one at a time). On the CPU it also times CORE scoring one example
per forward (what `eval_batching` picks there) and bpb (tokens/s), each forward's rows split over
the cores (`cpu_shards`, the default) against one shard (`MLXCHAT_CPU_SHARDS=1`, the code before
the split). `--json` writes the numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


@contextlib.contextmanager
def shards(count: str | None):
    """`MLXCHAT_CPU_SHARDS` set to `count` (None: unset, one shard a core) for the block."""
    from mlxchat.cpu_shards import SHARDS_ENV

    before = os.environ.pop(SHARDS_ENV, None)
    if count is not None:
        os.environ[SHARDS_ENV] = count
    try:
        yield
    finally:
        os.environ.pop(SHARDS_ENV, None)
        if before is not None:
            os.environ[SHARDS_ENV] = before


class Generated:
    """A task's conversations as a generative task whose answers are never right: every problem
    decodes its whole budget on both sides (greedy; `run_generative_eval`)."""

    eval_type = "generative"

    def __init__(self, task):
        self.task = task

    def __len__(self):
        return len(self.task)

    def __getitem__(self, i):
        return self.task[i]

    def evaluate(self, conversation, completion) -> bool:
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", required=True)
    ap.add_argument("--depths", type=int, nargs="+", default=[4, 12])
    ap.add_argument("--examples", type=int, default=48)
    ap.add_argument("--core-task", default="hellaswag_zeroshot", help="a multiple-choice task of the pack")
    ap.add_argument("--gen-problems", type=int, default=16, help="ARC-Easy prompts for greedy generation")
    ap.add_argument("--gen-tokens", type=int, default=32, help="new tokens a generated answer")
    ap.add_argument("--json")
    args = ap.parse_args()

    import mlx.core as mx

    from mlxchat import dataset
    from mlxchat.conversations import ARC
    from mlxchat.evaluation import bpb, core
    from mlxchat.evaluation.chatcore import run_categorical_eval, run_generative_eval
    from mlxchat.gpt import GPT, GPTConfig
    from mlxchat.tokenizer import Tokenizer

    home = Path(args.home)
    texts = dataset.iter_texts(dataset.get_source("smoke", root=home), "train", max_chars=2_000_000)
    tok = Tokenizer.train_from_iterator(texts, 4096)
    bundle = home / "evals" / "core"
    tasks, _, _ = core.load_bundle(bundle)
    spec = next(t for t in tasks if t["label"] == args.core_task)
    meta = {"label": spec["label"], "task_type": spec["icl_task_type"], "num_fewshot": spec["num_fewshot"][0],
            "continuation_delimiter": spec.get("continuation_delimiter", " ")}
    with open(bundle / "eval_data" / spec["dataset_uri"]) as f:
        data = [json.loads(line) for line in f if line.strip()]
    random.Random(1337).shuffle(data)
    data = data[: args.examples]
    arc = ARC.from_pack(home, "ARC-Easy", stop=args.examples)
    generated = Generated(ARC.from_pack(home, "ARC-Easy", stop=args.gen_problems))

    results = {"device": str(mx.default_device()), "examples": args.examples, "core_task": args.core_task, "depths": {}}
    for depth in args.depths:
        model = GPT(GPTConfig.from_depth(depth, vocab_size=tok.vocab_size, sequence_len=2048))
        model.init_weights(0)
        # nanochat's zero head makes every logit equal: greedy decoding would repeat token 0
        model.lm_head.weight = mx.random.normal(model.lm_head.weight.shape, key=mx.random.key(0)) * 0.02
        mx.eval(model.parameters())
        row = {"params": model.num_params()}
        # warm up the compiled shapes once, so neither side pays first-call costs
        core.evaluate_task(model, tok, data[:2], meta, batch_tokens=8192)
        run_categorical_eval(arc, model, tok, batch_size=8, max_problems=8)
        for name, tokens in (("core_batched", 8192), ("core_one_by_one", 1)):
            seconds, _ = timed(lambda: core.evaluate_task(model, tok, data, meta, batch_tokens=tokens))
            row[name] = len(data) / seconds
        for name, batch in (("categorical_batched", 16), ("categorical_one_by_one", 1)):
            seconds, _ = timed(lambda: run_categorical_eval(arc, model, tok, batch_size=batch))
            row[name] = len(arc) / seconds
        for name, batch in (("generative_batched", 8), ("generative_one_by_one", 1)):
            run_generative_eval(generated, model, tok, max_new_tokens=2, max_problems=batch, batch_size=batch)  # compile
            seconds, _ = timed(lambda: run_generative_eval(generated, model, tok, max_new_tokens=args.gen_tokens,
                                                           batch_size=batch))
            row[name] = len(generated) / seconds
        if mx.default_device() == mx.cpu:
            ids = mx.random.randint(0, tok.vocab_size, (4, 8, 1024), key=mx.random.key(0))
            token_bytes = mx.array(tok.token_bytes())
            for label, count in (("sharded", None), ("one_shard", "1")):
                with shards(count):
                    bpb.evaluate_bpb(model, iter([(ids[0], ids[0])]), 1, token_bytes)  # compile
                    seconds, _ = timed(lambda: bpb.evaluate_bpb(model, iter(zip(ids, ids)), len(ids), token_bytes))
                    row[f"bpb_{label}"] = ids.size / seconds
                    if label == "one_shard":
                        seconds, _ = timed(lambda: core.evaluate_task(model, tok, data, meta, batch_tokens=1))
                        row["core_one_by_one_one_shard"] = len(data) / seconds
        results["depths"][depth] = row
        print(f"d{depth} ({row['params'] / 1e6:.1f}M params), {args.examples} examples, {results['device']}")
        print(f"  CORE-style ({args.core_task}): batched {row['core_batched']:.2f} ex/s, one-by-one "
              f"{row['core_one_by_one']:.2f} ex/s, ratio {row['core_batched'] / row['core_one_by_one']:.2f}x")
        print(f"  categorical (ARC-Easy):  batched {row['categorical_batched']:.2f} ex/s, one-by-one "
              f"{row['categorical_one_by_one']:.2f} ex/s, ratio "
              f"{row['categorical_batched'] / row['categorical_one_by_one']:.2f}x")
        print(f"  generative (ARC-Easy prompts, greedy, {args.gen_tokens} tokens): batched (8) "
              f"{row['generative_batched']:.2f} ex/s, one-by-one {row['generative_one_by_one']:.2f} ex/s, ratio "
              f"{row['generative_batched'] / row['generative_one_by_one']:.2f}x")
        if "bpb_sharded" in row:
            print(f"  CPU shards: CORE one-by-one {row['core_one_by_one']:.2f} against "
                  f"{row['core_one_by_one_one_shard']:.2f} ex/s one shard "
                  f"({row['core_one_by_one'] / row['core_one_by_one_one_shard']:.2f}x); bpb "
                  f"{row['bpb_sharded']:,.0f} against {row['bpb_one_shard']:,.0f} tok/s "
                  f"({row['bpb_sharded'] / row['bpb_one_shard']:.2f}x)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
