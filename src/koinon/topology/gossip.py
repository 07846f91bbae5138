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

More options: `variance_correction` (the Vanishing Variance correction after each mixing step,
`correct_variance`); `resample_every` k (a fresh seeded random graph every k rounds);
`sampling = "modest"` (MoDeST decentralized sampling instead of all-node gossip, see
`koinon.topology.modest`).

Failure scenarios (all seeded by (seed, round), all TOML-friendly): `failures` {round: fraction
of all nodes} crash at that round's start (`failure_choice` random / degree / central);
`churn` {round: signed fraction}: negative = that fraction of the live nodes leave (chosen like
`failures`), positive = that fraction of the crashed nodes rejoin (seeded random ones), e.g.
`churn = { "10" = -0.3, "20" = 0.3 }` (string keys are accepted); `crash_loses_data`: a node
that rejoins lost its model (and its optimizer / codec state) and restarts from the average of
its live neighbours (of all live nodes when it has none), instead of its stale model;
`link_failure` p: every round each edge fails independently with probability p, the round's
Metropolis-Hastings matrix is built on the surviving live subgraph (so it stays doubly
stochastic), a node cut off from all its neighbours keeps its own model, and no bytes are counted
over failed links. Each round reports `crashed`, `rejoined` and `failed_links`.

