"""What the sandbox costs per program: a bare `python -I` run of the same program against
`run_program` with every layer and with namespaces left out, interleaved in one run.

    python bench/sandbox_overhead.py [--programs 40] [--json FILE]

Two programs: `pass` (pure start-up cost) and a HumanEval-sized one (imports, a function,
asserts). Prints milliseconds per program and each variant's ratio to the bare run; the
layers in force are printed too, so a figure says what it paid for.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROGRAMS = {
    "pass": "pass",
    "humaneval-like": (
        "from typing import List\nimport math, re, collections\n"
        "def f(xs: List[int]) -> int:\n    return sum(x * x for x in xs if x % 2)\n"
        "def check(c):\n    assert c([1, 2, 3]) == 10\n    assert c([]) == 0\n    assert c(list(range(100))) == 166650\n"
        "check(f)\n"
    ),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--programs", type=int, default=40, help="runs of each program per variant")
    ap.add_argument("--json")
    args = ap.parse_args()
    from mlxchat.evaluation.sandbox import run_program

    variants = {
        "bare python -I": lambda code: subprocess.run([sys.executable, "-I", "-c", code], check=True),
        "sandbox, no namespaces": lambda code: _passed(run_program(code, namespaces=False)),
        "sandbox, every layer": lambda code: _passed(run_program(code)),
    }
    print("layers:", {k: v or "in force" for k, v in run_program("pass").layers.items()})
    results = {}
    for name, code in PROGRAMS.items():
        seconds = {variant: 0.0 for variant in variants}
        for _ in range(args.programs):
            for variant, run in variants.items():  # interleaved: machine noise hits all alike
                t0 = time.perf_counter()
                run(code)
                seconds[variant] += time.perf_counter() - t0
        bare = seconds["bare python -I"]
        results[name] = {v: {"ms": 1000 * s / args.programs, "ratio": s / bare} for v, s in seconds.items()}
        for variant, r in results[name].items():
            print(f"{name:15s} {variant:24s} {r['ms']:7.1f} ms/program  {r['ratio']:.2f}x bare")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def _passed(result) -> None:
    if not result.passed:
        raise SystemExit(f"the program did not pass in the sandbox: {result.status}\n{result.stderr}")


if __name__ == "__main__":
    main()
