import pytest
import torch
from torch import nn
from torch.func import functional_call, vmap

from koinon.models import build_model
from koinon.params import Layout
from koinon.runtime.batched import batched_forward


@pytest.mark.parametrize("name,shape", [("mlp", (1, 8, 8)), ("cnn", (1, 8, 8)), ("cnn1d", (1, 40)), ("logreg", (60,))])
def test_batched_forward_equals_vmap(name, shape):
    model = build_model(name, {}, shape, 10, seed=0)
    layout = Layout.from_module(model)
    k, b = 4, 5
    stack = layout.flatten(model) + 0.1 * torch.randn(k, layout.numel, generator=torch.Generator().manual_seed(0))
    x = torch.randn(k, b, *shape)
    fast = batched_forward(model)
    assert fast is not None
    reference = vmap(lambda p, xx: functional_call(model, p, (xx,)))(layout.views(stack), x)
    assert torch.allclose(fast(layout.views(stack), x), reference, atol=1e-5)


def test_unknown_layers_are_left_to_vmap():
    assert batched_forward(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))) is None
    assert batched_forward(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))) is None
    assert batched_forward(nn.Linear(2, 2)) is None  # not a Sequential
