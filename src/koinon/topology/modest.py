"""MoDeST decentralized sampling (https://arxiv.org/abs/2302.13837): a gossip network's round
run by a sample of trainers and aggregators instead of every node.

Every node ranks the peers it knows by a hash of (seed, round, peer), so nodes that share a view
draw the same sample without coordination. `Gossip` calls `modest_round` when
`sampling = "modest"`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from koinon.errors import CodecError
from koinon.log import notice
from koinon.seeding import mix_seed
from koinon.topology.gossip_round import GossipRound

if TYPE_CHECKING:
    from koinon.topology.gossip import Gossip


def modest_ranking(view: list[int], seed: int, round_index: int) -> list[int]:
    """MoDeST: the peers of a node's `view` ranked by hash(seed, round, peer id).

    Every node computes this alone; nodes that share a view derive the same sample without
    coordination (the view's order does not matter).
    """
    return sorted(set(view), key=lambda p: (mix_seed(seed, round_index, p, 0x30D5), p))


def modest_round(net: Gossip, r: int, evaluate: bool, crashed: list[int]) -> GossipRound:
    """MoDeST round r: sample r's trainers train from the model of round r-1's aggregators and
    send to round r's aggregators (the first of sample r+1), which average what arrived.

    Simulated arrival: a trainer's time is its number of samples trained, so the aggregators
    average the first ceil(success_fraction x trainers) models to arrive (ties by rank);
    later ones are sent (and counted) but ignored. Bytes: uplink = each trainer's payload
    (encoded with its codec) x the aggregators other than itself; downlink = the fp32 model x
    each (live aggregator of r-1, trainer of r) pair of distinct nodes. Pings are not counted.
    """
    model_bytes = 4 * net.layout.numel
    trainers = net.modest_sample(r, net.trainers_per_round)
    holders = [a for a in net.modest_holders if net.live[a]]
    downlink = 0
    if holders:
        start = net.stack[holders[0]].expand(len(trainers), -1).clone()
        downlink = model_bytes * sum(1 for a in holders for t in trainers if a != t)
    else:  # first round, or every holder crashed: trainers go on from the model they have
        if net.modest_holders:
            notice(f"round {r + 1}: every aggregator of the last round crashed")
        start = net.stack[trainers].clone()
    aggregators = net.modest_sample(r + 1, net.aggregators_per_round)
    uplink, train_loss = 0, float("nan")
    if trainers:
        result = net.runtime.train(
            trainers, start, {}, [net.client_states.get(c, {}) for c in trainers], net.seed, r
        )
        trained = start + result.deltas
        for i, c in enumerate(trainers):
            if result.client_states[i]:
                net.client_states[c] = result.client_states[i]
        seen = result.num_samples.to(torch.float32)
        train_loss = float((result.train_loss * seen).sum() / seen.sum().clamp_min(1.0))
        received, weights = [], []
        order = sorted(range(len(trainers)), key=lambda i: (int(result.num_samples[i]), i))
        for i in order:
            c = trainers[i]
            state = net.codec_states.get(c) or net.codec.init_state()
            gen = torch.Generator().manual_seed(mix_seed(net.seed, r, c, 0x30D5))
            payload, new_state = net.codec.encode(trained[i], state, gen)
            if new_state:
                net.codec_states[c] = new_state
            uplink += len(payload) * sum(1 for a in aggregators if a != c)
            try:
                row = net.codec.decode(payload)
            except CodecError as exc:
                notice(f"round {r + 1}: trainer {c}'s payload was refused ({exc})")
                continue
            if getattr(net.codec, "decodes_increment", False):
                row = net.increment_sums.get(c, torch.zeros_like(row)) + row
                net.increment_sums[c] = row
            if bool(torch.isfinite(row).all()):
                received.append(row)
                weights.append(float(result.num_samples[i]))
        ok = torch.isfinite(trained).all(dim=1)
        net.stack[torch.tensor(trainers)[ok]] = trained[ok]
        needed = max(1, math.ceil(net.success_fraction * len(trainers)))
        received, weights = received[:needed], weights[:needed]
        if received and aggregators:
            models, w = torch.stack(received), torch.tensor(weights)
            if net.aggregator is not None and len(received) > 1:
                try:
                    merged = net.aggregator.aggregate(models, w)
                except ValueError:
                    merged = (models * w.unsqueeze(1)).sum(0) / w.sum().clamp_min(1.0)
            else:
                merged = (models * w.unsqueeze(1)).sum(0) / w.sum().clamp_min(1.0)
            net.stack[aggregators] = merged
            net.modest_holders = aggregators
    net.uplink_total += uplink
    net.downlink_total += downlink
    net.round_index += 1
    num_live = int(net.live.sum())
    total = uplink + downlink
    out = GossipRound(
        net.round_index, num_live, train_loss, total, total / num_live if num_live else 0.0,
        net.consensus_distance(), crashed=crashed, num_clients=len(trainers),
        uplink_bytes=uplink, downlink_bytes=downlink,
    )
    if evaluate and num_live:
        net.evaluate_into(out, net.live.nonzero().flatten().tolist())
    return out
