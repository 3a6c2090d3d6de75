"""Stage entry points: each reads its inputs from the run directory and writes its outputs there.

The CLI and the Prefect tasks both call these, so a stage behaves the same with or without
Prefect. Each returns a plain dict (paths and metrics) small enough to pass between tasks.
"""

from __future__ import annotations

import time
from mlxchat.common import atomic_write_json, read_json, run_dir


def train_tokenizer(run: str, vocab_size: int = 65536, source: str = "smoke", max_chars: int = 2_000_000_000,
                    doc_cap: int = 10_000, root=None) -> dict:
    """nanochat's tok_train: BPE on the first `max_chars` characters of the training split."""
    from mlxchat import dataset, tokenizer

    src = dataset.get_source(source, root=root)
    out = run_dir(run, root) / "tokenizer"
    meta = tokenizer.train_tokenizer(dataset.iter_texts(src, "train"), vocab_size, out, max_chars=max_chars, doc_cap=doc_cap)
    return {"tokenizer_dir": str(out), **meta}


def eval_tokenizer(run: str, source: str = "smoke", max_chars: int = 1_000_000, root=None) -> dict:
    """nanochat's tok_eval: compression (bytes per token) on held-out and training text."""
    from mlxchat import dataset, tokenizer

    rdir = run_dir(run, root, must_exist=True)
    tok = tokenizer.Tokenizer.load(rdir / "tokenizer")
    src = dataset.get_source(source, root=root)
    texts = {split: "\n".join(dataset.iter_texts(src, split, max_chars=max_chars)) for split in ("train", "val")}
    result = tokenizer.evaluate_tokenizer(tok, texts)
    atomic_write_json(rdir / "tokenizer" / "tok_eval.json", result)
    return result


def eval_bpb(run: str, stage: str = "base", eval_tokens: int | None = None, root=None) -> dict:
    """Bits per byte of a stage's latest checkpoint on the validation (and training) split."""
    from mlxchat import dataset
    from mlxchat.dataloader import DataLoader
    from mlxchat.evaluation.bpb import evaluate_bpb
    from mlxchat.tokenizer import Tokenizer
    from mlxchat.train import TrainConfig, load_trained_model

    rdir = run_dir(run, root, must_exist=True)
    model, ck = load_trained_model(rdir / stage, f"train it first: mlxchat train {stage} --run {run}")
    cfg = TrainConfig.from_dict(ck.state["config"])
    tok = Tokenizer.load(rdir / "tokenizer")
    src = dataset.get_source(cfg.source, root=root)
    tokens = eval_tokens or cfg.eval_tokens
    steps = max(1, tokens // (cfg.device_batch_size * cfg.seq_len))
    t0 = time.time()
    result = {"stage": stage, "step": ck.step, "checkpoint": str(ck.path), "eval_tokens": steps * cfg.device_batch_size * cfg.seq_len}
    for split in ("val", "train"):
        loader = DataLoader(src, tok, cfg.device_batch_size, cfg.seq_len, split)
        result[f"{split}_bpb"] = evaluate_bpb(model, loader, steps, tok.token_bytes())
    result["eval_time_s"] = time.time() - t0
    path = rdir / "eval" / "bpb.json"
    existing = read_json(path, "bpb results") if path.exists() else {}
    atomic_write_json(path, {**existing, stage: result})
    return result
