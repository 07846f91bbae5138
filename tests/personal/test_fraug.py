"""FRAug: the generator and the RTNet by hand, FedAvg + fine-tuning without augmentation, both
local runtimes, the RTNet on the client and the averaged generator at the server."""

import importlib.util
from pathlib import Path

import torch

import koinon as kn
from koinon.local import LocalTraining
from koinon.personal import FineTune, FRAug, personal_models
from koinon.personal.fraug import generate, transform
from koinon.topology.evaluation import Evaluation

_tiny_spec = importlib.util.spec_from_file_location("personal_tiny", Path(__file__).parent / "tiny.py")
assert _tiny_spec and _tiny_spec.loader
tiny = importlib.util.module_from_spec(_tiny_spec)
_tiny_spec.loader.exec_module(tiny)
_model = tiny.model


def _digits(num_clients=8):
    return tiny.digits(num_clients, "dirichlet")


def test_generator_and_rtnet_by_hand():
    w1 = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, -1.0, 0.0, 2.0]])  # noise 2 + classes 2 in, 2 hidden
    b1 = torch.tensor([0.0, 1.0])
    w2 = torch.tensor([[1.0, 1.0], [0.0, 2.0], [3.0, 0.0]])
    b2 = torch.tensor([0.0, 0.0, 1.0])
    z = torch.tensor([[1.0, 2.0]])
    e = generate([w1, b1, w2, b2], z, torch.tensor([1]), 2)
    # input (1, 2, 0, 1): hidden relu(1, -2 + 2 + 1) = (1, 1); out (2, 2, 4)
    assert torch.equal(e, torch.tensor([[2.0, 2.0, 4.0]]))
    a = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -0.5]])
    assert torch.equal(transform([a, torch.tensor([1.0, 0.0, 0.0])], e), torch.tensor([[3.0, 4.0, 2.0]]))


def test_without_augmentation_it_is_fedavg_with_fine_tuning():
    feds = []
    for alg in (FRAug(aug_weight=0.0, noise=4, gen_hidden=8, adapt_steps=4), FineTune(adapt_steps=4)):
        fed = kn.Federation(_model(), _digits(), local=LocalTraining(lr=0.1, epochs=1), clients_per_round=4, seed=1,
                            algorithm=alg, runtime="inprocess")
        fed.fit(2)
        feds.append(fed)
    a, b = feds
    assert torch.allclose(a.params, b.params, atol=1e-5)
    ids = [0, 5]
    pa, pb = (personal_models(f.algorithm, f.runtime.trainer, ids, f.params, f.server.server_state,
                              [f.client_states.get(c, {}) for c in ids], 0, 2) for f in feds)
    assert torch.allclose(pa, pb, atol=1e-5)


def test_both_local_runtimes_agree_and_the_rtnet_stays_on_the_client():
    feds = []
    for runtime in ("inprocess", "vectorized"):
        fed = kn.Federation(_model(), _digits(), local=LocalTraining(lr=0.1, epochs=1), clients_per_round=4, seed=1,
                            algorithm=FRAug(noise=4, gen_hidden=8, adapt_steps=3), runtime=runtime,
                            evaluation=Evaluation(holdout=0.2, new_clients=2))
        fed.fit(2, eval_every=2)
        feds.append(fed)
    a, b = feds
    assert torch.allclose(a.params, b.params, atol=1e-5)
    assert torch.allclose(a.server.server_state["generator"], b.server.server_state["generator"], atol=1e-5)
    assert a.server.server_state["generator"][-1] == 1.0
    states = a.client_states
    assert states and all(set(st) == {"rt_weight", "rt_bias"} for st in states.values())
    assert any(bool(st["rt_weight"].abs().sum() > 0) for st in states.values())
    for c in states:
        for k in states[c]:
            assert torch.allclose(states[c][k], b.client_states[c][k], atol=1e-5)
