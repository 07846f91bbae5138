"""Topologies: how parties are wired (a server, decentralized gossip, compute islands).

`TOPOLOGIES` holds their builders by `topology.name` (federated, gossip, diloco, experts,
distillation); `GRAPHS` holds the communication graphs a gossip network can use
(`topology.graph`).
"""

from koinon.topology import build as _build  # noqa: F401  (registers the topology builders)
from koinon.topology.base import TOPOLOGIES, Topology
from koinon.topology.federated import Federation, RoundResult
from koinon.topology.gossip import Gossip, GossipRound
from koinon.topology.graphs import GRAPHS

__all__ = ["GRAPHS", "TOPOLOGIES", "Federation", "Gossip", "GossipRound", "RoundResult", "Topology"]
