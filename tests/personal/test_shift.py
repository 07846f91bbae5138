"""Feature shift: each group's transform, checked on hand-made inputs and on digits / MNIST-1D."""

import pytest
import torch

import koinon as kn
from koinon.data import Dataset, FederatedData
from koinon.personal import feature_shift
from koinon.personal.shift import shift_groups, transform


def test_rotation_by_a_quarter_turn_is_rot90():
    x = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4)
    turned = transform(x, "rotation", group=1, num_groups=4, strength=1.0, seed=0)  # 90 degrees
    assert any(torch.allclose(turned, torch.rot90(x, k, dims=(2, 3)), atol=1e-4) for k in (1, -1))
    assert torch.equal(transform(x, "rotation", 0, 4, 1.0, 0), x)


def test_rotation_of_a_signal_is_a_circular_shift():
    x = torch.arange(8, dtype=torch.float32).view(1, 1, 8)
    assert torch.equal(transform(x, "rotation", 1, 4, 1.0, 0), torch.roll(x, 2, dims=-1))


def test_noise_contrast_and_permutation():
    x = torch.rand(500, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    noisy = transform(x, "noise", 2, 3, 0.5, seed=1)  # std 0.5 * 2 / 2
    assert (noisy - x).std().item() == pytest.approx(0.5, rel=0.05)
    flat = transform(x, "contrast", 2, 3, 1.0, seed=1)  # c = 0.2 around each sample's mean
    assert torch.allclose(flat.flatten(1).mean(1), x.flatten(1).mean(1), atol=1e-5)
    assert torch.allclose(flat.flatten(1).std(1), 0.2 * x.flatten(1).std(1), atol=1e-5)
    perm = transform(x, "permute", 1, 3, 1.0, seed=1)
    assert not torch.equal(perm, x)
    assert torch.equal(perm.flatten(1).sort(1).values, x.flatten(1).sort(1).values)  # same values, moved
    assert torch.equal(transform(x, "permute", 1, 3, 1.0, seed=1), perm)  # seeded


def test_groups_are_balanced_and_seeded():
    g = shift_groups(12, 3, seed=4)
    assert sorted(g.tolist()) == [0] * 4 + [1] * 4 + [2] * 4
    assert (shift_groups(12, 3, seed=4) == g).all()
    assert shift_groups(5, 0, seed=4).tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("name", ["digits", "mnist1d"])
@pytest.mark.parametrize("kind", ["rotation", "noise", "contrast", "permute"])
def test_each_client_sees_its_groups_transform(name, kind):
    options = {"num_samples": 400} if name == "mnist1d" else {}
    ds = kn.DATASETS.build(name, options, "data", seed=0, test_fraction=0.2, num_clients=6)
    data = kn.partition_dataset(ds, "iid", 6, seed=0)
    before = ds.x_train.clone()
    shifted = feature_shift(data, kind, seed=2, groups=2)
    assert torch.equal(ds.x_train, before)  # a new dataset; the original is untouched
    assert torch.equal(shifted.dataset.x_test, ds.x_test)  # the server's test split is not shifted
    groups = shift_groups(6, 2, seed=2)
    for c, ix in enumerate(data.client_indices):
        expected = transform(before[ix], kind, int(groups[c]), 2, 1.0, 2, c)
        assert torch.allclose(shifted.dataset.x_train[ix], expected), (c, kind)
    moved = [not torch.equal(shifted.dataset.x_train[ix], before[ix]) for ix in data.client_indices]
    assert moved == [bool(groups[c]) for c in range(6)]  # group 0 is the untransformed one


def test_bad_shift_is_refused():
    ds = Dataset.from_tensors(torch.randn(8, 3), torch.arange(8) % 2, torch.randn(2, 3), torch.arange(2))
    data = FederatedData(ds, [torch.arange(4), torch.arange(4, 8)])
    with pytest.raises(ValueError, match="feature_shift"):
        feature_shift(data, "blur", 0)
    with pytest.raises(ValueError, match="images"):
        feature_shift(data, "rotation", 0)
    with pytest.raises(ValueError, match="shift_groups"):
        feature_shift(data, "noise", 0, groups=-1)
