"""Publishing: mlx-lm and Hugging Face tokenizers must read the folder as the same model and
tokenizer that mlxchat trained, token for token and logit for logit."""

import json
from pydoc_data.topics import topics

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlxchat.checkpoint import save_checkpoint
from mlxchat.common import MlxchatError
from mlxchat.gpt import GPT, GPTConfig
from mlxchat.interop import export_mlx_lm as publish
from mlxchat.interop import load_published
from mlxchat.rundir import Home
from mlxchat.tokenizer import Tokenizer

TEXT = (
    "Hello, world! It's 2025-11-25 and the price is $1234.56 (or 12,345 yen).\n\n"
    "  Indented   spaces\tand tabs\r\nCRLF lines. Don't they'll we've I'm.\n"
    "Ünïcödé: café, naïve, 日本語のテキスト, Ελληνικά, русский, emoji 🚀🙂, math ∑∫√.\n"
    "def f(x):\n    return x ** 2  # comment\n"
    "Digits 0123456789 9876543210 and <tags> |pipes|\n"
)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run with a real (small) tokenizer and a 2-layer `base` checkpoint with non-trivial weights."""
    run_dir = Home(tmp_path_factory.mktemp("home")).run("tiny")
    tok = Tokenizer.train_from_iterator(iter(list(topics.values())), 512)
    tok.save(run_dir.tokenizer)
    cfg = GPTConfig(sequence_len=64, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_kv_head=2, n_embd=128)
    model = GPT(cfg)
    model.init_weights(seed=1)
    # init zeroes lm_head and every c_proj; without noise all logits would be 0 and agree trivially
    noisy = {
        k: v + 0.02 * mx.random.normal(v.shape, key=mx.random.key(i)) if k.endswith("c_proj.weight") or k == "lm_head.weight" else v
        for i, (k, v) in enumerate(tree_flatten(model.parameters()))
    }
    model.load_weights(list(noisy.items()))
    save_checkpoint(run_dir.stage("base"), 1, model.parameters(), None, {"model_config": cfg.to_dict(), "config": {}})
    out = run_dir.published("base")
    publish(run_dir, "base", out, {"val_bpb": 1.2345})
    return run_dir, out, model, tok


def test_mlx_lm_logits_match(run):
    from mlx_lm import load

    _, out, model, tok = run
    ids = mx.array([tok.encode(TEXT[:200], prepend="<|bos|>")[:64]])
    theirs, _ = load(str(out))
    expected, got = model(ids), theirs(ids)
    assert float(mx.abs(expected).max()) > 0.1  # the comparison is not between zeros
    np.testing.assert_allclose(np.array(got), np.array(expected), atol=1e-4)
    ours, ours_tok = load_published(out)
    assert not ours.training  # inference mode: CastLinear's plain ops, the training model's logits
    np.testing.assert_allclose(np.array(ours(ids)), np.array(expected), atol=1e-6)
    assert ours_tok.encode(TEXT) == tok.encode(TEXT)


def test_hf_tokenizer_matches_tiktoken(run):
    from tokenizers import Tokenizer as HFTokenizer

    _, out, _, tok = run
    hf = HFTokenizer.from_file(str(out / "tokenizer.json"))
    texts = [TEXT, *list(topics.values())[:20]]
    for text in texts:
        ids = tok.encode(text)
        assert hf.encode(text, add_special_tokens=False).ids == ids
        assert hf.decode(ids, skip_special_tokens=False) == text
    # plain-text prompts start with <|bos|>, like every nanochat document
    assert hf.encode("hi").ids == [tok.bos_id] + tok.encode("hi")
    assert hf.token_to_id("<|assistant_end|>") == tok.encode_special("<|assistant_end|>")
    # Unlike tok.encode, HF reads special-token text as the token: the chat template relies on it.
    assert hf.encode("a<|user_end|>", add_special_tokens=False).ids == tok.encode("a") + [
        tok.encode_special("<|user_end|>")
    ]


def test_chat_template_renders_nanochat_format(run):
    from mlx_lm import load

    _, out, _, tok = run
    _, wrapper = load(str(out))
    conversation = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me check. "},
            {"type": "python", "text": "2+2"},
            {"type": "python_output", "text": "4"},
            {"type": "text", "text": "It is 4."},
        ]},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You're welcome."},
    ]}
    expected, _ = tok.render_conversation(conversation)
    rendered = wrapper.apply_chat_template(conversation["messages"], tokenize=False)
    assert wrapper.encode(rendered, add_special_tokens=False) == expected
    prompt = wrapper.apply_chat_template(conversation["messages"][:-1], add_generation_prompt=True)
    assert list(prompt) == tok.render_for_completion(conversation)
    assert wrapper.eos_token_id == tok.encode_special("<|assistant_end|>")


def test_published_folder_contents(run):
    _, out, _, _ = run
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "nanochat" and config["intermediate_size"] == 4 * config["hidden_size"]
    assert config["mlxchat"]["step"] == 1 and config["mlxchat"]["stage"] == "base"
    card = (out / "README.md").read_text()
    assert "| val_bpb | 1.2345 |" in card and "mlx_lm" in card
    assert sorted(p.name for p in out.iterdir()) == [
        ".mlxchat-published", "README.md", "config.json", "model.safetensors", "token_bytes.npy",
        "tokenizer.json", "tokenizer.pkl", "tokenizer_config.json",
    ]


def test_republish_replaces_atomically(run):
    run_dir, out, _, _ = run
    (out / "stale.txt").write_text("from an older publish")
    (out.parent / ".tiny-base.tmp-999").mkdir()  # what a publish killed mid-way leaves
    result = publish(run_dir, "base", out, {"val_bpb": 0.5})
    assert result["step"] == 1 and not (out / "stale.txt").exists()
    assert "| val_bpb | 0.5000 |" in (out / "README.md").read_text()
    assert [p.name for p in out.parent.iterdir()] == ["tiny-base"]  # no temporaries left beside it


def test_publish_refuses_a_folder_of_foreign_files_and_leaves_siblings_alone(run, tmp_path):
    run_dir, _, _, _ = run
    mine = tmp_path / "mine"
    (mine / "notes").mkdir(parents=True)
    (mine / "notes" / "todo.txt").write_text("my own file")
    (mine / "config.json").write_text("{}")
    backup = tmp_path / ".mine.backup-2024"  # a user's sibling folder, named like a temporary
    backup.mkdir()
    (backup / "weights.bin").write_bytes(b"keep me")
    before = sorted((p.relative_to(tmp_path), p.read_bytes()) for p in tmp_path.rglob("*") if p.is_file())
    with pytest.raises(MlxchatError, match="already holds files that mlxchat publish did not write") as e:
        publish(run_dir, "base", mine)
    assert "\n" not in str(e.value)
    assert sorted((p.relative_to(tmp_path), p.read_bytes()) for p in tmp_path.rglob("*") if p.is_file()) == before
    empty = tmp_path / "empty"
    empty.mkdir()
    publish(run_dir, "base", empty)  # an empty folder is fine, and so is republishing there
    publish(run_dir, "base", empty)
    assert (empty / "model.safetensors").exists() and (backup / "weights.bin").read_bytes() == b"keep me"


def test_publish_without_checkpoint_is_a_user_error(run, tmp_path):
    run_dir, _, _, _ = run
    with pytest.raises(MlxchatError, match=r"mlxchat train sft --run tiny") as e:
        publish(run_dir, "sft", tmp_path / "out")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()
