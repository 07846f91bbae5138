import math

import networkx as nx
import pytest
import torch
from torch import nn

import koinon as kn
from koinon.topology import GRAPHS as REGISTERED_GRAPHS
from koinon.topology import Gossip
from koinon.topology.failures import FailureOptions
from koinon.topology.gossip import GossipOptions, split_options
from koinon.topology.graphs import build_graph, check_mixing, from_networkx, mixing_matrix

GRAPHS = {
    "ring": {}, "torus": {}, "exponential": {}, "fully_connected": {}, "star": {},
    "random_regular": {"degree": 4}, "erdos_renyi": {"p": 0.3}, "barabasi_albert": {"m": 2},
}


def _parts(num_nodes):
    ds = kn.DATASETS.get("digits")(seed=0, test_fraction=0.2, num_clients=num_nodes)
    data = kn.partition_dataset(ds, "dirichlet", num_nodes, seed=0, options={"alpha": 0.5})
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    return model, data


def _net(num_nodes=20, graph="ring", final_merge_every=0, **flat):
    """A network whose options are given flat, as a config's `topology.options` (split_options)."""
    model, data = _parts(num_nodes)
    return Gossip(model, data, graph=graph, local=kn.LocalTraining(lr=0.05, epochs=2, momentum=0.9),
                  final_merge_every=final_merge_every, seed=3, **split_options(flat))


def test_options_dataclasses_build_the_same_network_as_flat_options():
    model, data = _parts(10)
    direct = Gossip(model, data, graph="exponential", local=kn.LocalTraining(lr=0.05, epochs=2, momentum=0.9),
                    seed=3, options=GossipOptions(codec={"name": "ef21", "inner": "topk"}),
                    failures=FailureOptions(failures={1: 0.2}, link_failure=0.3))
    flat = _net(num_nodes=10, graph="exponential", codec={"name": "ef21", "inner": "topk"}, failures={1: 0.2}, link_failure=0.3)
    direct.fit(rounds=3, eval_every=10)
    flat.fit(rounds=3, eval_every=10)
    assert direct.state_dict().keys() == flat.state_dict().keys()
    assert all(torch.equal(v, flat.state_dict()[k]) for k, v in direct.state_dict().items())
    with pytest.raises(ValueError, match="sampling"):
        split_options({"sampling": "everyone"})


def test_every_registered_graph_is_covered():
    assert set(REGISTERED_GRAPHS.names()) == set(GRAPHS) | {"edge_list"}


@pytest.mark.parametrize("name", sorted(GRAPHS))
@pytest.mark.parametrize("rule", ["metropolis", "max_degree"])
def test_mixing_is_symmetric_and_doubly_stochastic(name, rule):
    graph = build_graph(name, 16, seed=1, options=GRAPHS[name])
    assert graph.number_of_nodes() == 16 and nx.is_connected(graph)
    w = mixing_matrix(graph, rule)
    check_mixing(w)
    dense = w.to_dense()
    assert ((dense > 0) == (torch.from_numpy(nx.to_numpy_array(graph)) + torch.eye(16) > 0)).all()
    # With a third of the nodes dead: still doubly stochastic, dead rows are the identity.
    live = torch.arange(16) % 3 != 0
    wl = mixing_matrix(graph, rule, live).to_dense()
    check_mixing(wl)
    assert torch.equal(wl[~live][:, ~live], torch.eye(int((~live).sum())))
    assert (wl[live][:, ~live] == 0).all()


def test_ring_weights_are_one_third_and_check_rejects_bad_matrices():
    w = mixing_matrix(build_graph("ring", 5)).to_dense()
    assert torch.allclose(w[0], torch.tensor([1, 1, 0, 0, 1]) / 3.0)
    with pytest.raises(ValueError, match="doubly stochastic"):
        check_mixing(torch.tensor([[0.5, 0.5], [0.5, 0.6]]))
    with pytest.raises(ValueError, match="symmetric"):
        check_mixing(torch.tensor([[0.2, 0.8, 0.0], [0.0, 0.2, 0.8], [0.8, 0.0, 0.2]]))


def test_edge_list_file_and_networkx_graph(tmp_path):
    path = tmp_path / "edges.txt"
    path.write_text("# a square\n0 1\n1 2\n2 3\n3 0\n")
    graph = build_graph("edge_list", 4, options={"path": str(path)})
    assert sorted(graph.edges()) == [(0, 1), (0, 3), (1, 2), (2, 3)]
    relabelled = from_networkx(nx.Graph([("a", "b"), ("b", "c")]))
    assert sorted(relabelled.edges()) == [(0, 1), (1, 2)]


