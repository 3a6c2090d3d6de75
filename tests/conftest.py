"""Shared fixtures: a fake Hugging Face Hub on localhost, and the smoke corpus built once."""

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
