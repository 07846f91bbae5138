"""Small file helpers shared by every driver (runner, deployment server, compute islands).

They live here, below `experiment/`, so that the process runtimes can write their outputs
without importing the simulation runner.
"""

from __future__ import annotations

import os
from pathlib import Path


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename: a reader (or a crash)
    sees the old content or the new one, never a partial file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
