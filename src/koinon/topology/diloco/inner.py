"""Inner training of a stack of workers: `[K, P]` parameters, one vmapped gradient per step.

The simulation runs all M workers as one stack (K = M); a worker process runs the same code on a
stack of one (K = 1). Same functions, same seeded batches, so the two modes agree to float
tolerance. The inner optimizer (AdamW, or SGD for the H = 1 equivalence test) is the shared
local optimizer on the flat stack (`koinon.local.optim`), the one federated clients use.
Evaluation is the shared `koinon.local.losses.evaluate` (scored per predicted position).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap
from torch.nn import functional as F

from koinon.local.optim import LOCAL_OPTIMIZERS, LocalOptimizer
from koinon.params import Layout
from koinon.topology.diloco.spec import IslandsSpec

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def make_loss(model: nn.Module, layout: Layout) -> LossFn:
    """Mean next-token (or class) cross-entropy of flat parameters `[P]` on one batch."""

    names = [e.name for e in layout.entries]
    sizes = [e.numel for e in layout.entries]
    shapes = [e.shape for e in layout.entries]

    def loss(flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # One split instead of per-entry slices: its backward is a single concatenation, where
        # slicing would allocate and add a full-size zero gradient per entry.
        parts = flat.split(sizes)
        params = {n: p.view(s) for n, p, s in zip(names, parts, shapes)}
        logits = functional_call(model, params, (x,))
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    return loss


StackGrad = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def make_stack_grad(loss: LossFn, vectorized: bool) -> StackGrad:
    """(grads [K, P], losses [K]) of a parameter stack on a batch stack `[K, B, ...]`.

    `vectorized`: one `vmap` over the K workers. Otherwise a loop of plain autograd calls,
    which on a 2-core CPU we measured 2-3x faster for the char transformer (vmap's batched
    kernels add copies that tiny matrices do not amortize); a worker process (K = 1) uses the
    loop, so with `vectorized = false` the simulation repeats its arithmetic exactly.
    """
    if vectorized:
        return vmap(grad_and_value(loss))

    def looped(
        params: torch.Tensor, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        grads = torch.empty_like(params)
        losses = torch.empty(len(params), device=params.device)
        for k in range(len(params)):
            p = params[k].detach().requires_grad_(True)
            value = loss(p, x[k], y[k])
            (grads[k],) = torch.autograd.grad(value, p)
            losses[k] = value.detach()
        return grads, losses

    return looped


def batch_generator(seed: int, worker_id: int, step: int) -> torch.Generator:
    """The generator of worker `worker_id`'s batch at inner step `step`: the same in every mode
    and on every machine, and computable without replaying earlier steps (joiners, resume).
    Not `koinon.seeding.generator`: its batches would be as independent but different ones,
    moving every figure of the README's DiLoCo table for no gain in the math."""
    return torch.Generator().manual_seed((seed * 1_000_003 + worker_id) * 1_000_000_007 + step)


def sample_batch(
    x: torch.Tensor, y: torch.Tensor, shard: torch.Tensor, batch_size: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    pick = shard[torch.randint(len(shard), (batch_size,), generator=gen)]
    return x[pick], y[pick]


def clip_rows(grads: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Scale each worker's gradient to L2 norm <= max_norm (0 = unchanged)."""
    if max_norm <= 0:
        return grads
    norms = grads.norm(dim=1, keepdim=True)
    return grads * (max_norm / (norms + 1e-6)).clamp(max=1.0)


def inner_optimizer(spec: IslandsSpec) -> LocalOptimizer:
    """The inner optimizer of `spec` (its weight decay applies to AdamW only, decoupled)."""
    if spec.inner_optimizer == "sgd":
        return LOCAL_OPTIMIZERS.build("sgd", {}, "diloco")
    return LOCAL_OPTIMIZERS.build("adamw", {}, "diloco", beta1=spec.beta1, beta2=spec.beta2,
                                  weight_decay=spec.weight_decay)
