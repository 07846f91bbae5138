import pytest
import torch
from torch import nn
from torch.func import functional_call, vmap

from koinon.local.batched import batched_forward, mlp_value_and_grad
from koinon.models import build_model
from koinon.params import Layout


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


def _stacked_mlp_case(model: nn.Module, shape: tuple[int, ...], k: int = 3, b: int = 6):
    layout = Layout.from_module(model)
    gen = torch.Generator().manual_seed(1)
    stack = layout.flatten(model) + 0.3 * torch.randn(k, layout.numel, generator=gen)
    x = torch.randn(k, b, *shape, generator=gen)
    y = torch.randint(0, 10, (k, b), generator=gen)
    scale = torch.rand(k, b, generator=gen) * (torch.rand(k, b, generator=gen) > 0.3)
    return layout, stack, x, y, scale


@pytest.mark.parametrize("model,shape", [
    (build_model("mlp", {"hidden": [16, 12]}, (1, 8, 8), 10, seed=0), (1, 8, 8)),
    (build_model("logreg", {}, (20,), 10, seed=0), (20,)),
    (nn.Sequential(nn.Flatten(), nn.Linear(12, 9), nn.Tanh(), nn.Identity(), nn.Linear(9, 10, bias=False)), (3, 4)),
    (nn.Sequential(nn.Linear(12, 9).requires_grad_(False), nn.ReLU(), nn.Linear(9, 7), nn.Tanh(),
                   nn.Linear(7, 10)), (12,)),
])
def test_hand_written_backward_equals_autograd(model, shape):
    layout, stack, x, y, scale = _stacked_mlp_case(model, shape)
    step = mlp_value_and_grad(model)
    assert step is not None
    grad = torch.zeros_like(stack)
    losses = step(layout.views(stack), layout.views(grad), x, y, scale)

    trainable = layout.num_trainable
    leaf = stack[:, :trainable].clone().requires_grad_(True)
    out = vmap(lambda p, xx: functional_call(model, p, (xx,)))(
        layout.views(torch.cat([leaf, stack[:, trainable:]], dim=1)), x)
    ref_losses = torch.nn.functional.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="none").view_as(y)
    (ref_losses * scale).sum().backward()
    assert torch.allclose(losses, ref_losses.detach(), atol=1e-5)
    assert torch.allclose(grad[:, :trainable], leaf.grad, atol=1e-5)
    assert not grad[:, trainable:].any()  # frozen layers get no gradient
    assert grad.abs().sum() > 0


def test_hand_written_backward_only_for_plain_mlps():
    assert mlp_value_and_grad(build_model("cnn", {}, (1, 8, 8), 10, seed=0)) is None
    assert mlp_value_and_grad(nn.Sequential(nn.Linear(2, 2), nn.GELU(), nn.Linear(2, 2))) is None
    assert mlp_value_and_grad(nn.Sequential(nn.ReLU())) is None
