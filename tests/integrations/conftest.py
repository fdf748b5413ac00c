"""Shared set-up for the integration tests (adapter files, the diffusers backend config, optimizer groups): one CPU
thread, tiny models from ``tests/tiny_models.py``."""

import torch

torch.set_num_threads(1)
