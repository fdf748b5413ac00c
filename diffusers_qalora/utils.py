"""Small helpers shared by every subpackage (no dependency beyond the standard library)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write"]


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Write a file all at once or not at all: ``write(tmp)`` fills a temporary file next to ``path``, which then
    replaces ``path`` in one ``os.replace``.  If ``write`` raises, the temporary file is removed and ``path`` is left
    as it was.  Returns ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
