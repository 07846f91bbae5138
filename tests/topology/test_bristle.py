"""Bristle: frozen pretrained features, only the head trained and exchanged, and a per-class
integrator that keeps Byzantine heads out while plain gossip averaging collapses."""

import functools

import pytest
import torch
from torch import nn

import koinon as kn
from koinon.topology import Gossip
from koinon.topology.bristle import (
    BristleMixer,
    BristleOptions,
    head_of,
    reserve_public,
    swap_accuracy,
)
from koinon.topology.byzantine import ByzantineOptions
from koinon.topology.gossip import GossipOptions

NODES = 30


def _data(alpha: float = 0.5, nodes: int = NODES) -> kn.FederatedData:
    ds = kn.DATASETS.get("digits")(seed=0, test_fraction=0.2, num_clients=nodes)
    return kn.partition_dataset(ds, "dirichlet", nodes, seed=0, options={"alpha": alpha})


def _net(bristle=True, attack=None, fraction=0.0, nodes: int = NODES, **kw) -> Gossip:
    data = _data(nodes=nodes)
    model = kn.build_model("mlp", {}, data.dataset.input_shape, data.dataset.num_classes, 0)
    return Gossip(model, data, graph="random_regular", local=kn.LocalTraining(lr=0.05, epochs=1, momentum=0.9),
                  seed=0, options=GossipOptions(graph_options={"degree": 6}, eval_nodes=nodes, **kw),
                  bristle=BristleOptions.parse(bristle), byzantine=ByzantineOptions(attack, fraction))


def test_public_split_is_disjoint_from_what_clients_keep_and_covers_their_data():
    data = _data()
    kept, public = reserve_public(data, 0.1, seed=0)
    before = torch.cat(data.client_indices).sort().values
    after = torch.cat([*kept.client_indices, public]).sort().values
    assert torch.equal(before, after)  # nothing lost, nothing duplicated
    assert len(set(public.tolist()) & set(torch.cat(kept.client_indices).tolist())) == 0
    assert 0.05 * len(before) < len(public) < 0.15 * len(before)
    assert all(len(ix) >= 1 for ix in kept.client_indices)


def test_only_the_head_is_trained_and_sent():
    net = _net()
    _, head = head_of(net.model)
    head_numel = head.weight.numel() + head.bias.numel()
    assert net.layout.num_trainable == head_numel == 650
    frozen = net.peers.stack[:, head_numel:].clone()
    r = net.run_round(evaluate=False)
    assert torch.equal(net.peers.stack[:, head_numel:], frozen)  # the features never move
    assert net.peers.stack[:, :head_numel].abs().sum() > 0  # the head (reset to zero) learned
    degree = torch.tensor([net.peers.graph.degree(i) for i in range(NODES)])
    assert r.bytes_total == int((4 * head_numel * degree).sum())  # fp32 head to every neighbour
    plain = _net(bristle=False)
    assert plain.run_round(evaluate=False).bytes_total == int((4 * plain.layout.numel * degree).sum())
    assert r.bytes_total * 7 < plain.run_round(evaluate=False).bytes_total


def _toy_mixer(tolerance: float = 0.15) -> BristleMixer:
    """Two classes, features in 2-D: class 0 at (1, 0), class 1 at (0, 1); the node has both."""
    mixer = BristleMixer.__new__(BristleMixer)
    mixer.num_classes, mixer.dim, mixer.has_bias, mixer.head_numel = 2, 2, True, 6
    mixer.options = BristleOptions(tolerance=tolerance)
    mixer.seed = 0
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    mixer.local = [(x, torch.tensor([0, 0, 1, 1]))]
    return mixer


def _head(w00, w01, w10, w11, b0=0.0, b1=0.0) -> torch.Tensor:
    return torch.tensor([w00, w01, w10, w11, b0, b1])


def test_integrator_averages_useful_rows_and_refuses_a_flipped_one():
    mixer = _toy_mixer()
    own = _head(1.0, 0.0, 0.0, 1.0)  # perfect on the node's data
    good = _head(3.0, 0.0, 0.0, 3.0)  # also perfect: accepted for both classes
    flipped = -own  # its row 0 claims the class-1 samples and misses class 0
    out = mixer.integrate(0, own, torch.stack([good, flipped]))
    # Accuracy 1 for own and good, weights 1/2 each: rows become the mean of own and good.
    assert torch.allclose(out, _head(2.0, 0.0, 0.0, 2.0))


