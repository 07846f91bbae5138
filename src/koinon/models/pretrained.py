"""Pretrained starts: a registered model's weights from a safetensors file (`model.init`).

The file is keyed like the model's `Layout` (parameters and float buffers by name), which is
what `koinon pretrain` and every run folder's `model.safetensors` write, so a run's result is
the next run's start. Loading is strict: every name the model has must be in the file with its
exact shape, and the file may hold nothing else; each problem is one line naming the file, the
tensor and what was expected. Values are copied as they are (float32 stays bit for bit).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from koinon.errors import ConfigError
from koinon.params import Layout


def _names(names: list[str]) -> str:
    return ", ".join(names[:4]) + (f" (and {len(names) - 4} more)" if len(names) > 4 else "")


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a missing or unreadable file is a ConfigError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"model.init = {str(p)!r}: no such file (expected a .safetensors file "
                          "written by koinon pretrain or a run's model.safetensors)")
    try:
        return load_file(str(p))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ConfigError(f"model.init = {str(p)!r}: not a safetensors file ({str(exc).splitlines()[0]})") from None


def load_weights(module: nn.Module, path: str | Path) -> None:
    """Copy the weights in `path` into `module` (names and shapes checked, nothing left out)."""
    tensors = read_weights(path)
    layout = Layout.from_module(module)
    where = f"model.init = {str(path)!r}"
    missing = [e.name for e in layout.entries if e.name not in tensors]
    if missing:
        raise ConfigError(f"{where}: the file lacks {_names(missing)} of the model")
    unexpected = sorted(set(tensors) - set(layout.names))
    if unexpected:
        raise ConfigError(f"{where}: the file holds {_names(unexpected)}, which the model does not have")
    for e in layout.entries:
        got = tuple(tensors[e.name].shape)
        if got != e.shape:
            raise ConfigError(f"{where}: {e.name} has shape {list(got)} in the file, the model needs {list(e.shape)}")
        if not torch.is_floating_point(tensors[e.name]):
            raise ConfigError(f"{where}: {e.name} is {tensors[e.name].dtype} in the file, expected a float tensor")
    flat = torch.cat([tensors[e.name].reshape(-1).to(e.dtype) for e in layout.entries])
    layout.load_into(module, flat)


def save_weights(module: nn.Module, path: str | Path) -> Path:
    """Write `module`'s parameters and float buffers as safetensors, keyed by their names."""
    from safetensors.torch import save_file

    layout = Layout.from_module(module)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp")
    save_file({k: v.detach().contiguous().clone() for k, v in layout.views(layout.flatten(module)).items()}, str(tmp))
    tmp.replace(p)
    return p
