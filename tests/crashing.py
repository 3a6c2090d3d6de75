"""SIGKILL a writer at every line it executes, and check what the next run finds.

Run as a script (`python tests/crashing.py checkpoint|metrics DIR`) in a fresh process: each kill
point is a forked child that traces the module under test and SIGKILLs itself on its Nth line.
The parent never runs an MLX operation (a child forked after one would hang in MLX's threads),
so everything it checks is plain files: manifests, digests, JSON. Prints one JSON object.
"""

import json
import os
import shutil
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlxchat import checkpoint as ck  # noqa: E402
from mlxchat import common, train  # noqa: E402


def _in_child(fn, kill_at: int | None, files: set[str], where: Path) -> bool:
    """Run `fn` in a forked child, SIGKILLed at its `kill_at`-th traced line (None: never).
    True if the child was killed, False if it finished first."""
    pid = os.fork()
    if pid == 0:
        if kill_at is not None:
            count = 0

            def local(frame, event, arg):
                nonlocal count
                if event == "line":
                    count += 1
                    if count == kill_at:
                        where.write_text(f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno} ({frame.f_code.co_name})")
                        os.kill(os.getpid(), signal.SIGKILL)
                return local

            sys.settrace(lambda frame, event, arg: local if frame.f_code.co_filename in files else None)
        try:
            fn()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def _save(stage: Path, step: int, value: float):
    def run():
        import mlx.core as mx

        ck.save_checkpoint(stage, step, {"w": mx.full((8, 4), value)}, {"m": mx.full((4,), value)}, {"value": value})
    return run


def _intact(path: Path) -> bool:
    """Every file the checkpoint's manifest names holds exactly the recorded bytes."""
    entries = json.loads((path / ck.MANIFEST).read_text())
    return all(common.sha256_file(path / name) == e["sha256"] for name, e in entries.items())


def checkpoint_kills(base: Path) -> dict:
    """Kill `save_checkpoint` at every line, saving a new step (3) and rewriting the step that
    `latest` names (2). After each kill, the next run (recover + the checks a resume does)
    must find an intact checkpoint of step 2 or the new one, and a following save must work
    and leave no temporaries."""
    files = {ck.__file__}
    template = base / "template"
    for step in (1, 2):
        assert not _in_child(_save(template, step, float(step)), None, files, base / "where")
    results = []
    for new_step, value in ((3, 3.0), (2, 20.0)):
        n = 0
        while True:
            n += 1
            work = base / f"s{new_step}-{n}"
            shutil.copytree(template, work, symlinks=True)
            killed = _in_child(_save(work, new_step, value), n, files, base / "where")
            if not killed:
                break
            where = (base / "where").read_text()
            try:
                ck.recover(work)
                latest = ck.latest_checkpoint(work)
                found = (latest.step, latest.state["value"]) if latest else None
                ok = found in ((2, 2.0), (new_step, value)) and _intact(latest.path)
                assert not _in_child(_save(work, 4, 4.0), None, files, base / "where")
                leftovers = [p.name for p in work.iterdir() if p.name.startswith(".")]
                ok = ok and not leftovers and ck.latest_checkpoint(work).step == 4
            except Exception as e:  # noqa: BLE001 - reported, the test fails on it
                found, ok = repr(e), False
            results.append({"kill": n, "at": where, "found": found, "ok": ok})
            shutil.rmtree(work)
    return {"results": results}


def metrics_kills(base: Path) -> dict:
    """Kill the metrics rewrite of a resume (`truncate_metrics`) at every line: the log is then
    the old one or the truncated one, never empty or half-written, and the next run's rewrite
    (after the run lock's sweep of dead temporaries) leaves no temporary behind."""
    files = {train.__file__, common.__file__}
    rows = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 9)]
    old = "".join(r + "\n" for r in rows) + '{"step": 9, "lo'  # a line cut short by an earlier kill
    truncated = "".join(r + "\n" for r in rows[:5])
    results, n = [], 0
    while True:
        n += 1
        work = base / f"m{n}"
        work.mkdir()
        metrics = work / "metrics.jsonl"
        metrics.write_text(old)
        killed = _in_child(lambda: train.truncate_metrics(metrics, 5), n, files, base / "where")
        if not killed:
            ok = metrics.read_text() == truncated
            results.append({"kill": None, "at": "finished", "found": None, "ok": ok})
            break
        found = metrics.read_text()
        common.sweep_temporaries(work)
        train.truncate_metrics(metrics, 5)
        ok = found in (old, truncated) and metrics.read_text() == truncated and os.listdir(work) == ["metrics.jsonl"]
        results.append({"kill": n, "at": (base / "where").read_text(), "found": len(found), "ok": ok})
        shutil.rmtree(work)
    return {"results": results}


if __name__ == "__main__":
    what, base = sys.argv[1], Path(sys.argv[2])
    print(json.dumps({"checkpoint": checkpoint_kills, "metrics": metrics_kills}[what](base)))
