"""Shared fixtures: a Hub-compatible HTTP server on loopback (``hub_server``) and an env pointing at it (``hub_env``)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.hub_server import LoopbackHub

FAKE_TOKEN = "hf_saftTestTokenDoNotLog0123456789"


@pytest.fixture(scope="session")
def hub_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackHub]:
    """One loopback Hub for the whole session, stopped at the end."""
    server = LoopbackHub(tmp_path_factory.mktemp("loopback-hub")).start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class HubEnv:
    endpoint: str
    token: str
    hf_home: Path
    server: LoopbackHub


@pytest.fixture
def hub_env(hub_server: LoopbackHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> HubEnv:
    """Point huggingface_hub at the loopback Hub with a fresh cache and a fake token, online, without Xet.

    huggingface_hub reads these settings into ``huggingface_hub.constants`` at import, so the constants
    are patched too (nothing is reloaded); monkeypatch restores everything after the test.
    """
    from huggingface_hub import constants

    hf_home = tmp_path / "hf_home"
    hub_cache = hf_home / "hub"
    hub_cache.mkdir(parents=True)
    env = {
        "HF_ENDPOINT": hub_server.url,
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(hub_cache),
        "HF_HUB_OFFLINE": "0",
        "TRANSFORMERS_OFFLINE": "0",
        "HF_HUB_DISABLE_XET": "1",
        "HF_TOKEN": FAKE_TOKEN,
        "SAFT_HF_CACHE": str(hf_home / "saft"),  # conversion-branch pairings of bases, per test
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    patched = {
        "ENDPOINT": hub_server.url,
        "HUGGINGFACE_CO_URL_TEMPLATE": hub_server.url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_URL_HOSTS": frozenset(constants.HF_URL_HOSTS | {"127.0.0.1"}),
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_XET": True,
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(hub_cache),
        "HF_ASSETS_CACHE": str(hf_home / "assets"),
        "HF_XET_CACHE": str(hf_home / "xet"),
        "HF_TOKEN_PATH": str(hf_home / "token"),
        "HF_STORED_TOKENS_PATH": str(hf_home / "stored_tokens"),
    }
    for name, value in patched.items():
        monkeypatch.setattr(constants, name, value)
    return HubEnv(endpoint=hub_server.url, token=FAKE_TOKEN, hf_home=hf_home, server=hub_server)
