"""The metrics record of one gossip round."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class GossipRound:
    """Metrics of one gossip round (accuracies on the held-out test split)."""

    round: int
    num_live: int
    train_loss: float
    bytes_total: int  # sent by all nodes this round
    bytes_per_node: float  # mean over the live nodes
    consensus_distance: float  # mean squared distance of live models to their average
    averaged_accuracy: float | None = None  # the average of the live models
    averaged_loss: float | None = None
    mean_accuracy: float | None = None  # over the evaluated nodes
    min_accuracy: float | None = None
    max_accuracy: float | None = None
    evaluated_nodes: int = 0
    crashed: list[int] = field(default_factory=list)  # nodes that failed at this round's start
    rejoined: list[int] = field(default_factory=list)  # crashed nodes back at this round's start
    failed_links: int = 0  # edges of the graph down this round (`link_failure`)
    merged: bool = False
    num_clients: int = 0  # live nodes that trained this round
    uplink_bytes: int = 0  # this round's; gossip puts all its bytes here (see `Gossip`)
    downlink_bytes: int = 0

    @property
    def test_accuracy(self) -> float | None:
        """Accuracy of the averaged model (the name every topology's rounds share)."""
        return self.averaged_accuracy

    @property
    def test_loss(self) -> float | None:
        return self.averaged_loss

    def as_dict(self) -> dict:
        return {
            # The keys every topology's rounds share (the runner reads these).
            "round": self.round,
            "test_accuracy": self.averaged_accuracy,
            "test_loss": self.averaged_loss,
            "train_loss": self.train_loss,
            "num_clients": self.num_clients,
            "uplink_bytes": self.uplink_bytes,
            "downlink_bytes": self.downlink_bytes,
            # Gossip's own.
            "num_live": self.num_live,
            "bytes_total": self.bytes_total,
            "bytes_per_node": self.bytes_per_node,
            "consensus_distance": self.consensus_distance,
            "averaged_accuracy": self.averaged_accuracy,
            "averaged_loss": self.averaged_loss,
            "mean_accuracy": self.mean_accuracy,
            "min_accuracy": self.min_accuracy,
            "max_accuracy": self.max_accuracy,
            "evaluated_nodes": self.evaluated_nodes,
            "crashed": self.crashed,
            "rejoined": self.rejoined,
            "failed_links": self.failed_links,
            "merged": self.merged,
        }
