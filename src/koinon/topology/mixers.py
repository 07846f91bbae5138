"""How a gossip node combines its own model with its neighbours' copies: the mixing step.

Every mixer takes the network (each node's exact model in `net.stack`), the public copies its
neighbours decoded and the round's links, and returns the new `[N, P]` stack:

- `WeightedMixer`: the mixing matrix W (Metropolis-Hastings, max-degree or uniform weights over
  the live links) as ONE sparse matrix product, `x <- W @ x_hat + diag(W) * (x - x_hat)`: the
  neighbours' decoded copies, each node's exact model for its own term.
- `RobustMixer`: a robust aggregator per node over its closed neighbourhood (a Python loop).
- `VarianceCorrected`: any mixer followed by the Vanishing Variance correction
  (`koinon.topology.variance`).
- Bristle's prioritizer and integrator, `koinon.topology.bristle.BristleMixer`.
"""

from __future__ import annotations

from typing import Protocol

import torch

from koinon.aggregate import Aggregator
from koinon.params import Layout
from koinon.topology.peers import Links, PeerNetwork
from koinon.topology.variance import correct_mixed_variance


class Mixer(Protocol):
    def mix(self, net: PeerNetwork, public: torch.Tensor, links: Links, round_index: int) -> torch.Tensor:
        """The stack after every live node mixed its exact model with its neighbours' copies."""
        ...


class WeightedMixer:
    """x_i <- sum_{j != i} W_ij x_hat_j + W_ii x_i: exact self term, decoded neighbours."""

    def mix(self, net: PeerNetwork, public: torch.Tensor, links: Links, round_index: int) -> torch.Tensor:
        w = links.mixing
        diag = torch.zeros(net.num_nodes)
        index = w.indices()
        on_diag = index[0] == index[1]
        diag[index[0, on_diag]] = w.values()[on_diag]
        return torch.sparse.mm(w, public) + diag.unsqueeze(1) * (net.stack - public)


class RobustMixer:
    """Each node applies `aggregator` to its own exact model and its neighbours' copies, with
    the weights of its row of W; with too few neighbours for the rule it keeps its own model."""

    def __init__(self, aggregator: Aggregator) -> None:
        self.aggregator = aggregator

    def mix(self, net: PeerNetwork, public: torch.Tensor, links: Links, round_index: int) -> torch.Tensor:
        out = net.stack.clone()
        live_ids = net.live_ids()
        if not live_ids:
            return out
        dense_rows = links.mixing.index_select(0, torch.tensor(live_ids)).to_dense()
        for row, i in enumerate(live_ids):
            peers = [j for j in dense_rows[row].nonzero().flatten().tolist() if j != i]
            models = torch.cat([net.stack[i : i + 1], public[peers]])
            weights = torch.cat([dense_rows[row, i : i + 1], dense_rows[row, peers]])
            try:
                out[i] = self.aggregator.aggregate(models, weights)
            except ValueError:  # too few neighbours for the rule's assumption: keep own model
                pass
        return out


class VarianceCorrected:
    """`inner`, then each live node's layers rescaled to the mean variance of what it mixed."""

    def __init__(self, inner: Mixer, layout: Layout) -> None:
        self.inner = inner
        self.layout = layout

    def mix(self, net: PeerNetwork, public: torch.Tensor, links: Links, round_index: int) -> torch.Tensor:
        mixed = self.inner.mix(net, public, links, round_index)
        live_ids = net.live_ids()
        if live_ids:
            correct_mixed_variance(mixed, net.stack, public, links.mixing, live_ids, self.layout)
        return mixed
