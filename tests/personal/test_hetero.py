"""Model heterogeneity: pFedGate's gated sub-models and FedConv's compressed sub-models against
hand-computed cases, both local runtimes, one client, and the config keys."""

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import koinon as kn
from koinon.clients import LocalSGD
from koinon.data import FederatedData
from koinon.local import LocalTraining
from koinon.params import Layout
from koinon.personal import FedConv, PFedGate
from koinon.personal.fedconv import compress, dilate, factor_of, plan, sub_forward
from koinon.personal.pfedgate import gate_scores
from koinon.topology.evaluation import Evaluation

_tiny_spec = importlib.util.spec_from_file_location("personal_tiny", Path(__file__).parent / "tiny.py")
assert _tiny_spec and _tiny_spec.loader
tiny = importlib.util.module_from_spec(_tiny_spec)
_tiny_spec.loader.exec_module(tiny)
_model, _digits = tiny.model, tiny.digits


def test_gate_keeps_each_layers_top_scores_scaled_by_two_sigmoid():
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, 0.0], [2.0, 0.0], [0.0, -3.0]])
    b = torch.zeros(6)
    x = torch.tensor([[1.0, 2.0]])
    # scores 2 sig(.) of (1, 2, -1, 0 | 2, -6); layer 1 has 4 units, keep ceil(0.5 * 4) = 2; layer 2 keeps 1
    g = gate_scores(w, b, x, [4, 2], 0.5)
    s = lambda v: 2.0 / (1.0 + torch.exp(-torch.tensor(v)))  # noqa: E731
    expected = torch.tensor([[s(1.0), s(2.0), 0.0, 0.0, s(2.0), 0.0]])
    assert torch.allclose(g, expected)
    # all scores tied (a fresh, zero gating layer): the lower unit indices, each at exactly 1
    g0 = gate_scores(torch.zeros(6, 2), b, x, [4, 2], 0.5)
    assert torch.equal(g0, torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0, 0.0]]))


def test_gated_model_scales_the_kept_units_pre_activations():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    trainer = SimpleNamespace(module=model, layout=Layout.from_module(model))  # what the forward pass uses
    flat = trainer.layout.flatten(model)
    w, b = torch.randn(4, 3), torch.randn(4)
    x = torch.randn(5, 3)
    out = PFedGate(budgets=[0.5]).logits(trainer, flat, w, b, x, 0.5)
    g = 2 * torch.sigmoid(x @ w.T + b)
    top = g.topk(2, dim=1).indices
    kept = torch.zeros_like(g).scatter(1, top, 1.0) * g
    by_hand = torch.relu((x @ model[0].weight.T + model[0].bias) * kept) @ model[2].weight.T + model[2].bias
    assert torch.allclose(out, by_hand, atol=1e-6)


def test_compression_averages_unit_groups_and_dilation_undoes_it():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    layout = Layout.from_module(model)
    spec = plan(model, layout)
    w1 = torch.arange(12.0).view(4, 3)
    b1 = torch.tensor([1.0, 3.0, 5.0, 9.0])
    w2 = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 1.0, 0.0, -1.0]])
    b2 = torch.tensor([0.5, -0.5])
    full = {"0.weight": w1, "0.bias": b1, "2.weight": w2, "2.bias": b2}
    sub = compress(full, spec, 2)
    assert torch.equal(sub["0.weight"], torch.tensor([[1.5, 2.5, 3.5], [7.5, 8.5, 9.5]]))  # mean of row pairs
    assert torch.equal(sub["0.bias"], torch.tensor([2.0, 7.0]))
    assert torch.equal(sub["2.weight"], torch.tensor([[3.0, 7.0], [1.0, -1.0]]))  # sum of column pairs
    assert torch.equal(sub["2.bias"], b2)  # the head's classes are never compressed
    back = dilate(sub, spec, 2)
    assert torch.equal(back["0.weight"], torch.tensor([[1.5, 2.5, 3.5]] * 2 + [[7.5, 8.5, 9.5]] * 2))
    assert torch.equal(back["2.weight"], torch.tensor([[1.5, 1.5, 3.5, 3.5], [0.5, 0.5, -0.5, -0.5]]))
    again = compress(back, spec, 2)
    assert all(torch.equal(again[k], sub[k]) for k in sub)  # C(D(w)) = w
    # a model whose grouped units are equal: the sub-model computes the same function
    x = torch.randn(7, 3)
    full_out = sub_forward(model, back, x)
    assert torch.allclose(sub_forward(model, sub, x), full_out, atol=1e-5)


