"""Decentralized learning without a server: the `gossip` topology's entry point.

`Gossip` wires three kinds of parts and measures what they do:

- the state, `koinon.topology.peers.PeerNetwork`: the `[N, P]` stack of node models, their
  public copies, the live mask, the graph and its mixing matrix, client and codec state (through
  `koinon.wire`), byte totals, and the one `state_dict` of a run;
- a protocol that moves it one round: D-PSGD gossip (`koinon.topology.dpsgd.DPSGD`, every live
  node trains and mixes with its neighbours) or MoDeST sampling (`koinon.topology.modest.Modest`,
  given `modest = ModestOptions(...)`);
- a mixer for D-PSGD (`koinon.topology.mixers`): Metropolis-Hastings / max-degree / uniform
  weighted mixing, a robust aggregator per neighbourhood (`GossipOptions.aggregator`), either one
  followed by the Vanishing Variance correction (`variance_correction`), or Bristle's prioritizer
  and integrator (`bristle = BristleOptions(...)`, `koinon.topology.bristle`: feature layers
  pretrained on a public split and frozen, only the head trained and exchanged).

Options come in dataclasses, each checked when built: `GossipOptions` (graph options, mixing
rule, codec, compress_delta, aggregator, runtime, client algorithm, eval_nodes, ...),
`FailureOptions` (crashes, churn, lost data, link failures; `koinon.topology.failures`),
`ModestOptions`, `BristleOptions`, `ByzantineOptions` (a seeded fraction of Byzantine nodes that
poison their data or forge what they send; accuracies and the averaged model are over honest
nodes only). `split_options` turns the flat TOML `topology.options` into them.

`final_merge_every` k: an exact global average every k rounds, and `merge()` for one at the
end ("A Single Merging Suffices", https://arxiv.org/abs/2507.06542). `GossipOptions.resample_every`
k: a fresh seeded random graph every k rounds. Node accuracy is measured on at most `eval_nodes`
live honest nodes, a seeded sample when there are more (`GossipRound.evaluated_nodes`).

Runner interface as `Federation`: `round_index`, `uplink_total` / `downlink_total` (gossip counts
every byte as uplink; MoDeST splits trainer -> aggregator uplink from aggregator -> trainer
downlink), `params`, `evaluate()`, `state_dict()` / `load_state_dict()` (bit-identical resume).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from koinon.aggregate import Aggregator, build_aggregator
from koinon.clients import CLIENT_ALGORITHMS, ClientAlgorithm, LocalTraining
from koinon.compress import CODECS, Codec
from koinon.data.federated import FederatedData
from koinon.local import CohortTrainer, cross_entropy, evaluate
from koinon.params import Layout
from koinon.runtime import RUNTIMES, Runtime
from koinon.seeding import mix_seed
from koinon.topology.base import fit_rounds
from koinon.topology.bristle import (
    BristleMixer,
    BristleOptions,
    pretrain_and_freeze,
    reserve_public,
)
from koinon.topology.byzantine import ByzantineOptions, ByzantinePeers
from koinon.topology.dpsgd import DPSGD, CopyExchange
from koinon.topology.failures import FailureOptions, FailureSchedule
from koinon.topology.federated import component
from koinon.topology.gossip_round import GossipRound
from koinon.topology.graphs import build_graph, from_networkx
from koinon.topology.mixers import Mixer, RobustMixer, VarianceCorrected, WeightedMixer
from koinon.topology.modest import Modest, ModestOptions
from koinon.topology.peers import PeerNetwork
from koinon.wire import MODEL, Receiver, Sender

if TYPE_CHECKING:
    import networkx as nx

RESAMPLED_GRAPHS = ("random_regular", "erdos_renyi", "barabasi_albert")  # seeded random graphs
SAMPLING_CHOICES = ("all", "modest")

__all__ = [
    "BristleOptions", "ByzantineOptions", "FailureOptions", "Gossip", "GossipOptions", "GossipRound",
    "ModestOptions", "split_options",
]


@dataclass(frozen=True)
class GossipOptions:
    """The network's parts and how D-PSGD mixes (`topology.options` keys of the same names)."""

    graph_options: dict = field(default_factory=dict)  # the named graph's (degree, m, p, ...)
    mixing: str = "metropolis"  # metropolis, max_degree or uniform weights
    codec: Codec | str = "identity"
    compress_delta: bool = False  # send the change of the public copy (CHOCO-gossip)
    aggregator: Aggregator | str | None = None  # a robust rule per neighbourhood (None: W-mean)
    variance_correction: bool = False
    resample_every: int = 0  # a fresh seeded random graph every k rounds
    eval_nodes: int = 20
    algorithm: ClientAlgorithm | str = "fedavg"
    runtime: Runtime | str = "vectorized"
    loss_fn: Callable[..., torch.Tensor] = cross_entropy

    def __post_init__(self) -> None:
        if self.resample_every < 0 or self.eval_nodes < 1:
            raise ValueError("resample_every must be >= 0 and eval_nodes >= 1")


