import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from koinon.params import Layout


def test_layout_offsets_and_views_share_storage():
    m = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    layout = Layout.from_module(m)
    assert layout.names == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert [e.offset for e in layout.entries] == [0, 12, 16, 24]
    assert layout.numel == layout.num_trainable == 26
    flat = layout.flatten(m)
    views = layout.views(flat)
    assert torch.equal(views["2.weight"], m[2].weight.detach())
    views["0.bias"].fill_(7.0)  # a view, not a copy
    assert torch.all(flat[12:16] == 7.0)


def test_stacked_views_and_load_into_round_trip():
    m = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3))
    layout = Layout.from_module(m)
    stack = torch.randn(5, layout.numel)
    views = layout.views(stack)
    assert views["0.weight"].shape == (5, 2, 1, 3, 3)
    assert torch.equal(views["2.bias"][3], stack[3, -3:])
    layout.load_into(m, stack[2])
    assert torch.equal(layout.flatten(m), stack[2])


def test_buffers_follow_trainables_and_change_the_hash():
    plain = Layout.from_module(nn.Sequential(nn.Linear(2, 2)))
    bn = Layout.from_module(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)))
    assert not plain.has_buffers and bn.has_buffers
    assert bn.num_trainable == 6 + 4 and bn.numel == 10 + 4  # running mean/var, not the int counter
    assert [e.trainable for e in bn.entries][-2:] == [False, False]
    assert plain.hash() != bn.hash()
    assert plain.hash() == Layout.from_module(nn.Sequential(nn.Linear(2, 2))).hash()


def test_views_reject_wrong_size():
    layout = Layout.from_module(nn.Linear(2, 2))
    try:
        layout.views(torch.zeros(5))
    except ValueError as exc:
        assert "6" in str(exc)
    else:
        raise AssertionError("a wrong-sized tensor must be refused")


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 6), min_size=1, max_size=4), st.integers(1, 4))
def test_flatten_views_round_trip(widths, k):
    dims = [3, *widths]
    m = nn.Sequential(*[nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:])])
    layout = Layout.from_module(m)
    flat = layout.flatten(m)
    rebuilt = torch.cat([v.reshape(-1) for v in layout.views(flat).values()])
    assert torch.equal(rebuilt, flat)
    stack = flat.repeat(k, 1)
    for name, v in layout.views(stack).items():
        assert v.shape[0] == k and torch.equal(v[k - 1], dict(m.named_parameters())[name].detach())
