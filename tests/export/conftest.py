"""Shared set-up of the export tests: one CPU thread (the build machines are shared)."""

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
