"""nanochat's own checkpoints: a stage exported to nanochat's layout and imported back is the
same model bit for bit, PyTorch computes the same logits from the exported file, and a broken
nanochat directory is one line and exit 2."""

import json
import pickle
import sys
from pydoc_data.topics import topics

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from mlxchat.checkpoint import latest_checkpoint, save_checkpoint
from mlxchat.cli import main
from mlxchat.gpt import GPT, GPTConfig
from mlxchat.inference import load_model as load_trained_model
from mlxchat.optim import OptimConfig, build_optimizer
from mlxchat.tokenizer import SPECIAL_TOKENS, Tokenizer
from mlxchat.train import TrainConfig

torch = pytest.importorskip("torch")  # the `torch` extra; the `test` extra installs it, so CI runs these

CFG = GPTConfig(sequence_len=32, vocab_size=0, n_layer=2, n_head=2, n_kv_head=1, n_embd=64)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A run `src` with a small real tokenizer and a `mid` checkpoint whose weights and
    optimizer moments are all non-zero (so equality is not between zeros)."""
    root = tmp_path_factory.mktemp("home")
    rdir = root / "runs" / "src"
    tok = Tokenizer.train_from_iterator(iter(list(topics.values())[:200]), 400)
    tok.save(rdir / "tokenizer")
    cfg = GPTConfig(**{**CFG.to_dict(), "vocab_size": tok.vocab_size})
    model = GPT(cfg)
    model.init_weights(seed=3)
    noise = lambda i, v: v + 0.02 * mx.random.normal(v.shape, key=mx.random.key(i))  # noqa: E731
    model.load_weights([(k, noise(i, v)) for i, (k, v) in enumerate(tree_flatten(model.parameters()))])
    opt = build_optimizer(model, OptimConfig(), 10)
    opt.init(model.trainable_parameters())
    opt.state = tree_map(lambda a: mx.abs(mx.random.normal(a.shape)) if a.ndim == 2 else a, opt.state)
    train_cfg = TrainConfig(stage="mid", depth=2, seq_len=32, max_steps=7)
    save_checkpoint(rdir / "mid", 7, model.parameters(), opt.state,
                    {"config": train_cfg.to_dict(), "model_config": cfg.to_dict(), "num_iterations": 7, "loader": None,
                     "rng_seed": 7, "history": [], "val_bpb": 1.5})
    return root, model, tok


def cli(root, *args) -> int:
    return main(["--home", str(root), *args])


@pytest.fixture(scope="module")
def exported(home):
    root, _, _ = home
    out = root / "nanochat"
    assert cli(root, "export", "nanochat", "--run", "src", "--stage", "mid", "--out", str(out)) == 0
    return out


def test_export_writes_nanochats_layout(exported):
    folder = exported / "mid_checkpoints" / "d2"
    assert sorted(p.name for p in folder.iterdir()) == ["meta_000007.json", "model_000007.pt", "optim_000007.pt"]
    assert sorted(p.name for p in (exported / "tokenizer").iterdir()) == ["token_bytes.pt", "tokenizer.pkl"]
    meta = json.loads((folder / "meta_000007.json").read_text())
    assert set(meta["model_config"]) == {"sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd"}
    assert meta["step"] == 7 and meta["val_bpb"] == 1.5
    adamw, muon = torch.load(folder / "optim_000007.pt", weights_only=True)
    assert [g["params"] for g in adamw["param_groups"]] == [[0], [1]]
    assert sum(len(g["params"]) for g in muon["param_groups"]) == 2 * 6 == len(muon["state"])
    with open(exported / "tokenizer" / "tokenizer.pkl", "rb") as f:  # nanochat's RustBPETokenizer.from_directory
        enc = pickle.load(f)
    assert enc.encode_single_token("<|bos|>") == enc.n_vocab - len(SPECIAL_TOKENS)


def test_export_then_import_is_bitwise(home, exported):
    root, model, tok = home
    assert cli(root, "import", "nanochat", str(exported), "--run", "back", "--stage", "mid") == 0
    src, back = latest_checkpoint(root / "runs" / "src" / "mid"), latest_checkpoint(root / "runs" / "back" / "mid")
    assert back.step == 7 and back.state["model_config"] == src.state["model_config"]
    for name in ("model.safetensors", "optim.safetensors"):
        a, b = mx.load(str(src.path / name)), mx.load(str(back.path / name))
        assert sorted(a) == sorted(b)
        for k in a:
            assert a[k].dtype == b[k].dtype and np.array_equal(np.array(a[k]), np.array(b[k])), (name, k)
    assert (root / "runs" / "back" / "tokenizer" / "tokenizer.pkl").read_bytes() == \
        (root / "runs" / "src" / "tokenizer" / "tokenizer.pkl").read_bytes()
    imported, _ = load_trained_model(root / "runs" / "back" / "mid", "")
    ids = mx.array([tok.encode(topics["assert"][:300], prepend="<|bos|>")[:32]])
    expected = model(ids)
    assert float(mx.abs(expected).max()) > 0.1
    assert np.array_equal(np.array(imported(ids)), np.array(expected))


def test_pytorch_computes_the_same_logits_from_the_exported_file(home, exported):
    """nanochat's forward pass (gpt.py at c75fe54), written out in torch, on the exported state_dict."""
    _, model, tok = home
    folder = exported / "mid_checkpoints" / "d2"
    cfg = json.loads((folder / "meta_000007.json").read_text())["model_config"]
    sd = torch.load(folder / "model_000007.pt", weights_only=True)
    ids = tok.encode(topics["assert"][:300], prepend="<|bos|>")[:32]
    got = nanochat_forward(sd, cfg, torch.tensor([ids]))
    np.testing.assert_allclose(got.numpy(), np.array(model(mx.array([ids]))), atol=2e-4)


