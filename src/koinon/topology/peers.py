"""The state of a peer network: what every protocol (D-PSGD gossip, MoDeST) reads and moves.

Every node holds its own model; the network's models are one `[N, P]` stack, what the
neighbours hold of them (the public copies, which differ from the models under a lossy codec)
another. The live mask says who answers; the graph and its mixing matrix over the live nodes
(rebuilt when nodes crash or rejoin) say who talks to whom. Each node's client-algorithm state
sits here, its codec state in a `koinon.wire.Sender` and the running sums of increment codecs in
a `koinon.wire.Receiver`, so `state_dict` / `load_state_dict` is the one serializer of a
decentralized run. Everything random is drawn from (seed, round, node), so there is no generator
state to save.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from koinon.runtime import Runtime
from koinon.topology.graphs import fail_links, mixing_matrix
from koinon.update import State
from koinon.wire import Receiver, Sender

if TYPE_CHECKING:
    import networkx as nx


@dataclass(frozen=True)
class Links:
    """A round's links: the graph after link failures, its mixing matrix, the failed edge count."""

    graph: nx.Graph
    mixing: torch.Tensor
    failed: int

    def live_neighbours(self, node: int, live: torch.Tensor) -> list[int]:
        return [v for v in self.graph.neighbors(node) if v != node and live[v]]


