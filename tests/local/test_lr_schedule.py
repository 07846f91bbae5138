"""The local learning-rate schedule: values by hand, applied per local step, the same in every
runtime, and set from a config."""

import math

import pytest
import torch
from torch import nn

from koinon.clients import LocalTraining
from koinon.config import Config
from koinon.data import Dataset, partition_dataset
from koinon.errors import ConfigError
from koinon.topology import Federation


def _data(num_clients=6):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(120, 5, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 1).long()
    return partition_dataset(Dataset.from_tensors(x, y, x[:20], y[:20]), "quantity", num_clients, seed=0)


def _fed(local, runtime="inprocess", model=None):
    torch.manual_seed(0)
    model = model or nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    return Federation(model, _data(), local=local, runtime=runtime, clients_per_round=6, seed=2)


def test_schedule_values_by_hand():
    cosine = LocalTraining(lr=1.0, steps=4, lr_schedule="cosine")
    assert [cosine.lr_at(s) for s in range(4)] == pytest.approx(
        [1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4))])
    linear = LocalTraining(lr=1.0, steps=4, lr_schedule="linear", lr_warmup=2)
    assert [linear.lr_at(s) for s in range(4)] == pytest.approx([0.5, 1.0, 1.0, 0.5])
    assert LocalTraining(lr=0.3).lr_at(7) == 0.3  # constant: the exact lr, numbers unchanged
    with pytest.raises(ValueError, match="decays over client.steps"):
        LocalTraining(lr_schedule="cosine")  # epochs: clients of unequal size would differ
    with pytest.raises(ValueError, match="'constant', 'cosine' or 'linear'"):
        LocalTraining(steps=4, lr_schedule="cos")


def test_the_schedule_acts_on_every_local_step():
    # A factor of zero after the first step leaves exactly the model of one step.
    one = _fed(LocalTraining(lr=0.1, steps=1))
    cut = _fed(LocalTraining(lr=0.1, steps=3, lr_schedule=lambda step: 1.0 if step == 0 else 0.0))
    plain = _fed(LocalTraining(lr=0.1, steps=3))
    for fed in (one, cut, plain):
        fed.run_round(evaluate=False)
    assert torch.equal(one.params, cut.params)
    assert not torch.allclose(plain.params, cut.params)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_every_runtime_follows_the_schedule(optimizer):
    local = LocalTraining(lr=0.05, steps=4, lr_schedule="cosine", lr_warmup=1, optimizer=optimizer)
    runs = [_fed(local, runtime) for runtime in ("inprocess", "vectorized")]
    for fed in runs:
        fed.fit(2, eval_every=2)
    assert torch.allclose(runs[0].params, runs[1].params, atol=1e-6)


def test_config_keys_reach_local_training():
    from koinon.experiment import build_federation

    cfg = Config().with_overrides({"client.steps": 3, "client.lr_schedule": "linear", "client.lr_warmup": 1,
                                   "data.num_clients": 10, "server.clients_per_round": 2})
    fed = build_federation(cfg)
    assert fed.local.lr_schedule == "linear" and fed.local.lr_warmup == 1
    with pytest.raises(ConfigError, match="client.lr_schedule must be"):
        build_federation(Config().with_overrides({"client.lr_schedule": "cos"}))