def nanochat_forward(sd, cfg, idx):
    F = torch.nn.functional
    norm = lambda x: F.rms_norm(x, (x.size(-1),))  # noqa: E731
    B, T = idx.shape
    H, KV, D = cfg["n_head"], cfg["n_kv_head"], cfg["n_embd"] // cfg["n_head"]
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    freqs = torch.outer(torch.arange(T, dtype=torch.float32), inv_freq)
    cos, sin = freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]

    def rotary(x):
        x1, x2 = x[..., : D // 2], x[..., D // 2:]
        return torch.cat([x1 * cos + x2 * sin, x1 * (-sin) + x2 * cos], dim=-1)

    x = norm(F.embedding(idx, sd["transformer.wte.weight"]))
    for i in range(cfg["n_layer"]):
        p = lambda n: sd[f"transformer.h.{i}.{n}.weight"]  # noqa: E731
        h = norm(x)
        q = rotary((h @ p("attn.c_q").T).view(B, T, H, D))
        k = rotary((h @ p("attn.c_k").T).view(B, T, KV, D))
        v = (h @ p("attn.c_v").T).view(B, T, KV, D)
        q, k = norm(q), norm(k)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                           enable_gqa=True)
        x = x + y.transpose(1, 2).reshape(B, T, -1) @ p("attn.c_proj").T
        x = x + F.relu(norm(x) @ p("mlp.c_fc").T).square() @ p("mlp.c_proj").T
    logits = norm(x) @ sd["lm_head.weight"].T
    return 15 * torch.tanh(logits / 15)


@pytest.fixture
def nanochat_dir(home, tmp_path):
    """A nanochat base dir as nanochat's scripts leave it on a GPU: wte in bfloat16, keys prefixed
    by torch.compile, no optimizer file, the tokenizer pickled with plain pickle.dump."""
    _, model, tok = home
    folder = tmp_path / "base_checkpoints" / "d2"
    folder.mkdir(parents=True)
    sd = {f"_orig_mod.{k}": torch.from_numpy(np.array(v)) for k, v in tree_flatten(model.parameters())}
    sd["_orig_mod.transformer.wte.weight"] = sd["_orig_mod.transformer.wte.weight"].bfloat16()
    torch.save(sd, folder / "model_000020.pt")
    cfg = {**CFG.to_dict(), "vocab_size": tok.vocab_size}
    (folder / "meta_000020.json").write_text(json.dumps({"step": 20, "val_bpb": 2.0, "model_config": cfg,
                                                         "user_config": {"depth": 2}, "device_batch_size": 4}))
    (tmp_path / "tokenizer").mkdir()
    with open(tmp_path / "tokenizer" / "tokenizer.pkl", "wb") as f:
        pickle.dump(tok.enc, f)
    torch.save(torch.tensor([0] * tok.vocab_size, dtype=torch.int32), tmp_path / "tokenizer" / "token_bytes.pt")
    return tmp_path