Byzantine peers (`attack`, `byzantine_fraction`; see `koinon.topology.byzantine`): a seeded
fraction of the nodes poisons its data or forges the copies it sends; accuracies and the averaged
model are over honest nodes only. `bristle = true` (or a table of `BristleOptions`) runs Bristle
(`koinon.topology.bristle`): feature layers pretrained on a public split and frozen, only the
output layer trained and exchanged (bytes are the head's), a distance-based prioritizer and a
per-class performance-based integrator in place of neighbour averaging. Frozen parameters are
non-trainable layout entries, so the vectorized runtime falls back to the in-process one.

Runner interface as `Federation`: `round_index`, `uplink_total` /
`downlink_total` (gossip counts every byte as uplink; MoDeST splits trainer -> aggregator
uplink from aggregator -> trainer downlink), `params`, `evaluate()`, `state_dict()` /
`load_state_dict()` (bit-identical resume).
"""

from __future__ import annotations

import networkx as nx
import numpy as np
import torch
from torch import nn

from koinon.aggregate import Aggregator, build_aggregator
from koinon.attacks import Attack
from koinon.clients import CLIENT_ALGORITHMS, ClientAlgorithm, LocalTraining
from koinon.compress import CODECS, Codec
from koinon.data.federated import FederatedData
from koinon.errors import CodecError
from koinon.local import CohortTrainer, cross_entropy, evaluate
from koinon.log import notice
from koinon.params import Layout
from koinon.runtime import RUNTIMES, Runtime
from koinon.seeding import mix_seed
from koinon.topology.bristle import (
    BristleMixer,
    BristleOptions,
    pretrain_and_freeze,
    reserve_public,
)
from koinon.topology.byzantine import ByzantinePeers
from koinon.topology.failures import FailureSchedule
from koinon.topology.federated import component, fit_rounds
from koinon.topology.gossip_round import GossipRound
from koinon.topology.graphs import build_graph, fail_links, from_networkx, mixing_matrix
from koinon.topology.modest import modest_ranking, modest_round
from koinon.topology.variance import correct_mixed_variance, correct_variance, layer_variances
from koinon.update import State

SAMPLING_CHOICES = ("all", "modest")
RESAMPLED_GRAPHS = ("random_regular", "erdos_renyi", "barabasi_albert")  # seeded random graphs

__all__ = ["Gossip", "GossipRound", "correct_variance", "layer_variances", "modest_ranking"]


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
        bristle: bool | dict = False,
        attack: Attack | str | None = None,
        byzantine_fraction: float = 0.0,
        final_merge_every: int = 0,
        variance_correction: bool = False,
        resample_every: int = 0,
        sampling: str = "all",
        trainers_per_round: int = 10,
        aggregators_per_round: int = 2,
        success_fraction: float = 1.0,
        failures: dict[int, float] | None = None,
        failure_choice: str = "random",
        churn: dict | None = None,
        crash_loses_data: bool = False,
        link_failure: float = 0.0,
        eval_nodes: int = 20,
        seed: int = 0,
        loss_fn=cross_entropy,
    ) -> None:
        n = data.num_clients
        self.graph = (build_graph(graph, n, seed, graph_options) if isinstance(graph, str)
                      else from_networkx(graph))
        if self.graph.number_of_nodes() != n:
            raise ValueError(f"the graph has {self.graph.number_of_nodes()} nodes, the data {n} clients")
        self.schedule = FailureSchedule.build(failures, churn, failure_choice, seed)
        if not 0.0 <= link_failure <= 1.0:
            raise ValueError(f"link_failure must be a probability in [0, 1], got {link_failure}")
        if link_failure and sampling == "modest":
            raise ValueError("link_failure applies to gossip (sampling = 'all'), not to MoDeST sampling")
        if sampling not in SAMPLING_CHOICES:
            raise ValueError(f"sampling {sampling!r}; allowed: {', '.join(SAMPLING_CHOICES)}")
        if trainers_per_round < 1 or aggregators_per_round < 1 or not 0.0 < success_fraction <= 1.0:
            raise ValueError("need trainers_per_round >= 1, aggregators_per_round >= 1, success_fraction in (0, 1]")
        if sampling == "modest" and compress_delta:
            raise ValueError("sampling = 'modest' sends whole models: compress_delta is not supported")
        if resample_every < 0:
            raise ValueError(f"resample_every must be >= 0, got {resample_every}")
        if resample_every and not (isinstance(graph, str) and graph in RESAMPLED_GRAPHS):
            raise ValueError(f"resample_every needs a seeded random graph: {', '.join(RESAMPLED_GRAPHS)}")
        if final_merge_every < 0 or eval_nodes < 1:
            raise ValueError("final_merge_every must be >= 0 and eval_nodes >= 1")
        self.bristle_options = BristleOptions.parse(bristle)
        if self.bristle_options is not None:
            if aggregator is not None or sampling != "all" or compress_delta or variance_correction:
                raise ValueError("bristle replaces the mixing step: it takes no aggregator, "
                                 "MoDeST sampling, compress_delta or variance_correction")
            data, public = reserve_public(data, self.bristle_options.public_fraction, seed)
            pretrain_and_freeze(model, data.dataset.x_train[public], data.dataset.y_train[public],
                                self.bristle_options, seed)
        self.byzantine = ByzantinePeers(attack, byzantine_fraction, n, seed)
        if self.byzantine.nodes and sampling == "modest":
            raise ValueError("attacks apply to gossip (sampling = 'all'), not to MoDeST sampling")
        data = self.byzantine.poison(data)
        self.model = model
        self.data = data
        self.layout = Layout.from_module(model)
        # What a node sends: its whole model, or under Bristle only the (trainable) head.
        self.exchanged = self.layout.numel if self.bristle_options is None else self.layout.num_trainable
        self.bristle = (BristleMixer(model, data, self.bristle_options, seed)
                        if self.bristle_options is not None and self.bristle_options.defense else None)
        self.local = local or LocalTraining()
        self.algorithm = component(CLIENT_ALGORITHMS, algorithm, "client.algorithm")
        if self.algorithm.downloads or self.algorithm.uploads:
            # Server state (SCAFFOLD's control variate) has no owner without a server.
            raise ValueError(f"client algorithm {self.algorithm.name!r} needs a server; use fedavg or fedprox")
        if self.bristle_options is None:
            self.codec = component(CODECS, codec, "codec", layout=self.layout)
        else:  # the codec sees only the head; a codec built for the whole model is rebuilt by name
            head = Layout(tuple(e for e in self.layout.entries if e.trainable))
            self.codec = component(CODECS, codec if isinstance(codec, str) else codec.name, "codec",
                                   layout=head)
        self.compress_delta = compress_delta
        self.aggregator = build_aggregator(aggregator) if isinstance(aggregator, str) else aggregator
        self.runtime = component(RUNTIMES, runtime, "runtime")
        self.mixing_rule = mixing
        self.final_merge_every = final_merge_every
        self.variance_correction = variance_correction
        self.resample_every = resample_every
        self.sampling = sampling
        self.trainers_per_round = trainers_per_round
        self.aggregators_per_round = aggregators_per_round
        self.success_fraction = success_fraction
        self.modest_holders: list[int] = []  # MoDeST: last round's aggregators (hold its model)
        self.graph_name = graph if isinstance(graph, str) else None
        self.graph_options = dict(graph_options or {})
        self.crash_loses_data = crash_loses_data
        self.link_failure = link_failure
        self.eval_nodes = eval_nodes
        self.seed = seed
        self.loss_fn = loss_fn

        self.num_nodes = n
        self.stack = self.layout.flatten(model).unsqueeze(0).repeat(n, 1)  # [N, P]
        # What neighbours hold of each node's model (meaningful only with a lossy codec).
        self.public = self.stack.clone()
        self.live = torch.ones(n, dtype=torch.bool)
        self.round_index = 0  # rounds completed
        # Totals in bytes. Gossip has no server, so no up/down direction: every byte a node sends
        # (gossip payloads and merge all-reduces) is counted as uplink; downlink stays 0.
        self.uplink_total = 0
        self.downlink_total = 0
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

    def graph_for(self, round_index: int) -> nx.Graph:
        """With `resample_every` k: the graph of round r, drawn with seed (seed, k * floor(r / k))."""
        assert self.graph_name is not None and self.resample_every
        start = round_index - round_index % self.resample_every
        seed = self.seed if start == 0 else mix_seed(self.seed, start, 0x6A4F)
        return build_graph(self.graph_name, self.num_nodes, seed, self.graph_options)

    def crash(self, nodes: list[int]) -> None:
        """Nodes stop training and talking; their models stay as they were (crash with data)."""
        self.live[nodes] = False
        self._mixing = None

    def rejoin(self, nodes: list[int]) -> None:
        """Crashed nodes come back: with the model they had when they crashed, or, with
        `crash_loses_data`, with the average of their live neighbours' models (of all live nodes
        when none is a neighbour; the stale model when nobody is live), and fresh client and codec
        state."""
        if self.crash_loses_data:
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
                for states in (self.client_states, self.codec_states, self.increment_sums):
                    states.pop(i, None)
        self.live[nodes] = True
        self._mixing = None

    def _round_links(self, r: int) -> tuple[nx.Graph, torch.Tensor, int]:
        """Round r's graph after link failures, its mixing matrix and the failed edge count."""
        if not self.link_failure:
            return self.graph, self.mixing, 0
        rng = np.random.default_rng([self.seed, r, 0x714C])
        graph, failed = fail_links(self.graph, self.link_failure, rng)
        return graph, mixing_matrix(graph, self.mixing_rule, self.live), failed

    # ---------------------------------------------------------------- round

    def _gossip_copies(self, live_ids: list[int], r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each live node encodes once; returns the public copies `[N, P]` and bytes per node `[N]`."""
        sizes = torch.zeros(self.num_nodes, dtype=torch.long)
        public = self.public.clone()
        for i in live_ids:
            width = self.exchanged
            mine = self.stack[i, :width]
            target = mine - self.public[i, :width] if self.compress_delta else mine
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
            row = public[i, :width] + row if self.compress_delta else row
            if bool(torch.isfinite(row).all()):
                public[i, :width] = row
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
        """Exact global average of the live models (one all-reduce), counted in `uplink_total`."""
        live_ids = self.live.nonzero().flatten()
        self.stack[live_ids] = self.stack[live_ids].mean(dim=0)
        self.public[live_ids] = self.stack[live_ids]
        self.uplink_total += self._merge_bytes(len(live_ids))

    def _merge_bytes(self, num_live: int) -> int:
        # A ring all-reduce sends about twice the model per node.
        return 2 * 4 * self.layout.numel * num_live if num_live > 1 else 0

    def run_round(self, evaluate: bool = True) -> GossipRound:
        r = self.round_index
        if self.resample_every and r % self.resample_every == 0 and r:
            self.graph = self.graph_for(r)  # a fresh random graph ("epidemic learning")
            self._mixing = None
        crashed, rejoined = self.schedule.apply(self, r)
        if self.sampling == "modest":
            out = modest_round(self, r, evaluate, crashed)
            out.rejoined = rejoined
            return out
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
        if self.byzantine.nodes and live_ids:
            public = self.byzantine.forge(public, live_ids, self.exchanged, r, self.aggregator)
        graph, w, failed_links = self._round_links(r)
        degree = torch.tensor([sum(1 for v in graph.neighbors(u) if v != u and self.live[v])
                               for u in range(self.num_nodes)])
        sent = sizes * degree * self.live
        before = self.stack
        if self.bristle is not None:
            neighbours = {i: [v for v in graph.neighbors(i) if v != i and self.live[v]] for i in live_ids}
            self.stack = self.bristle.mix(self.stack, public, neighbours, live_ids, r)
        elif self.aggregator is not None:
            self.stack = self._robust_mix(public, live_ids, w)
        else:
            # x_i <- sum_{j != i} W_ij x_hat_j + W_ii x_i: exact self term, decoded neighbours.
            diag = torch.zeros(self.num_nodes)
            index = w.indices()
            on_diag = index[0] == index[1]
            diag[index[0, on_diag]] = w.values()[on_diag]
            self.stack = torch.sparse.mm(w, public) + diag.unsqueeze(1) * (self.stack - public)
        if self.variance_correction and live_ids:
            correct_mixed_variance(self.stack, before, public, w, live_ids, self.layout)
        self.public = public
        round_bytes = int(sent.sum())
        self.uplink_total += round_bytes

        merged = bool(self.final_merge_every) and (r + 1) % self.final_merge_every == 0
        if merged:
            sent_before = self.uplink_total
            self.merge()
            round_bytes += self.uplink_total - sent_before
        self.round_index += 1

        num_live = len(live_ids)
        out = GossipRound(
            self.round_index, num_live, train_loss, round_bytes,
            round_bytes / num_live if num_live else 0.0, self.consensus_distance(),
            crashed=crashed, rejoined=rejoined, failed_links=failed_links, merged=merged,
            num_clients=num_live, uplink_bytes=round_bytes,
        )
        if evaluate and num_live:
            self.evaluate_into(out, live_ids)
        return out

    # --------------------------------------------------------------- MoDeST

    def modest_sample(self, round_index: int, count: int, view: list[int] | None = None) -> list[int]:
        """The first `count` responsive peers of `view` (default: every node) ranked for the round.

        Candidates are pinged in rank order and unresponsive (crashed) ones skipped, so a stale
        view that still lists crashed peers yields the same sample as an up-to-date one.
        """
        ranked = modest_ranking(list(range(self.num_nodes)) if view is None else view, self.seed, round_index)
        return [p for p in ranked if self.live[p]][:count]

    # ------------------------------------------------------------- metrics

    @property
    def bytes_total(self) -> int:
        """All bytes sent so far (uplink + downlink)."""
        return self.uplink_total + self.downlink_total

    @property
    def params(self) -> torch.Tensor:
        """The network's model `[P]` (read-only): the average of the live nodes' models."""
        return self.averaged_model()

    def averaged_model(self) -> torch.Tensor:
        """The mean of the live honest nodes' models `[P]` (of all nodes when none is live).

        With MoDeST sampling: the model of the last round's first live aggregator (the model the
        next trainers start from), when there is one.
        """
        holders = [a for a in self.modest_holders if self.live[a]]
        if self.sampling == "modest" and holders:
            return self.stack[holders[0]].clone()
        honest = self.live & ~self.byzantine.mask
        rows = self.stack[honest] if bool(honest.any()) else self.stack
        return rows.mean(dim=0)

    def evaluate(self) -> tuple[float, float]:
        """(accuracy, loss) of the averaged model on the held-out test split."""
        ds = self.data.dataset
        return evaluate(self.model, self.layout, self.params, ds.x_test, ds.y_test, self.loss_fn)

    def consensus_distance(self) -> float:
        """Mean over live honest nodes of ||x_i - x_bar||^2."""
        live = self.stack[self.live & ~self.byzantine.mask]
        if len(live) == 0:
            return 0.0
        return float(((live - live.mean(dim=0)) ** 2).sum(dim=1).mean())

    def evaluate_node(self, node: int) -> tuple[float, float]:
        ds = self.data.dataset
        return evaluate(self.model, self.layout, self.stack[node], ds.x_test, ds.y_test, self.loss_fn)

    def evaluate_into(self, out: GossipRound, live_ids: list[int]) -> None:
        out.averaged_accuracy, out.averaged_loss = self.evaluate()
        nodes = [i for i in live_ids if not self.byzantine.mask[i]] or live_ids
        if len(nodes) > self.eval_nodes:  # a seeded sample keeps large networks affordable
            rng = np.random.default_rng([self.seed, self.round_index, 0xE7A1])
            nodes = sorted(int(v) for v in rng.choice(live_ids, self.eval_nodes, replace=False))
        accuracies = [self.evaluate_node(i)[0] for i in nodes]
        out.mean_accuracy = float(np.mean(accuracies))
        out.min_accuracy, out.max_accuracy = min(accuracies), max(accuracies)
        out.evaluated_nodes = len(nodes)

    def fit(self, rounds: int, eval_every: int = 1) -> list[GossipRound]:
        """Run `rounds` more rounds, evaluating every `eval_every` rounds and after the last."""
        return fit_rounds(self, rounds, eval_every)

    def close(self) -> None:
        self.runtime.close()

    # ------------------------------------------------------------- checkpoint

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor needed to continue bit-identically where this network stands.

        The graph, mixing matrix and failure schedule are rebuilt from the config and
        `round_index`; everything random is drawn from (seed, round, node), so there is no
        generator state to save.
        """
        out: dict[str, torch.Tensor] = {
            "stack": self.stack,
            "public": self.public,  # the last-sent copies (delta mode) / what neighbours hold
            "live": self.live,
            "round_index": torch.tensor(self.round_index, dtype=torch.long),
            "uplink_total": torch.tensor(self.uplink_total, dtype=torch.long),
            "downlink_total": torch.tensor(self.downlink_total, dtype=torch.long),
            "modest_holders": torch.tensor(self.modest_holders, dtype=torch.long),
        }
        for c, st in self.client_states.items():
            out.update({f"client/{c}/{k}": v for k, v in st.items()})
        for c, st in self.codec_states.items():
            out.update({f"codec/{c}/{k}": v for k, v in st.items()})
        for c, v in self.increment_sums.items():
            out[f"increment/{c}"] = v
        aggregator = self.aggregator
        if aggregator is not None and hasattr(aggregator, "state_dict"):
            out.update({f"aggregator/{k}": v for k, v in aggregator.state_dict().items()})
        return {k: v.detach().clone().contiguous() for k, v in out.items()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        if tuple(tensors["stack"].shape) != tuple(self.stack.shape):
            raise ValueError(
                f"checkpoint holds a {tuple(tensors['stack'].shape)} node stack, "
                f"this network {tuple(self.stack.shape)}"
            )
        self.stack = tensors["stack"].clone()
        self.public = tensors["public"].clone()
        self.live = tensors["live"].clone().bool()
        self.round_index = int(tensors["round_index"])
        self.uplink_total = int(tensors["uplink_total"])
        self.downlink_total = int(tensors["downlink_total"])
        self.modest_holders = [int(v) for v in tensors.get("modest_holders", torch.zeros(0)).tolist()]
        self.client_states, self.codec_states, self.increment_sums = {}, {}, {}
        aggregator_state = {}
        for key, v in tensors.items():
            parts = key.split("/")
            if parts[0] == "client":
                self.client_states.setdefault(int(parts[1]), {})[parts[2]] = v.clone()
            elif parts[0] == "codec":
                self.codec_states.setdefault(int(parts[1]), {})[parts[2]] = v.clone()
            elif parts[0] == "increment":
                self.increment_sums[int(parts[1])] = v.clone()
            elif parts[0] == "aggregator":
                aggregator_state[parts[1]] = v.clone()
        aggregator = self.aggregator
        if aggregator_state and aggregator is not None and hasattr(aggregator, "load_state_dict"):
            aggregator.load_state_dict(aggregator_state)
        if self.resample_every:
            self.graph = self.graph_for(self.round_index)
        self._mixing = None
