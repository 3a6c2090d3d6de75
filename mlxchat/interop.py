"""Publishing a trained stage as a folder that mlx-lm (and Hugging Face tokenizers) load as is.

mlx-lm ships a `nanochat` architecture whose module tree has exactly our parameter names
(`transformer.wte.weight`, `transformer.h.{i}.attn.c_q.weight`, ..., `lm_head.weight`) and
no `sanitize`, so the checkpoint's safetensors are republished unchanged; only the config
needs translating to its Hugging Face-style field names.

The tokenizer is the part that needs real conversion: mlx-lm loads tokenizers through
transformers' AutoTokenizer, which cannot read a pickled tiktoken Encoding. `tokenizer.json`
re-expresses the same BPE for the `tokenizers` library (byte-level alphabet, merges derived
from the ranks, our split regex), and `tokenizer.pkl` is kept beside it for mlxchat itself.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
from functools import lru_cache
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from mlxchat.checkpoint import require_checkpoint
from mlxchat.common import MlxchatError, atomic_write_json, owned_temporary, owner_pid, pid_alive, read_json
from mlxchat.gpt import GPT, ROPE_BASE, GPTConfig
from mlxchat.rundir import RunDir
from mlxchat.tokenizer import SPECIAL_TOKENS, Tokenizer, tokenizer_fingerprint

EOS_TOKEN = "<|assistant_end|>"

# nanochat's chat format as a Hugging Face chat template. A leading system message is merged
# into the first user message (nanochat has no system token), and an assistant message may be
# a list of parts (text / python tool call / python output), exactly as
# `Tokenizer.render_conversation` renders them.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(system='') -%}"
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- set ns.system = message['content'] + '\n\n' -%}"
    "{%- elif message['role'] == 'user' -%}"
    "{{- '<|user_start|>' + ns.system + message['content'] + '<|user_end|>' -}}"
    "{%- set ns.system = '' -%}"
    "{%- else -%}"
    "{{- '<|assistant_start|>' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'python' -%}{{- '<|python_start|>' + part['text'] + '<|python_end|>' -}}"
    "{%- elif part['type'] == 'python_output' -%}{{- '<|output_start|>' + part['text'] + '<|output_end|>' -}}"
    "{%- else -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|assistant_end|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant_start|>' -}}{%- endif -%}"
)


# Written into every published folder: publish replaces a folder only if it holds this, so a
# user's own files under --out are never deleted.
PUBLISHED_MARKER = ".mlxchat-published"


def export_mlx_lm(rdir: RunDir, stage: str, out_dir: Path, metrics: dict | None = None) -> dict:
    """Write `out_dir` from the stage's latest checkpoint and the run's tokenizer.

    The folder is built in a temporary directory beside `out_dir` and swapped in only when
    complete, so a reader (or an upload) never sees a half-written model: it sees the old
    folder, the new one, or, for the instant between the two renames, none.
    """
    out_dir = Path(out_dir)
    ck = require_checkpoint(rdir.stage(stage), f"train it first: mlxchat train {stage} --run {rdir.name}")
    tok = Tokenizer.load(rdir.tokenizer)
    cfg = GPTConfig(**ck.state["model_config"])
    weights = _checked_weights(ck.model_file, cfg)
    if tok.vocab_size > cfg.vocab_size:
        raise MlxchatError(
            f"tokenizer in {rdir.tokenizer} has {tok.vocab_size} tokens but the {stage} model only "
            f"{cfg.vocab_size}: the checkpoint was trained with another tokenizer"
        )
    trained_with = (ck.state.get("identity") or {}).get("tokenizer")
    if trained_with and trained_with != tokenizer_fingerprint(rdir.tokenizer):
        raise MlxchatError(f"the {stage} checkpoint {ck.path} was trained with another tokenizer than "
                           f"{rdir.tokenizer}; retrain {stage} (rerun the flow) before publishing")
    n_params = sum(w.size for w in weights.values())
    source = {"run": rdir.name, "stage": stage, "step": ck.step, "checkpoint": str(ck.path)}

    _recover(out_dir)
    if out_dir.exists() and not (out_dir / PUBLISHED_MARKER).exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise MlxchatError(f"{out_dir} already holds files that mlxchat publish did not write; "
                           f"choose a new or empty --out folder (nothing was changed)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = owned_temporary(out_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        atomic_write_json(tmp / PUBLISHED_MARKER, source)
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        config = hf_config(cfg, tok, {**source, "model_config": cfg.to_dict(), "num_params": n_params})
        atomic_write_json(tmp / "config.json", config)
        atomic_write_json(tmp / "tokenizer.json", hf_tokenizer_json(tok))
        atomic_write_json(tmp / "tokenizer_config.json", hf_tokenizer_config(cfg))
        tok.save(tmp)
        card = model_card(source, cfg, n_params, ck.state.get("config", {}), metrics or {})
        (tmp / "README.md").write_text(card, encoding="utf-8")
        _swap_in(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {**source, "out_dir": str(out_dir), "num_params": n_params, "vocab_size": tok.vocab_size}


def load_published(out_dir: Path) -> tuple[GPT, Tokenizer]:
    """The model (fp32, as published) and tokenizer of a folder written by `publish`."""
    out_dir = Path(out_dir)
    config = read_json(out_dir / "config.json", "published model config")
    model_config = config.get("mlxchat", {}).get("model_config")
    if not isinstance(model_config, dict):
        raise MlxchatError(f"{out_dir / 'config.json'} has no mlxchat.model_config; it was not written by mlxchat publish")
    model = GPT(GPTConfig(**model_config))
    try:
        model.load_weights(str(out_dir / "model.safetensors"), strict=True)
    except (ValueError, RuntimeError, OSError) as e:
        raise MlxchatError(f"cannot load {out_dir / 'model.safetensors'} ({e}); publish the model again") from None
    mx.eval(model.parameters())
    model.eval()  # inference mode, as inference.load_model
    return model, Tokenizer.load(out_dir)


def _checked_weights(path: Path, cfg: GPTConfig) -> dict[str, mx.array]:
    """The checkpoint's arrays, checked name by name and shape by shape against the config,
    because mlx-lm's loader would otherwise fail later with a less helpful message."""
    try:
        weights = mx.load(str(path))
    except (RuntimeError, ValueError, OSError) as e:
        raise MlxchatError(f"cannot read {path} ({e}); the checkpoint is damaged") from None
    expected = {k: v.shape for k, v in tree_flatten(GPT(cfg).parameters())}
    got = {k: v.shape for k, v in weights.items()}
    if expected != got:
        diff = sorted(set(expected.items()) ^ set((k, tuple(s)) for k, s in got.items()))[:3]
        raise MlxchatError(f"{path} does not match its model_config (first differences: {diff})")
    return weights


