"""FedBABU: the body trains under the fixed initial head (hand-computed step), the global head never
moves, clients fine-tune the whole model; both local runtimes agree, one client is local training,
and a deployment ends with the simulation's model."""

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

import koinon as kn
from koinon.clients import CLIENT_ALGORITHMS
from koinon.config import Config
from koinon.data import FederatedData
from koinon.local import LocalTraining
from koinon.params import Layout
from koinon.personal import FedBABU, personal_models
from koinon.personal.base import Frozen, head_mask
from koinon.topology.evaluation import Evaluation

_tiny_spec = importlib.util.spec_from_file_location("personal_tiny", Path(__file__).parent / "tiny.py")
assert _tiny_spec and _tiny_spec.loader
tiny = importlib.util.module_from_spec(_tiny_spec)
_tiny_spec.loader.exec_module(tiny)
_model, _digits, _grad, _trainer = tiny.model, tiny.digits, tiny.grad, tiny.trainer


def test_fedbabu_local_step_moves_the_body_only():
    data = _digits()
    alg = FedBABU()
    trainer, w = _trainer(alg, data, steps=2)
    head = head_mask(trainer.layout)  # the output layer "4"
    assert int(head.sum()) == 8 * 10 + 10
    result = trainer.train([3], w, {}, [{}], seed=0, round_index=0)
    ix = data.client_indices[3]  # one batch holds the client's whole data: two full-batch steps
    x, y = trainer.x_train[ix], trainer.y_train[ix]
    v = w.clone()
    for _ in range(2):
        g = _grad(trainer.module, trainer.layout, v, x, y)
        v[~head] -= 0.1 * g[~head]
    assert torch.count_nonzero(result.deltas[0][head]) == 0
    assert torch.count_nonzero(result.deltas[0][~head]) > 0
    assert torch.allclose(result.deltas[0], v - w, atol=1e-6)


def test_fedbabu_head_stays_fixed_even_under_adamw():
    data = _digits()
    alg = FedBABU()
    trainer, w = _trainer(alg, data, steps=3, optimizer="adamw", weight_decay=0.5)
    result = trainer.train([0, 1], w, {}, [{}, {}], seed=0, round_index=0)
    assert torch.count_nonzero(result.deltas[:, head_mask(trainer.layout)]) == 0


def test_fedbabu_clients_fine_tune_the_whole_model():
    data = _digits()
    trainer, w = _trainer(FedBABU(adapt_steps=1), data)
    out = personal_models(trainer.algorithm, trainer, [2], w, {}, [{}], seed=0, round_index=0)
    ix = data.client_indices[2]
    expected = w - 0.1 * _grad(trainer.module, trainer.layout, w, trainer.x_train[ix], trainer.y_train[ix])
    assert torch.allclose(out[0], expected, atol=1e-6)
    assert not torch.equal(out[0][head_mask(trainer.layout)], w[head_mask(trainer.layout)])


def test_fedbabu_head_only_fine_tuning_leaves_the_body():
    data = _digits()
    trainer, w = _trainer(FedBABU(adapt_steps=1, adapt_part="head"), data)
    out = personal_models(trainer.algorithm, trainer, [4], w, {}, [{}], seed=0, round_index=0)
    ix = data.client_indices[4]
    head = head_mask(trainer.layout)
    g = _grad(trainer.module, trainer.layout, w, trainer.x_train[ix], trainer.y_train[ix])
    assert torch.allclose(out[0], torch.where(head, w - 0.1 * g, w), atol=1e-6)


def test_fedbabu_global_head_is_the_initial_one_and_both_runtimes_agree():
    feds = []
    for runtime in ("inprocess", "vectorized"):
        fed = kn.Federation(_model(), _digits(8, "dirichlet"), local=LocalTraining(lr=0.1, epochs=1, momentum=0.9),
                            clients_per_round=4, seed=1, algorithm=FedBABU(adapt_steps=3), runtime=runtime,
                            evaluation=Evaluation(holdout=0.2, new_clients=2))
        start = fed.params.clone()
        history = fed.fit(3, eval_every=3)
        head = head_mask(fed.layout)
        assert torch.equal(fed.params[head], start[head]) and not torch.equal(fed.params, start)
        assert "personal_accuracy_p10" in history[-1].extra and "new_client_accuracy_mean" in history[-1].extra
        feds.append(fed)
    a, b = feds
    assert torch.allclose(a.params, b.params, atol=1e-5)
    ids = list(range(a.data.num_clients))
    pa, pb = (personal_models(f.algorithm, f.runtime.trainer, ids, f.params, f.server.server_state,
                              [{} for _ in ids], 0, 3) for f in feds)
    assert torch.allclose(pa, pb, atol=1e-4)


