"""FedLEx and AutoFLIP: the exploration's gradient deviations and the guided / masked steps
against plain autograd on the same batches, the guidance matrix and the pruning mask by hand,
the pruned multiply-adds, both local runtimes alike, bad options, and a real-process deployment
that ends with the simulation's model."""

import pytest
import torch
from torch import nn
from torch.func import functional_call

from koinon.clients import CLIENT_ALGORITHMS, LocalTraining
from koinon.clients.fedlex import guidance_weights
from koinon.data import Dataset, partition_dataset
from koinon.errors import ConfigError
from koinon.local import CohortTrainer
from koinon.params import Layout


def _data(num_clients=6, n=90, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    return partition_dataset(Dataset.from_tensors(x, y, x[:20], y[:20]), "quantity", num_clients, seed=seed)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def _grad(model, layout, w, x, y):
    w = w.detach().requires_grad_(True)
    loss = nn.functional.cross_entropy(functional_call(model, layout.views(w), (x,)), y)
    return torch.autograd.grad(loss, w)[0]


def _setup(options):
    data, model = _data(), _model()
    layout = Layout.from_module(model)
    alg = CLIENT_ALGORITHMS.build("fedlex", options, "client", layout=layout)
    trainer = CohortTrainer(model, layout, data, alg, LocalTraining(epochs=2, batch_size=4, lr=0.1))
    return data, model, layout, trainer, alg


def _batches(trainer, data, client):
    for row in trainer.client_batches(client, seed=3, round_index=0):
        ix = row[row >= 0]
        yield data.dataset.x_train[ix], data.dataset.y_train[ix]


def test_exploration_uploads_the_standard_deviation_of_the_local_gradients():
    data, model, layout, trainer, alg = _setup({})
    x0 = layout.flatten(model)
    result = trainer.train([1, 4], x0, {"guidance": torch.zeros_like(x0)}, [{}, {}], seed=3, round_index=0)
    for row, client in enumerate([1, 4]):
        w, grads = x0.clone(), []
        for x, y in _batches(trainer, data, client):
            g = _grad(model, layout, w, x, y)
            grads.append(g)
            w = w - 0.1 * g
        assert torch.allclose(result.deltas[row], w - x0, atol=1e-6)  # FedAvg's steps
        expected = torch.stack(grads).std(dim=0, unbiased=False)
        assert expected.abs().sum() > 0
        assert torch.allclose(result.uploads["deviation"][row], expected, atol=1e-5)


def test_guided_steps_scale_each_gradient_coordinate():
    data, model, layout, trainer, alg = _setup({})
    x0 = layout.flatten(model)
    guidance = torch.rand(x0.shape, generator=torch.Generator().manual_seed(2)) * 2
    result = trainer.train([2], x0, {"guidance": guidance}, [{}], seed=3, round_index=0)
    w = x0.clone()
    for x, y in _batches(trainer, data, 2):
        w = w - 0.1 * guidance * _grad(model, layout, w, x, y)
    assert torch.allclose(result.deltas[0], w - x0, atol=1e-6)
    assert not result.uploads["deviation"].any()  # nothing to explore any more


def test_server_builds_the_guidance_matrix_after_the_exploration_rounds():
    alg = CLIENT_ALGORITHMS.build("fedlex", {"explore_rounds": 2, "min_weight": 0.5, "max_weight": 2.0}, "client")
    state = alg.init_server_state(4)
    state = alg.server_update(state, {"deviation": torch.tensor([1.0, 2.0, 0.0, 5.0])}, 0.5)
    assert not state["guidance"].any()  # still exploring
    state = alg.server_update(state, {"deviation": torch.tensor([3.0, 2.0, 0.0, 3.0])}, 0.5)
    # D = [2, 2, 0, 4], mean 2: D / mean = [1, 1, 0, 2], clipped to [0.5, 2]
    assert torch.equal(state["guidance"], torch.tensor([1.0, 1.0, 0.5, 2.0]))
    after = alg.server_update(state, {"deviation": torch.zeros(4)}, 0.5)
    assert torch.equal(after["guidance"], state["guidance"])  # fixed from then on
    assert torch.equal(guidance_weights(torch.zeros(3), 0.1, 10.0), torch.ones(3))


def test_vectorized_equals_inprocess_and_guidance_is_built():
    from koinon.topology import Federation

    data = _data(num_clients=8, n=120)
    finals = {}
    for runtime in ("inprocess", "vectorized"):
        fed = Federation(_model(), data, local=LocalTraining(epochs=2, batch_size=8, lr=0.1),
                         algorithm={"name": "fedlex", "explore_rounds": 2}, runtime=runtime,
                         clients_per_round=5, seed=11)
        for _ in range(4):
            fed.run_round(evaluate=False)
        guidance = fed.server.server_state["guidance"]
        assert guidance.any() and not torch.allclose(guidance, torch.ones_like(guidance))
        finals[runtime] = fed.params.clone()
    assert torch.allclose(finals["inprocess"], finals["vectorized"], atol=1e-5)


@pytest.mark.parametrize("options, message", [
    ({"explore_rounds": 0}, "explore_rounds must be >= 1"),
    ({"min_weight": 0.0}, "min_weight and client.max_weight"),
    ({"max_weight": 0.5}, "min_weight and client.max_weight"),
    ({"guide": 1}, "not an option"),
])
def test_bad_options_are_refused(options, message):
    with pytest.raises(ConfigError, match=message):
        CLIENT_ALGORITHMS.build("fedlex", options, "client")


# ------------------------------------------------------------------ AutoFLIP

def test_hybrid_mask_prunes_neurons_then_the_least_important_weights():
    from koinon.clients.autoflip import hybrid_mask

    torch.manual_seed(0)
    layout = Layout.from_module(nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2)))
    # 0.weight [3, 2] at 0, 0.bias [3] at 6, 2.weight [2, 3] at 9, 2.bias [2] at 15
    importance = torch.tensor([1.0, 0.9, 0.1, 0.3, 5.0, 5.0, 8.0, 8.0, 8.0,
                               0.5, 2.0, 3.0, 0.4, 6.0, 0.7, 8.0, 8.0])
    mask = hybrid_mask(importance, layout, sparsity=0.5, structured=0.34)
    # structured: 1 of layer 0's 3 neurons (row means 0.95, 0.2, 5): row 1 and its bias (7);
    # the last layer keeps its outputs. Unstructured: half of the 10 weights left, lowest first:
    # 0.4 (12), 0.5 (9), 0.7 (14), 0.9 (1), 1.0 (0).
    pruned = {2, 3, 7, 12, 9, 14, 1, 0}
    assert mask.tolist() == [0.0 if i in pruned else 1.0 for i in range(17)]


