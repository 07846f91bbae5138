"""FedLGD: distribution matching and gradient matching against hand-computed cases, the virtual
data's bytes on the wire, both runtimes."""

import pytest
import torch
from torch import nn

import koinon as kn
from koinon.local import LocalTraining
from koinon.params import Layout
from koinon.personal.fedlgd import FedLGD, _ModuleView, dm_loss, match_distance
from koinon.topology.evaluation import Evaluation


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def _digits(num_clients=6):
    ds = kn.DATASETS.get("digits")(seed=0, test_fraction=0.2, num_clients=num_clients)
    return kn.partition_dataset(ds, "dirichlet", num_clients, seed=0, options={"alpha": 0.5})


def test_distribution_matching_step_by_hand():
    # Embedding = the output layer's input = the first layer's output = x (identity weights).
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 3))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(2))
        model[0].bias.zero_()
    layout = Layout.from_module(model)
    alg = FedLGD(ipc=1, dm_steps=1, dm_lr=0.1, layout=layout)
    v = torch.tensor([[0.0, 0.0], [2.0, 2.0]])
    vy = torch.tensor([0, 1])
    x = torch.tensor([[1.0, 1.0], [3.0, 1.0], [5.0, 5.0]])
    y = torch.tensor([0, 0, 1])
    # Class 0: real mean (2, 1); class 1: (5, 5). Loss (4 + 1) + (9 + 9) = 23.
    assert float(dm_loss(v, vy, x, y)) == pytest.approx(23.0)
    out = alg.distill(_ModuleView(model, layout), layout.flatten(model), v, vy, x, y)
    # Gradients 2 (v - mean): (-4, -2) and (-6, -6); one step of 0.1.
    assert torch.allclose(out, torch.tensor([[0.4, 0.2], [2.6, 2.6]]), atol=1e-6)


def test_gradient_matching_distance_by_hand():
    layout = Layout.from_module(nn.Sequential(nn.Linear(2, 1)))  # weight [1, 2] then bias [1]
    target = torch.tensor([1.0, 0.0, 2.0])
    assert float(match_distance(target * 3, target, layout)) == pytest.approx(0.0, abs=1e-6)
    assert float(match_distance(-target, target, layout)) == pytest.approx(4.0)  # 2 per layer
    # Weight (0, 1) against (1, 0): orthogonal, 1; bias agrees: 0.
    assert float(match_distance(torch.tensor([0.0, 1.0, 5.0]), target, layout)) == pytest.approx(1.0)


def test_server_moves_the_global_virtual_data_towards_the_clients_gradient():
    model = _model()
    layout = Layout.from_module(model)
    alg = FedLGD(ipc=2, match_steps=5, layout=layout)
    alg.module = model
    state = alg.init_server_state(layout.numel)
    params = layout.flatten(model)
    view = _ModuleView(model, layout)
    real = kn.DATASETS.get("digits")(seed=0, test_fraction=0.2, num_clients=2)
    target = alg.virtual_grad(view, params, real.x_train[:40].flatten(1), real.y_train[:40])
    before = match_distance(alg.virtual_grad(view, params, alg.unpack(state["global_x"]), alg.global_labels()),
                            target, layout)
    new = alg.server_update_rows(state, params, params, {"vgrad": target.unsqueeze(0)}, torch.ones(1), [0])
    after = match_distance(alg.virtual_grad(view, params, alg.unpack(new["global_x"]), alg.global_labels()),
                           target, layout)
    assert float(after) < float(before)
    assert torch.count_nonzero(new["global_x"][2 * 10 * 64:]) == 0  # the padding stays zero


def _federation(algorithm, runtime):
    return kn.Federation(_model(), _digits(), local=LocalTraining(lr=0.1, epochs=1), clients_per_round=3,
                         seed=1, algorithm=algorithm, runtime=runtime, evaluation=Evaluation(holdout=0.2))


def test_both_runtimes_agree_and_the_virtual_data_bytes_are_counted():
    spec = {"name": "fedlgd", "ipc": 2, "dm_steps": 2, "match_steps": 2}
    feds = [_federation(spec, rt) for rt in ("inprocess", "vectorized")]
    base = _federation("fedavg", "inprocess")
    for fed in (*feds, base):
        fed.fit(2, eval_every=2)
    a, b = feds
    assert torch.allclose(a.params, b.params, atol=1e-5)
    assert torch.allclose(a.server.server_state["global_x"], b.server.server_state["global_x"], atol=1e-4)
    # Down: the model and the global virtual data (a model-sized download); up: delta and gradient.
    assert a.downlink_total == 2 * base.downlink_total and a.uplink_total == 2 * base.uplink_total
    for st in a.client_states.values():  # the local virtual data stays on the client
        assert st["virtual_x"].shape[1] == 64 and len(st["virtual_x"]) == len(st["virtual_y"])


def test_bad_options_are_refused_in_one_line():
    layout = Layout.from_module(_model())
    with pytest.raises(ValueError, match="ipc <= 3"):
        FedLGD(ipc=8, layout=layout).init_server_state(layout.numel)
    with pytest.raises(ValueError, match="Linear"):
        FedLGD(layout=Layout.from_module(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(72, 10))))
    cfg = kn.Config()
    cfg.data.num_clients, cfg.server.clients_per_round = 6, 3
    cfg.client.algorithm = "fedlgd"
    from koinon.deploy.server import check_deployable
    from koinon.experiment.runner import build_federation

    fed = check_deployable(build_federation(cfg), cfg)  # koinon server runs it (tests/personal/test_deploy_labels.py)
    assert fed.algorithm.module is None  # until `serve` hands it the run's model (`serve_with`)
