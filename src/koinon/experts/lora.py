"""LoRA experts: an owner's expert is a low-rank adapter on the shared frozen public model.

LoRA-Mixer ("Coordinate Modular LoRA Experts Through Serial Attention Routing", 2025) routes task-specific LoRA experts that sit on
a frozen backbone's linear projections. Here every `nn.Linear` of a copy of the public model
becomes `W x + b + (alpha / r) B A x` with `W`, `b` frozen (the public weights) and only `A`
(`[r, in]`, seeded) and `B` (`[out, r]`, zero, so an expert starts as the public model)
trained by the owner. Only the adapter crosses the wire: `r (in + out)` numbers a layer instead
of `in x out`. The mixture routes whole adapted models at the output, as it does full experts
(`koinon.experts.mixture.Mixture`); LoRA-Mixer's routing inside each projection and its
specialization balance loss are not reproduced.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"lora rank must be >= 1, got {rank}")
        # Trainable first: the layout puts trainable entries before frozen ones anyway.
        self.lora_a = nn.Parameter(torch.randn(rank, base.in_features, generator=generator) / math.sqrt(base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))
        self.weight = nn.Parameter(base.weight.detach().clone(), requires_grad=False)
        self.bias = None if base.bias is None else nn.Parameter(base.bias.detach().clone(), requires_grad=False)
        self.scale = alpha / rank
        self.in_features, self.out_features = base.in_features, base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.scale * F.linear(F.linear(x, self.lora_a), self.lora_b)


def lora_expert(public: nn.Module, rank: int, alpha: float = 1.0, seed: int = 0) -> nn.Module:
    """A copy of `public` with every `nn.Linear` adapted (`LoRALinear`), only the adapters trainable."""
    expert = copy.deepcopy(public)
    for p in expert.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    targets = [(name, m) for name, m in expert.named_modules() if isinstance(m, nn.Linear)]
    if not targets:
        raise ValueError("lora experts need a model with nn.Linear layers")
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = expert.get_submodule(parent_name) if parent_name else expert
        setattr(parent, child, LoRALinear(module, rank, alpha, gen))
    return expert
