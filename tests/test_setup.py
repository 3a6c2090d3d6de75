"""README's two commands work in a fresh copy of the repository with no virtual environment.

The copy holds what a clone would (git's tracked and unignored files, nothing built), the
environment is a new user's (no LD_PRELOAD, no PYTHONPATH, no virtualenv, no Prefect server);
only pip's download cache is shared, as it would be on a machine that installed anything before.
The commands are read out of README.md, so editing them there is what this test checks. The
smoke flow is run on the tiny preset (`--preset tiny` appended; argparse keeps the last), and
the test command on one small test file, to stay within CI's budget."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def readme_commands() -> tuple[str, str]:
    """The two commands of README's "Set up and run" section: the main job, then the tests."""
    section = REPO.joinpath("README.md").read_text().split("## Set up and run", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    assert len(blocks) == 2 and all(b.strip().count("\n") == 0 for b in blocks), blocks
    return blocks[0].strip(), blocks[1].strip()


def fresh_copy(dest: Path) -> Path:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name, follow_symlinks=False)
    return dest


def test_readme_commands_set_up_a_fresh_copy_and_run(tmp_path):
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs a git checkout to know which files a clone holds")
    main, tests = readme_commands()
    assert main.startswith("./setup.sh ") and "--preset smoke" in main
    assert tests.startswith("./setup.sh ") and "pytest" in tests
    ci = REPO.joinpath(".ci", "run").read_text().strip().splitlines()
    assert ci[-1] == tests, "README's test command must be what .ci/run runs"
    clone = fresh_copy(tmp_path / "clone")
    drop = {"LD_PRELOAD", "PYTHONPATH", "VIRTUAL_ENV", "PREFECT_API_URL", "PREFECT_HOME", "MLXCHAT_HOME", "PYTHONHOME"}
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("_MLXCHAT")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if Path(sys.prefix, "bin") != Path(p))  # not the suite's own venv

    def run(command: str, *extra: str) -> str:
        out = subprocess.run(["bash", "-c", f"{command} {' '.join(extra)}"], cwd=clone, env=env,
                             capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, f"{command}: {out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        return out.stdout + out.stderr

    # The test command first: it installs the test tools too, so the main job then needs no pip.
    log = run(tests, "tests/test_report.py")
    assert re.search(r"\b\d+ passed\b", log) and (clone / ".venv" / "bin" / "python").exists()
    log = run(main, "--preset", "tiny")
    assert "speedrun finished" in log and "warning: MLX is running on its slow reference BLAS" not in log
    report = clone / "artifacts" / "runs" / "tiny" / "report.md"
    assert report.read_text().startswith("# mlxchat report: tiny")
    assert (clone / "artifacts" / "published" / "tiny-sft" / "model.safetensors").exists()