def test_cnn_compression_follows_channels_through_flatten():
    model = kn.build_model("cnn", {"channels": 4}, (1, 8, 8), 10, seed=0)
    layout = Layout.from_module(model)
    spec = plan(model, layout)
    views = layout.views(layout.flatten(model))
    sub = compress(views, spec, 2)
    assert sub["0.weight"].shape == (2, 1, 3, 3) and sub["2.weight"].shape == (4, 2, 3, 3)
    assert sub["6.weight"].shape == (10, 4 * 16)
    assert sub_forward(model, sub, torch.randn(3, 1, 8, 8)).shape == (3, 10)
    back = dilate(sub, spec, 2)
    assert all(back[k].shape == views[k].shape for k in views)
    assert all(torch.allclose(compress(back, spec, 2)[k], sub[k], atol=1e-6) for k in sub)


def test_bad_budgets_are_refused_in_one_line():
    with pytest.raises(ValueError, match="budgets"):
        PFedGate(budgets=[0.0])
    with pytest.raises(ValueError, match="1/r"):
        FedConv(budgets=[0.4])
    assert factor_of(0.25) == 4
    with pytest.raises(ValueError, match="divisible"):
        compress({"0.weight": torch.zeros(6, 2), "0.bias": torch.zeros(6), "2.weight": torch.zeros(2, 6),
                  "2.bias": torch.zeros(2)}, plan(nn.Sequential(nn.Linear(2, 6), nn.ReLU(), nn.Linear(6, 2)),
                                                  Layout.from_module(nn.Sequential(nn.Linear(2, 6), nn.ReLU(),
                                                                                   nn.Linear(6, 2)))), 4)


@pytest.mark.parametrize("make", [lambda: PFedGate(budgets=[1.0, 0.5, 0.25], adapt_steps=3),
                                  lambda: FedConv(budgets=[1.0, 0.5, 0.25], adapt_steps=3)],
                         ids=["pfedgate", "fedconv"])
def test_both_local_runtimes_give_the_same_models(make):
    feds = []
    for runtime in ("inprocess", "vectorized"):
        fed = kn.Federation(_model(), _digits(8, "dirichlet"), local=LocalTraining(lr=0.1, epochs=1),
                            clients_per_round=4, seed=1, algorithm=make(), runtime=runtime,
                            evaluation=Evaluation(holdout=0.2, new_clients=2))
        fed.fit(3, eval_every=3)
        feds.append(fed)
    a, b = feds
    assert torch.allclose(a.params, b.params, atol=1e-5)
    assert sorted(a.client_states) == sorted(b.client_states)
    for c in a.client_states:
        for k in a.client_states[c]:
            assert torch.allclose(a.client_states[c][k], b.client_states[c][k], atol=1e-5)
    ids = list(range(a.data.num_clients))
    x = a.data.dataset.x_train[:50]
    pa, pb = (f.algorithm.personal_predictors(f.runtime.trainer, ids, f.params, f.server.server_state,
                                              [f.client_states.get(c, {}) for c in ids], 0, 3) for f in feds)
    for fa, fb in zip(pa, pb):
        assert torch.allclose(fa(x), fb(x), atol=1e-4)


def _one_client(algorithm, rounds=3):
    full = _digits(6)
    data = FederatedData(full.dataset, [full.client_indices[0]])
    fed = kn.Federation(_model(), data, local=LocalTraining(lr=0.1, batch_size=16, epochs=1), clients_per_round=1,
                        seed=0, algorithm=algorithm, runtime="inprocess")
    start = fed.params.clone()
    fed.fit(rounds)
    return fed, start


def _local_chain(trainer, w, rounds):
    for r in range(rounds):
        idx, steps = trainer.schedule([0], 0, r)
        w = w + trainer.run_steps([0], w, {}, [{}], idx, steps, algorithm=LocalSGD()).deltas[0]
    return w


@pytest.mark.parametrize("make", [lambda: PFedGate(budgets=[1.0], gate_lr=0.0), lambda: FedConv(budgets=[1.0])],
                         ids=["pfedgate", "fedconv"])
