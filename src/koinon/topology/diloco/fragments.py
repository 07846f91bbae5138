"""Streaming DiLoCo fragments: which parameters sync together, and when.

Fragments are made of whole *units* (a transformer block, the embedding, the head): units are
named by the layout entry's name up to its first numeric component (`blocks.3.qkv.weight` is in
unit `blocks.3`), otherwise by its first component. `strided` puts unit i in fragment i mod P
(the paper finds it slightly better: every fragment spans the depth of the network);
`sequential` cuts the unit list into P contiguous runs. Fragment p syncs after inner steps
(p + 1) * H/P, then every H steps, so in every window of H steps each parameter syncs once.
"""

from __future__ import annotations

import torch

from koinon.errors import ConfigError
from koinon.params import Layout


def _unit(name: str) -> str:
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return parts[0]


def fragment_indices(layout: Layout, num_fragments: int, pattern: str) -> list[torch.Tensor]:
    """Sorted flat indices of each fragment; together they cover every element exactly once."""
    units: dict[str, list[tuple[int, int]]] = {}
    for e in layout.entries:
        units.setdefault(_unit(e.name), []).append((e.offset, e.numel))
    names = list(units)
    if num_fragments > len(names):
        raise ConfigError(
            f"diloco.fragments = {num_fragments}: the model has only {len(names)} units "
            f"({', '.join(names)}) to split"
        )
    if pattern == "strided":
        groups = [names[p::num_fragments] for p in range(num_fragments)]
    elif pattern == "sequential":
        bounds = [round(p * len(names) / num_fragments) for p in range(num_fragments + 1)]
        groups = [names[bounds[p]: bounds[p + 1]] for p in range(num_fragments)]
    else:
        raise ConfigError(f"diloco.fragment_pattern = {pattern!r}: allowed: strided, sequential")
    out = []
    for group in groups:
        ranges = [torch.arange(o, o + n) for u in group for o, n in units[u]]
        out.append(torch.cat(ranges).sort().values)
    return out


def fragment_at(sync_index: int, num_fragments: int) -> int:
    """The fragment that the `sync_index`-th sync event (0-based) carries: round robin."""
    return sync_index % num_fragments
