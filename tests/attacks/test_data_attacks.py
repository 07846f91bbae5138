"""Data-poisoning attacks: only the Byzantine clients' samples change, exactly as defined."""

import torch
from torch import nn

from koinon.attacks import ATTACKS
from koinon.attacks.data import stamp
from koinon.data.datasets import Dataset
from koinon.params import Layout


def tiny_dataset() -> Dataset:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 1, 4, 4, generator=g) * 0.5
    x[0, 0, 0, 0] = 0.9  # the training maximum, away from the trigger corner
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    x_test = torch.rand(6, 1, 4, 4, generator=g) * 0.5
    y_test = torch.tensor([0, 1, 2, 3, 2, 1])
    return Dataset("tiny", x, y, x_test, y_test, num_classes=4)


def test_label_flip_maps_y_to_c_minus_1_minus_y_on_byzantine_indices_only():
    ds = tiny_dataset()
    indices = torch.tensor([1, 2, 6])
    out = ATTACKS.build("label_flip", {}, "attack").poison_data(ds, indices, torch.Generator())
    expected = ds.y_train.clone()
    expected[indices] = torch.tensor([2, 1, 1])  # 1 -> 2, 2 -> 1, 2 -> 1 with C = 4
    assert torch.equal(out.y_train, expected)
    assert torch.equal(out.x_train, ds.x_train)
    assert torch.equal(ds.y_train, torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]))  # input untouched


def test_backdoor_stamps_and_relabels_only_byzantine_samples():
    ds = tiny_dataset()
    indices = torch.tensor([1, 3, 4, 6])
    attack = ATTACKS.build("backdoor", {"target": 2, "poison_fraction": 0.5}, "attack")
    out = attack.poison_data(ds, indices, torch.Generator().manual_seed(0))
    changed = [i for i in range(8) if not torch.equal(out.x_train[i], ds.x_train[i])]
    assert len(changed) == 2 and set(changed) <= set(indices.tolist())  # half of the Byzantine ones
    for i in range(8):
        if i in changed:
            assert torch.all(out.x_train[i, 0, 2:, 2:] == 0.9)  # corner set to the data maximum
            assert torch.equal(out.x_train[i, 0, :2], ds.x_train[i, 0, :2])  # nothing else moved
            assert torch.equal(out.x_train[i, 0, :, :2], ds.x_train[i, 0, :, :2])
            assert out.y_train[i] == 2
        else:
            assert torch.equal(out.x_train[i], ds.x_train[i]) and out.y_train[i] == ds.y_train[i]
    again = attack.poison_data(ds, indices, torch.Generator().manual_seed(0))
    assert torch.equal(again.x_train, out.x_train)  # the chosen samples follow the seed


def test_stamp_on_flat_inputs_sets_the_last_features():
    out = stamp(torch.zeros(2, 5), 2, 1.0)
    assert torch.equal(out, torch.tensor([[0.0, 0.0, 0.0, 1.0, 1.0]] * 2))


def corner_detector(target: int) -> tuple[nn.Module, Layout, torch.Tensor]:
    """A linear model that predicts `target` when the bottom-right pixel is bright, else class 0."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 4))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(torch.tensor([0.5, 0.0, 0.0, 0.0]))
        model[1].weight[target, 15] = 1.0  # the pixel [3, 3]: 0.9 with the trigger, <= 0.5 without
    layout = Layout.from_module(model)
    return model, layout, layout.flatten(model)


def test_backdoor_success_is_the_share_of_triggered_inputs_sent_to_the_target():
    ds = tiny_dataset()
    attack = ATTACKS.build("backdoor", {"target": 2}, "attack")
    model, layout, params = corner_detector(target=2)
    assert attack.metrics(model, layout, params, ds) == {"backdoor_success": 1.0}
    model, layout, params = corner_detector(target=1)  # the trigger leads elsewhere
    assert attack.metrics(model, layout, params, ds) == {"backdoor_success": 0.0}
