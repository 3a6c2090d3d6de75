"""Run an `mlxchat` command on several ranks through `mlx.launch`, as one call.

`mlx.launch` starts the ranks (local processes, or hosts over ssh from a hostfile) and
ends them all once one fails, but it exits 0 whatever happened and interleaves every rank's
output. This wrapper gives a caller what one process would: rank 0's result, rank 0's
progress as it happens, and on failure one `MlxchatError` naming the rank that caused it.

Protocol with the ranks (`mlxchat.cli`, when `EVENTS_ENV` is set): rank 0 prints
`@mlxchat {"progress": row}` lines while training and `@mlxchat {"result": ...}` at the end
on stdout; a rank that fails prints `error: rank N: message` on stderr.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from mlxchat.common import HOME_ENV, MlxchatError

EVENTS_ENV = "MLXCHAT_EVENTS"
EVENT_PREFIX = "@mlxchat "
BACKENDS = ("ring", "jaccl", "jaccl-ring", "nccl", "mpi")
_RANK_ENDED = re.compile(r"Node with rank (\d+) (?:exited with code (-?\d+)|was killed)")
_RANK_ERROR = re.compile(r"^error: rank (\d+): (.*)$")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_BAR = re.compile(r"[\w-]+: +\d+%\|[^|]*\|[^\]]*\]")  # a tqdm frame, as train_loop's bar draws it
# What a rank says when another one went away first: a consequence, not the cause.
PEER_LOST = ("connection to a peer was lost", "was closed by the peer", "Too many send/recv errors")


@dataclass(frozen=True)
class Ranks:
    """Where the ranks run: `np` local processes (or `np` per host), a hostfile as
    `mlx.launch --hostfile` reads it, and the backend (None: the hostfile's or MLX's default,
    NCCL where CUDA is available, ring otherwise)."""

    np: int = 1
    hostfile: str | None = None
    backend: str | None = None

    @property
    def distributed(self) -> bool:
        return self.np > 1 or self.hostfile is not None

    @property
    def size(self) -> int:
        """How many ranks: `np` per host of the hostfile (mlx.launch's -n repeats each host)."""
        if self.hostfile is None:
            return self.np
        try:
            data = json.loads(Path(self.hostfile).read_text())
            return self.np * len(data["hosts"] if isinstance(data, dict) else data)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise MlxchatError(f"hostfile {self.hostfile} is not an mlx.launch hostfile ({e})") from None

    def to_dict(self) -> dict:
        return asdict(self)

    def check(self) -> None:
        if self.np < 1:
            raise MlxchatError(f"--np must be at least 1, got {self.np}")
        if self.backend is not None and self.backend not in BACKENDS:
            raise MlxchatError(f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.hostfile is not None and not Path(self.hostfile).is_file():
            raise MlxchatError(f"hostfile {self.hostfile} does not exist; write one as the README's 'Past one machine' shows")


def launched_rank() -> int | None:
    """This process's rank when a launcher started it (ring, JACCL, NCCL set MLX_RANK; MPI its
    own variables), read without initializing MLX; None in a plain process."""
    for name in ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        if name in os.environ:
            return int(os.environ[name])
    return None


def emit(kind: str, payload) -> None:
    """One event line for the launching process (only when it asked for them)."""
    if os.environ.get(EVENTS_ENV):
        sys.stdout.write(EVENT_PREFIX + json.dumps({kind: payload}, default=str) + "\n")
        sys.stdout.flush()


def _launcher() -> list[str]:
    script = Path(sys.executable).with_name("mlx.launch")
    found = str(script) if script.exists() else shutil.which("mlx.launch")
    if found is None:
        raise MlxchatError("mlx.launch is not installed next to this Python; pip install 'mlx>=0.32'")
    return [sys.executable, found]


def _free_ports(n: int) -> int:
    """The first of `n` consecutive free local ports (the ring backend listens on port + rank)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n > 65535:
            continue
        try:
            for port in range(base, base + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise MlxchatError(f"found no {n} consecutive free local ports for the ring backend")


def launch_command(rank_command: list[str], ranks: Ranks) -> list[str]:
    """The `mlx.launch` command line that runs `rank_command` on every rank."""
    ranks.check()
    cmd = _launcher()
    if ranks.np > 1:
        cmd += ["-n", str(ranks.np)]
    env = {EVENTS_ENV: "1"}
    if ranks.hostfile:
        cmd += ["--hostfile", str(Path(ranks.hostfile).resolve())]
    else:
        cmd += ["--starting-port", str(_free_ports(ranks.np))]
        # N local CPU ranks each starting a BLAS thread per core oversubscribe the cores: share them
        # (measured on a 2-core VM: a 2-rank d2 run took 33 s instead of 58 s)
        env["OPENBLAS_NUM_THREADS"] = os.environ.get("OPENBLAS_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // ranks.np)))
    if ranks.backend:
        cmd += ["--backend", ranks.backend]
    for name in (HOME_ENV, "PYTHONPATH"):
        if os.environ.get(name):
            env[name] = os.environ[name]
    if ranks.backend == "nccl":
        env.setdefault("NCCL_NVLS_ENABLE", os.environ.get("NCCL_NVLS_ENABLE", "0"))
    for k, v in env.items():
        cmd += ["--env", f"{k}={v}"]
    return cmd + ["--", *rank_command]


def _describe(code: int) -> str:
    if code == 130:
        return "was interrupted (Ctrl-C); rerun the command to resume"
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else f"signal {-code}"
        hint = " (out of memory, or killed by hand)" if code == -signal.SIGKILL else ""
        return f"was killed by {name}{hint}"
    return f"exited with code {code}"


def culprit(ended: dict[int, int], errors: dict[int, str]) -> str | None:
    """The one line that says which rank failed first and why, from the ranks' exit codes
    (as mlx.launch reports them) and their `error:` lines; None when every rank succeeded.

    Ranks that ended because another did (terminated by the launcher, or lost their peer)
    are consequences; the cause is a rank that failed on its own."""
    failed = {r for r, c in ended.items() if c != 0} | set(errors)
    if not failed:
        return None

    def consequence(rank: int) -> bool:
        return ended.get(rank) == -signal.SIGTERM or any(p in errors.get(rank, "") for p in PEER_LOST)

    rank = min((r for r in failed if not consequence(r)), default=min(failed))
    if rank in errors:
        return f"rank {rank} of {len(ended)} failed: {errors[rank]}"
    return f"rank {rank} of {len(ended)} {_describe(ended[rank])}"


def run_mlxchat(args: list[str], ranks: Ranks, on_progress: Callable[[dict], None] | None = None,
                on_output: Callable[[str], None] | None = None):
    """Run `mlxchat <args>` under `mlx.launch`; return rank 0's result.

    `on_progress` receives rank 0's training progress rows as they come; `on_output` every
    other line without the progress bars' frames (default: all to this process's stderr as
    it comes, bars included)."""
    cmd = launch_command([sys.executable, "-m", "mlxchat.cli", *args], ranks)
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ended: dict[int, int] = {}
    errors: dict[int, str] = {}
    outcome: dict = {}
    tail: list[str] = []

    def read_stdout() -> None:
        for raw in proc.stdout:
            line = raw.decode(errors="replace")
            if line.startswith(EVENT_PREFIX):
                event = json.loads(line[len(EVENT_PREFIX):])
                if "progress" in event and on_progress is not None:
                    on_progress(event["progress"])
                outcome.update({k: v for k, v in event.items() if k != "progress"})
            elif on_output is None:
                sys.stdout.write(line)
                sys.stdout.flush()
            elif line.strip():
                on_output(line.rstrip())

    def read_stderr() -> None:
        pending = ""
        while chunk := proc.stderr.read1(65536):
            text = chunk.decode(errors="replace")
            if on_output is None:  # as it comes, progress bars and all
                sys.stderr.write(text)
                sys.stderr.flush()
            pending += text
            *lines, pending = re.split(r"[\r\n]", pending)
            for line in lines:
                line = _BAR.sub("", _ANSI.sub("", line)).strip()
                if on_output is not None and line:
                    on_output(line)
                if m := _RANK_ENDED.search(line):
                    # "was killed": the launcher ended it because another rank had failed
                    ended[int(m[1])] = int(m[2]) if m[2] is not None else -signal.SIGTERM
                elif m := _RANK_ERROR.match(line):
                    errors.setdefault(int(m[1]), m[2])
                if line:
                    tail[:] = (tail + [line])[-5:]

    readers = [threading.Thread(target=f, daemon=True) for f in (read_stdout, read_stderr)]
    for t in readers:
        t.start()
    try:
        code = proc.wait()
    except KeyboardInterrupt:  # the ranks got it too: let them finish the step and write their checkpoint
        code = proc.wait()
    for t in readers:
        t.join()
    ended = {r: ended.get(r, 0) for r in range(ranks.size)} | ended
    problem = culprit(ended, errors)
    if problem is None and code != 0:
        problem = f"mlx.launch exited with code {code}: {tail[-1] if tail else 'no output'}"
    if problem is None and "result" not in outcome:
        problem = "the ranks ended without a result from rank 0: " + (tail[-1] if tail else "no output")
    if problem is not None:
        raise MlxchatError(problem)
    return outcome["result"]
