"""Worker momentum: the upload is beta * m + (1 - beta) * delta, kept per client across rounds."""

import pytest
import torch
from torch import nn

import koinon as kn
from koinon.clients import CLIENT_ALGORITHMS, WorkerMomentum


def test_upload_is_the_running_average_of_the_client_deltas():
    algo = WorkerMomentum(beta=0.75)
    theta0 = torch.tensor([1.0, 2.0])
    # Round 1: no state yet, the upload is the delta itself (no zero bias).
    ctx = algo.begin(theta0, {}, [{}])
    theta = torch.tensor([[3.0, 2.0]])
    _, states = algo.end(theta0, theta, torch.tensor([4]), 0.1, ctx)
    assert torch.equal(theta, torch.tensor([[3.0, 2.0]]))
    assert torch.equal(states[0]["momentum"], torch.tensor([2.0, 0.0]))
    # Round 2: delta [0, 4] -> 0.75 * [2, 0] + 0.25 * [0, 4] = [1.5, 1]; theta = theta0 + m.
    ctx = algo.begin(theta0, {}, states)
    theta = torch.tensor([[1.0, 6.0]])
    _, states = algo.end(theta0, theta, torch.tensor([4]), 0.1, ctx)
    assert torch.equal(states[0]["momentum"], torch.tensor([1.5, 1.0]))
    assert torch.equal(theta, torch.tensor([[2.5, 3.0]]))


def test_rows_of_a_cohort_keep_their_own_state():
    algo = WorkerMomentum(beta=0.5)
    theta0 = torch.zeros(2)
    ctx = algo.begin(theta0, {}, [{"momentum": torch.tensor([2.0, 2.0])}, {}])
    theta = torch.tensor([[4.0, 0.0], [1.0, 1.0]])
    algo.end(theta0, theta, torch.tensor([1, 1]), 0.1, ctx)
    assert torch.equal(theta, torch.tensor([[3.0, 1.0], [1.0, 1.0]]))


def test_beta_is_checked_and_registered():
    assert isinstance(CLIENT_ALGORITHMS.build("worker_momentum", {"beta": 0.5}, "client"), WorkerMomentum)
    with pytest.raises(ValueError, match="beta"):
        WorkerMomentum(beta=1.0)


def test_federation_uploads_momentum_and_keeps_it_per_client():
    ds = kn.DATASETS.get("digits")(seed=0, test_fraction=0.2, num_clients=8)
    data = kn.partition_dataset(ds, "iid", 8, seed=0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    fed = kn.Federation(model, data, local=kn.LocalTraining(lr=0.05, steps=2), clients_per_round=8,
                        algorithm=WorkerMomentum(beta=0.9), runtime="vectorized", seed=0)
    fed.run_round(evaluate=False)
    first = {c: s["momentum"].clone() for c, s in fed.client_states.items()}
    assert len(first) == 8
    before = fed.params.clone()
    fed.run_round(evaluate=False)
    # Every client moved its momentum by (1 - beta) of the way towards its new delta, and the
    # server applied the mean of the momenta (FedAvg, server lr 1, equal client sizes).
    momenta = torch.stack([fed.client_states[c]["momentum"] for c in range(8)])
    assert not torch.equal(momenta, torch.stack([first[c] for c in range(8)]))
    weights = fed.data.sizes.to(torch.float32)
    expected = before + (weights @ momenta) / weights.sum()
    assert torch.allclose(fed.params, expected, atol=1e-5)
