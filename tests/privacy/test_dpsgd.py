"""Sample-level DP-SGD in the clients: per-sample clipping by hand, accounting, refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from koinon.clients import CLIENT_ALGORITHMS
from koinon.data import DATASETS, partition_dataset
from koinon.errors import ConfigError
from koinon.experiment.runner import build_federation
from koinon.local import CohortTrainer, LocalTraining
from koinon.params import Layout
from koinon.privacy import SampleDP, build_privacy
from koinon.privacy.accounting import epsilon_for
from tests.privacy.test_federation import small


def test_one_step_is_the_mean_of_clipped_per_sample_gradients() -> None:
    ds = DATASETS.get("digits")(seed=0, test_fraction=0.2, num_clients=4)
    data = partition_dataset(ds, "iid", 4, seed=0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    layout = Layout.from_module(model)
    fedavg = CLIENT_ALGORITHMS.build("fedavg", {}, "client")
    n = len(data.client_indices[1])
    local = LocalTraining(lr=0.5, epochs=1, batch_size=n)  # q = 1: every sample, one step
    algorithm = SampleDP(fedavg, 1e-9, 0.05, data.sizes.clone(), n, 1, 1e-5, seed=0)
    trainer = CohortTrainer(model, layout, data, algorithm, local)
    params = layout.flatten(model)
    result = trainer.train([1], params, {}, [{}], seed=0, round_index=0)
    # By hand: per-sample gradients with autograd, each clipped to 0.05, summed, over B = n.
    ix = data.client_indices[1]
    total = torch.zeros_like(params)
    for i in ix.tolist():
        model.zero_grad()
        loss = nn.functional.cross_entropy(model(ds.x_train[i:i + 1]), ds.y_train[i:i + 1])
        loss.backward()
        g = torch.cat([p.grad.flatten() for p in model.parameters()])
        total += g * min(1.0, 0.05 / float(g.norm()))
    expected = -0.5 * total / n
    assert torch.allclose(result.deltas[0], expected, atol=1e-6)
    assert int(result.num_steps[0]) == 1


def test_epsilon_is_the_worst_clients() -> None:
    sizes = torch.tensor([40, 100, 0, 64])
    dp = SampleDP(CLIENT_ALGORITHMS.build("fedavg", {}, "client"), 1.1, 1.0, sizes, 8, 2, 1e-5)
    assert dp.rate_and_steps(40) == (0.2, 10) and dp.rate_and_steps(100) == (0.08, 26)
    dp.record([0, 1])
    dp.record([1])
    assert dp.metrics["dp_epsilon"] == pytest.approx(epsilon_for(1.1, 0.2, 26 * 2, 1e-5))


def test_sample_dp_refusals() -> None:
    with pytest.raises(ConfigError, match="client.algorithm = 'fedavg'"):
        build_federation(small(**{"privacy.dp": "sample", "privacy.noise_multiplier": 1.0,
                                  "client.algorithm": "fedprox"}))
    cfg = small(**{"privacy.dp": "sample", "privacy.noise_multiplier": 1.0})
    with_norm = nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.BatchNorm1d(10))
    with pytest.raises(ConfigError, match="has buffers"):
        build_privacy(cfg, 20, CLIENT_ALGORITHMS.build("fedavg", {}, "client"), torch.full((20,), 50), with_norm)


def test_dpsgd_federation_learns_and_reports_epsilon() -> None:
    cfg = small(**{"privacy.dp": "sample", "privacy.noise_multiplier": 0.7, "privacy.noise_seed": 0,
                   "data.num_clients": 8, "data.partition": "iid", "server.clients_per_round": 8,
                   "client.lr": 1.0, "client.batch_size": 32, "client.epochs": 2})
    fed = build_federation(cfg)
    assert fed.algorithm.name == "dpsgd(fedavg)"
    results = [fed.run_round() for _ in range(3)]
    assert results[-1].test_accuracy > 0.5  # chance is 0.1
    sizes = fed.data.sizes
    q = 32 / int(sizes.min())
    steps = -(-int(sizes.max()) // 32)
    assert results[-1].extra["dp_epsilon"] == pytest.approx(epsilon_for(0.7, q, 3 * 2 * steps, 1e-5))


def test_a_step_whose_poisson_batches_are_all_empty_still_adds_the_noise() -> None:
    from koinon.privacy import NoiseSource
    from koinon.seeding import mix_seed

    ds = DATASETS.get("digits")(seed=0, test_fraction=0.2, num_clients=4)
    data = partition_dataset(ds, "iid", 4, seed=0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    layout = Layout.from_module(model)
    z, clip, batch = 1.5, 0.1, 8
    algorithm = SampleDP(CLIENT_ALGORITHMS.build("fedavg", {}, "client"), z, clip, data.sizes.clone(), batch, 1,
                         1e-5, seed=0)
    algorithm.rate_and_steps = lambda n: (0.0, 1)  # q = 0: nobody's sample is drawn, one step
    trainer = CohortTrainer(model, layout, data, algorithm, LocalTraining(lr=0.5, epochs=1, batch_size=batch))
    params = layout.flatten(model)
    result = trainer.train([1], params, {}, [{}], seed=0, round_index=0)
    # The client's noise stream: its Poisson draws, then the step's Gaussian noise.
    source = NoiseSource(mix_seed(0, 0, 1))
    source.uniform(len(data.client_indices[1]))
    expected = -0.5 * source.normal(len(params), z * clip) / batch
    assert float(expected.abs().max()) > 0
    assert torch.allclose(result.deltas[0], expected, atol=1e-7)
