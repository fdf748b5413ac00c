"""A content checksum of named tensors, written into safetensors metadata by every file this package saves
(adapters, exported models, Winograd layers) and verified on load: flipped bytes in a file whose header is intact
would otherwise load silently.  Pure torch and hashlib, so every layer of the package can use it."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable

import torch


def tensor_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """blake2b (16 bytes, hex) over the names, dtypes, shapes and bytes of ``tensors``, sorted by name."""
    return streamed_tensor_checksum(sorted(tensors), tensors.__getitem__)


def streamed_tensor_checksum(names: Iterable[str], get: Callable[[str], torch.Tensor]) -> str:
    """`tensor_checksum` of the tensors ``get(name)`` for ``names`` in the given (sorted) order, fetched one at a time
    (e.g. from an open safetensors file), so that a large file is never held in memory whole."""
    digest = hashlib.blake2b(digest_size=16)
    for name in names:
        t = get(name).detach().contiguous().cpu()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()
