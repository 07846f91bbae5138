"""Flat parameters: a model's state as one contiguous 1-D tensor plus a `Layout`.

Aggregators and codecs work on flat tensors and on stacks of them (`[n, P]`), which turns
aggregation into a few vectorized kernels instead of Python loops over layers. The layout
records, in order, each entry's name, shape, dtype and offset. Trainable parameters come first
(`num_trainable` elements), then floating-point buffers (e.g. BatchNorm statistics), so an
optimizer step is one slice `flat[..., :num_trainable]` and algorithms such as FedBN can keep the
buffer tail local.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from math import prod

import torch
from torch import nn


@dataclass(frozen=True)
class Entry:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int
    trainable: bool

    @property
    def numel(self) -> int:
        return prod(self.shape)


@dataclass(frozen=True)
class Layout:
    """Ordered description of a flat parameter vector."""

    entries: tuple[Entry, ...]

    @staticmethod
    def from_module(module: nn.Module) -> Layout:
        entries: list[Entry] = []
        offset = 0
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            entries.append(Entry(name, tuple(p.shape), p.dtype, offset, True))
            offset += p.numel()
        frozen = [(n, p) for n, p in module.named_parameters() if not p.requires_grad]
        for name, b in [*frozen, *module.named_buffers()]:
            if not torch.is_floating_point(b):
                continue  # integer buffers (e.g. num_batches_tracked) are not averaged
            entries.append(Entry(name, tuple(b.shape), b.dtype, offset, False))
            offset += b.numel()
        return Layout(tuple(entries))

    @property
    def numel(self) -> int:
        return sum(e.numel for e in self.entries)

    @property
    def num_trainable(self) -> int:
        return sum(e.numel for e in self.entries if e.trainable)

    @property
    def has_buffers(self) -> bool:
        return any(not e.trainable for e in self.entries)

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    def hash(self) -> str:
        """Stable hex digest of names, shapes and dtypes: two peers agree on it or refuse."""
        desc = [[e.name, list(e.shape), str(e.dtype), e.trainable] for e in self.entries]
        return hashlib.sha256(json.dumps(desc).encode()).hexdigest()[:16]

    def flatten(self, module: nn.Module) -> torch.Tensor:
        """Copy a module's parameters and float buffers into a new flat float32 tensor."""
        state: dict[str, torch.Tensor] = dict(module.named_parameters())
        state.update(dict(module.named_buffers()))
        return torch.cat([state[e.name].detach().reshape(-1).float() for e in self.entries])

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Name -> view into `flat` (shape `[P]` or stacked `[K, P]`), no copies."""
        if flat.shape[-1] != self.numel:
            raise ValueError(f"flat tensor has {flat.shape[-1]} elements, layout needs {self.numel}")
        lead = tuple(flat.shape[:-1])
        return {
            e.name: flat[..., e.offset : e.offset + e.numel].view(*lead, *e.shape)
            for e in self.entries
        }

    def load_into(self, module: nn.Module, flat: torch.Tensor) -> None:
        """Copy a flat tensor into a module's parameters and buffers in place."""
        state: dict[str, torch.Tensor] = dict(module.named_parameters())
        state.update(dict(module.named_buffers()))
        with torch.no_grad():
            for name, view in self.views(flat).items():
                state[name].copy_(view)

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Per-entry views in layout order (for layer-wise codecs)."""
        return list(self.views(flat).values())
