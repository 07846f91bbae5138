"""Topologies: how parties are wired (server-based federated learning, decentralized gossip)."""

from koinon.topology.federated import Federation, RoundResult
from koinon.topology.gossip import Gossip, GossipRound
from koinon.topology.graphs import TOPOLOGIES

__all__ = ["TOPOLOGIES", "Federation", "Gossip", "GossipRound", "RoundResult"]