def _recover(out_dir: Path) -> None:
    """Clean up after a publish that was killed, touching only its own leftovers beside
    `out_dir` (`.NAME.tmp-PID`, `.NAME.old-PID` of a process that is gone): a moved-aside
    previous version comes back if the new one never arrived."""
    for kind in ("old", "tmp"):
        for path in out_dir.parent.glob(f".{glob.escape(out_dir.name)}.{kind}-*"):
            pid = owner_pid(path)
            if pid is None or pid_alive(pid) or path.name != f".{out_dir.name}.{kind}-{pid}":
                continue
            if kind == "old" and not out_dir.exists():
                os.replace(path, out_dir)
            else:
                shutil.rmtree(path, ignore_errors=True)


def _swap_in(tmp: Path, out_dir: Path) -> None:
    """Rename `tmp` onto `out_dir`, moving any previous version aside first and deleting it after."""
    old = owned_temporary(out_dir, "old")
    if out_dir.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def hf_config(cfg: GPTConfig, tok: Tokenizer, source: dict) -> dict:
    """config.json: the fields mlx-lm's nanochat `ModelArgs` reads, plus where it came from."""
    return {
        "model_type": "nanochat",
        "architectures": ["NanoChatForCausalLM"],
        "hidden_size": cfg.n_embd,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.sequence_len,
        "intermediate_size": 4 * cfg.n_embd,
        "rope_theta": ROPE_BASE,
        "bos_token_id": tok.bos_id,
        # mlx-lm stops generating at these; a chat model ends its turn with <|assistant_end|>,
        # a base model's document ends where the next <|bos|> would start.
        "eos_token_id": [tok.encode_special(EOS_TOKEN), tok.bos_id],
        "torch_dtype": "float32",
        "mlxchat": source,
    }