def test_with_one_full_budget_client_the_model_is_local_training(make):
    fed, start = _one_client(make())
    assert torch.allclose(fed.params, _local_chain(fed.runtime.trainer, start, 3), atol=1e-5)


def test_with_one_client_fedconv_trains_the_compressed_model_locally():
    fed, start = _one_client(FedConv(budgets=[0.5]))
    layout, model = fed.layout, fed.runtime.trainer.module
    spec = plan(model, layout)
    sub = compress(layout.views(start), spec, 2)
    trainer = fed.runtime.trainer
    for r in range(3):  # plain SGD on the sub-model, by hand with autograd
        idx, steps = trainer.schedule([0], 0, r)
        for s in range(int(steps[0])):
            ix = idx[0, s][idx[0, s] >= 0]
            leaves = {k: v.detach().requires_grad_(True) for k, v in sub.items()}
            loss = nn.functional.cross_entropy(sub_forward(model, leaves, trainer.x_train[ix]), trainer.y_train[ix])
            grads = torch.autograd.grad(loss, list(leaves.values()))
            sub = {k: (v - 0.1 * g).detach() for (k, v), g in zip(leaves.items(), grads)}
    final = compress(layout.views(fed.params), spec, 2)
    assert all(torch.allclose(final[k], sub[k], atol=1e-5) for k in sub)


def test_pfedgate_gating_layer_stays_on_the_client():
    fed = kn.Federation(_model(), _digits(6), local=LocalTraining(lr=0.1, epochs=1), clients_per_round=6,
                        seed=0, algorithm=PFedGate(budgets=[0.5]), runtime="vectorized")
    fed.fit(2)
    states = fed.client_states
    assert len(states) == 6 and all(set(st) == {"gate_weight", "gate_bias"} for st in states.values())
    assert states[0]["gate_weight"].shape == (8, 64) and not torch.equal(states[0]["gate_weight"],
                                                                          states[1]["gate_weight"])
    assert fed.uplink_total > 0 and fed.server.server_state == {}


@pytest.mark.parametrize(("algorithm", "options"), [
    ("pfedgate", {"budgets": [1.0, 0.5]}), ("fedconv", {"budgets": [1.0, 0.5]}), ("reconnaissance", {}),
    ("fedka", {"voters": 2, "lam": 0.5}), ("fedins", {"pool_size": 2, "top": 1}), ("fraug", {"noise": 4, "gen_hidden": 8}),
])
def test_selectable_from_a_config(tmp_path, algorithm, options):
    """Each method from TOML keys with its options; a bad option is one ConfigError naming it."""
    cfg = kn.Config()
    cfg.data.name, cfg.data.num_clients, cfg.data.client_test_fraction = "digits", 6, 0.25
    cfg.data.holdout_clients = 2
    cfg.model.name, cfg.model.options = "mlp_norm", {"hidden": [16]}
    cfg.server.rounds, cfg.server.clients_per_round = 2, 4
    cfg.client.algorithm, cfg.client.options = algorithm, dict(options)
    summary = kn.run_experiment(cfg, tmp_path / "run", progress=False)
    assert summary["final_accuracy"] > 0.0
    cfg.client.options = {"budgets": [1.5]}
    with pytest.raises(kn.ConfigError, match="budgets"):
        kn.run_experiment(cfg, tmp_path / "again", progress=False)


def test_predictor_metrics_match_model_metrics():
    """The evaluation's predictor path (`personal_predictors`) scores exactly as its model path:
    FedConv at budget 1 serves what FedAvg + fine-tuning serves."""
    from koinon.personal import FineTune

    metrics = []
    for alg in (FedConv(budgets=[1.0], adapt_steps=3), FineTune(adapt_steps=3)):
        fed = kn.Federation(_model(), _digits(8, "dirichlet"), local=LocalTraining(lr=0.1, epochs=1),
                            clients_per_round=4, seed=1, algorithm=alg, runtime="inprocess",
                            evaluation=Evaluation(holdout=0.25, new_clients=2))
        result = fed.fit(2, eval_every=2)[-1]
        metrics.append({k: v for k, v in result.extra.items() if k.startswith(("personal_", "new_client_"))})
    assert metrics[0] == metrics[1] and "personal_accuracy_p10" in metrics[0] and "new_client_accuracy_mean" in metrics[0]
