"""FedCAC's defining steps on hand-made cases, and its per-client download."""

import torch
from torch import nn

import koinon as kn
from koinon.config import Config
from koinon.deploy.server import check_deployable
from koinon.params import Layout
from koinon.personal import FedCAC
from koinon.personal.fedcac import critical_mask, customized_models


def test_critical_parameters_are_each_layers_most_sensitive_share():
    layout = Layout.from_module(nn.Sequential(nn.Linear(2, 2)))  # weight (4 values), bias (2)
    before = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    after = torch.tensor([[2.0, 1.0, 0.5, -3.0, 1.0, 4.0]])
    # sensitivity |(after - before) * after| = 2, 0, 0.25, 12 | 0, 12: top half of the weight = {0, 3};
    # of the bias, the top half is one value, and the zero one is never critical
    mask = critical_mask(layout, before, after, tau=0.5)
    assert mask.tolist() == [[1.0, 0.0, 0.0, 1.0, 0.0, 1.0]]


def test_customized_model_averages_the_clients_whose_critical_parameters_overlap():
    masks = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1]], dtype=torch.bool)
    models = torch.tensor([[1.0, 1, 1, 1], [3.0, 3, 3, 3], [10.0, 10, 10, 10]])
    # overlaps: 0-1 = 1, 0-2 = 1-2 = 0; avg over pairs 1/3, max 1; rounds / beta = 1/2 -> threshold 2/3
    out = customized_models(models, masks, rounds=1, beta=2.0)
    assert torch.allclose(out, torch.tensor([[2.0] * 4, [2.0] * 4, [10.0] * 4]))
    # early on (rounds / beta near 0) the threshold is the average: 0 and 1 still pair, 2 alone
    assert torch.allclose(customized_models(models, masks, rounds=0, beta=100.0), out)


def test_each_client_receives_its_own_customized_model_and_the_bytes_are_counted():
    ds = kn.DATASETS.get("digits")(seed=0, test_fraction=0.2, num_clients=6)
    data = kn.partition_dataset(ds, "shards", 6, seed=0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 10))
    alg = FedCAC(beta=2.0)
    fed = kn.Federation(model, data, local=kn.LocalTraining(lr=0.1), clients_per_round=6, seed=0,
                        algorithm=alg, runtime="inprocess")
    first = fed.run_round(evaluate=False)
    p = fed.layout.numel
    assert first.downlink_bytes == 6 * 4 * p  # the model only: nobody has a customized one yet
    state = fed.server.server_state
    assert all(f"customized_{c}" in state for c in range(6))
    seen = {}
    train = fed.runtime.train

    def spy(cohort, received, downloads, states, *rest):
        seen.update({c: st for c, st in zip(cohort, states)})
        return train(cohort, received, downloads, states, *rest)

    fed.runtime.train = spy
    second = fed.run_round(evaluate=False)
    assert second.downlink_bytes == 6 * 4 * p + 6 * 4 * p  # the model and each client's own model
    for c in range(6):
        assert torch.equal(seen[c]["customized"], state[f"customized_{c}"])
        assert seen[c]["critical"].shape == (p,)


def test_the_deployment_runs_it():  # its per-client download travels in the task (TaskHeader.own)
    cfg = Config()
    cfg.client.algorithm = "fedcac"
    cfg.data.num_clients, cfg.server.clients_per_round = 6, 3
    from koinon.experiment.runner import build_federation

    check_deployable(build_federation(cfg), cfg)