@lru_cache(maxsize=1)
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character map, the alphabet of byte-level BPE vocabularies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _token_str(token: bytes) -> str:
    table = _byte_to_unicode()
    return "".join(table[b] for b in token)


def hf_tokenizer_json(tok: Tokenizer) -> dict:
    """The tiktoken BPE as a `tokenizers` byte-level BPE (the standard tiktoken → HF conversion).

    tiktoken repeatedly merges the adjacent pair whose concatenation has the lowest rank; HF BPE
    merges the pair that comes first in its merge list. So every split of a token into two
    tokens becomes a merge, ordered by the rank of the token it makes, and both apply the same
    merges in the same order. Merges are ordered within one token by the ranks of the parts.
    """
    ranks: dict[bytes, int] = tok.enc._mergeable_ranks
    merges = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    added = [
        {"id": tok.encode_special(s), "content": s, "single_word": False, "lstrip": False,
         "rstrip": False, "normalized": False, "special": True}
        for s in SPECIAL_TOKENS
    ]
    bos = SPECIAL_TOKENS[0]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": tok.enc._pat_str}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ],
        },
        # nanochat starts every document with <|bos|>: plain-text prompts get it as a special token;
        # chat prompts already carry it from the template and are encoded without special tokens.
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 0}}],
            "special_tokens": {bos: {"id": bos, "ids": [tok.bos_id], "tokens": [bos]}},
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": {_token_str(t): r for t, r in ranks.items()},
            "merges": [[_token_str(m[3]), _token_str(m[4])] for m in merges],
        },
    }


def hf_tokenizer_config(cfg: GPTConfig) -> dict:
    """tokenizer_config.json for transformers' PreTrainedTokenizerFast (what AutoTokenizer builds)."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": SPECIAL_TOKENS[0],
        "eos_token": EOS_TOKEN,
        "model_max_length": cfg.sequence_len,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


def model_card(source: dict, cfg: GPTConfig, n_params: int, train_config: dict, metrics: dict) -> str:
    """README.md: what the model is, how it was trained, its metrics, and how to load it."""
    name = f"{source['run']}-{source['stage']}"
    rows = "\n".join(f"| {k} | {_fmt(v)} |" for k, v in sorted(metrics.items())) or "| (none recorded) | |"
    train = "\n".join(f"| {k} | {_fmt(v)} |" for k, v in sorted(train_config.items())) or "| (not recorded) | |"
    return f"""---
library_name: mlx
tags:
- mlx
- nanochat
- mlxchat
pipeline_tag: text-generation
---

# {name}

A nanochat GPT trained with mlxchat (Karpathy's nanochat ported to MLX):
run `{source['run']}`, stage `{source['stage']}`, step {source['step']}.

## Model

| field | value |
|---|---|
| parameters | {n_params:,} |
| layers | {cfg.n_layer} |
| model dim | {cfg.n_embd} |
| heads (query / kv) | {cfg.n_head} / {cfg.n_kv_head} |
| head dim | {cfg.head_dim} |
| context length | {cfg.sequence_len} |
| vocab size | {cfg.vocab_size} |

Architecture: rotary embeddings, QK norm, parameter-free RMSNorm, relu² MLP, untied
embedding / lm_head, logits softcapped at 15. Weights are float32.

## Training data and settings

| setting | value |
|---|---|
{train}

## Metrics

| metric | value |
|---|---|
{rows}

## Usage

With mlx-lm (architecture `nanochat`):

```python
from mlx_lm import load, generate

model, tokenizer = load("{name}")
messages = [{{"role": "user", "content": "Why is the sky blue?"}}]
prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
print(generate(model, tokenizer, prompt=prompt, max_tokens=100))
```

With mlxchat:

```python
from mlxchat.interop import load_published

model, tokenizer = load_published("{name}")
```

Chat format (nanochat): `<|bos|><|user_start|>…<|user_end|><|assistant_start|>…<|assistant_end|>`.
`tokenizer.pkl` is the original tiktoken tokenizer; `tokenizer.json` is the same BPE for
Hugging Face `tokenizers`.
"""


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)
