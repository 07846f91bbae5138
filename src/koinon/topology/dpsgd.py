"""D-PSGD gossip (Lian et al. 2017, https://arxiv.org/abs/1705.09056): one round of a peer network.

Every live node runs local training from its own model (one `runtime.train` call over all live
nodes), encodes what it sends once (`CopyExchange`, through `koinon.wire`), and mixes with its
neighbours (a `koinon.topology.mixers.Mixer`). A node's bytes are its payload size times its
live degree on the round's links; with `final_merge_every` k an exact global average every k
rounds, counted as a ring all-reduce.

Compressed gossip: each live node encodes its model (or, with `compress_delta`, the change of
its public copy since it last sent, as in CHOCO-gossip) with its own codec state (the wire's
`Sender`, generator parts (seed, round, node, 0x6055)); its neighbours decode with the wire's
`Receiver` (a refused or non-finite payload leaves the previous copy) and mix with the decoded
public copy while each node keeps its exact model for its own term.
"""

from __future__ import annotations

import torch

from koinon.log import notice
from koinon.runtime import Runtime
from koinon.topology.byzantine import ByzantinePeers
from koinon.topology.gossip_round import GossipRound
from koinon.topology.mixers import Mixer
from koinon.topology.peers import PeerNetwork
from koinon.wire import MODEL, Rejected

GOSSIP_SALT = 0x6055  # the last part of a gossip payload's generator seed


class CopyExchange:
    """Each live node sends the first `width` entries of its model (the whole model, or under
    Bristle the head), or their change since its last send (`delta`)."""

    def __init__(self, width: int, delta: bool) -> None:
        self.width = width
        self.delta = delta

    def send(self, net: PeerNetwork, live_ids: list[int], r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The public copies after everyone sent `[N, P]` and bytes per node `[N]`."""
        width = self.width
        sizes = torch.zeros(net.num_nodes, dtype=torch.long)
        public = net.public.clone()
        for i in live_ids:
            mine = net.stack[i, :width]
            target = mine - net.public[i, :width] if self.delta else mine
            payload = net.sender.encode(i, target, r, GOSSIP_SALT)
            sizes[i] = len(payload)
            try:
                rows = net.receiver.decode(i, [payload])
            except Rejected as exc:  # neighbours keep the previous copy
                notice(f"round {r + 1}: node {i}'s payload was refused ({exc})")
                continue
            net.receiver.keep(i, rows)
            row = public[i, :width] + rows[MODEL] if self.delta else rows[MODEL]
            if bool(torch.isfinite(row).all()):
                public[i, :width] = row
        return public, sizes


class DPSGD:
    """One D-PSGD round: train, send (forged by Byzantine nodes), mix, and merge every k rounds."""

    def __init__(self, runtime: Runtime, exchange: CopyExchange, mixer: Mixer,
                 byzantine: ByzantinePeers, link_failure: float, final_merge_every: int) -> None:
        self.runtime = runtime
        self.exchange = exchange
        self.mixer = mixer
        self.byzantine = byzantine
        self.link_failure = link_failure
        self.final_merge_every = final_merge_every

    def run_round(self, net: PeerNetwork, r: int) -> GossipRound:
        """Round r (its failures already applied); the round's consensus distance and accuracies
        are the caller's to measure."""
        live_ids = net.live_ids()
        train_loss = float("nan")
        if live_ids:
            trained, _, train_loss = net.train(self.runtime, live_ids, net.stack[live_ids], r)
            ok = torch.isfinite(trained).all(dim=1)  # a diverged node keeps its model
            net.stack[torch.tensor(live_ids)[ok]] = trained[ok]

        public, sizes = self.exchange.send(net, live_ids, r)
        if self.byzantine.nodes and live_ids:
            public = self.byzantine.forge(public, live_ids, self.exchange.width, r)
        links = net.links(r, self.link_failure)
        degree = torch.tensor([len(links.live_neighbours(u, net.live)) for u in range(net.num_nodes)])
        sent = sizes * degree * net.live
        net.stack = self.mixer.mix(net, public, links, r)
        net.public = public
        round_bytes = int(sent.sum())
        net.uplink_total += round_bytes

        merged = bool(self.final_merge_every) and (r + 1) % self.final_merge_every == 0
        if merged:
            round_bytes += net.merge()
        net.round_index += 1
        num_live = len(live_ids)
        return GossipRound(
            net.round_index, num_live, train_loss, round_bytes,
            round_bytes / num_live if num_live else 0.0, float("nan"),
            failed_links=links.failed, merged=merged, num_clients=num_live, uplink_bytes=round_bytes,
        )
