"""Split learning: with one client and lossless codecs it is centralized training of the whole
model; feature and gradient bytes are the real payloads; a lossy feature codec still trains."""

import pytest
import torch
from torch import nn

from koinon.clients import CLIENT_ALGORITHMS, LocalTraining
from koinon.data import Dataset, partition_dataset
from koinon.local import CohortTrainer
from koinon.local.losses import evaluate
from koinon.params import Layout
from koinon.split import SplitLearning


def _data(num_clients=1, n=96):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 0.5).long()
    return partition_dataset(Dataset.from_tensors(x, y, x[:32], y[:32]), "iid", num_clients, seed=0)


def _model():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3))


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_one_client_with_lossless_codecs_is_centralized_training(momentum):
    data = _data()
    local = LocalTraining(epochs=2, batch_size=10, lr=0.1, momentum=momentum)
    split = SplitLearning(_model(), 2, data, local, seed=4)
    central = _model()
    layout = Layout.from_module(central)
    trainer = CohortTrainer(central, layout, data, CLIENT_ALGORITHMS.build("fedavg", {}, "client"), local)
    params = layout.flatten(central)
    for r in range(2):
        rnd = split.run_round()
        params = params + trainer.train([0], params, {}, [{}], seed=4, round_index=r).deltas[0]
        assert rnd.steps == 2 * 10  # ceil(96 / 10) batches, two epochs
        # float32 features [B, 16] up and their gradients down, for every batch
        assert rnd.feature_bytes == rnd.gradient_bytes == 2 * 96 * 16 * 4
    assert torch.allclose(split.params, params, atol=1e-5)


def test_coded_features_count_their_bytes_and_still_train():
    data = _data(num_clients=3, n=300)
    split = SplitLearning(_model(), 2, data, LocalTraining(epochs=1, batch_size=20, lr=0.2), seed=0,
                          feature_codec="int8")
    model = split.model
    layout = Layout.from_module(model)
    before = evaluate(model, layout, split.params, data.dataset.x_test, data.dataset.y_test)[0]
    for _ in range(5):
        rnd = split.run_round()
    after = evaluate(model, layout, split.params, data.dataset.x_test, data.dataset.y_test)[0]
    assert after > before + 0.2
    assert rnd.gradient_bytes == 300 * 16 * 4  # float32 gradients
    assert rnd.feature_bytes < rnd.gradient_bytes / 3  # about one byte a value
    assert rnd.relay_bytes == 2 * (6 * 16 + 16) * 4  # the client part, handed on twice


def test_the_cut_must_fall_inside_a_sequential():
    with pytest.raises(ValueError, match="0 < cut < 5"):
        SplitLearning(_model(), 5, _data(), LocalTraining())
