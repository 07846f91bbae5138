"""Byzantine peers in decentralized training: who they are, their poisoned data, what they send.

As in `Federation`, a seeded fraction of the nodes is Byzantine (chosen with the same seed
stream) and `attack.poison_data` rewrites their training samples before training starts. A model
attack forges what those nodes *send* each round: the rows of the gossip copies that their
neighbours receive (the exchanged part of the parameters: the whole model, or only the head
under Bristle). Without a server there is no round update to forge, so attacks act on models
here: `sign_flip` sends minus the node's model, `gaussian` a noise model, ALIE the honest mean
minus z standard deviations; omniscient attacks read every honest live node's copy. What a
Byzantine node holds itself is never evaluated.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from koinon.aggregate import Aggregator, build_aggregator
from koinon.attacks import ATTACKS, Attack, AttackContext
from koinon.data.federated import FederatedData
from koinon.seeding import mix_seed
from koinon.topology.federated import component


@dataclass(frozen=True)
class ByzantineOptions:
    """`attack` (a registered name or an `Attack`) run by a `byzantine_fraction` of the nodes."""

    attack: Attack | str | None = None
    byzantine_fraction: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.byzantine_fraction < 1.0:
            raise ValueError(f"byzantine_fraction must be in [0, 1), got {self.byzantine_fraction}")


class ByzantinePeers:
    """The Byzantine nodes of a network and the attack they run. `aggregator` is what the
    honest nodes mix with (omniscient attacks read it); the mean when they average."""

    def __init__(self, options: ByzantineOptions, num_nodes: int, seed: int,
                 aggregator: Aggregator | None = None) -> None:
        self.attack = component(ATTACKS, options.attack or "none", "attack")
        rng = np.random.default_rng([seed, 0xBAD])
        count = round(options.byzantine_fraction * num_nodes)
        self.nodes = sorted(int(c) for c in rng.choice(num_nodes, count, replace=False))
        self.mask = torch.zeros(num_nodes, dtype=torch.bool)
        self.mask[self.nodes] = True
        self.seed = seed
        self.aggregator: Aggregator = aggregator or build_aggregator("mean")

    def poison(self, data: FederatedData) -> FederatedData:
        """The data with the Byzantine nodes' samples poisoned (data attacks; others: unchanged)."""
        if not self.nodes:
            return data
        owned = torch.cat([data.client_indices[c] for c in self.nodes])
        poisoned = self.attack.poison_data(
            data.dataset, owned, torch.Generator().manual_seed(mix_seed(self.seed, 0xBAD))
        )
        return FederatedData(poisoned, data.client_indices)

    def forge(self, public: torch.Tensor, live_ids: list[int], width: int, round_index: int) -> torch.Tensor:
        """`public` with the live Byzantine rows' first `width` entries replaced by the attack's."""
        rows = torch.tensor(live_ids, dtype=torch.long)
        byzantine = self.mask[rows]
        if not bool(byzantine.any()):
            return public
        sent = public[rows, :width]
        context = AttackContext(
            round_index, sent[~byzantine].mean(dim=0) if bool((~byzantine).any()) else sent.mean(dim=0),
            torch.ones(len(rows)), self.aggregator,
            torch.Generator().manual_seed(mix_seed(self.seed, round_index, 0xBAD)),
        )
        out = public.clone()
        out[rows, :width] = self.attack.forge(sent, byzantine, context)
        return out