class PeerNetwork:
    """N nodes' models, public copies, liveness, graph, wire state and byte totals."""

    def __init__(self, initial: torch.Tensor, num_nodes: int, graph: nx.Graph, mixing_rule: str,
                 wire: tuple[Sender, Receiver], seed: int) -> None:
        self.num_nodes = num_nodes
        self.stack = initial.unsqueeze(0).repeat(num_nodes, 1)  # [N, P]
        # What neighbours hold of each node's model (meaningful only with a lossy codec).
        self.public = self.stack.clone()
        self.live = torch.ones(num_nodes, dtype=torch.bool)
        self.graph = graph
        self.mixing_rule = mixing_rule
        self.sender, self.receiver = wire
        self.seed = seed
        self.client_states: dict[int, State] = {}
        self.holders: list[int] = []  # MoDeST: the last round's aggregators (hold its model)
        self.round_index = 0  # rounds completed
        # Totals in bytes. Gossip has no server, so no up/down direction: every byte a node sends
        # (gossip payloads and merge all-reduces) is uplink; MoDeST splits trainer -> aggregator
        # uplink from aggregator -> trainer downlink.
        self.uplink_total = 0
        self.downlink_total = 0
        self._mixing: torch.Tensor | None = None  # rebuilt lazily when `live` or the graph changes

    # ------------------------------------------------------------- graph

    @property
    def mixing(self) -> torch.Tensor:
        """Sparse `[N, N]` mixing matrix over the live nodes (identity rows for dead ones)."""
        if self._mixing is None:
            self._mixing = mixing_matrix(self.graph, self.mixing_rule, self.live)
        return self._mixing

    def set_graph(self, graph: nx.Graph) -> None:
        self.graph = graph
        self._mixing = None

    def links(self, round_index: int, link_failure: float) -> Links:
        """Round r's links: every edge fails with probability `link_failure`, seeded by (seed, r);
        the mixing matrix of the surviving live subgraph stays doubly stochastic."""
        if not link_failure:
            return Links(self.graph, self.mixing, 0)
        rng = np.random.default_rng([self.seed, round_index, 0x714C])
        graph, failed = fail_links(self.graph, link_failure, rng)
        return Links(graph, mixing_matrix(graph, self.mixing_rule, self.live), failed)

    def live_ids(self) -> list[int]:
        return self.live.nonzero().flatten().tolist()

    # ------------------------------------------------------------- failures

    def crash(self, nodes: list[int]) -> None:
        """Nodes stop training and talking; their models stay as they were (crash with data)."""
        self.live[nodes] = False
        self._mixing = None

    def rejoin(self, nodes: list[int], loses_data: bool = False) -> None:
        """Crashed nodes come back: with the model they had when they crashed, or, when they
        lost their data, with the average of their live neighbours' models (of all live nodes
        when none is a neighbour; the stale model when nobody is live), and fresh client and codec
        state."""
        if loses_data:
            was_live = self.live.clone()
            anyone = self.stack[was_live].mean(dim=0) if bool(was_live.any()) else None
            for i in nodes:
                if was_live[i]:
                    continue
                peers = [v for v in self.graph.neighbors(i) if v != i and was_live[v]]
                start = self.stack[peers].mean(dim=0) if peers else anyone
                if start is not None:
                    self.stack[i] = start
                    self.public[i] = start
                self.client_states.pop(i, None)
                self.sender.forget(i)
                self.receiver.forget(i)
        self.live[nodes] = True
        self._mixing = None

    # ------------------------------------------------------------- steps

    def train(self, runtime: Runtime, nodes: list[int], starts: torch.Tensor, round_index: int,
              ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """`nodes` train from `starts` (one runtime call); their client states move on. Returns
        the trained models `[K, P]`, samples seen `[K]` and the sample-weighted train loss."""
        result = runtime.train(nodes, starts, {}, [self.client_states.get(c, {}) for c in nodes],
                               self.seed, round_index)
        for i, c in enumerate(nodes):
            if result.client_states[i]:
                self.client_states[c] = result.client_states[i]
        seen = result.num_samples.to(torch.float32)
        loss = float((result.train_loss * seen).sum() / seen.sum().clamp_min(1.0))
        assert result.deltas is not None
        return starts + result.deltas, result.num_samples, loss

    def merge(self) -> int:
        """Exact global average of the live models (one all-reduce); returns its bytes, counted
        in `uplink_total` (a ring all-reduce sends about twice the model per node)."""
        live_ids = self.live.nonzero().flatten()
        self.stack[live_ids] = self.stack[live_ids].mean(dim=0)
        self.public[live_ids] = self.stack[live_ids]
        sent = 2 * 4 * self.stack.shape[1] * len(live_ids) if len(live_ids) > 1 else 0
        self.uplink_total += sent
        return sent

    def consensus_distance(self, honest: torch.Tensor) -> float:
        """Mean over live `honest` nodes of ||x_i - x_bar||^2."""
        rows = self.stack[self.live & honest]
        if len(rows) == 0:
            return 0.0
        return float(((rows - rows.mean(dim=0)) ** 2).sum(dim=1).mean())

    # ------------------------------------------------------------- checkpoint

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor needed to continue bit-identically (the graph and the failure schedule
        are rebuilt from the config and `round_index`)."""
        out: dict[str, torch.Tensor] = {
            "stack": self.stack,
            "public": self.public,  # the last-sent copies (delta mode) / what neighbours hold
            "live": self.live,
            "round_index": torch.tensor(self.round_index, dtype=torch.long),
            "uplink_total": torch.tensor(self.uplink_total, dtype=torch.long),
            "downlink_total": torch.tensor(self.downlink_total, dtype=torch.long),
            "modest_holders": torch.tensor(self.holders, dtype=torch.long),
        }
        for c, st in self.client_states.items():
            out.update({f"client/{c}/{k}": v for k, v in st.items()})
        out.update({f"codec/{k}": v for k, v in self.sender.state_dict().items()})
        out.update({f"increment/{k}": v for k, v in self.receiver.state_dict().items()})
        return {k: v.detach().clone().contiguous() for k, v in out.items()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        if tuple(tensors["stack"].shape) != tuple(self.stack.shape):
            raise ValueError(f"checkpoint holds a {tuple(tensors['stack'].shape)} node stack, "
                             f"this network {tuple(self.stack.shape)}")
        self.stack = tensors["stack"].clone()
        self.public = tensors["public"].clone()
        self.live = tensors["live"].clone().bool()
        self.round_index = int(tensors["round_index"])
        self.uplink_total = int(tensors["uplink_total"])
        self.downlink_total = int(tensors["downlink_total"])
        self.holders = [int(v) for v in tensors.get("modest_holders", torch.zeros(0)).tolist()]
        self.client_states = {}
        for key, v in tensors.items():
            parts = key.split("/")
            if parts[0] == "client":
                self.client_states.setdefault(int(parts[1]), {})[parts[2]] = v.clone()
        self.sender.load_state_dict(_under(tensors, "codec/"))
        self.receiver.load_state_dict(_under(tensors, "increment/"))
        self._mixing = None


def _under(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
