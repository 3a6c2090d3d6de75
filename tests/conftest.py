"""Shared fixtures: a fake Hugging Face Hub on localhost, the smoke corpus built once, and one
Prefect test server for the session (it takes tens of seconds to start here)."""

import pytest

from hubserver import FakeHub


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
    from mlxchat.dataset import prepare_smoke

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
