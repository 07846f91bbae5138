"""FedIns: per-instance choice of scale-and-shift modules by hand, FedAvg with a frozen pool,
both local runtimes, the averaged pool."""

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

import koinon as kn
from koinon.clients import LocalSGD
from koinon.local import LocalTraining
from koinon.params import Layout
from koinon.personal import FedIns
from koinon.personal.fedins import choose
from koinon.personal.pfedgate import gated_modules
from koinon.topology.evaluation import Evaluation

_tiny_spec = importlib.util.spec_from_file_location("personal_tiny", Path(__file__).parent / "tiny.py")
assert _tiny_spec and _tiny_spec.loader
tiny = importlib.util.module_from_spec(_tiny_spec)
_tiny_spec.loader.exec_module(tiny)
_model = tiny.model


def _digits(num_clients=8):
    return tiny.digits(num_clients, "dirichlet")


def test_each_instance_picks_the_most_similar_keys():
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    q = torch.tensor([[2.0, 0.1], [0.0, 3.0]])
    idx, sim = choose(q, keys, 2)
    assert idx.tolist() == [[0, 2], [1, 2]]
    assert torch.allclose(sim[1], torch.tensor([1.0, 2 ** -0.5]), atol=1e-6)


def test_the_chosen_modules_average_scales_and_shifts_each_hidden_unit():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    trainer = SimpleNamespace(module=model, layout=Layout.from_module(model))
    alg = FedIns(pool_size=3, top=2)
    gammas, betas = torch.randn(3, 4), torch.randn(3, 4)
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])
    x = torch.randn(2, 3)
    q = torch.tensor([[1.0, 0.2], [0.1, 1.0]])  # both choose modules 0 and 1
    out, _ = alg.logits(trainer, gated_modules(model), trainer.layout.flatten(model), [gammas, betas, keys], q, x)
    g, b = gammas[:2].mean(dim=0), betas[:2].mean(dim=0)
    by_hand = torch.relu((x @ model[0].weight.T + model[0].bias) * g + b) @ model[2].weight.T + model[2].bias
    assert torch.allclose(out, by_hand, atol=1e-6)


def test_with_a_frozen_identity_pool_it_is_fedavg():
    feds = []
    for alg in (FedIns(pool_lr=0.0), LocalSGD()):
        fed = kn.Federation(_model(), _digits(), local=LocalTraining(lr=0.1, epochs=1), clients_per_round=4, seed=1,
                            algorithm=alg, runtime="inprocess")
        fed.fit(2)
        feds.append(fed)
    assert torch.allclose(feds[0].params, feds[1].params, atol=1e-5)


def test_both_local_runtimes_agree_and_the_pool_is_averaged():
    feds = []
    for runtime in ("inprocess", "vectorized"):
        fed = kn.Federation(_model(), _digits(), local=LocalTraining(lr=0.1, epochs=1), clients_per_round=4, seed=1,
                            algorithm=FedIns(pool_size=4, top=2), runtime=runtime,
                            evaluation=Evaluation(holdout=0.2, new_clients=2))
        fed.fit(2, eval_every=2)
        feds.append(fed)
    a, b = feds
    assert torch.allclose(a.params, b.params, atol=1e-5)
    pa = a.server.server_state["pool"]
    assert torch.allclose(pa, b.server.server_state["pool"], atol=1e-5)
    gammas, betas, keys = a.algorithm.unpack(pa, 8, 8)
    assert pa[-1] == 1.0 and not torch.allclose(gammas, torch.ones(4, 8)) and keys.shape == (4, 8)
