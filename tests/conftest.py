"""Test-wide settings (one torch thread per process, so tests, Ray workers and servers share the cores fairly) and
shared fixtures."""

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402  (the thread count must be set before torch starts its pool)

torch.set_num_threads(1)


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """The Hugging Face hub switched off and vqbatch's cache empty: returns the folder hub snapshots are read from."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once at import
    monkeypatch.setenv("VQBATCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "hub"
