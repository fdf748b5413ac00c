"""Shared set-up of the Hub tests: one CPU thread, and a fake Hub (``fake_hub_server.py``) on 127.0.0.1 that
huggingface_hub is pointed at for the module, with a fresh ``HF_HOME``; the previous environment is restored after."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from fake_hub_server import FakeHubServer, hub_client_environment

torch.set_num_threads(1)


@dataclass
class HubEnv:
    server: FakeHubServer
    home: Path

    @property
    def url(self) -> str:
        return self.server.url


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def fake_hub(tmp_path_factory) -> HubEnv:
    home = tmp_path_factory.mktemp("hf_home")
    with FakeHubServer() as server, hub_client_environment(server.url, home):
        yield HubEnv(server, home)
