"""The run directory's layout, in one place (see artifacts/README.md).

Every stage reads and writes through these paths, so the layout is a contract between stages
that no other module spells: `Home` is the root (`artifacts/` or `$MLXCHAT_HOME`) with what
runs share (data shards, eval data, published models), `RunDir` one run's folder under it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from mlxchat.common import MlxchatError, check_run_name, home

MODEL_STAGES = ("base", "mid", "sft", "rl")  # trained in this order; each starts from the one before
CHAT_STAGES = MODEL_STAGES[1:]  # the stages that talk (ChatCORE, chat, serve)
LOOP_STAGES = MODEL_STAGES[:3]  # trained by train.py's loop on text or conversations (rl: rl.py), and sampled
CHAT_MODEL_STAGE = "sft"  # what the flow publishes and `mlxchat chat` talks to by default
METRICS_FILE = "metrics.jsonl"  # in a stage's folder: one JSON row per logged step
HUB_CACHE = "hub-datasets"  # `<home>/data/hub-datasets`: hub datasets' files, kept between runs


@dataclass(frozen=True)
class Home:
    """`<home>`: the runs and what they share."""

    root: Path

    @classmethod
    def resolve(cls, override: str | os.PathLike | None = None) -> Home:
        return cls(home(override))

    def run(self, name: str, must_exist: bool = False) -> RunDir:
        rdir = RunDir(self, check_run_name(name))
        if must_exist and not rdir.path.is_dir():
            raise MlxchatError(f"unknown run {name!r} (no directory {rdir.path}); train its tokenizer first: "
                               f"mlxchat tokenizer train --run {name}")
        return rdir

    def data(self, source: str) -> Path:
        """`data/<source>`: the shared shard cache of one text source."""
        return self.root / "data" / source

    @property
    def hub_cache(self) -> Path:
        return self.data(HUB_CACHE)

    @property
    def digests(self) -> Path:
        """Content digests of data files by size and mtime (provenance.cached_digests)."""
        return self.root / ".cache" / "digests.json"

    @property
    def evals(self) -> Path:
        """`evals/`: CORE's bundle (`core/`), ChatCORE's data (`chat/`) and PROVENANCE.json."""
        return self.root / "evals"

    @property
    def core_bundle(self) -> Path:
        return self.evals / "core"

    @property
    def chat_evals(self) -> Path:
        return self.evals / "chat"

    @property
    def eval_provenance(self) -> Path:
        return self.evals / "PROVENANCE.json"

    @property
    def published_root(self) -> Path:
        return self.root / "published"

    def published(self, run: str, stage: str) -> Path:
        return self.published_root / f"{run}-{stage}"

    @property
    def eval_history(self) -> Path:
        """The nightly evaluation's rows, one per evaluation."""
        return self.root / "eval_history.parquet"

    @property
    def eval_trend(self) -> Path:
        return self.root / "eval_trend.png"


@dataclass(frozen=True)
class RunDir:
    """`<home>/runs/<name>`: one run's tokenizer, checkpoints, results and records."""

    home: Home
    name: str

    @property
    def path(self) -> Path:
        return self.home.root / "runs" / self.name

    def __fspath__(self) -> str:
        return str(self.path)

    @property
    def run_json(self) -> Path:
        return self.path / "run.json"

    @property
    def timings(self) -> Path:
        return self.path / "timings.json"

    @property
    def lock(self) -> Path:
        return self.path / ".lock"

    @property
    def tokenizer(self) -> Path:
        """`tokenizer/`: tokenizer.pkl, token_bytes.npy, meta.json, tok_eval.json."""
        return self.path / "tokenizer"

    @property
    def tokenizer_meta(self) -> Path:
        return self.tokenizer / "meta.json"

    @property
    def tok_eval(self) -> Path:
        return self.tokenizer / "tok_eval.json"

    def stage(self, stage: str) -> Path:
        """A model stage's checkpoints (`step_NNNNNN/`, `latest`) and its metrics.jsonl."""
        return self.path / stage

    def metrics(self, stage: str) -> Path:
        return self.stage(stage) / METRICS_FILE

    def eval_file(self, name: str) -> Path:
        """`eval/<name>.json`: "bpb", "core" (keyed by stage) or a stage's "chat_<stage>"."""
        return self.path / "eval" / f"{name}.json"

    def chat_eval(self, stage: str) -> Path:
        return self.eval_file(f"chat_{stage}")

    def samples(self, stage: str) -> Path:
        return self.path / "samples" / f"{stage}.md"

    @property
    def report(self) -> Path:
        return self.path / "report.md"

    @property
    def plots(self) -> Path:
        return self.path / "plots"

    def plot(self, stage: str) -> Path:
        return self.plots / f"{stage}.png"

    def step_record(self, step: str) -> Path:
        """`.steps/<step>.json`: what a pipeline step's outputs were made from and their digests."""
        return self.path / ".steps" / f"{step}.json"

    def published(self, stage: str) -> Path:
        return self.home.published(self.name, stage)


def run_dir(run: str, root: str | os.PathLike | None = None, must_exist: bool = False) -> RunDir:
    """The run `run` under `root` (else `$MLXCHAT_HOME`, else ./artifacts); with `must_exist`,
    a missing run is a user error."""
    return Home.resolve(root).run(run, must_exist)
