"""Topologies: how parties are wired (server-based federated learning so far)."""

from koinon.topology.federated import Federation, RoundResult

__all__ = ["Federation", "RoundResult"]
