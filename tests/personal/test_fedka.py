"""FedKA: moment matching and voting by hand, FedAvg when both are off, both local runtimes,
and a new client that never reads its own labels."""

import dataclasses
import importlib.util
from pathlib import Path

import pytest
import torch

import koinon as kn
from koinon.clients import LocalSGD
from koinon.data import FederatedData
from koinon.local import LocalTraining
from koinon.personal import FedKA, personal_models
from koinon.personal.fedka import moment_loss, vote
from koinon.personal.recon import embed
from koinon.topology.evaluation import Evaluation

_tiny_spec = importlib.util.spec_from_file_location("personal_tiny", Path(__file__).parent / "tiny.py")
assert _tiny_spec and _tiny_spec.loader
tiny = importlib.util.module_from_spec(_tiny_spec)
_tiny_spec.loader.exec_module(tiny)
_model = tiny.model


def _digits(num_clients=8):
    return tiny.digits(num_clients, "dirichlet")


def test_moment_loss_by_hand():
    emb = torch.tensor([[0.0, 1.0], [2.0, 3.0]])  # means (1, 2), population stds (1, 1)
    mu, sigma = torch.tensor([0.0, 2.0]), torch.tensor([3.0, 1.0])
    assert moment_loss(emb, mu, sigma).item() == pytest.approx(((1.0 + 0.0) + (4.0 + 0.0)) / 2, abs=1e-4)


def test_vote_takes_the_majority_where_enough_voters_agree():
    preds = torch.tensor([[1, 2, 0, 3], [1, 2, 1, 4], [1, 0, 2, 3]])
    label, agree = vote(preds, 5, 0.6)
    assert label.tolist() == [1, 2, 0, 3]  # sample 2: a three-way tie goes to the lower class
    assert agree.tolist() == [True, True, False, True]
    assert vote(preds, 5, 1.0)[1].tolist() == [True, False, False, False]


def test_without_matching_or_voting_it_is_fedavg():
    feds = []
    for alg in (FedKA(lam=0.0, adapt_steps=0), LocalSGD()):
        fed = kn.Federation(_model(), _digits(), local=LocalTraining(lr=0.1, epochs=1), clients_per_round=4, seed=1,
                            algorithm=alg, runtime="inprocess")
        fed.fit(3)
        feds.append(fed)
    assert torch.allclose(feds[0].params, feds[1].params, atol=1e-5)


def test_both_local_runtimes_agree_and_the_workspace_holds_the_clients_moments():
    feds = []
    for runtime in ("inprocess", "vectorized"):
        fed = kn.Federation(_model(), _digits(), local=LocalTraining(lr=0.1, epochs=1), clients_per_round=4, seed=1,
                            algorithm=FedKA(lam=1.0, voters=3, adapt_steps=3), runtime=runtime,
                            evaluation=Evaluation(holdout=0.2, new_clients=2))
        fed.fit(3, eval_every=3)
        feds.append(fed)
    a, b = feds
    assert torch.allclose(a.params, b.params, atol=1e-5)
    for key in a.server.server_state:
        assert torch.allclose(a.server.server_state[key], b.server.server_state[key], atol=1e-5), key
    assert sorted(k for k in a.server.server_state if k.startswith("voter_")) == ["voter_0", "voter_1", "voter_2"]
    ws = a.server.server_state["workspace"]
    assert ws[16] == 1.0 and bool((ws[8:16] >= 0).all()) and bool((ws[8:16] > 0).any()) and bool(ws[:8].abs().sum() > 0)


def test_a_new_client_fine_tunes_on_voted_labels_never_its_own():
    fed = kn.Federation(_model(), _digits(), local=LocalTraining(lr=0.1, epochs=1), clients_per_round=4, seed=1,
                        algorithm=FedKA(voters=3, adapt_steps=5), runtime="inprocess")
    fed.fit(3)
    trainer, state = fed.runtime.trainer, fed.server.server_state
    new = 7  # a client with an empty state: the new-client procedure
    models = personal_models(fed.algorithm, trainer, [new], fed.params, state, [{}], 0, 3)
    assert not torch.equal(models[0], fed.params)
    ds = fed.data.dataset
    ix = fed.data.client_indices[new]
    y = ds.y_train.clone()
    y[ix] = (y[ix] + 1) % 10  # other labels for the new client: nothing changes
    other = dataclasses.replace(ds, y_train=y)
    trainer2 = kn.personal.evaluate.with_steps(trainer, data=FederatedData(other, fed.data.client_indices))
    again = personal_models(fed.algorithm, trainer2, [new], fed.params, state, [{}], 0, 3)
    assert torch.equal(models, again)
    # a trained client serves the global model
    trained = personal_models(fed.algorithm, trainer, [0], fed.params, state, [{"trained": torch.ones(1)}], 0, 3)
    assert torch.equal(trained[0], fed.params)
    assert embed(trainer.module, fed.layout.views(fed.params), ds.x_train[:3]).shape == (3, 8)
