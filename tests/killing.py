"""Start a training command, SIGKILL it once it has written a checkpoint at or past a step; find a rank of a launched job."""

import signal
import subprocess
import time
from pathlib import Path

from mlxchat.checkpoint import latest_checkpoint


def kill_after_checkpoint(cmd, env, stage_dir, min_step: int, timeout_s: float = 120) -> int:
    """Return the step of the `latest` checkpoint the killed process left behind."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        ck = latest_checkpoint(stage_dir) if (stage_dir / "latest").is_symlink() else None
        if ck is not None and ck.step >= min_step:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return latest_checkpoint(stage_dir).step


def rank_pid(job_pid: int, rank: int, timeout_s: float = 120) -> int:
    """The pid of rank `rank` among the descendants of `job_pid` (an `mlxchat ... --np N`):
    the process whose environment has MLX_RANK=<rank>, as mlx.launch sets it."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        children: dict[int, list[int]] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                pid, ppid = int(stat.parent.name), int(stat.read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(pid)
        todo, found = [job_pid], []
        while todo:
            for child in children.get(todo.pop(), []):
                todo.append(child)
                found.append(child)
        for pid in found:
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if f"MLX_RANK={rank}".encode() in environ and b"mlxchat.cli" in cmdline:
                return pid
        time.sleep(0.05)
    raise AssertionError(f"no rank {rank} under process {job_pid}")
