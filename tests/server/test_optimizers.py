import math

import numpy as np
import pytest
import torch

from koinon.server import SAMPLERS, SERVER_OPTIMIZERS


def _opt(name, **kw):
    return SERVER_OPTIMIZERS.get(name)(**kw)


def test_fedavg_adds_scaled_delta():
    opt = _opt("fedavg", lr=0.5)
    x = torch.tensor([1.0, 2.0])
    assert torch.equal(opt.step(x, torch.tensor([2.0, -4.0]), opt.init(x)), torch.tensor([2.0, 0.0]))


def test_fedavgm_hand_computed():
    opt = _opt("fedavgm", lr=1.0, momentum=0.5)
    x = torch.zeros(1)
    st = opt.init(x)
    x = opt.step(x, torch.tensor([1.0]), st)  # v = 1
    x = opt.step(x, torch.tensor([1.0]), st)  # v = 1.5
    assert x.item() == pytest.approx(2.5)


@pytest.mark.parametrize("name, nesterov", [("fedavgm", False), ("nesterov", True)])
def test_momentum_matches_torch_sgd_on_the_pseudo_gradient(name, nesterov):
    # Delta is minus the pseudo-gradient: the server step is torch's SGD step on -Delta.
    x = torch.randn(10, generator=torch.Generator().manual_seed(0))
    reference = x.clone().requires_grad_(True)
    torch_opt = torch.optim.SGD([reference], lr=0.7, momentum=0.9, nesterov=nesterov)
    opt = _opt(name, lr=0.7, momentum=0.9)
    st = opt.init(x)
    for k in range(5):
        delta = torch.randn(10, generator=torch.Generator().manual_seed(k + 1))
        x = opt.step(x, delta, st)
        reference.grad = -delta
        torch_opt.step()
    torch.testing.assert_close(x, reference.detach())
    assert opt.name == name


def test_nesterov_hand_computed():
    opt = _opt("nesterov", lr=1.0, momentum=0.5)
    x = torch.zeros(1)
    st = opt.init(x)
    x = opt.step(x, torch.tensor([1.0]), st)  # v = 1, step 1 + 0.5 * 1
    assert x.item() == 1.5
    x = opt.step(x, torch.tensor([1.0]), st)  # v = 1.5, step 1 + 0.75
    assert x.item() == 3.25


@pytest.mark.parametrize("name", ["fedadagrad", "fedadam", "fedyogi"])
def test_adaptive_first_step_hand_computed(name):
    lr, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    opt = _opt(name, lr=lr, beta1=b1, beta2=b2, tau=tau)
    x = torch.zeros(1)
    st = opt.init(x)
    d = 0.2
    x = opt.step(x, torch.tensor([d]), st)
    m = (1 - b1) * d
    v0 = tau**2
    v = {
        "fedadagrad": v0 + d * d,
        "fedadam": b2 * v0 + (1 - b2) * d * d,
        "fedyogi": v0 - (1 - b2) * d * d * math.copysign(1, v0 - d * d),
    }[name]
    assert x.item() == pytest.approx(lr * m / (math.sqrt(v) + tau), rel=1e-5)


def test_bad_hyperparameters_are_refused():
    with pytest.raises(ValueError, match="server.lr"):
        _opt("fedavg", lr=0.0)
    with pytest.raises(ValueError, match="server.momentum"):
        _opt("fedavgm", momentum=1.0)


def test_uniform_sampler_is_seeded_and_without_replacement():
    s = SAMPLERS.get("uniform")()
    pop = np.arange(100)
    a = s.sample(pop, np.ones(100), 10, np.random.default_rng(1))
    b = s.sample(pop, np.ones(100), 10, np.random.default_rng(1))
    assert a == b and len(set(a)) == 10


def test_proportional_sampler_prefers_large_clients():
    s = SAMPLERS.get("proportional")()
    sizes = np.array([1] * 90 + [100] * 10)
    hits = np.zeros(100)
    for seed in range(200):
        for c in s.sample(np.arange(100), sizes, 5, np.random.default_rng(seed)):
            hits[c] += 1
    assert hits[90:].sum() > 5 * hits[:90].sum()
    with pytest.raises(ValueError, match="cannot sample"):
        s.sample(np.arange(3), np.ones(3), 4, np.random.default_rng(0))
