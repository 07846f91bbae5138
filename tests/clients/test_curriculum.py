"""Curriculum ordering of local data: each pass visits the same samples, easiest first."""

import pytest
import torch
from torch import nn

import koinon as kn
from koinon.clients.curriculum import _losses, order_by_difficulty
from koinon.local import CohortTrainer


def _trainer(steps=0, epochs=2):
    ds = kn.DATASETS.get("digits")(seed=0, test_fraction=0.2, num_clients=6)
    data = kn.partition_dataset(ds, "dirichlet", 6, seed=0, options={"alpha": 0.5})
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    layout = kn.Layout.from_module(model)
    local = kn.LocalTraining(epochs=epochs, steps=steps, batch_size=8)
    return CohortTrainer(model, layout, data, kn.LocalSGD(), local), layout.flatten(model)


@pytest.mark.parametrize("steps", [0, 7])
def test_each_pass_keeps_its_samples_and_is_sorted_by_loss(steps):
    trainer, params = _trainer(steps=steps)
    clients = [0, 3, 5]
    idx, _ = trainer.schedule(clients, 1, 0)
    for hardest in (False, True):
        ordered = order_by_difficulty(trainer, params, clients, idx, hardest_first=hardest)
        assert ordered.shape == idx.shape and torch.equal(ordered < 0, idx < 0)  # padding stays
        for i, c in enumerate(clients):
            n = int(trainer.sizes([c])[0])
            before, after = idx[i][idx[i] >= 0], ordered[i][ordered[i] >= 0]
            for a in range(0, len(before), n):
                assert sorted(before[a:a + n].tolist()) == sorted(after[a:a + n].tolist())
                loss = _losses(trainer, params, after[a:a + n])
                step = loss[1:] - loss[:-1]
                assert bool((step <= 1e-6).all()) if hardest else bool((step >= -1e-6).all())


def test_a_federation_trains_with_curriculum_ordering():
    ds = kn.DATASETS.get("digits")(seed=0, test_fraction=0.2, num_clients=10)
    data = kn.partition_dataset(ds, "dirichlet", 10, seed=0, options={"alpha": 0.5})
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    fed = kn.Federation(model, data, local=kn.LocalTraining(lr=0.1, epochs=1), clients_per_round=5,
                        algorithm={"name": "curriculum", "order": "easy"})
    records = fed.fit(5)
    assert records[-1].test_accuracy > records[0].test_accuracy
    with pytest.raises(kn.ConfigError, match="anti-curriculum"):
        kn.Federation(model, data, algorithm={"name": "curriculum", "order": "random"})
