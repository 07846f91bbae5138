"""Decentralized learning without a server: D-PSGD gossip over any graph.

Every node holds its own model; the network's models are one `[N, P]` stack. One round
(D-PSGD, Lian et al. 2017, https://arxiv.org/abs/1705.09056): every live node runs local training
from its own model (one `runtime.train` call over all live nodes, `starts = stack[live]`), then
mixes with its neighbours, `stack <- W @ stack`, as ONE sparse matrix product. W is the
Metropolis-Hastings matrix of the subgraph induced by the live nodes (rebuilt when nodes crash
or rejoin), so the survivors' mean is preserved; crashed nodes keep their stale model.

Compressed gossip: each live node encodes its model (or, with `compress_delta`, the change of
its public copy since it last sent, as in CHOCO-gossip) once with its own codec state; its
neighbours mix with the decoded public copy while each node keeps its exact model for the self
term: `x <- W @ x_hat + diag(W) * (x - x_hat)`. A node's bytes are its payload size times its
live degree.

Options: a robust `aggregator` applied per node over its closed neighbourhood's models instead
of the W-weighted mean (a Python loop over nodes); `final_merge_every` k: an exact global average
every k rounds, and `merge()` for one at the end ("A Single Merging Suffices",
https://arxiv.org/abs/2507.06542), counted as a ring all-reduce (2 x model bytes a node); crash
and rejoin schedules. Node accuracy is measured on at most `eval_nodes` live nodes, a seeded
sample when there are more (`GossipRound.evaluated_nodes` says how many).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx
import numpy as np
import torch
from torch import nn

from koinon.aggregate import Aggregator, build_aggregator
from koinon.clients import CLIENT_ALGORITHMS, ClientAlgorithm, LocalTraining
from koinon.clients.base import State
from koinon.compress import CODECS, Codec
from koinon.data.federated import FederatedData
from koinon.errors import CodecError
from koinon.params import Layout
from koinon.runtime import RUNTIMES, CohortTrainer, Runtime, evaluate, mix_seed
from koinon.runtime.base import notice
from koinon.runtime.trainer import cross_entropy
from koinon.topology.graphs import build_graph, from_networkx, mixing_matrix

FAILURE_CHOICES = ("random", "degree", "central")


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
    merged: bool = False

    def as_dict(self) -> dict:
        return {
            "round": self.round,
            "num_live": self.num_live,
            "train_loss": self.train_loss,
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
            "merged": self.merged,
        }


def _component(registry, value, section: str, **context):
    return registry.build(value, {}, section, **context) if isinstance(value, str) else value


class Gossip:
    """D-PSGD: N nodes (one per client of `data`), each training and averaging with its neighbours.

    >>> net = Gossip(model, data, graph="exponential", local=LocalTraining(lr=0.05))
    >>> for r in net.fit(rounds=20):
    ...     print(r.averaged_accuracy, r.consensus_distance)
    """

    def __init__(
        self,
        model: nn.Module,
        data: FederatedData,
        *,
        graph: nx.Graph | str = "ring",
        graph_options: dict | None = None,
        mixing: str = "metropolis",
        local: LocalTraining | None = None,
        algorithm: ClientAlgorithm | str = "fedavg",
        codec: Codec | str = "identity",
        compress_delta: bool = False,
        aggregator: Aggregator | str | None = None,
        runtime: Runtime | str = "vectorized",
        final_merge_every: int = 0,
        failures: dict[int, float] | None = None,
        failure_choice: str = "random",
        eval_nodes: int = 20,
        seed: int = 0,
        loss_fn=cross_entropy,
    ) -> None:
        n = data.num_clients
        self.graph = (build_graph(graph, n, seed, graph_options) if isinstance(graph, str)
                      else from_networkx(graph))
        if self.graph.number_of_nodes() != n:
            raise ValueError(f"the graph has {self.graph.number_of_nodes()} nodes, the data {n} clients")
        if failure_choice not in FAILURE_CHOICES:
            raise ValueError(f"failure_choice {failure_choice!r}; allowed: {', '.join(FAILURE_CHOICES)}")
        for r, fraction in (failures or {}).items():
            if r < 0 or not 0.0 <= fraction <= 1.0:
                raise ValueError(f"failures {{{r}: {fraction}}}: need round >= 0 and fraction in [0, 1]")
        if final_merge_every < 0 or eval_nodes < 1:
            raise ValueError("final_merge_every must be >= 0 and eval_nodes >= 1")
        self.model = model
        self.data = data
        self.layout = Layout.from_module(model)
        self.local = local or LocalTraining()
        self.algorithm = _component(CLIENT_ALGORITHMS, algorithm, "client.algorithm")
        if self.algorithm.downloads or self.algorithm.uploads:
            # Server state (SCAFFOLD's control variate) has no owner without a server.
            raise ValueError(f"client algorithm {self.algorithm.name!r} needs a server; use fedavg or fedprox")
        self.codec = _component(CODECS, codec, "codec", layout=self.layout)
        self.compress_delta = compress_delta
        self.aggregator = build_aggregator(aggregator) if isinstance(aggregator, str) else aggregator
        self.runtime = _component(RUNTIMES, runtime, "runtime")
        self.mixing_rule = mixing
        self.final_merge_every = final_merge_every
        self.failures = dict(failures or {})
        self.failure_choice = failure_choice
        self.eval_nodes = eval_nodes
        self.seed = seed
        self.loss_fn = loss_fn

        self.num_nodes = n
        self.stack = self.layout.flatten(model).unsqueeze(0).repeat(n, 1)  # [N, P]
        # What neighbours hold of each node's model (meaningful only with a lossy codec).
        self.public = self.stack.clone()
        self.live = torch.ones(n, dtype=torch.bool)
        self.round_index = 0
        self.bytes_total = 0
        self.client_states: dict[int, State] = {}
        self.codec_states: dict[int, State] = {}
        self.increment_sums: dict[int, torch.Tensor] = {}
        self._mixing: torch.Tensor | None = None  # rebuilt lazily when `live` changes
        self.runtime.setup(
            CohortTrainer(model, self.layout, data, self.algorithm, self.local, loss_fn=loss_fn)
        )

    # ------------------------------------------------------------- failures

    @property
    def mixing(self) -> torch.Tensor:
        """Sparse `[N, N]` mixing matrix over the live nodes (identity rows for dead ones)."""
        if self._mixing is None:
            self._mixing = mixing_matrix(self.graph, self.mixing_rule, self.live)
        return self._mixing

    def crash(self, nodes: list[int]) -> None:
        """Nodes stop training and talking; their models stay as they were (crash with data)."""
        self.live[nodes] = False
        self._mixing = None

    def rejoin(self, nodes: list[int]) -> None:
        """Crashed nodes come back with the model they had when they crashed."""
        self.live[nodes] = True
        self._mixing = None

    def choose_failures(self, count: int, round_index: int) -> list[int]:
        """`count` live nodes to fail: seeded random ones, or the most central of the live graph."""
        alive = self.live.nonzero().flatten().tolist()
        count = min(count, len(alive))
        if self.failure_choice == "random":
            rng = np.random.default_rng([self.seed, round_index, 0xFA11])
            return sorted(int(v) for v in rng.choice(alive, count, replace=False))
        sub = self.graph.subgraph(alive)
        if self.failure_choice == "degree":
            score = dict(sub.degree())
        else:  # betweenness is O(N E); sample pivots on large graphs to keep it seconds
            k = None if len(alive) <= 300 else 300
            score = nx.betweenness_centrality(sub, k=k, seed=self.seed)
        ranked = sorted(alive, key=lambda v: (-score[v], v))  # ties broken by id: deterministic
        return sorted(ranked[:count])

    # ---------------------------------------------------------------- round

    def _gossip_copies(self, live_ids: list[int], r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each live node encodes once; returns the public copies `[N, P]` and bytes per node `[N]`."""
        sizes = torch.zeros(self.num_nodes, dtype=torch.long)
        public = self.public.clone()
        for i in live_ids:
            target = self.stack[i] - self.public[i] if self.compress_delta else self.stack[i]
            state = self.codec_states.get(i) or self.codec.init_state()
            gen = torch.Generator().manual_seed(mix_seed(self.seed, r, i, 0x6055))
            payload, new_state = self.codec.encode(target, state, gen)
            if new_state:
                self.codec_states[i] = new_state
            sizes[i] = len(payload)
            try:
                row = self.codec.decode(payload)
            except CodecError as exc:  # neighbours keep the previous copy
                notice(f"round {r + 1}: node {i}'s payload was refused ({exc})")
                continue
            if getattr(self.codec, "decodes_increment", False):
                row = self.increment_sums.get(i, torch.zeros_like(row)) + row
                self.increment_sums[i] = row
            row = public[i] + row if self.compress_delta else row
            if bool(torch.isfinite(row).all()):
                public[i] = row
        return public, sizes

    def _robust_mix(self, public: torch.Tensor, live_ids: list[int], w: torch.Tensor) -> torch.Tensor:
        """Each node applies the aggregator to its own exact model and its neighbours' copies."""
        assert self.aggregator is not None
        out = self.stack.clone()
        dense_rows = w.index_select(0, torch.tensor(live_ids)).to_dense()
        for row, i in enumerate(live_ids):
            peers = [j for j in dense_rows[row].nonzero().flatten().tolist() if j != i]
            models = torch.cat([self.stack[i : i + 1], public[peers]])
            weights = torch.cat([dense_rows[row, i : i + 1], dense_rows[row, peers]])
            try:
                out[i] = self.aggregator.aggregate(models, weights)
            except ValueError:  # too few neighbours for the rule's assumption: keep own model
                pass
        return out

    def merge(self) -> None:
        """Exact global average of the live models (one all-reduce), counted in `bytes_total`."""
        live_ids = self.live.nonzero().flatten()
        self.stack[live_ids] = self.stack[live_ids].mean(dim=0)
        self.public[live_ids] = self.stack[live_ids]
        self.bytes_total += self._merge_bytes(len(live_ids))

    def _merge_bytes(self, num_live: int) -> int:
        # A ring all-reduce sends about twice the model per node.
        return 2 * 4 * self.layout.numel * num_live if num_live > 1 else 0

    def run_round(self, evaluate: bool = True) -> GossipRound:
        r = self.round_index
        crashed: list[int] = []
        if r in self.failures:
            crashed = self.choose_failures(round(self.failures[r] * self.num_nodes), r)
            self.crash(crashed)
            notice(f"round {r + 1}: {len(crashed)} nodes crashed, {int(self.live.sum())} live")
        live_ids = self.live.nonzero().flatten().tolist()

        train_loss = float("nan")
        if live_ids:
            result = self.runtime.train(
                live_ids, self.stack[live_ids], {}, [self.client_states.get(c, {}) for c in live_ids],
                self.seed, r,
            )
            trained = self.stack[live_ids] + result.deltas
            ok = torch.isfinite(trained).all(dim=1)  # a diverged node keeps its model
            self.stack[torch.tensor(live_ids)[ok]] = trained[ok]
            for i, c in enumerate(live_ids):
                if result.client_states[i]:
                    self.client_states[c] = result.client_states[i]
            seen = result.num_samples.to(torch.float32)
            train_loss = float((result.train_loss * seen).sum() / seen.sum().clamp_min(1.0))

        public, sizes = self._gossip_copies(live_ids, r)
        w = self.mixing
        degree = torch.tensor([sum(1 for v in self.graph.neighbors(u) if self.live[v]) for u in range(self.num_nodes)])
        sent = sizes * degree * self.live
        if self.aggregator is not None:
            self.stack = self._robust_mix(public, live_ids, w)
        else:
            # x_i <- sum_{j != i} W_ij x_hat_j + W_ii x_i: exact self term, decoded neighbours.
            diag = torch.zeros(self.num_nodes)
            index = w.indices()
            on_diag = index[0] == index[1]
            diag[index[0, on_diag]] = w.values()[on_diag]
            self.stack = torch.sparse.mm(w, public) + diag.unsqueeze(1) * (self.stack - public)
        self.public = public
        round_bytes = int(sent.sum())
        self.bytes_total += round_bytes

        merged = bool(self.final_merge_every) and (r + 1) % self.final_merge_every == 0
        if merged:
            before = self.bytes_total
            self.merge()
            round_bytes += self.bytes_total - before
        self.round_index += 1

        num_live = len(live_ids)
        out = GossipRound(
            self.round_index, num_live, train_loss, round_bytes,
            round_bytes / num_live if num_live else 0.0, self.consensus_distance(),
            crashed=crashed, merged=merged,
        )
        if evaluate and num_live:
            self._evaluate_into(out, live_ids)
        return out

    # ------------------------------------------------------------- metrics

    def averaged_model(self) -> torch.Tensor:
        """The mean of the live nodes' models `[P]`."""
        return self.stack[self.live].mean(dim=0)

    def consensus_distance(self) -> float:
        """Mean over live nodes of ||x_i - x_bar||^2."""
        live = self.stack[self.live]
        if len(live) == 0:
            return 0.0
        return float(((live - live.mean(dim=0)) ** 2).sum(dim=1).mean())

    def evaluate_node(self, node: int) -> tuple[float, float]:
        ds = self.data.dataset
        return evaluate(self.model, self.layout, self.stack[node], ds.x_test, ds.y_test, self.loss_fn)

    def _evaluate_into(self, out: GossipRound, live_ids: list[int]) -> None:
        ds = self.data.dataset
        out.averaged_accuracy, out.averaged_loss = evaluate(
            self.model, self.layout, self.averaged_model(), ds.x_test, ds.y_test, self.loss_fn
        )
        nodes = live_ids
        if len(nodes) > self.eval_nodes:  # a seeded sample keeps large networks affordable
            rng = np.random.default_rng([self.seed, self.round_index, 0xE7A1])
            nodes = sorted(int(v) for v in rng.choice(live_ids, self.eval_nodes, replace=False))
        accuracies = [self.evaluate_node(i)[0] for i in nodes]
        out.mean_accuracy = float(np.mean(accuracies))
        out.min_accuracy, out.max_accuracy = min(accuracies), max(accuracies)
        out.evaluated_nodes = len(nodes)

    def fit(self, rounds: int, eval_every: int = 1) -> list[GossipRound]:
        """Run `rounds` more rounds, evaluating every `eval_every` rounds and after the last."""
        out = []
        for i in range(rounds):
            last = i == rounds - 1
            out.append(self.run_round(evaluate=last or (self.round_index + 1) % eval_every == 0))
        return out

    def close(self) -> None:
        self.runtime.close()
