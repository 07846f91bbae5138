"""Checkpoints: safetensors for the tensors, a small JSON pointer written last.

Writes go to a new round-stamped file first and `checkpoint.json` is replaced atomically after
it, so a crash at any moment leaves either the previous checkpoint or the new one, never a
mixture.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from koinon.errors import KoinonError
from koinon.files import atomic_write_text

POINTER = "checkpoint.json"


def save_checkpoint(out_dir: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    name = f"ckpt-{meta['round']:06d}.safetensors"
    tmp = out_dir / f".{name}.tmp"
    save_file(tensors, str(tmp))
    os.replace(tmp, out_dir / name)
    atomic_write_text(out_dir / POINTER, json.dumps({**meta, "file": name}, indent=1))
    for old in out_dir.glob("ckpt-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)
    return out_dir / name


def load_checkpoint(out_dir: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    pointer = out_dir / POINTER
    if not pointer.is_file():
        raise KoinonError(f"{out_dir} has no checkpoint ({POINTER} is missing); nothing to resume")
    meta = json.loads(pointer.read_text())
    path = out_dir / meta["file"]
    if not path.is_file():
        raise KoinonError(f"{out_dir}: checkpoint file {meta['file']} named by {POINTER} is missing")
    return meta, load_file(str(path))