def test_pruned_macs_counts_each_weight_once_per_output_position():
    from koinon.clients.autoflip import pruned_macs

    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2))
    layout = Layout.from_module(mlp)
    mask = torch.ones(layout.numel)
    mask[[0, 1, 2, 3, 9, 12, 14]] = 0.0
    assert pruned_macs(mlp, layout, mask, torch.zeros(4, 2)) == pytest.approx(7 / 12)
    cnn = nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(6, 2))
    layout = Layout.from_module(cnn)
    mask = torch.ones(layout.numel)
    mask[:3] = 0.0  # conv channel 0: 3 weights, each used at 3 positions; 18 + 12 multiply-adds
    assert pruned_macs(cnn, layout, mask, torch.zeros(4, 1, 5)) == pytest.approx(9 / 30)


def _autoflip_setup(options, **local):
    data, model = _data(), _model()
    layout = Layout.from_module(model)
    alg = CLIENT_ALGORITHMS.build("autoflip", options, "client", layout=layout)
    trainer = CohortTrainer(model, layout, data, alg, LocalTraining(**{"epochs": 2, "batch_size": 4, "lr": 0.1,
                                                                       **local}))
    return data, model, layout, trainer, alg


@pytest.mark.parametrize("local", [{}, {"momentum": 0.9, "weight_decay": 0.01}])
def test_autoflip_trains_under_the_mask_and_pruned_weights_stay_zero(local):
    data, model, layout, trainer, alg = _autoflip_setup({}, **local)
    x0 = layout.flatten(model)
    mask = (torch.rand(x0.shape, generator=torch.Generator().manual_seed(5)) > 0.4).float()
    result = trainer.train([1, 3], x0, {"mask": mask}, [{}, {}], seed=3, round_index=0)
    final = x0 + result.deltas
    assert not final[:, mask == 0].any()
    if not local:
        for row, client in enumerate([1, 3]):
            w = x0 * mask
            for x, y in _batches(trainer, data, client):
                w = w - 0.1 * mask * _grad(model, layout, w, x, y)
            assert torch.allclose(result.deltas[row], w - x0, atol=1e-6)
    # From a model already zero there, the update is zero on pruned coordinates: what a sparse codec saves.
    again = trainer.train([1], x0 * mask, {"mask": mask}, [{}], seed=3, round_index=1)
    assert not again.deltas[0, mask == 0].any()


def test_autoflip_vectorized_equals_inprocess_and_the_model_is_pruned():
    from koinon.topology import Federation

    data = _data(num_clients=8, n=120)
    finals = {}
    for runtime in ("inprocess", "vectorized"):
        fed = Federation(_model(), data, local=LocalTraining(epochs=2, batch_size=8, lr=0.1),
                         algorithm={"name": "autoflip", "explore_rounds": 2, "sparsity": 0.5, "structured": 0.25},
                         runtime=runtime, clients_per_round=5, seed=11)
        for _ in range(4):
            fed.run_round(evaluate=False)
        mask = fed.server.server_state["mask"]
        assert mask.any() and not mask.all()
        assert not fed.params[mask == 0].any()
        finals[runtime] = fed.params.clone()
    assert torch.allclose(finals["inprocess"], finals["vectorized"], atol=1e-5)


@pytest.mark.parametrize("options, message", [
    ({"explore_rounds": 0}, "explore_rounds must be >= 1"),
    ({"sparsity": 1.0}, r"sparsity must be in \[0, 1\)"),
    ({"structured": -0.1}, r"structured must be in \[0, 1\)"),
])
def test_autoflip_bad_options_are_refused(options, message):
    layout = Layout.from_module(_model())
    with pytest.raises(ConfigError, match=message):
        CLIENT_ALGORITHMS.build("autoflip", options, "client", layout=layout)


# ------------------------------------------------------------------ deployment

@pytest.mark.slow
@pytest.mark.parametrize("client", [
    {"algorithm": "fedlex", "explore_rounds": 1, "momentum": 0.0},
    {"algorithm": "autoflip", "explore_rounds": 1, "sparsity": 0.5, "structured": 0.2, "momentum": 0.0},
], ids=["fedlex", "autoflip"])
def test_deployment_ends_with_the_simulation_model(tmp_path, certs, client):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("deploy_helpers", Path(__file__).parents[1] / "deploy" / "helpers.py")
    assert spec and spec.loader
    h = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(h)
    config = h.write_config(tmp_path / "fed.toml", server={"rounds": 3, "clients_per_round": 3}, client=client)
    state = h.run_deployment(tmp_path, config, certs, server_s=120)
    sim = h.simulate(tmp_path, config, state)  # the same final model, bit for bit
    assert [r["uplink_bytes"] for r in h.metrics(state)] == [r["uplink_bytes"] for r in sim]