@pytest.mark.parametrize("section", [{"privacy": {"dp": "central", "noise_multiplier": 0.5, "clip": 1.0, "noise_seed": 0}},
                                     {"privacy": {"dp": "local", "noise_multiplier": 0.5, "clip": 1.0, "noise_seed": 0}},
                                     {"attack": {"name": "gaussian", "fraction": 0.25}}],
                         ids=["central-dp", "local-dp", "gaussian-attack"])
def test_fedbabu_head_stays_the_initial_one_under_noise_and_attacks(section):
    """The server zeroes the head of every aggregate: neither DP noise nor a Byzantine update moves it."""
    from koinon.experiment.runner import build_federation

    cfg = Config.from_dict({"seed": 0, "data": {"name": "digits", "partition": "iid", "num_clients": 8},
                            "model": {"name": "mlp", "hidden": [16]},
                            "client": {"algorithm": "fedbabu", "epochs": 1, "batch_size": 32, "lr": 0.1},
                            "server": {"rounds": 2, "clients_per_round": 4}, **section})
    fed = build_federation(cfg)
    start = fed.params.clone()
    fed.fit(2)
    head = head_mask(fed.layout)
    assert torch.equal(fed.params[head], start[head]) and not torch.equal(fed.params, start)


def test_with_one_client_fedbabu_is_local_training_of_the_body_then_fine_tuning():
    full = _digits(6)
    data = FederatedData(full.dataset, [full.client_indices[0]])
    fed = kn.Federation(_model(), data, local=LocalTraining(lr=0.1, batch_size=16, epochs=1), clients_per_round=1,
                        seed=0, algorithm=FedBABU(adapt_steps=0), runtime="inprocess")
    start = fed.params.clone()
    fed.fit(3)
    trainer = fed.runtime.trainer
    w = start
    for r in range(3):  # local training alone, head frozen
        idx, steps = trainer.schedule([0], 0, r)
        w = w + trainer.run_steps([0], w, {}, [{}], idx, steps, algorithm=Frozen(head_mask(fed.layout))).deltas[0]
    assert torch.allclose(fed.params, w, atol=1e-5)
    model = personal_models(fed.algorithm, trainer, [0], fed.params, {}, [{}], 0, 3)[0]
    assert torch.equal(model, fed.params)  # adapt_steps = 0: the trained model itself


def test_fedbabu_from_config_and_its_errors():
    cfg = Config().with_overrides({"client.algorithm": "fedbabu", "client.adapt_steps": 5, "client.head": ["4"]})
    alg = CLIENT_ALGORITHMS.build(cfg.client.algorithm, cfg.client.options, "client")
    assert isinstance(alg, FedBABU) and alg.adapt_steps == 5 and alg.head == ["4"]
    with pytest.raises(ValueError, match="adapt_steps must be an integer >= 0"):
        FedBABU(adapt_steps=-1)
    with pytest.raises(ValueError, match="adapt_part must be 'all'"):
        FedBABU(adapt_part="body")
    logreg = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with pytest.raises(ValueError, match="no body to train"):
        FedBABU().head_mask(Layout.from_module(logreg))
    with pytest.raises(ValueError, match="not a module of the model"):
        FedBABU(head=["9"]).head_mask(Layout.from_module(_model()))


_spec = importlib.util.spec_from_file_location("deploy_helpers", Path(__file__).parents[1] / "deploy" / "helpers.py")
assert _spec and _spec.loader
h = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(h)


@pytest.mark.slow
def test_deployment_trains_fedbabu_to_the_simulation_model(tmp_path):
    from koinon.deploy.certs import create_certs

    certs = tmp_path / "certs"
    create_certs(certs, 3, ["127.0.0.1", "localhost"])
    config = h.write_config(tmp_path / "fed.toml", server={"rounds": 3, "clients_per_round": 3},
                            client={"algorithm": "fedbabu", "adapt_steps": 5})
    state = h.run_deployment(tmp_path, config, certs, server_s=90)
    h.simulate(tmp_path, config, state)
