"""MoDeST decentralized sampling (https://arxiv.org/abs/2302.13837): a peer network's round
run by a sample of trainers and aggregators instead of every node.

Every node ranks the peers it knows by a hash of (seed, round, peer), so nodes that share a view
draw the same sample without coordination. `Gossip` runs `Modest` rounds when given
`ModestOptions` (`sampling = "modest"` in a config).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from koinon.aggregate import Aggregator
from koinon.log import notice
from koinon.runtime import Runtime
from koinon.seeding import mix_seed
from koinon.topology.gossip_round import GossipRound
from koinon.topology.peers import PeerNetwork
from koinon.wire import MODEL, Rejected

MODEST_SALT = 0x30D5  # the last part of a trainer payload's generator seed (and of the ranking)


@dataclass(frozen=True)
class ModestOptions:
    """Each round's sample: `trainers_per_round` trainers, `aggregators_per_round` aggregators
    that average the first `success_fraction` of the trainers' models to arrive."""

    trainers_per_round: int = 10
    aggregators_per_round: int = 2
    success_fraction: float = 1.0

    def __post_init__(self) -> None:
        if self.trainers_per_round < 1 or self.aggregators_per_round < 1 or not 0.0 < self.success_fraction <= 1.0:
            raise ValueError("need trainers_per_round >= 1, aggregators_per_round >= 1, success_fraction in (0, 1]")


def modest_ranking(view: list[int], seed: int, round_index: int) -> list[int]:
    """MoDeST: the peers of a node's `view` ranked by hash(seed, round, peer id).

    Every node computes this alone; nodes that share a view derive the same sample without
    coordination (the view's order does not matter).
    """
    return sorted(set(view), key=lambda p: (mix_seed(seed, round_index, p, MODEST_SALT), p))


class Modest:
    """MoDeST rounds: sampled trainers train and send to sampled aggregators, which average."""

    def __init__(self, runtime: Runtime, options: ModestOptions, aggregator: Aggregator | None,
                 seed: int) -> None:
        self.runtime = runtime
        self.options = options
        self.aggregator = aggregator
        self.seed = seed

    def sample(self, net: PeerNetwork, round_index: int, count: int, view: list[int] | None = None) -> list[int]:
        """The first `count` responsive peers of `view` (default: every node) ranked for the round.

        Candidates are pinged in rank order and unresponsive (crashed) ones skipped, so a stale
        view that still lists crashed peers yields the same sample as an up-to-date one.
        """
        ranked = modest_ranking(list(range(net.num_nodes)) if view is None else view, self.seed, round_index)
        return [p for p in ranked if net.live[p]][:count]

    def run_round(self, net: PeerNetwork, r: int) -> GossipRound:
        """Round r: sample r's trainers train from the model of round r-1's aggregators and send
        to round r's aggregators (the first of sample r+1), which average what arrived.

        Simulated arrival: a trainer's time is its number of samples trained, so the aggregators
        average the first ceil(success_fraction x trainers) models to arrive (ties by rank);
        later ones are sent (and counted) but ignored. Bytes: uplink = each trainer's payload
        (encoded with its codec state, through the wire) x the aggregators other than itself;
        downlink = the fp32 model x each (live aggregator of r-1, trainer of r) pair of distinct
        nodes. Pings are not counted. The consensus distance and accuracies are the caller's.
        """
        model_bytes = 4 * net.stack.shape[1]
        trainers = self.sample(net, r, self.options.trainers_per_round)
        holders = [a for a in net.holders if net.live[a]]
        downlink = 0
        if holders:
            start = net.stack[holders[0]].expand(len(trainers), -1).clone()
            downlink = model_bytes * sum(1 for a in holders for t in trainers if a != t)
        else:  # first round, or every holder crashed: trainers go on from the model they have
            if net.holders:
                notice(f"round {r + 1}: every aggregator of the last round crashed")
            start = net.stack[trainers].clone()
        aggregators = self.sample(net, r + 1, self.options.aggregators_per_round)
        uplink, train_loss = 0, float("nan")
        if trainers:
            trained, num_samples, train_loss = net.train(self.runtime, trainers, start, r)
            received, weights = [], []
            order = sorted(range(len(trainers)), key=lambda i: (int(num_samples[i]), i))
            for i in order:
                c = trainers[i]
                payload = net.sender.encode(c, trained[i], r, MODEST_SALT)
                uplink += len(payload) * sum(1 for a in aggregators if a != c)
                try:
                    rows = net.receiver.decode(c, [payload])
                except Rejected as exc:
                    notice(f"round {r + 1}: trainer {c}'s payload was refused ({exc})")
                    continue
                net.receiver.keep(c, rows)
                received.append(rows[MODEL])
                weights.append(float(num_samples[i]))
            ok = torch.isfinite(trained).all(dim=1)
            net.stack[torch.tensor(trainers)[ok]] = trained[ok]
            needed = max(1, math.ceil(self.options.success_fraction * len(trainers)))
            received, weights = received[:needed], weights[:needed]
            if received and aggregators:
                net.stack[aggregators] = self._average(torch.stack(received), torch.tensor(weights))
                net.holders = aggregators
        net.uplink_total += uplink
        net.downlink_total += downlink
        net.round_index += 1
        num_live = int(net.live.sum())
        total = uplink + downlink
        return GossipRound(
            net.round_index, num_live, train_loss, total, total / num_live if num_live else 0.0,
            float("nan"), num_clients=len(trainers), uplink_bytes=uplink, downlink_bytes=downlink,
        )

    def _average(self, models: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The robust aggregator's result when there is one and it takes this many models, else
        the sample-weighted mean."""
        if self.aggregator is not None and len(models) > 1:
            try:
                return self.aggregator.aggregate(models, w)
            except ValueError:
                pass
        return (models * w.unsqueeze(1)).sum(0) / w.sum().clamp_min(1.0)
