"""The diagnostic benchmarks that call the model's parts or MLX's kernels one by one (bench/memory_breakdown.py,
bench/attention_backward.py) still run at a tiny size: a part whose call no longer fits the model's
signature reports an error row instead of failing, so nothing else would notice. Nothing is timed."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run_bench(tmp_path, script: str, *args: str) -> dict:
    """bench/<script> run with `args` and `--json`: the report it writes."""
    out = tmp_path / "report.json"
    subprocess.run([sys.executable, str(REPO / "bench" / script), *args, "--json", str(out)],
                   check=True, capture_output=True, text=True, timeout=600)
    return json.loads(out.read_text())


def test_memory_breakdown_runs_every_part(tmp_path):
    rows = run_bench(tmp_path, "memory_breakdown.py", "--depth", "1", "--batch", "1", "--seq-len", "64", "--vocab", "256",
                     "--dtype", "float32", "--reps", "1")["rows"]
    assert len(rows) >= 10
    assert [r["part"] for r in rows if r["error"]] == []


def test_sft_steady_state_drops_the_compiling_steps_on_both_sides():
    sys.path.insert(0, str(REPO / "bench"))
    import train_loop

    widths = [256, 256, 256, 384, 256, 512, 256]  # 2 warm-up steps, then 5 timed
    loop = {"step_times_s": [0.1, 0.5, 0.1, 0.6, 0.1], "step_tokens": [8, 12, 8, 16, 8]}
    step = {"step_times_s": [0.2, 0.2, 0.4, 0.2, 0.4], "step_tokens": [8, 12, 8, 16, 8]}
    out = train_loop.steady_state({"loop": loop, "step": step}, widths, warmup=2)
    # 384 first at step 3 and 512 at step 5 compile there, and show in the loop's dt one step earlier
    assert out["dropped_steps"] == [0, 1, 2, 3]
    assert out["steps"] == 1
    assert out["loop_tok_per_s"] == 8 / 0.1 and out["step_tok_per_s"] == 8 / 0.4


def test_attention_backward_times_both_masks_at_a_tiny_size(tmp_path):
    rows = run_bench(tmp_path, "attention_backward.py", "--batch", "1", "--heads", "2", "--seq-len", "128",
                     "--head-dim", "32", "--reps", "1")["results"]
    for name in ("mlx causal", "mlx bias"):
        assert rows[name]["forward_backward_ms"] > 0 and rows[name]["forward_ms"] > 0
    assert "error" in rows["torch cudnn"] or rows["torch cudnn"]["backward_ms"] != 0
    assert "error" in rows["ours cpu"]  # bf16: the CPU's arithmetic attention does not run


def test_attention_backward_times_the_cpus_attention_in_float32(tmp_path):
    rows = run_bench(tmp_path, "attention_backward.py", "--batch", "1", "--heads", "2", "--seq-len", "64",
                     "--head-dim", "32", "--reps", "1", "--dtype", "float32")["results"]
    assert rows["ours cpu"]["forward_backward_ms"] > 0 and rows["mlx causal / ours"]["forward_ms"] > 0


def test_step_timeline_splits_a_steps_wall_time_around_its_kernels():
    sys.path.insert(0, str(REPO / "bench"))
    import kernel_profile

    def span(cat, ts, dur, name="k"):
        return {"cat": cat, "name": name, "ts": ts, "dur": dur}

    events = [span("user_annotation", 0, 1000, kernel_profile.STEP), span("user_annotation", 2000, 1000, kernel_profile.STEP),
              # step 1: first kernel at 100 us, two overlapping kernels (busy once), a gap, the last ends at 900
              span("kernel", 100, 400), span("kernel", 300, 300), span("kernel", 700, 200),
              # step 2: one kernel from 2050 to 2950; a memcpy inside it; the GPU side of the annotation is not a kernel
              span("kernel", 2050, 900), span("gpu_memcpy", 2100, 100), span("gpu_user_annotation", 2000, 1000, kernel_profile.STEP)]
    t = kernel_profile.step_timeline(events)
    assert t == pytest.approx({"wall_ms": 1.0, "before_first_ms": (0.1 + 0.05) / 2, "after_last_ms": (0.1 + 0.05) / 2,
                               "idle_ms": (0.3 + 0.1) / 2})  # step 1: 1000 - (500 + 200) busy; step 2: 1000 - 900
    assert kernel_profile.step_timeline([span("kernel", 0, 10)]) == {}  # no annotated steps: nothing to say


def test_host_dispatch_times_every_block_it_can_run_here(tmp_path):
    out = tmp_path / "host.json"
    subprocess.run([sys.executable, str(REPO / "bench" / "host_dispatch.py"), "--depth", "1", "--batch", "1",
                    "--seq-len", "64", "--vocab", "256", "--steps", "2", "--warmup", "1", "--queued", "2",
                    "--json", str(out)], check=True, capture_output=True, text=True, timeout=600)
    report = json.loads(out.read_text())
    assert {"warmup", "timed", "timed-again"} <= set(report["blocks"])
    assert all(len(b["step_times_s"]) == (1 if name == "warmup" else 2) for name, b in report["blocks"].items())
    assert report["dispatch"]["host_ms"] > 0 and report["queued"]["steps"] == 2
    assert "torch" in report or {"torch-init", "profiler", "after"} <= set(report["blocks"])
