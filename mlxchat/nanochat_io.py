"""nanochat's own checkpoints in and out: `model_<step>.pt` + `meta_<step>.json` (+ `optim_<step>.pt`)
and `tokenizer/tokenizer.pkl` + `token_bytes.pt`, in the layout nanochat's checkpoint_manager reads.

A model trained with nanochat on GPUs becomes an ordinary mlxchat run stage (evaluate, chat,
serve, publish, train the next stage from it), and any mlxchat stage becomes a nanochat base
directory (`NANOCHAT_BASE_DIR`). Parameter names are the same on both sides (gpt.py follows
nanochat), so weights map 1:1; only the containers differ. nanochat keeps `wte` in bfloat16 on
CUDA: it is widened to float32 on import, which is exact.

The optimizer state maps 1:1 as well: torch's AdamW `exp_avg`/`exp_avg_sq` are MLX AdamW's
`m`/`v`, and nanochat Muon's `momentum_buffer` is MLX Muon's `v` (both lerp towards the
gradient). A torch optimizer state_dict numbers parameters across its groups in order;
nanochat's AdamW groups are [lm_head, wte], its Muon groups the block matrices by size (in
the iteration order of a set of sizes, which CPython makes the same here as there).

torch is an optional extra (`pip install 'mlxchat[torch]'`): only this module imports it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from mlxchat import checkpoint as ckpt_lib
from mlxchat.common import MlxchatError, atomic_path, atomic_write_json
from mlxchat.gpt import GPT, GPTConfig
from mlxchat.rundir import run_dir
from mlxchat.tokenizer import PICKLE_NAME, SPECIAL_TOKENS, Tokenizer

# mlxchat model stage -> nanochat's checkpoint folder under its base dir (checkpoint_manager.load_model)
CHECKPOINT_DIRS = {"base": "base_checkpoints", "mid": "mid_checkpoints", "sft": "chatsft_checkpoints",
                   "rl": "chatrl_checkpoints"}
TOKEN_BYTES_PT = "token_bytes.pt"
COMPILE_PREFIX = "_orig_mod."  # torch.compile'd modules prefix every key with it
ADAMW_PARAMS = ["lm_head.weight", "transformer.wte.weight"]  # nanochat's adam_groups order


def _torch():
    try:
        import torch
    except ImportError:
        raise MlxchatError("nanochat checkpoints are PyTorch files: install the extra, pip install 'mlxchat[torch]'") from None
    return torch


# -- import ----------------------------------------------------------------------------------


def find_checkpoint(source: Path, stage: str, model_tag: str | None = None, step: int | None = None) -> tuple[Path, int]:
    """The checkpoint folder and step inside a nanochat base dir (or a checkpoint folder given
    directly), chosen as checkpoint_manager does: the deepest `d<N>` tag, the last step."""
    source = Path(source)
    if not source.is_dir():
        raise MlxchatError(f"{source} is not a directory; give a nanochat base dir (NANOCHAT_BASE_DIR) or a checkpoint folder")
    if any(source.glob("model_*.pt")):
        folder = source
    else:
        parent = source / CHECKPOINT_DIRS[stage]
        tags = sorted((p.name for p in parent.iterdir() if p.is_dir()), key=_tag_depth, reverse=True) if parent.is_dir() else []
        if model_tag is None and not tags:
            raise MlxchatError(f"no nanochat {stage} checkpoints in {parent}; pass the folder holding model_<step>.pt")
        folder = parent / (model_tag or tags[0])
    steps = sorted(int(m.group(1)) for p in folder.glob("model_*.pt") if (m := re.fullmatch(r"model_(\d+)\.pt", p.name)))
    if not steps:
        raise MlxchatError(f"no model_<step>.pt in {folder}")
    if step is not None and step not in steps:
        raise MlxchatError(f"no model_{step:06d}.pt in {folder} (steps there: {', '.join(map(str, steps))})")
    return folder, steps[-1] if step is None else step


def _tag_depth(tag: str) -> int:
    m = re.fullmatch(r"d(\d+)", tag)
    return int(m.group(1)) if m else -1


def _tokenizer_dir(source: Path, folder: Path) -> Path:
    """nanochat keeps the tokenizer in `<base dir>/tokenizer/`; a checkpoint folder is two below it."""
    for base in (Path(source), folder.parent.parent, folder):
        if (base / "tokenizer" / PICKLE_NAME).exists():
            return base / "tokenizer"
    raise MlxchatError(f"no tokenizer/{PICKLE_NAME} in {source} or {folder.parent.parent}; copy nanochat's tokenizer folder too")


def read_nanochat_checkpoint(folder: Path, step: int) -> tuple[GPTConfig, dict, dict | None, dict]:
    """(model config, fp32 weights, MLX optimizer state or None, meta) of one nanochat checkpoint,
    with every name and shape checked against the meta's model_config."""
    torch = _torch()
    meta_path = folder / f"meta_{step:06d}.json"
    if not meta_path.exists():
        raise MlxchatError(f"no {meta_path.name} beside model_{step:06d}.pt in {folder}; nanochat writes both: copy it too")
    try:
        meta = json.loads(meta_path.read_text())
        cfg = GPTConfig(**meta["model_config"]).validated()
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise MlxchatError(f"{meta_path} has no valid model_config ({type(e).__name__}: {e})") from None
    model_path = folder / f"model_{step:06d}.pt"
    try:
        state = torch.load(model_path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, not a torch file, pickled code (weights_only refuses it)
        raise MlxchatError(f"cannot read {model_path} ({type(e).__name__}: {e}); copy it again") from None
    if not isinstance(state, dict):
        raise MlxchatError(f"{model_path} holds a {type(state).__name__}, not a state_dict")
    weights = {k.removeprefix(COMPILE_PREFIX): _to_mx(v) for k, v in state.items()}
    _check_shapes(weights, cfg, f"{model_path} does not match model_config in {meta_path.name}")
    optim_path = folder / f"optim_{step:06d}.pt"
    optim = None
    if optim_path.exists():
        try:
            saved = torch.load(optim_path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise MlxchatError(f"cannot read {optim_path} ({type(e).__name__}: {e}); copy it again or delete it") from None
        optim = optimizer_from_torch(saved, cfg, weights, step)
    return cfg, weights, optim, meta


def _to_mx(t) -> mx.array:
    return mx.array(t.detach().float().numpy())


def _check_shapes(weights: dict, cfg: GPTConfig, what: str) -> None:
    expected = {k: tuple(v.shape) for k, v in tree_flatten(GPT(cfg).parameters())}
    got = {k: tuple(v.shape) for k, v in weights.items()}
    if expected != got:
        diff = [f"{k}: {got.get(k, 'missing')} vs {expected.get(k, 'unexpected')}"
                for k in sorted(set(expected) | set(got)) if expected.get(k) != got.get(k)]
        raise MlxchatError(f"{what} (file vs config: {'; '.join(diff[:3])})")


def _matrix_groups(cfg: GPTConfig) -> list[list[str]]:
    """nanochat Muon's param groups: block matrices in module order, grouped by element count in
    the iteration order of the set of counts (as `Muon.__init__` builds them)."""
    shapes = [(k, v.size) for k, v in tree_flatten(GPT(cfg).parameters()) if k.startswith("transformer.h.")]
    return [[k for k, n in shapes if n == size] for size in {n for _, n in shapes}]


def _fresh_optimizer(cfg: GPTConfig, weights: dict):
    from mlxchat.optim import OptimConfig, build_optimizer

    model = GPT(cfg)
    model.load_weights(list(weights.items()))
    opt = build_optimizer(model, OptimConfig(), 1)
    opt.init(model.trainable_parameters())
    return opt


def optimizer_from_torch(saved, cfg: GPTConfig, weights: dict, step: int) -> dict:
    """nanochat's `[adamw.state_dict(), muon.state_dict()]` as mlxchat's MultiOptimizer state
    (lm_head AdamW, wte AdamW, Muon). A parameter without state in the file (nanochat under DDP
    saves rank 0's shards only), or every parameter when `saved` is None, keeps zero moments."""
    if saved is None:
        saved = [{"state": {}, "param_groups": [{"params": [i]} for i in range(len(ADAMW_PARAMS))]},
                 {"state": {}, "param_groups": [{"params": [None] * len(g)} for g in _matrix_groups(cfg)]}]
    if not (isinstance(saved, list) and len(saved) == 2 and all(isinstance(s, dict) and "state" in s for s in saved)):
        raise MlxchatError("the nanochat optimizer file is not [adamw.state_dict(), muon.state_dict()]; delete it to import without it")
    flat = dict(tree_flatten(_fresh_optimizer(cfg, weights).state))
    adamw, muon = saved
    for name, index in _numbered(adamw, [[n] for n in ADAMW_PARAMS]):
        for mine, theirs in (("m", "exp_avg"), ("v", "exp_avg_sq")):
            _put(flat, f"states.{ADAMW_PARAMS.index(name)}.{name}.{mine}", adamw["state"].get(index, {}).get(theirs))
    for name, index in _numbered(muon, _matrix_groups(cfg)):
        _put(flat, f"states.2.{name}.v", muon["state"].get(index, {}).get("momentum_buffer"))
    # the optimizer's own counters: torch AdamW keeps its step per parameter, the LRs and Muon's
    # momentum per group (the schedules recompute them on the next update)
    saved_step = adamw["state"].get(0, {}).get("step")
    step = int(saved_step) if saved_step is not None else step
    groups = [*adamw["param_groups"], muon["param_groups"][0] if muon["param_groups"] else {}]
    for i, group in enumerate(groups):
        flat[f"states.{i}.step"] = mx.array(step, dtype=mx.uint64)
        if isinstance(group.get("lr"), float):
            flat[f"states.{i}.learning_rate"] = mx.array(group["lr"], dtype=mx.float32)
    if isinstance(groups[2].get("momentum"), float):
        flat["states.2.momentum"] = mx.array(groups[2]["momentum"], dtype=mx.float32)
    return tree_unflatten(list(flat.items()))


def _numbered(state_dict: dict, groups: list[list[str]]):
    """(parameter name, torch state index) pairs: torch numbers parameters across groups in order."""
    saved_groups = state_dict.get("param_groups", [])
    if [len(g.get("params", [])) for g in saved_groups] != [len(g) for g in groups]:
        raise MlxchatError("the nanochat optimizer file's param groups do not match this model; delete it to import without it")
    for names, group in zip(groups, saved_groups):
        yield from zip(names, group["params"])


def _put(flat: dict, key: str, tensor) -> None:
    if tensor is not None and tuple(tensor.shape) == flat[key].shape:
        flat[key] = _to_mx(tensor)


def import_nanochat(source: str | os.PathLike, run: str, stage: str = "base", model_tag: str | None = None,
                    step: int | None = None, root=None) -> dict:
    """A nanochat checkpoint (+ its tokenizer) as the `stage` checkpoint of run `run`.

    Refuses to replace what the run already has (a different tokenizer, a stage with
    checkpoints): importing never destroys a user's model."""
    _torch()  # before anything else: without it nothing below can be read
    if stage not in CHECKPOINT_DIRS:
        raise MlxchatError(f"unknown stage {stage!r}; expected one of {', '.join(CHECKPOINT_DIRS)}")
    source = Path(source).expanduser()
    folder, step = find_checkpoint(source, stage, model_tag, step)
    tok_dir = _tokenizer_dir(source, folder)
    tok = Tokenizer.load(tok_dir)
    cfg, weights, optim, meta = read_nanochat_checkpoint(folder, step)
    if tok.vocab_size > cfg.vocab_size:
        raise MlxchatError(f"tokenizer {tok_dir} has {tok.vocab_size} tokens but the model {cfg.vocab_size}: "
                           f"they come from different nanochat runs")
    _check_token_bytes(tok_dir, tok)
    rdir = run_dir(run, root)
    stage_dir = rdir.stage(stage)
    if ckpt_lib.latest_checkpoint(stage_dir) is not None:
        raise MlxchatError(f"run {run!r} already has a {stage} checkpoint in {stage_dir}; import into another --run")
    pkl = (tok_dir / PICKLE_NAME).read_bytes()
    ours = rdir.tokenizer / PICKLE_NAME
    if ours.exists() and ours.read_bytes() != pkl:
        raise MlxchatError(f"run {run!r} has another tokenizer ({ours}); import into another --run")
    if not ours.exists():
        tok.save(rdir.tokenizer)  # token_bytes.npy; then the pickle byte for byte as nanochat wrote it
        with atomic_path(ours) as tmp:
            shutil.copyfile(tok_dir / PICKLE_NAME, tmp)
    if optim is None:  # nanochat's SFT and RL save none: moments start at zero, as a fresh optimizer's
        optim = optimizer_from_torch(None, cfg, weights, step)
    state = imported_state(stage, cfg, step, meta, {"path": str(folder), "step": step, "optimizer": (folder / f"optim_{step:06d}.pt").exists()})
    path = ckpt_lib.save_checkpoint(stage_dir, step, tree_unflatten(list(weights.items())), optim, state)
    return {"run": run, "stage": stage, "checkpoint": str(path), "step": step, "source": str(folder),
            "model_config": cfg.to_dict(), "optimizer": state["imported_from"]["optimizer"],
            "tokenizer": str(rdir.tokenizer)}


def _check_token_bytes(tok_dir: Path, tok: Tokenizer) -> None:
    """token_bytes.pt must describe this tokenizer; mlxchat recomputes its own from the raw
    token bytes (bits per byte needs them), so the file is only checked."""
    path = tok_dir / TOKEN_BYTES_PT
    if not path.exists():
        return
    try:
        n = len(_torch().load(path, map_location="cpu", weights_only=True))
    except Exception as e:
        raise MlxchatError(f"cannot read {path} ({type(e).__name__}: {e}); copy it again or delete it") from None
    if n != tok.vocab_size:
        raise MlxchatError(f"{path} has {n} entries but {tok_dir / PICKLE_NAME} {tok.vocab_size} tokens: they come from different runs")


def imported_state(stage: str, cfg: GPTConfig, step: int, meta: dict, origin: dict) -> dict:
    """state.json of an imported checkpoint: a finished stage of `step` steps, trained with the
    settings nanochat's meta records (what the next stage and the report read)."""
    from mlxchat.train import TrainConfig, stage_validation

    user = meta.get("user_config", {}) if isinstance(meta.get("user_config"), dict) else {}
    known = {"device_batch_size": meta.get("device_batch_size", user.get("device_batch_size")),
             "total_batch_size": user.get("total_batch_size")}
    train_cfg = TrainConfig(stage=stage, depth=cfg.n_layer, seq_len=cfg.sequence_len, max_steps=max(step, 1),
                            **{k: v for k, v in known.items() if isinstance(v, int)})
    metric = stage_validation(stage).metric
    value = meta.get(metric)
    return {"config": train_cfg.to_dict(), "model_config": cfg.to_dict(), "num_iterations": step, "loader": None,
            "rng_seed": step, "history": [], metric: value if isinstance(value, (int, float)) else None,
            "imported_from": {**origin, "meta": meta}}


# -- export ----------------------------------------------------------------------------------


def export_nanochat(run: str, stage: str, out: str | os.PathLike, root=None) -> dict:
    """A stage's latest checkpoint as a nanochat base dir: `<out>/<stage>_checkpoints/d<depth>/`
    {model,meta[,optim]}_<step>.pt/json and `<out>/tokenizer/` {tokenizer.pkl, token_bytes.pt}.
    Each file is written atomically; an existing checkpoint of the same step or a different
    tokenizer in `out` is never overwritten."""
    torch = _torch()
    if stage not in CHECKPOINT_DIRS:
        raise MlxchatError(f"unknown stage {stage!r}; expected one of {', '.join(CHECKPOINT_DIRS)}")
    rdir = run_dir(run, root, must_exist=True)
    ck = ckpt_lib.require_checkpoint(rdir.stage(stage), f"train it first: mlxchat train {stage} --run {run}")
    cfg = GPTConfig(**ck.state["model_config"])
    tok = Tokenizer.load(rdir.tokenizer)
    try:
        weights = mx.load(str(ck.model_file))
    except (RuntimeError, ValueError, OSError) as e:
        raise MlxchatError(f"cannot read {ck.model_file} ({e}); the checkpoint is damaged") from None
    _check_shapes(weights, cfg, f"{ck.model_file} does not match its model_config")
    out = Path(out).expanduser()
    folder = out / CHECKPOINT_DIRS[stage] / f"d{cfg.n_layer}"
    names = {kind: folder / f"{kind}_{ck.step:06d}.{'json' if kind == 'meta' else 'pt'}" for kind in ("model", "meta", "optim")}
    taken = [p for p in names.values() if p.exists()]
    if taken:
        raise MlxchatError(f"{taken[0]} already exists; export to another --out or move it away")
    tok_out = out / "tokenizer"
    pkl = (rdir.tokenizer / PICKLE_NAME).read_bytes()
    if (tok_out / PICKLE_NAME).exists() and (tok_out / PICKLE_NAME).read_bytes() != pkl:
        raise MlxchatError(f"{tok_out / PICKLE_NAME} is another tokenizer; export to another --out")
    folder.mkdir(parents=True, exist_ok=True)
    tok_out.mkdir(parents=True, exist_ok=True)

    def save(obj, path: Path) -> None:
        with atomic_path(path) as tmp:
            torch.save(obj, tmp)

    save({k: torch.from_numpy(np.array(v)) for k, v in weights.items()}, names["model"])
    optim_file = ck.path / "optim.safetensors"
    if optim_file.exists():
        save(optimizer_to_torch(dict(mx.load(str(optim_file))), cfg, torch), names["optim"])
    if not (tok_out / PICKLE_NAME).exists():
        save(torch.tensor(nanochat_token_bytes(tok), dtype=torch.int32), tok_out / TOKEN_BYTES_PT)
        with atomic_path(tok_out / PICKLE_NAME) as tmp:
            tmp.write_bytes(pkl)
    atomic_write_json(names["meta"], nanochat_meta(ck, cfg))  # last: nanochat finds a step by its model file
    return {"run": run, "stage": stage, "step": ck.step, "out": str(out), "checkpoint_dir": str(folder),
            "files": sorted(str(p) for p in names.values() if p.exists())}


def nanochat_token_bytes(tok: Tokenizer) -> list[int]:
    """token_bytes as nanochat's tok_train computes them: UTF-8 length of each decoded token,
    0 for special tokens (a partial UTF-8 token decodes to a 3-byte replacement character)."""
    special = {tok.encode_special(s) for s in SPECIAL_TOKENS}
    return [0 if i in special else len(tok.decode([i]).encode("utf-8")) for i in range(tok.vocab_size)]


def nanochat_meta(ck: ckpt_lib.Checkpoint, cfg: GPTConfig) -> dict:
    """meta_<step>.json with the keys nanochat's scripts write (model_config is what
    checkpoint_manager.build_model reads)."""
    config = ck.state.get("config", {})
    meta = {"step": ck.step, "model_config": cfg.to_dict(), "user_config": config,
            "device_batch_size": config.get("device_batch_size"), "max_seq_len": cfg.sequence_len}
    for metric in ("val_bpb", "val_loss"):
        if ck.state.get(metric) is not None:
            meta[metric] = ck.state[metric]
    return meta


def optimizer_to_torch(flat: dict, cfg: GPTConfig, torch) -> list[dict]:
    """mlxchat's MultiOptimizer state as nanochat's `[adamw.state_dict(), muon.state_dict()]`."""
    def t(key):
        return torch.from_numpy(np.array(flat[key]))

    step = float(np.array(flat["states.0.step"]))
    adam_state = {i: {"step": torch.tensor(step), "exp_avg": t(f"states.{i}.{name}.m"), "exp_avg_sq": t(f"states.{i}.{name}.v")}
                  for i, name in enumerate(ADAMW_PARAMS)}
    adamw = {"state": adam_state, "param_groups": [
        {"params": [i], "betas": (0.8, 0.95), "eps": 1e-10, "weight_decay": 0.0, "lr": float(np.array(flat[f"states.{i}.learning_rate"])),
         "amsgrad": False, "maximize": False, "foreach": None, "capturable": False, "differentiable": False, "fused": True,
         "initial_lr": float(np.array(flat[f"states.{i}.learning_rate"]))}
        for i in range(len(ADAMW_PARAMS))]}
    groups, muon_state, index = [], {}, 0
    for names in _matrix_groups(cfg):
        ids = list(range(index, index + len(names)))
        muon_state.update({i: {"momentum_buffer": t(f"states.2.{n}.v")} for i, n in zip(ids, names)})
        groups.append({"params": ids, "lr": float(np.array(flat["states.2.learning_rate"])),
                       "momentum": float(np.array(flat["states.2.momentum"])), "nesterov": True, "ns_steps": 5,
                       "initial_lr": float(np.array(flat["states.2.learning_rate"]))})
        index += len(names)
    return [adamw, {"state": muon_state, "param_groups": groups}]