def test_a_nanochat_gpu_checkpoint_imports_and_samples(home, nanochat_dir, tmp_path):
    root, model, tok = home
    assert cli(root, "import", "nanochat", str(nanochat_dir), "--run", "gpu") == 0
    rdir = root / "runs" / "gpu"
    assert (rdir / "tokenizer" / "tokenizer.pkl").read_bytes() == (nanochat_dir / "tokenizer" / "tokenizer.pkl").read_bytes()
    imported, ck = load_trained_model(rdir / "base", "")
    assert ck.step == 20 and ck.state["val_bpb"] == 2.0 and ck.state["config"]["device_batch_size"] == 4
    wte = mx.load(str(ck.model_file))["transformer.wte.weight"]
    assert np.array_equal(np.array(wte), np.array(model.transformer.wte.weight.astype(mx.bfloat16).astype(mx.float32)))
    assert Tokenizer.load(rdir / "tokenizer").encode(topics["assert"]) == tok.encode(topics["assert"])
    # and mlxchat's commands run on it
    assert cli(root, "sample", "--run", "gpu", "--stage", "base", "--prompt", "The", "--max-tokens", "3") == 0
    assert cli(root, "publish", "--run", "gpu", "--stage", "base", "--out", str(tmp_path / "pub")) == 0
    # importing again would replace the run's model: refused
    assert cli(root, "import", "nanochat", str(nanochat_dir), "--run", "gpu") == 2


def _one_line_exit_2(capsys, root, *args) -> str:
    assert cli(root, *args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    return err


def test_wrong_shape_is_one_line_and_exit_2(home, nanochat_dir, capsys):
    root, _, _ = home
    path = nanochat_dir / "base_checkpoints" / "d2" / "model_000020.pt"
    sd = torch.load(path, weights_only=True)
    sd["_orig_mod.transformer.h.1.mlp.c_fc.weight"] = torch.zeros(100, 64)
    torch.save(sd, path)
    err = _one_line_exit_2(capsys, root, "import", "nanochat", str(nanochat_dir), "--run", "bad")
    assert "transformer.h.1.mlp.c_fc.weight: (100, 64) vs (256, 64)" in err
    assert not (root / "runs" / "bad" / "base").exists()


def test_missing_meta_is_one_line_and_exit_2(home, nanochat_dir, capsys):
    root, _, _ = home
    (nanochat_dir / "base_checkpoints" / "d2" / "meta_000020.json").unlink()
    err = _one_line_exit_2(capsys, root, "import", "nanochat", str(nanochat_dir / "base_checkpoints" / "d2"), "--run", "bad")
    assert "meta_000020.json" in err


def test_without_torch_the_error_names_the_extra(home, exported, monkeypatch, capsys):
    root, _, _ = home
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    err = _one_line_exit_2(capsys, root, "import", "nanochat", str(exported), "--run", "x", "--stage", "mid")
    assert "mlxchat[torch]" in err
    assert "mlxchat[torch]" in _one_line_exit_2(capsys, root, "export", "nanochat", "--run", "src", "--stage", "mid",
                                                 "--out", str(root / "x"))


def test_export_never_overwrites(home, exported, capsys):
    root, _, _ = home
    err = _one_line_exit_2(capsys, root, "export", "nanochat", "--run", "src", "--stage", "mid", "--out", str(exported))
    assert "model_000007.pt already exists" in err
