"""The small model and digits split the personalization tests share (loaded by path: the test
folders are not packages)."""

import torch
from torch import nn
from torch.func import functional_call

import koinon as kn
from koinon.local import CohortTrainer, LocalTraining, cross_entropy
from koinon.params import Layout


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 10))


def digits(num_clients=6, partition="shards"):
    ds = kn.DATASETS.get("digits")(seed=0, test_fraction=0.2, num_clients=num_clients)
    return kn.partition_dataset(ds, partition, num_clients, seed=0, options={"classes_per_client": 2}
                                if partition == "shards" else {})


def grad(module, layout, flat, x, y):
    """Gradient of the mean cross-entropy at `flat` (autograd on the plain module)."""
    leaf = flat.clone().requires_grad_(True)
    loss = cross_entropy(functional_call(module, layout.views(leaf), (x,)), y).mean()
    (g,) = torch.autograd.grad(loss, leaf)
    return g


def trainer(algorithm, data, **local):
    """A cohort trainer of `model()` on `data` (full-batch SGD at lr 0.1 unless `local` says otherwise)
    and the model's flat parameters."""
    module = model()
    layout = Layout.from_module(module)
    args = {"lr": 0.1, "batch_size": 1000}
    args.update(local)
    return CohortTrainer(module, layout, data, algorithm, LocalTraining(**args)), layout.flatten(module)
