"""Shared set-up for the Winograd tests: one CPU thread (the build machines are shared)."""

import torch

torch.set_num_threads(1)
