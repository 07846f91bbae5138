"""A small trained latent interface between frozen experts, after Mixture of Thoughts.

Mixture of Thoughts (MoT: "Learning to Aggregate What Experts Think, Not Just What They Say",
2025) lets frozen, heterogeneous experts collaborate in a shared latent space: a router picks
the active experts, interaction
layers project their hidden states into one latent space where the primary expert attends to
its active peers, and only the router and these light layers are trained. Here, at the output:
each slot's feature (the input of its output layer, whatever its width) is projected to a
`latent`-dimensional space; the query is the routing-weighted latent of the active experts (a
soft primary expert), keys and values come from every active expert's latent; the attended
latent passes through one zero-initialized linear layer into a correction of the mixture's
logits. At initialization the mixture is unchanged; the interface is trained on public data
with the experts frozen. An excluded owner is masked out of the attention as out of the
mixture, so its expert is still never read (the interface is not retrained without it).
"""

from __future__ import annotations

import math

import torch
from torch import nn


class LatentInterface(nn.Module):
    """Projections per slot, one attention step, and a zero-initialized output layer."""

    def __init__(self, dims: list[int], latent: int, num_classes: int) -> None:
        super().__init__()
        if latent < 1:
            raise ValueError(f"interface latent size must be >= 1, got {latent}")
        self.project = nn.ModuleList(nn.Linear(d, latent) for d in dims)
        self.key = nn.Linear(latent, latent, bias=False)
        self.value = nn.Linear(latent, latent, bias=False)
        self.out = nn.Linear(latent, num_classes)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.latent = latent

    def forward(self, features: dict[int, torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
        """Logit corrections `[..., C]` from the active slots' features (`slot -> [..., d_slot]`)
        and the router's weights `[..., slots]` (zero on inactive slots)."""
        slots = sorted(features)
        z = torch.stack([self.project[s](features[s]) for s in slots], dim=-2)  # [..., S, L]
        w = weights[..., slots]  # [..., S]
        query = (w.unsqueeze(-1) * z).sum(dim=-2)  # the soft primary expert's latent
        scores = (self.key(z) @ query.unsqueeze(-1)).squeeze(-1) / math.sqrt(self.latent)
        attention = scores.masked_fill(w <= 0, float("-inf")).softmax(dim=-1)
        context = (attention.unsqueeze(-1) * self.value(z)).sum(dim=-2)
        return self.out(query + context)
