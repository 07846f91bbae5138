import numpy as np
import torch

from koinon.data import DATASETS, Dataset, partition_dataset


def test_digits_split_is_stratified_and_seeded():
    a = DATASETS.get("digits")(seed=0, test_fraction=0.2, num_clients=10)
    b = DATASETS.get("digits")(seed=0, test_fraction=0.2, num_clients=10)
    assert a.x_train.shape[1:] == (1, 8, 8) and len(a.y_train) + len(a.y_test) == 1797
    assert abs(len(a.y_test) / 1797 - 0.2) < 0.01
    assert torch.equal(a.y_test, b.y_test)
    assert set(a.y_test.tolist()) == set(range(10))
    assert 0.0 <= a.x_train.min() and a.x_train.max() <= 1.0


def test_mnist1d_is_generated_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("KOINON_CACHE", str(tmp_path))
    ds = DATASETS.get("mnist1d")(seed=0, test_fraction=0.2, num_samples=200, num_clients=4)
    assert ds.x_train.shape == (160, 1, 40) and len(ds.y_test) == 40
    assert len(list(tmp_path.glob("mnist1d-*.npz"))) == 1
    again = DATASETS.get("mnist1d")(seed=0, test_fraction=0.2, num_samples=200, num_clients=4)
    assert torch.equal(ds.x_train, again.x_train)


def test_synthetic_has_a_natural_partition():
    ds = DATASETS.get("synthetic")(seed=1, test_fraction=0.2, num_clients=8)
    fed = partition_dataset(ds, "natural", 8, seed=1)
    assert fed.num_clients == 8
    joined = torch.cat(fed.client_indices).numpy()
    assert len(np.unique(joined)) == len(ds.y_train)
    # each device has its own logistic model, so label distributions differ between devices
    dists = [np.bincount(ds.y_train[ix].numpy(), minlength=10) / len(ix) for ix in fed.client_indices]
    assert max(np.abs(d - dists[0]).sum() for d in dists) > 0.3


def test_from_tensors_and_client_indices_are_not_copies():
    x = torch.randn(50, 3)
    y = torch.arange(50) % 4
    ds = Dataset.from_tensors(x, y, x[:10], y[:10])
    assert ds.num_classes == 4
    fed = partition_dataset(ds, "iid", 5, seed=0)
    assert fed.sizes.tolist() == [10] * 5
    assert fed.dataset.x_train.data_ptr() == ds.x_train.data_ptr()