def test_integrator_keeps_its_own_row_when_every_peer_would_cost_accuracy():
    mixer = _toy_mixer(tolerance=0.0)
    own = _head(1.0, 0.0, 0.0, 1.0)
    # Row 1 of this peer scores class-0 samples higher than row 0 does: refused for class 1;
    # its row 0 (0.5, 0) keeps every sample right: accepted for class 0.
    peer = _head(0.5, 0.0, 2.0, 1.0)
    out = mixer.integrate(0, own, peer.unsqueeze(0))
    assert torch.allclose(out, _head(0.75, 0.0, 0.0, 1.0))


def test_swap_accuracy_matches_swapping_each_column_by_hand():
    gen = torch.Generator().manual_seed(0)
    mine = torch.randint(-2, 3, (40, 5), generator=gen).float()  # small integers: many ties
    logits = torch.randint(-2, 3, (3, 40, 5), generator=gen).float()
    y = torch.randint(0, 5, (40,), generator=gen)
    expected = torch.zeros(3, 5)
    for m in range(3):
        for c in range(5):
            swapped = mine.clone()
            swapped[:, c] = logits[m, :, c]
            expected[m, c] = (swapped.argmax(dim=1) == y).float().mean()
    assert torch.equal(swap_accuracy(mine, logits, y), expected)


def test_prioritizer_takes_the_closest_heads_first():
    mixer = _toy_mixer()
    mixer.options = BristleOptions(closest=2)
    heads = torch.stack([_head(1, 0, 0, 1), _head(9, 9, 9, 9), _head(1, 0, 0, 2), _head(2, 0, 0, 1)])
    assert mixer.prioritize(heads[0], [1, 2, 3], heads, node=0, round_index=0) == [2, 3]
    mixer.options = BristleOptions(closest=1, explore=1)
    chosen = mixer.prioritize(heads[0], [1, 2, 3], heads, node=0, round_index=0)
    assert chosen[0] == 2 and chosen[1] in (1, 3)


def test_options_are_checked():
    with pytest.raises(ValueError, match="bristle options"):
        BristleOptions.parse({"closes": 3})
    with pytest.raises(ValueError, match="public_fraction"):
        BristleOptions.parse({"public_fraction": 1.5})
    assert BristleOptions.parse(False) is None
    assert BristleOptions.parse({"closest": 3}) == BristleOptions(closest=3)
    with pytest.raises(ValueError, match="nn.Linear"):
        head_of(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Conv1d(1, 1, 1)))
    with pytest.raises(ValueError, match="no aggregator"):
        _net(bristle=True, aggregator="median", nodes=8)


def _node_accuracy(net: Gossip, rounds: int) -> float:
    last = net.fit(rounds, eval_every=rounds)[-1]
    assert last.evaluated_nodes == NODES - len(net.byzantine.nodes)  # honest nodes only
    return last.mean_accuracy


@functools.cache
def _clean_bristle_accuracy() -> float:
    return _node_accuracy(_net(), 30)


@pytest.mark.slow
@pytest.mark.parametrize("attack", ["sign_flip", "gaussian"])
def test_bristle_resists_byzantine_peers_where_plain_gossip_collapses(attack):
    clean = _clean_bristle_accuracy()
    attacked = _node_accuracy(_net(attack=attack, fraction=0.3), 30)
    plain = _node_accuracy(_net(bristle=False, attack=attack, fraction=0.3), 30)
    averaged_heads = _node_accuracy(_net(bristle={"defense": False}, attack=attack, fraction=0.3), 30)
    assert clean > 0.8
    assert attacked > clean - 0.1  # measured: sign_flip 0.82, gaussian 0.87 vs clean 0.88
    assert plain < 0.3  # the full-model averages are destroyed
    assert averaged_heads < attacked - 0.3  # the defense, not the frozen features, does it


def test_the_example_config_reaches_bristle_through_topology_options():
    from koinon.config import load_config
    from koinon.experiment.runner import build_federation

    cfg = load_config("examples/bristle.toml").with_overrides({"server.rounds": 1})
    net = build_federation(cfg)
    try:
        assert isinstance(net, Gossip) and net.bristle is not None
        assert len(net.byzantine.nodes) == 15  # 30 % of 50 peers
        r = net.run_round(evaluate=False)
        assert r.bytes_total == 4 * 330 * 6 * 50  # fp32 head (32 x 10 + 10) to 6 neighbours each
    finally:
        net.close()