def split_options(flat: dict[str, Any]) -> dict[str, Any]:
    """Flat `topology.options` -> the options dataclasses, as keyword arguments of `Gossip`.
    `sampling = "modest"` selects `ModestOptions`; `bristle` is `true` or a table of
    `BristleOptions`; keys that belong to none are the graph's options (`degree`, `m`, ...)."""
    flat = dict(flat)
    sampling = flat.pop("sampling", "all")
    if sampling not in SAMPLING_CHOICES:
        raise ValueError(f"sampling {sampling!r}; allowed: {', '.join(SAMPLING_CHOICES)}")
    out: dict[str, Any] = {}
    for name, cls in (("options", GossipOptions), ("failures", FailureOptions),
                      ("modest", ModestOptions), ("byzantine", ByzantineOptions)):
        keys = {f.name for f in dataclasses.fields(cls)}
        picked = {k: flat.pop(k) for k in list(flat) if k in keys}
        if name != "modest" or sampling == "modest":
            out[name] = cls(**picked)
    out["bristle"] = BristleOptions.parse(flat.pop("bristle", False))
    out["options"] = dataclasses.replace(out["options"], graph_options={**out["options"].graph_options, **flat})
    return out


class Gossip:
    """N peers (one per client of `data`), each training and averaging with its neighbours.

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
        local: LocalTraining | None = None,
        final_merge_every: int = 0,
        seed: int = 0,
        options: GossipOptions | None = None,
        failures: FailureOptions | None = None,
        modest: ModestOptions | None = None,
        bristle: BristleOptions | None = None,
        byzantine: ByzantineOptions | None = None,
    ) -> None:
        o = options or GossipOptions()
        failures = failures or FailureOptions()
        byzantine = byzantine or ByzantineOptions()
        _check(o, failures, modest, bristle, graph)
        if final_merge_every < 0:
            raise ValueError("final_merge_every must be >= 0")
        n = data.num_clients
        self.graph_name = graph if isinstance(graph, str) else None
        self.graph_options = dict(o.graph_options)
        self.resample_every = o.resample_every
        self.seed = seed
        start_graph = build_graph(graph, n, seed, o.graph_options) if isinstance(graph, str) else from_networkx(graph)
        if start_graph.number_of_nodes() != n:
            raise ValueError(f"the graph has {start_graph.number_of_nodes()} nodes, the data {n} clients")
        self.schedule = FailureSchedule(failures, seed)
        if bristle is not None:
            data, public = reserve_public(data, bristle.public_fraction, seed)
            pretrain_and_freeze(model, data, public, bristle, seed)
        self.aggregator = build_aggregator(o.aggregator) if isinstance(o.aggregator, str) else o.aggregator
        self.byzantine = ByzantinePeers(byzantine, n, seed, self.aggregator)
        if self.byzantine.nodes and modest is not None:
            raise ValueError("attacks apply to gossip (sampling = 'all'), not to MoDeST sampling")
        self.data = data = self.byzantine.poison(data)
        self.model = model
        self.layout = Layout.from_module(model)
        self.eval_nodes = o.eval_nodes
        self.loss_fn = o.loss_fn
        algorithm = component(CLIENT_ALGORITHMS, o.algorithm, "client.algorithm")
        if algorithm.downloads or algorithm.uploads:
            # Server state (SCAFFOLD's control variate) has no owner without a server.
            raise ValueError(f"client algorithm {algorithm.name!r} needs a server; use fedavg or fedprox")
        # What a node sends: its whole model, or under Bristle only the (trainable) head.
        exchanged = self.layout.numel if bristle is None else self.layout.num_trainable
        if bristle is None:
            codec = component(CODECS, o.codec, "codec", layout=self.layout)
        else:  # the codec sees only the head; a codec built for the whole model is rebuilt by name
            head = Layout(tuple(e for e in self.layout.entries if e.trainable))
            codec = component(CODECS, o.codec if isinstance(o.codec, str) else o.codec.name, "codec", layout=head)
        self.bristle = (BristleMixer(model, data, bristle, seed)
                        if bristle is not None and bristle.defense else None)
        self.peers = PeerNetwork(self.layout.flatten(model), n, start_graph, o.mixing,
                                 (Sender(codec, seed, (MODEL,)), Receiver(codec, exchanged, (MODEL,))), seed)
        self.runtime: Runtime = component(RUNTIMES, o.runtime, "runtime")
        self.runtime.setup(CohortTrainer(model, self.layout, data, algorithm, local or LocalTraining(),
                                         loss_fn=o.loss_fn))
        self.protocol: DPSGD | Modest
        if modest is not None:
            self.protocol = Modest(self.runtime, modest, self.aggregator, seed)
        else:
            self.protocol = DPSGD(self.runtime, CopyExchange(exchanged, o.compress_delta),
                                  self._mixer(o), self.byzantine, failures.link_failure, final_merge_every)

    def _mixer(self, o: GossipOptions) -> Mixer:
        if self.bristle is not None:
            return self.bristle
        mixer: Mixer = WeightedMixer() if self.aggregator is None else RobustMixer(self.aggregator)
        return VarianceCorrected(mixer, self.layout) if o.variance_correction else mixer

    # ---------------------------------------------------------------- rounds

    def graph_for(self, round_index: int) -> nx.Graph:
        """With `resample_every` k: the graph of round r, drawn with seed (seed, k * floor(r / k))."""
        assert self.graph_name is not None and self.resample_every
        start = round_index - round_index % self.resample_every
        seed = self.seed if start == 0 else mix_seed(self.seed, start, 0x6A4F)
        return build_graph(self.graph_name, self.peers.num_nodes, seed, self.graph_options)

    def run_round(self, evaluate: bool = True) -> GossipRound:
        r = self.peers.round_index
        if self.resample_every and r % self.resample_every == 0 and r:
            self.peers.set_graph(self.graph_for(r))  # a fresh random graph ("epidemic learning")
        crashed, rejoined = self.schedule.apply(self.peers, r)
        out = self.protocol.run_round(self.peers, r)
        out.crashed, out.rejoined = crashed, rejoined
        out.consensus_distance = self.consensus_distance()
        if evaluate and out.num_live:
            self.evaluate_into(out, self.peers.live_ids())
        return out

    def fit(self, rounds: int, eval_every: int = 1) -> list[GossipRound]:
        """Run `rounds` more rounds, evaluating every `eval_every` rounds and after the last."""
        return fit_rounds(self, rounds, eval_every)

    def merge(self) -> None:
        """Exact global average of the live models (one all-reduce), counted in `uplink_total`."""
        self.peers.merge()

    def close(self) -> None:
        self.runtime.close()

    # ------------------------------------------------------------- runner interface

    @property
    def round_index(self) -> int:
        return self.peers.round_index

    @round_index.setter
    def round_index(self, value: int) -> None:
        self.peers.round_index = value

    @property
    def uplink_total(self) -> int:
        return self.peers.uplink_total

    @uplink_total.setter
    def uplink_total(self, value: int) -> None:
        self.peers.uplink_total = value

    @property
    def downlink_total(self) -> int:
        return self.peers.downlink_total

    @downlink_total.setter
    def downlink_total(self, value: int) -> None:
        self.peers.downlink_total = value

    @property
    def bytes_total(self) -> int:
        """All bytes sent so far (uplink + downlink)."""
        return self.uplink_total + self.downlink_total

    # ------------------------------------------------------------- metrics

    @property
    def params(self) -> torch.Tensor:
        """The network's model `[P]` (read-only): the average of the live nodes' models."""
        return self.averaged_model()

    def averaged_model(self) -> torch.Tensor:
        """The mean of the live honest nodes' models `[P]` (of all nodes when none is live).

        With MoDeST sampling: the model of the last round's first live aggregator (the model the
        next trainers start from), when there is one.
        """
        net = self.peers
        holders = [a for a in net.holders if net.live[a]]
        if holders:
            return net.stack[holders[0]].clone()
        honest = net.live & ~self.byzantine.mask
        rows = net.stack[honest] if bool(honest.any()) else net.stack
        return rows.mean(dim=0)

    def evaluate(self) -> tuple[float, float]:
        """(accuracy, loss) of the averaged model on the held-out test split."""
        ds = self.data.dataset
        return evaluate(self.model, self.layout, self.params, ds.x_test, ds.y_test, self.loss_fn)

    def consensus_distance(self) -> float:
        """Mean over live honest nodes of ||x_i - x_bar||^2."""
        return self.peers.consensus_distance(~self.byzantine.mask)

    def evaluate_node(self, node: int) -> tuple[float, float]:
        ds = self.data.dataset
        return evaluate(self.model, self.layout, self.peers.stack[node], ds.x_test, ds.y_test, self.loss_fn)

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

    # ------------------------------------------------------------- checkpoint

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The peer network's tensors (see `PeerNetwork.state_dict`) and a stateful aggregator's."""
        out = self.peers.state_dict()
        aggregator = self.aggregator
        if aggregator is not None and hasattr(aggregator, "state_dict"):
            out.update({f"aggregator/{k}": v.detach().clone().contiguous()
                        for k, v in aggregator.state_dict().items()})
        return out

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        self.peers.load_state_dict(tensors)
        aggregator_state = {k.split("/", 1)[1]: v.clone() for k, v in tensors.items() if k.startswith("aggregator/")}
        aggregator = self.aggregator
        if aggregator_state and aggregator is not None and hasattr(aggregator, "load_state_dict"):
            aggregator.load_state_dict(aggregator_state)
        if self.resample_every:
            self.peers.set_graph(self.graph_for(self.round_index))


def _check(o: GossipOptions, failures: FailureOptions, modest: ModestOptions | None,
           bristle: BristleOptions | None, graph: nx.Graph | str) -> None:
    """Refuse combinations the protocols do not implement, before anything is built."""
    if modest is not None:
        if failures.link_failure:
            raise ValueError("link_failure applies to gossip (sampling = 'all'), not to MoDeST sampling")
        if o.compress_delta:
            raise ValueError("sampling = 'modest' sends whole models: compress_delta is not supported")
    if o.resample_every and not (isinstance(graph, str) and graph in RESAMPLED_GRAPHS):
        raise ValueError(f"resample_every needs a seeded random graph: {', '.join(RESAMPLED_GRAPHS)}")
    if bristle is not None and (o.aggregator is not None or modest is not None or o.compress_delta
                                or o.variance_correction):
        raise ValueError("bristle replaces the mixing step: it takes no aggregator, "
                         "MoDeST sampling, compress_delta or variance_correction")