@pytest.mark.parametrize("name", ["ring", "exponential", "barabasi_albert", "torus"])
def test_repeated_mixing_converges_to_the_mean(name):
    w = mixing_matrix(build_graph(name, 24, seed=0))
    x = torch.randn(24, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    mean = x.mean(dim=0)
    for _ in range(600):
        x = torch.sparse.mm(w, x)
        assert torch.allclose(x.mean(dim=0), mean, atol=1e-5)  # the mean is preserved every step
    assert torch.allclose(x, mean.expand_as(x), atol=1e-4)


def test_sparse_product_equals_a_per_node_neighbour_loop():
    graph = build_graph("barabasi_albert", 30, seed=2)
    live = torch.ones(30, dtype=torch.bool)
    live[[0, 5, 7]] = False
    x = torch.randn(30, 11, generator=torch.Generator().manual_seed(1))
    mixed = torch.sparse.mm(mixing_matrix(graph, "metropolis", live), x)
    deg = {u: sum(1 for v in graph.neighbors(u) if live[v]) for u in graph}
    expected = x.clone()  # dead nodes keep their model
    for i in live.nonzero().flatten().tolist():
        total, kept = torch.zeros(11), 1.0
        for j in graph.neighbors(i):
            if live[j]:
                weight = 1.0 / (1 + max(deg[i], deg[j]))
                total += weight * x[j]
                kept -= weight
        expected[i] = total + kept * x[i]
    assert torch.allclose(mixed, expected, atol=1e-6)


@pytest.mark.parametrize("graph", ["ring", "exponential"])
def test_dpsgd_learns_and_a_final_merge_reaches_consensus(graph):
    net = _net(graph=graph)
    results = net.fit(rounds=12, eval_every=6)
    last = results[-1]
    assert last.averaged_accuracy > 0.6  # chance is 0.1
    assert last.num_live == 20 and last.evaluated_nodes == 20
    assert last.min_accuracy <= last.mean_accuracy <= last.max_accuracy
    assert last.consensus_distance > 1e-3  # nodes disagree before the merge
    degree = 2 if graph == "ring" else 8  # offsets +-1, +-2, +-4, +-8 (16 = -4 mod 20)
    assert last.bytes_per_node == 4 * net.layout.numel * degree
    net.merge()
    assert net.consensus_distance() < 1e-10


def test_merging_every_k_rounds():
    net = _net(graph="ring", final_merge_every=2)
    results = net.fit(rounds=4, eval_every=4)
    assert [r.merged for r in results] == [False, True, False, True]
    assert results[1].consensus_distance < 1e-10 < results[0].consensus_distance


def test_crashing_half_the_nodes_mid_run_keeps_going_without_nans():
    net = _net(graph="exponential", failures={3: 0.5}, failure_choice="central")
    results = net.fit(rounds=6)
    assert [r.num_live for r in results] == [20, 20, 20, 10, 10, 10]
    assert len(results[3].crashed) == 10
    assert torch.isfinite(net.peers.stack).all()
    for r in results:
        assert all(math.isfinite(v) for v in (r.train_loss, r.consensus_distance, r.averaged_accuracy))
    net.peers.rejoin(results[3].crashed)
    assert net.run_round().num_live == 20
    net.peers.crash(list(range(20)))  # everyone gone: the round is empty, not an error
    empty = net.run_round()
    assert empty.num_live == 0 and empty.bytes_total == 0


def test_random_failures_are_seeded():
    a, b = (_net(num_nodes=10, graph="ring", failures={0: 0.3}) for _ in range(2))
    assert a.run_round(evaluate=False).crashed == b.run_round(evaluate=False).crashed


def test_compressed_gossip_counts_real_bytes():
    full, half = _net(graph="ring"), _net(graph="ring", codec="fp16")
    a, b = full.run_round(evaluate=False), half.run_round(evaluate=False)
    p = full.layout.numel
    assert a.bytes_total == 20 * 2 * 4 * p and b.bytes_total == 20 * 2 * 2 * p
    delta = _net(graph="ring", codec="fp16", compress_delta=True)
    result = delta.fit(rounds=8, eval_every=8)[-1]
    assert result.averaged_accuracy > 0.3 and torch.isfinite(delta.peers.stack).all()


def test_robust_aggregator_per_neighbourhood():
    net = _net(graph="exponential", aggregator="median")
    result = net.fit(rounds=8, eval_every=8)[-1]
    assert torch.isfinite(net.peers.stack).all() and result.averaged_accuracy > 0.5


def test_runner_interface_and_round_metrics():
    net = _net(num_nodes=10, graph="ring", failures={1: 0.2})
    results = net.fit(rounds=2)
    d = results[-1].as_dict()
    for key in ("round", "test_accuracy", "test_loss", "train_loss", "num_clients",
                "uplink_bytes", "downlink_bytes"):
        assert key in d
    assert d["round"] == net.round_index == 2 and d["num_clients"] == 8
    assert d["test_accuracy"] == results[-1].averaged_accuracy == net.evaluate()[0]
    assert net.uplink_total == sum(r.uplink_bytes for r in results) and net.downlink_total == 0
    assert torch.equal(net.params, net.peers.stack[net.peers.live].mean(dim=0))


@pytest.mark.parametrize("kw", [
    {"graph": "exponential", "failures": {1: 0.25, 4: 0.2}},
    {"graph": "ring", "codec": "fp16", "compress_delta": True, "failures": {2: 0.3},
     "final_merge_every": 4},
    {"graph": "ring", "codec": {"name": "ef", "inner": "topk"}, "compress_delta": True, "failures": {1: 0.2}},  # codec state
    {"graph": "ring", "codec": {"name": "ef21", "inner": "topk"}, "failures": {1: 0.2}},  # increments
    {"graph": "random_regular", "graph_options": {"degree": 4}, "resample_every": 2, "failures": {3: 0.2}},
    {"graph": "exponential", "link_failure": 0.3, "churn": {"1": -0.4, "4": 0.5}, "crash_loses_data": True},
])
def test_state_dict_resumes_bit_identically(kw):
    a = _net(num_nodes=10, **kw)
    a.fit(rounds=3, eval_every=10)
    saved = a.state_dict()
    assert saved["round_index"].dtype == torch.int64 and saved["round_index"].dim() == 0
    a.fit(rounds=2, eval_every=10)
    b = _net(num_nodes=10, **kw)
    b.load_state_dict(saved)
    b.fit(rounds=2, eval_every=10)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    assert set(a.state_dict()) == set(b.state_dict())
    assert (a.round_index, a.uplink_total) == (b.round_index, b.uplink_total)


def test_variance_correction_restores_the_layer_variance_and_keeps_the_mean():
    from koinon.topology.variance import correct_mixed_variance, correct_variance, layer_variances

    net = _net(num_nodes=12, graph="ring", variance_correction=True)
    layout = net.layout
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(12, layout.numel, generator=gen) * torch.linspace(0.1, 2.0, layout.numel)
    target = torch.rand(12, len(layout.entries), generator=gen) + 0.5
    for eps in (0.0, 1e-4):
        out = correct_variance(x, target, layout, eps=eps)
        for k, e in enumerate(layout.entries):
            w, v = x[:, e.offset : e.offset + e.numel], out[:, e.offset : e.offset + e.numel]
            assert torch.allclose(v.mean(dim=1), w.mean(dim=1), atol=1e-5)  # the mean is unchanged
            var = v.var(dim=1, unbiased=False)
            expected = target[:, k] if eps == 0 else w.var(dim=1, unbiased=False) * (
                (target[:, k] + eps) / (w.var(dim=1, unbiased=False) + eps))
            assert torch.allclose(var, expected, rtol=1e-4)
    # In a round: each live node gets the mean layer variance of its closed neighbourhood's models.
    net.peers.crash([5])
    own = x.clone()  # the models each node mixed (identity codec: public copies are exact)
    net.peers.stack = torch.sparse.mm(net.peers.mixing, own)
    live_ids = net.peers.live.nonzero().flatten().tolist()
    mixed = net.peers.stack.clone()
    correct_mixed_variance(net.peers.stack, own, own, net.peers.mixing, live_ids, layout)
    variances = layer_variances(own, layout)
    for i in live_ids:
        hood = [i] + [j for j in net.peers.graph.neighbors(i) if net.peers.live[j]]
        target = variances[hood].mean(dim=0)
        assert torch.allclose(net.peers.stack[i], correct_variance(mixed[i : i + 1], target[None], layout)[0], atol=1e-6)
    assert torch.equal(net.peers.stack[5], mixed[5])  # a crashed node is left alone
    mean_var = layer_variances(net.peers.stack[live_ids], layout)
    assert (mean_var > layer_variances(mixed[live_ids], layout) - 1e-6).all()  # averaging had shrunk it


def test_variance_corrected_gossip_learns():
    net = _net(graph="ring", variance_correction=True)
    result = net.fit(rounds=10, eval_every=10)[-1]
    assert torch.isfinite(net.peers.stack).all() and result.averaged_accuracy > 0.6


def test_random_regular_graph_resampled_every_k_rounds():
    with pytest.raises(ValueError, match="seeded random graph"):
        _net(num_nodes=10, graph="ring", resample_every=1)
    net = _net(num_nodes=12, graph="random_regular", graph_options={"degree": 3}, resample_every=2)
    twin = _net(num_nodes=12, graph="random_regular", graph_options={"degree": 3}, resample_every=2)
    edges = []
    for r in range(6):
        result = net.run_round(evaluate=r == 5)
        edges.append(sorted(net.peers.graph.edges()))
        assert all(d == 3 for _, d in net.peers.graph.degree())
        check_mixing(net.peers.mixing)
    assert edges[0] == edges[1] != edges[2] == edges[3] != edges[4] == edges[5]
    assert edges[0] != edges[4]
    assert sorted(twin.graph_for(4).edges()) == edges[4]  # seeded by (seed, round): every node agrees
    assert result.averaged_accuracy > 0.5 and torch.isfinite(net.peers.stack).all()


def test_modest_samples_are_the_same_on_nodes_sharing_a_view():
    from koinon.topology.modest import modest_ranking

    view = list(range(30))
    shuffled = sorted(view, key=lambda p: (p * 7919) % 31)  # another node's copy, another order
    assert modest_ranking(view, 3, 5) == modest_ranking(shuffled, 3, 5)
    assert modest_ranking(view, 3, 5) != modest_ranking(view, 3, 6)  # a fresh sample every round
    net = _net(num_nodes=30, sampling="modest", trainers_per_round=6, aggregators_per_round=2)
    sample = net.protocol.sample(net.peers, 4, 6)
    net.peers.crash(sample[:2])  # pinged, unresponsive: skipped, the next ranked peers step in
    stale_view = net.protocol.sample(net.peers, 4, 6, view=view)
    fresh_view = net.protocol.sample(net.peers, 4, 6, view=[p for p in view if net.peers.live[p]])
    assert stale_view == fresh_view and stale_view[:4] == sample[2:] and len(stale_view) == 6


def test_modest_sampling_learns_counts_bytes_and_survives_failures():
    kw = {"sampling": "modest", "trainers_per_round": 8, "aggregators_per_round": 2}
    net = _net(**kw)
    first = net.run_round(evaluate=False)
    p4 = 4 * net.layout.numel
    trainers, aggregators = net.protocol.sample(net.peers, 0, 8), net.protocol.sample(net.peers, 1, 2)
    assert first.num_clients == 8 and first.downlink_bytes == 0
    assert first.uplink_bytes == p4 * sum(1 for t in trainers for a in aggregators if a != t)
    second = net.run_round(evaluate=False)
    assert second.downlink_bytes == p4 * sum(1 for a in aggregators for t in net.protocol.sample(net.peers, 1, 8) if a != t)
    result = net.fit(rounds=10, eval_every=10)[-1]
    assert result.test_accuracy > 0.6 and torch.equal(net.params, net.peers.stack[net.peers.holders[0]])
    # 80% of the nodes crash mid-run; sampling skips them and training goes on.
    crashy = _net(failures={3: 0.8}, success_fraction=0.75, **kw)
    results = crashy.fit(rounds=8, eval_every=8)
    assert [r.num_clients for r in results] == [8, 8, 8, 4, 4, 4, 4, 4]
    assert torch.isfinite(crashy.peers.stack).all() and results[-1].test_accuracy > 0.15  # 4 non-IID nodes left
    # Resume bit-identically.
    a = _net(failures={2: 0.3}, **kw)
    a.fit(rounds=3, eval_every=10)
    saved = a.state_dict()
    a.fit(rounds=2, eval_every=10)
    b = _net(failures={2: 0.3}, **kw)
    b.load_state_dict(saved)
    b.fit(rounds=2, eval_every=10)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_link_failures_mix_doubly_stochastic_without_nans_and_learn():
    net = _net(graph="exponential", link_failure=0.4, failures={2: 0.25})
    results = []
    for r in range(10):
        links = net.peers.links(r, 0.4)
        check_mixing(links.mixing)  # doubly stochastic on the surviving live subgraph, every round
        results.append(net.run_round(evaluate=r == 9))
        assert results[-1].failed_links == links.failed
        assert torch.isfinite(net.peers.stack).all() and math.isfinite(results[-1].consensus_distance)
    assert 0 < sum(r.failed_links for r in results) < 10 * net.peers.graph.number_of_edges()
    assert results[-1].averaged_accuracy > 0.5
    # Bytes only over links up this round (the graph is 8-regular, failures are per round).
    full = _net(graph="exponential").run_round(evaluate=False).bytes_total
    assert 0 < results[0].bytes_total < full
    # A node cut off from every neighbour keeps its own (trained) model; no links: nothing sent.
    lonely = _net(num_nodes=10, graph="ring", link_failure=1.0)
    assert torch.equal(lonely.peers.links(0, 1.0).mixing.to_dense(), torch.eye(10))
    out = lonely.run_round(evaluate=False)
    assert out.bytes_total == 0 and out.failed_links == 10
    isolated = _net(num_nodes=10, graph=nx.empty_graph(10))
    isolated.run_round(evaluate=False)
    assert torch.equal(lonely.peers.stack, isolated.peers.stack)
    # Seeded by (seed, round): the same on two networks, different from round to round.
    twin = _net(graph="exponential", link_failure=0.4)
    assert set(twin.peers.links(3, 0.4).graph.edges()) == set(net.peers.links(3, 0.4).graph.edges())
    assert set(net.peers.links(3, 0.4).graph.edges()) != set(net.peers.links(4, 0.4).graph.edges())
    with pytest.raises(ValueError, match="link_failure"):
        _net(link_failure=1.5)


def test_churn_schedule_leaves_and_rejoins_and_is_reported():
    net = _net(graph="exponential", churn={"2": -0.5, 4: 0.4, "5": 1.0})
    results = net.fit(rounds=7, eval_every=7)
    assert [r.num_live for r in results] == [20, 20, 10, 10, 14, 20, 20]
    assert len(results[2].crashed) == 10 and results[2].rejoined == []
    assert len(results[4].rejoined) == 4 and set(results[4].rejoined) <= set(results[2].crashed)
    assert sorted(results[4].rejoined + results[5].rejoined) == results[2].crashed
    assert results[5].as_dict()["rejoined"] == results[5].rejoined
    assert torch.isfinite(net.peers.stack).all() and results[-1].averaged_accuracy > 0.5
    with pytest.raises(ValueError, match="churn"):
        _net(churn={"ten": -0.3})
    with pytest.raises(ValueError, match="churn"):
        _net(churn={3: 1.5})


@pytest.mark.parametrize("loses", [False, True])
def test_crash_with_or_without_data(loses):
    net = _net(num_nodes=10, graph="ring", churn={1: -0.3, 3: 1.0}, crash_loses_data=loses,
               failure_choice="degree")
    net.fit(rounds=3, eval_every=10)
    gone = (~net.peers.live).nonzero().flatten().tolist()
    assert len(gone) == 3
    stale = net.peers.stack[gone].clone()
    live_before = net.peers.live.clone()
    expected = torch.stack([
        net.peers.stack[[v for v in net.peers.graph.neighbors(i) if live_before[v]]].mean(dim=0)
        if any(live_before[v] for v in net.peers.graph.neighbors(i)) else net.peers.stack[live_before].mean(dim=0)
        for i in gone
    ])
    out = net.run_round(evaluate=False)  # round 4: everyone rejoins, then trains
    assert out.rejoined == gone and out.num_live == 10
    net2 = _net(num_nodes=10, graph="ring", churn={1: -0.3, 3: 1.0}, crash_loses_data=loses,
                failure_choice="degree")
    net2.fit(rounds=3, eval_every=10)
    net2.peers.rejoin(gone, loses)
    assert torch.equal(net2.peers.stack[gone], expected if loses else stale)
    assert torch.isfinite(net.peers.stack).all()
