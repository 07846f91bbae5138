"""FedSAM, FedSpeed, FedNova and Mime-lite: each client's update against the same steps written
out with plain autograd on the same batches, and both local runtimes giving the same model."""

import pytest
import torch
from torch import nn
from torch.func import functional_call

from koinon.clients import CLIENT_ALGORITHMS, LocalTraining
from koinon.clients.fednova import step_norm
from koinon.data import Dataset, partition_dataset
from koinon.errors import ConfigError
from koinon.local import CohortTrainer
from koinon.params import Layout


def _data(num_clients=6, n=90, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    return partition_dataset(Dataset.from_tensors(x, y, x[:20], y[:20]), "quantity", num_clients, seed=seed)


def _model(act=nn.Tanh):
    torch.manual_seed(0)  # Tanh: the trainer's hand-written backward; GELU: autograd
    return nn.Sequential(nn.Linear(5, 8), act(), nn.Linear(8, 3))


def _grad(model, layout, w, x, y):
    """Gradient of the mean cross-entropy at flat parameters `w`, by plain autograd."""
    w = w.detach().requires_grad_(True)
    loss = nn.functional.cross_entropy(functional_call(model, layout.views(w), (x,)), y)
    return torch.autograd.grad(loss, w)[0]


def _setup(name, options, act=nn.Tanh, **local):
    data = _data()
    model = _model(act)
    layout = Layout.from_module(model)
    alg = CLIENT_ALGORITHMS.build(name, options, "client")
    hp = LocalTraining(**{"epochs": 2, "batch_size": 4, "lr": 0.1, **local})
    return data, model, layout, CohortTrainer(model, layout, data, alg, hp), alg, hp


def _batches(trainer, data, client, round_index=0):
    for row in trainer.client_batches(client, seed=3, round_index=round_index):
        ix = row[row >= 0]
        yield data.dataset.x_train[ix], data.dataset.y_train[ix]


@pytest.mark.parametrize("act", [nn.Tanh, nn.GELU])
def test_fedsam_steps_with_the_gradient_at_the_ascent_point(act):
    data, model, layout, trainer, _, _ = _setup("fedsam", {"rho": 0.2}, act)
    x0 = layout.flatten(model)
    result = trainer.train([1, 4], x0, {}, [{}, {}], seed=3, round_index=0)
    for row, client in enumerate([1, 4]):
        w = x0.clone()
        for x, y in _batches(trainer, data, client):
            g = _grad(model, layout, w, x, y)
            e = 0.2 * g / g.norm()
            w = w - 0.1 * _grad(model, layout, w + e, x, y)
        assert torch.allclose(result.deltas[row], w - x0, atol=1e-6)


def test_fedspeed_merges_gradients_and_corrects_its_proximal_bias_across_rounds():
    data, model, layout, trainer, _, _ = _setup("fedspeed", {"rho": 0.1, "alpha": 0.3, "lam": 2.0}, nn.GELU)
    x0 = layout.flatten(model)
    ghat = torch.zeros_like(x0)
    states = [{}]
    for r in range(2):
        result = trainer.train([2], x0, {}, states, seed=3, round_index=r)
        w = x0.clone()
        for x, y in _batches(trainer, data, 2, r):
            g1 = _grad(model, layout, w, x, y)
            g2 = _grad(model, layout, w + 0.1 * g1 / g1.norm(), x, y)
            w = w - 0.1 * (0.7 * g1 + 0.3 * g2 - ghat + (w - x0) / 2.0)
        ghat = ghat - (w - x0) / 2.0
        assert torch.allclose(result.deltas[0], (w - 2.0 * ghat) - x0, atol=1e-5)
        assert torch.allclose(result.client_states[0]["correction"], ghat, atol=1e-5)
        states = result.client_states
        x0 = x0 + result.deltas[0]


def test_fednova_scales_each_update_by_tau_eff_over_its_steps():
    data, model, layout, trainer, alg, hp = _setup("fednova", {})
    plain = CohortTrainer(model, layout, data, CLIENT_ALGORITHMS.build("fedavg", {}, "client"), hp)
    x0 = layout.flatten(model)
    sizes = data.sizes.tolist()
    tau = [2 * -(-n // 4) for n in sizes]  # two epochs of batches of 4
    tau_eff = sum(n * t for n, t in zip(sizes, tau)) / sum(sizes)
    ids = [0, 3, 5]
    got = trainer.train(ids, x0, {}, [{}] * 3, seed=3, round_index=0)
    ref = plain.train(ids, x0, {}, [{}] * 3, seed=3, round_index=0)
    for row, c in enumerate(ids):
        assert torch.allclose(got.deltas[row], ref.deltas[row] * tau_eff / tau[c], atol=1e-6)
    fixed = CLIENT_ALGORITHMS.build("fednova", {"tau_eff": 5.0}, "client").effective_steps(trainer)
    assert fixed == 5.0


def test_fednova_step_norm_with_momentum_is_the_sum_of_the_step_weights():
    rho, tau = 0.9, 7
    explicit = sum((1 - rho ** (tau - k)) / (1 - rho) for k in range(tau))
    assert step_norm(torch.tensor([tau]), rho).item() == pytest.approx(explicit)
    assert step_norm(torch.tensor([tau]), 0.0).item() == tau


def test_mime_lite_follows_the_server_momentum_and_uploads_the_full_gradient():
    data, model, layout, trainer, alg, _ = _setup("mime_lite", {"beta": 0.8}, nn.GELU)
    x0 = layout.flatten(model)
    m = torch.randn(layout.numel, generator=torch.Generator().manual_seed(1)) * 0.1
    result = trainer.train([0, 2], x0, {"momentum": m}, [{}, {}], seed=3, round_index=0)
    for row, client in enumerate([0, 2]):
        ix = data.client_indices[client]
        full = _grad(model, layout, x0, data.dataset.x_train[ix], data.dataset.y_train[ix])
        assert torch.allclose(result.uploads["grad"][row], full, atol=1e-6)
        w = x0.clone()
        for x, y in _batches(trainer, data, client):
            w = w - 0.1 * (0.2 * _grad(model, layout, w, x, y) + 0.8 * m)
        assert torch.allclose(result.deltas[row], w - x0, atol=1e-6)
    new = alg.server_update({"momentum": m}, {"grad": result.uploads["grad"].mean(0)}, 0.5)
    assert torch.allclose(new["momentum"], 0.2 * result.uploads["grad"].mean(0) + 0.8 * m)


@pytest.mark.parametrize("name, options", [
    ("fedsam", {"rho": 0.1}), ("fedspeed", {}), ("fednova", {}), ("mime_lite", {}), ("feddyn", {"alpha": 0.1}),
    ("adversarial", {"pgd_eps": 0.2, "pgd_steps": 2}), ("moon", {"mu_con": 1.0}),
])
def test_vectorized_equals_inprocess(name, options):
    from koinon.topology import Federation

    data = _data(num_clients=8, n=120)
    finals = {}
    for runtime in ("inprocess", "vectorized"):
        fed = Federation(_model(), data, local=LocalTraining(epochs=2, batch_size=8, lr=0.1),
                         algorithm=CLIENT_ALGORITHMS.build(name, options, "client"), runtime=runtime,
                         clients_per_round=5, seed=11)
        for _ in range(3):
            fed.run_round(evaluate=False)
        finals[runtime] = fed.params.clone()
    assert torch.allclose(finals["inprocess"], finals["vectorized"], atol=1e-5)


@pytest.mark.parametrize("name, options, message", [
    ("fedsam", {"rho": 0.0}, "rho must be > 0"),
    ("fedspeed", {"alpha": 2.0}, r"alpha must be in \[0, 1\]"),
    ("fednova", {"tau_eff": -1.0}, "tau_eff must be >= 0"),
    ("mime_lite", {"beta": 1.0}, r"beta must be in \[0, 1\)"),
])
def test_bad_options_are_refused(name, options, message):
    from koinon.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        CLIENT_ALGORITHMS.build(name, options, "client")


def test_feddyn_client_step_and_linear_term_across_rounds():
    data, model, layout, trainer, _, _ = _setup("feddyn", {"alpha": 0.5}, nn.GELU)
    x0 = layout.flatten(model)
    h = torch.zeros_like(x0)
    states = [{}]
    for r in range(2):
        result = trainer.train([3], x0, {"h": torch.zeros_like(x0)}, states, seed=3, round_index=r)
        w = x0.clone()
        for x, y in _batches(trainer, data, 3, r):
            w = w - 0.1 * (_grad(model, layout, w, x, y) - h + 0.5 * (w - x0))
        h = h - 0.5 * (w - x0)
        assert torch.allclose(result.deltas[0], w - x0, atol=1e-6)
        assert torch.allclose(result.client_states[0]["h"], h, atol=1e-6)
        states, x0 = result.client_states, x0 + result.deltas[0]


def test_feddyn_server_moves_to_the_mean_minus_h_over_alpha():
    from koinon.topology import Federation

    data = partition_dataset(_data(n=90).dataset, "iid", 6, seed=0)  # equal clients: weighted mean = mean
    fed = Federation(_model(), data, local=LocalTraining(epochs=1, batch_size=5, lr=0.1),
                     algorithm=CLIENT_ALGORITHMS.build("feddyn", {"alpha": 0.5}, "client"),
                     runtime="inprocess", clients_per_round=3, seed=2)
    for _ in range(2):
        x, h_old = fed.params.clone(), fed.server.server_state["h"].clone()
        fed.run_round(evaluate=False)
        h = fed.server.server_state["h"]
        mean_delta = (h_old - h) / (0.5 * 3 / 6)  # h <- h - alpha |S|/N mean(theta_i - x)
        assert h.abs().sum() > 0
        assert torch.allclose(fed.params, x + mean_delta - h / 0.5, atol=1e-5)


def test_adversarial_training_steps_on_pgd_inputs():
    data, model, layout, trainer, _, _ = _setup("adversarial", {"pgd_eps": 0.3, "pgd_step": 0.1, "pgd_steps": 3})
    x0 = layout.flatten(model)
    result = trainer.train([1, 4], x0, {}, [{}, {}], seed=3, round_index=0)
    for row, client in enumerate([1, 4]):
        w = x0.clone()
        for x, y in _batches(trainer, data, client):
            adv = x.clone()
            for _ in range(3):  # PGD by hand: signed ascent steps, projected into the eps-ball
                adv.requires_grad_(True)
                loss = nn.functional.cross_entropy(functional_call(model, layout.views(w), (adv,)), y, reduction="sum")
                (g,) = torch.autograd.grad(loss, adv)
                adv = torch.clamp(adv.detach() + 0.1 * g.sign(), x - 0.3, x + 0.3)
            w = w - 0.1 * _grad(model, layout, w, adv, y)
        assert torch.allclose(result.deltas[row], w - x0, atol=1e-6)


def test_robust_accuracy_is_at_most_the_clean_accuracy():
    from koinon.clients.adversarial import robust_accuracy
    from koinon.local.losses import evaluate

    data, model, layout, trainer, _, _ = _setup("fedavg", {})
    params = layout.flatten(model) + trainer.train([0], layout.flatten(model), {}, [{}], 3, 0).deltas[0]
    x, y = data.dataset.x_train, data.dataset.y_train
    clean = evaluate(model, layout, params, x, y)[0]
    assert robust_accuracy(model, layout, params, x, y, 1e-6, 1e-6, 1) == pytest.approx(clean)
    assert robust_accuracy(model, layout, params, x, y, 0.5, 0.2, 5) < clean


def test_moon_adds_the_model_contrastive_term_and_keeps_the_previous_model():
    data, model, layout, trainer, _, _ = _setup("moon", {"mu_con": 2.0, "tau": 0.5}, nn.GELU)
    x0 = layout.flatten(model)
    previous = x0 + 0.3 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(4))
    result = trainer.train([1], x0, {}, [{"previous": previous}], seed=3, round_index=0)

    def features(w, x):
        return functional_call(model[:-1], {k: v for k, v in layout.views(w).items() if not k.startswith("2.")}, (x,))

    w = x0.clone()
    for x, y in _batches(trainer, data, 1):
        w = w.detach().requires_grad_(True)
        z = features(w, x)
        near = nn.functional.cosine_similarity(z, features(x0, x).detach(), dim=-1)
        far = nn.functional.cosine_similarity(z, features(previous, x).detach(), dim=-1)
        con = -torch.log(torch.exp(near / 0.5) / (torch.exp(near / 0.5) + torch.exp(far / 0.5)))
        loss = nn.functional.cross_entropy(functional_call(model, layout.views(w), (x,)), y) + 2.0 * con.mean()
        (g,) = torch.autograd.grad(loss, w)
        w = w.detach() - 0.1 * g
    assert torch.allclose(result.deltas[0], w - x0, atol=1e-6)
    assert torch.allclose(result.client_states[0]["previous"], w, atol=1e-6)


def _frl_federation(runtime="inprocess", seed=11):
    from koinon.topology import Federation

    model = build_model_supermask()
    return Federation(model, _data(num_clients=8, n=120), local=LocalTraining(epochs=2, batch_size=8, lr=5.0),
                      algorithm="frl", runtime=runtime,
                      clients_per_round=4, seed=seed)


def build_model_supermask():
    from koinon.models.tuning import supermask

    return supermask(_model(), seed=0, density=0.5)


def test_supermask_uses_the_top_edges_and_passes_gradients_straight_through():
    model = build_model_supermask()
    layer = model[0]
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(2))
    kept = layer.scores >= layer.scores.flatten().sort().values[-layer.keep]
    assert int(kept.sum()) == layer.keep == 20
    assert torch.allclose(layer(x), x @ (layer.weight * kept).T + layer.bias)
    layer(x).sum().backward()
    # d/dscores = d/d(effective weight) * weight, for every edge (kept or not)
    assert torch.allclose(layer.scores.grad, torch.ones(4, 8).T @ x * layer.weight)


def test_frl_clients_send_rankings_and_the_server_takes_the_vote():
    from koinon.clients.frl import rank_positions

    fed = _frl_federation()
    layout = fed.layout
    fed.run_round(evaluate=False)
    theta0 = fed.params.clone()
    cohort = fed.server.sample(fed.server.round_index)
    trainer = fed.runtime.trainer if hasattr(fed.runtime, "trainer") else None
    assert trainer is not None
    result = trainer.train(cohort, theta0, {}, [{} for _ in cohort], fed.seed, fed.server.round_index)
    uploads = theta0 + result.deltas
    for e in layout.entries:  # every client sends a permutation of each layer's positions
        seg = uploads[:, e.offset : e.offset + e.numel] * e.numel
        assert torch.equal(seg.round().sort(dim=1).values, torch.arange(e.numel).float().expand_as(seg))
    # The vote: the new global order is the order of the summed positions.
    sizes = trainer.sizes(cohort).float()
    mean = theta0 + (result.deltas * (sizes / sizes.sum()).unsqueeze(1)).sum(0)
    assert not torch.equal(rank_positions(mean.unsqueeze(0), layout), rank_positions(theta0.unsqueeze(0), layout))
    fed.run_round(evaluate=False)
    assert torch.allclose(fed.params, mean, atol=1e-6)


def test_frl_vectorized_equals_inprocess():
    a, b = _frl_federation("inprocess"), _frl_federation("vectorized")
    for _ in range(2):
        a.run_round(evaluate=False)
        b.run_round(evaluate=False)
    assert torch.allclose(a.params, b.params, atol=1e-6)


def test_frl_refuses_a_model_without_supermask():
    from koinon.topology import Federation

    # Refused when the federation is built, before any round.
    with pytest.raises(ConfigError, match="frl trains supermask scores only"):
        Federation(_model(), _data(), local=LocalTraining(), algorithm="frl",
                   runtime="inprocess", clients_per_round=2, seed=0)
    with pytest.raises(ValueError, match="needs the model layout"):
        CLIENT_ALGORITHMS.build("frl", {}, "client").check_update(torch.zeros(3), torch.zeros(3))


@pytest.mark.parametrize("attack", ["sign_flip", "gaussian"])
def test_frl_server_refuses_updates_that_are_not_rankings(attack):
    from koinon.topology import Federation

    model = build_model_supermask()
    frl = CLIENT_ALGORITHMS.build("frl", {}, "client", layout=Layout.from_module(model))
    fed = Federation(model, _data(num_clients=8, n=120), local=LocalTraining(epochs=1, batch_size=8, lr=5.0),
                     algorithm=frl, runtime="inprocess", clients_per_round=8, seed=3, attack=attack,
                     byzantine_fraction=0.25)
    result = fed.run_round(evaluate=False)
    assert result.num_byzantine == 2
    assert len(result.rejected) == 2 and all("not a ranking" in why for why in result.reasons.values())
    assert result.num_clients == 6  # the honest votes
    honest = fed.params.clone()
    assert not frl.check_update(torch.zeros_like(honest), rank_of(honest, fed.layout))


def rank_of(params, layout):
    from koinon.clients.frl import rank_positions

    return rank_positions(params.unsqueeze(0), layout)[0]


def test_mime_lite_refuses_a_second_momentum():
    from koinon.config import Config
    from koinon.experiment.runner import build_federation

    for override in ({"client.momentum": 0.9}, {"client.optimizer": "adamw"}):
        cfg = Config().with_overrides({"client.algorithm": "mime_lite", "data.num_clients": 10, **override})
        with pytest.raises(ConfigError, match="steps with the server's momentum"):
            build_federation(cfg)


def test_feddyn_and_fedspeed_leave_buffers_uncorrected():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    layout = Layout.from_module(model)
    pt, p = layout.num_trainable, layout.numel
    assert pt < p  # running statistics are buffers
    theta0 = torch.zeros(1, p)
    theta = torch.ones(1, p)
    dyn = CLIENT_ALGORITHMS.build("feddyn", {}, "client", layout=layout)
    _, states = dyn.end(theta0[0], theta.clone(), torch.tensor([1]), 0.1, {"h": torch.zeros(1, p)})
    assert bool((states[0]["h"][:pt] != 0).all()) and bool((states[0]["h"][pt:] == 0).all())
    delta, state = dyn.server_delta({"h": torch.zeros(p)}, torch.ones(p), 0.5)
    assert bool((state["h"][pt:] == 0).all()) and torch.equal(delta[pt:], torch.ones(p - pt))
    speed = CLIENT_ALGORITHMS.build("fedspeed", {}, "client", layout=layout)
    moved = theta.clone()
    speed.end(theta0[0], moved, torch.tensor([1]), 0.1, {"ghat": torch.zeros(1, p), "plain": torch.zeros(1, p)})
    assert torch.equal(moved[0, pt:], torch.ones(p - pt))  # the running statistics as trained
