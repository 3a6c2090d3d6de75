"""Start a training command, SIGKILL it once it has written a checkpoint at or past a step."""

import signal
import subprocess
import time

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
