"""Feature shift: each client (or group of clients) sees its inputs through its own transform.

Label skew (Dirichlet, shards: `koinon.data.partition`) changes which classes a client holds;
feature shift changes how its inputs look, as different scanners, cameras or handwriting do.
`feature_shift(data, kind, seed, groups, strength)` transforms every client's training samples
(its held-out split included, so a client is tested under its own transform); the server's
test split stays as it was. With `groups = G` the clients fall into G seeded groups that share
a transform (planted clusters); with 0 every client has its own. Group g of G (g = 0 ... G-1):

- `rotation`: images `[C, H, W]` rotated by strength * 360 * g / G degrees (bilinear, zeros
  outside); 1-D signals `[C, L]` circularly shifted by strength * L * g / G steps;
- `noise`: additive Gaussian noise of standard deviation strength * g / max(G - 1, 1), drawn
  once per sample (seeded per client);
- `contrast`: x -> mean + c (x - mean) around each sample's mean, c = 1 - 0.8 strength g / max(G - 1, 1);
- `permute`: the input features in a seeded permutation of group g's own (group 0 unpermuted);
  `strength` is the share of features permuted.

In TOML: `data.feature_shift = "rotation"`, `data.shift_groups = 4`, `data.shift_strength = 1.0`.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
import torch.nn.functional as F

from koinon.data.federated import FederatedData
from koinon.seeding import generator

SHIFTS = ("none", "rotation", "noise", "contrast", "permute")


def shift_groups(num_clients: int, groups: int, seed: int) -> np.ndarray:
    """`[num_clients]`: each client's group (a seeded, balanced assignment; 0 = each its own)."""
    if groups <= 0 or groups >= num_clients:
        return np.arange(num_clients)
    rng = np.random.default_rng([seed, 0x5F1F])
    return rng.permutation(np.arange(num_clients) % groups)


def _rotate(x: torch.Tensor, degrees: float) -> torch.Tensor:
    if x.dim() == 3:  # [N, C, L]: a circular shift along the signal
        return torch.roll(x, shifts=int(round(degrees / 360.0 * x.shape[-1])), dims=-1)
    theta = math.radians(degrees)
    rot = torch.tensor([[math.cos(theta), -math.sin(theta), 0.0], [math.sin(theta), math.cos(theta), 0.0]])
    grid = F.affine_grid(rot.unsqueeze(0).expand(len(x), 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def transform(x: torch.Tensor, kind: str, group: int, num_groups: int, strength: float, seed: int,
              client: int = 0) -> torch.Tensor:
    """`x` (`[N, ...]`) as group `group` of `num_groups` sees it (see the module docstring); the
    noise is drawn per `client`, the other transforms are the group's."""
    if group == 0:  # the untransformed group, exactly
        return x
    frac = group / num_groups
    ramp = group / max(num_groups - 1, 1)
    if kind == "rotation":
        return _rotate(x, strength * 360.0 * frac) if x.dim() >= 3 else x
    if kind == "noise":
        gen = generator(seed, 0x5F1F, group, client)
        return x + strength * ramp * torch.randn(x.shape, generator=gen)
    if kind == "contrast":
        c = 1.0 - 0.8 * strength * ramp
        mean = x.flatten(1).mean(dim=1).view(-1, *([1] * (x.dim() - 1)))
        return mean + c * (x - mean)
    if kind == "permute":
        flat = x.flatten(1)
        f = flat.shape[1]
        gen = generator(seed, 0x5F1F, group)
        chosen = torch.randperm(f, generator=gen)[: int(round(strength * f))]
        perm = torch.arange(f)
        perm[chosen] = chosen[torch.randperm(len(chosen), generator=gen)]
        return flat[:, perm].view_as(x)
    return x


def feature_shift(data: FederatedData, kind: str, seed: int, groups: int = 0, strength: float = 1.0) -> FederatedData:
    """`data` with each client's training samples transformed by its group's transform (a new
    dataset: the original tensors are not modified)."""
    if kind not in SHIFTS:
        raise ValueError(f"data.feature_shift = {kind!r}: allowed {', '.join(SHIFTS)}")
    if not isinstance(groups, int) or groups < 0:
        raise ValueError(f"data.shift_groups must be an integer >= 0 (0 = each client its own), got {groups!r}")
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"data.shift_strength must be in [0, 1], got {strength}")
    if kind == "none":
        return data
    ds = data.dataset
    if kind == "rotation" and ds.x_train.dim() < 3:
        raise ValueError(f"data.feature_shift = 'rotation' needs images [C, H, W] or signals [C, L]; "
                         f"{ds.name} has samples of shape {list(ds.input_shape)}")
    group_of = shift_groups(data.num_clients, groups, seed)
    num_groups = int(group_of.max()) + 1 if len(group_of) else 1
    x = ds.x_train.clone()
    for c, ix in enumerate(data.client_indices):
        if len(ix):
            x[ix] = transform(ds.x_train[ix], kind, int(group_of[c]), num_groups, strength, seed, c)
    return FederatedData(dataclasses.replace(ds, x_train=x), data.client_indices)
