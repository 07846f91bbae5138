"""The server's root dataset and its own update each round, for rules that trust it (FLTrust).

FLTrust (Cao et al., NDSS 2021, https://arxiv.org/abs/2012.13995) needs a reference update the
server computes itself: from the model the clients received, on a small clean root dataset,
with the clients' algorithm, local steps and learning rate (the paper does exactly this).

Where the root data comes from: our partitioners deal every training sample to some client and
the datasets have no public split, so `reserve_root` sets `count` samples aside from the
training pool before training, drawn uniformly at random by seed (as the paper samples its
root data uniformly from the training set): no client owns them any more, and their labels are
the clean ones even when a data-poisoning attacker owned them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from koinon.clients import ClientAlgorithm, LocalTraining
from koinon.data.federated import FederatedData
from koinon.local import CohortTrainer, cross_entropy
from koinon.params import Layout
from koinon.seeding import mix_seed
from koinon.update import State

_ROOT = 0x7057  # seed stream of the root dataset and of the server's local batches
_PUBLIC = 0x9B1C  # seed stream of a method's public data


def reference_users(aggregator: Any) -> list[Any]:
    """The parts of `aggregator` (a rule, or a composition's steps and final rule) that need
    the server's reference update (`set_reference`)."""
    parts = [*getattr(aggregator, "steps", []), getattr(aggregator, "final", aggregator)]
    return [p for p in parts if hasattr(p, "set_reference")]


def reserve_root(data: FederatedData, count: int, seed: int) -> tuple[FederatedData, torch.Tensor]:
    """Take `count` training samples (seeded, uniform over the pool) away from the clients.

    Every client keeps at least one sample, so a draw that would empty a client is skipped.
    Returns the clients' reduced data and the root indices into `data.dataset`.
    """
    sizes = data.sizes
    spare = int(sizes.sum()) - data.num_clients
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= spare:
        raise ValueError(f"aggregator.root_samples = {count!r}: must be between 1 and {spare} "
                         "(the training samples that leave every client one)")
    flat = torch.cat([ix.to(torch.long) for ix in data.client_indices])
    owner = torch.repeat_interleave(torch.arange(data.num_clients), sizes)
    order = torch.randperm(len(flat), generator=torch.Generator().manual_seed(mix_seed(seed, _ROOT)))
    remaining = sizes.tolist()
    taken = torch.zeros(len(flat), dtype=torch.bool)
    picked = 0
    for pos in order.tolist():
        c = int(owner[pos])
        if remaining[c] > 1:
            remaining[c] -= 1
            taken[pos] = True
            picked += 1
            if picked == count:
                break
    kept = [flat[(owner == c) & ~taken] for c in range(data.num_clients)]
    return FederatedData(data.dataset, kept), flat[taken].sort().values


def reserve_public(data: FederatedData, count: int, seed: int) -> tuple[FederatedData, torch.Tensor]:
    """`reserve_root` for the server's public data (`data.public_samples`, e.g. FedConv's learnt
    kernels), from its own seed stream; a count that does not fit is refused in one line."""
    spare = int(data.sizes.sum()) - data.num_clients
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= spare:
        raise ValueError(f"data.public_samples = {count!r}: must be between 0 and {spare} "
                         "(the training samples that leave every client one)")
    return reserve_root(data, count, mix_seed(seed, _PUBLIC))


class RootUpdate:
    """The server's local training on its root dataset: one more 'client' that only it runs.

    Its batches come from their own seed stream, and its persistent algorithm state (e.g.
    worker momentum) is kept across rounds like a client's.
    """

    def __init__(self, module: nn.Module, layout: Layout, data: FederatedData, indices: torch.Tensor,
                 algorithm: ClientAlgorithm, local: LocalTraining, seed: int,
                 loss_fn=cross_entropy) -> None:
        self.indices = indices
        self.trainer = CohortTrainer(module, layout, FederatedData(data.dataset, [indices]),
                                     algorithm, local, loss_fn=loss_fn)
        self.seed = mix_seed(seed, _ROOT)
        self.state: State = {}

    def compute(self, params: torch.Tensor, server_state: State, round_index: int) -> torch.Tensor:
        """The server's update `[P]` of round `round_index`, from `params`."""
        result = self.trainer.train([0], params, server_state, [self.state], self.seed, round_index)
        if result.client_states[0]:
            self.state = result.client_states[0]
        assert result.deltas is not None  # trained here, never encoded
        return result.deltas[0]
