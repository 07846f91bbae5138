import pytest
import torch
from torch import nn
from torch.func import functional_call, vmap

from koinon.local.batched import batched_forward, sequential_value_and_grad
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
    step = sequential_value_and_grad(model)
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


def test_hand_written_backward_only_for_known_layers():
    assert sequential_value_and_grad(nn.Sequential(nn.Linear(2, 2), nn.GELU(), nn.Linear(2, 2))) is None
    assert sequential_value_and_grad(nn.Sequential(nn.ReLU())) is None


@pytest.mark.parametrize("model,shape", [
    (build_model("cnn", {"channels": 4}, (1, 8, 8), 10, seed=0), (1, 8, 8)),
    (build_model("cnn1d", {"channels": 5}, (1, 40), 10, seed=0), (1, 40)),
    (build_model("cnn", {"channels": 3}, (2, 6, 6), 10, seed=0), (2, 6, 6)),
    # 1-D pooling with stride != kernel and padding, Tanh, a bias-free grouped conv, frozen first conv.
    (nn.Sequential(nn.Conv1d(2, 4, 3, padding=1).requires_grad_(False), nn.Tanh(),
                   nn.MaxPool1d(3, stride=2, padding=1), nn.Conv1d(4, 6, 2, groups=2, bias=False, dilation=2),
                   nn.ReLU(), nn.Flatten(), nn.Linear(6 * 3, 7), nn.ReLU(), nn.Linear(7, 10)), (2, 9)),
    (nn.Sequential(nn.Conv2d(1, 3, (2, 3), stride=(1, 2), padding=(1, 0)), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True),
                   nn.Identity(), nn.Flatten(), nn.Linear(3 * 3 * 2, 10)), (1, 5, 7)),
])
def test_hand_written_cnn_backward_equals_autograd(model, shape):
    test_hand_written_backward_equals_autograd(model, shape)


def test_max_pool_ties_go_where_autograd_sends_them():
    # All-equal windows (as after a ReLU's zeros, or a constant input): the first element wins.
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2 * 2 * 2, 10))
    with torch.no_grad():
        model[0].weight.fill_(0.0)
        model[0].bias.fill_(0.5)
    layout = Layout.from_module(model)
    stack = layout.flatten(model).repeat(2, 1)
    x = torch.randn(2, 3, 1, 4, 4)
    y = torch.randint(0, 10, (2, 3))
    scale = torch.ones(2, 3)
    grad = torch.zeros_like(stack)
    sequential_value_and_grad(model)(layout.views(stack), layout.views(grad), x, y, scale)
    leaf = stack.clone().requires_grad_(True)
    out = vmap(lambda p, xx: functional_call(model, p, (xx,)))(layout.views(leaf), x)
    torch.nn.functional.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="sum").backward()
    assert torch.allclose(grad, leaf.grad, atol=1e-5)


def test_hand_written_backward_rejects_what_it_cannot_do_exactly():
    assert sequential_value_and_grad(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Linear(6, 10))) is None  # per position
    assert sequential_value_and_grad(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(),
                                                   nn.Linear(2, 2))) is None
    assert sequential_value_and_grad(nn.Sequential(nn.Conv2d(1, 2, 3), nn.AvgPool2d(2), nn.Flatten(),
                                                   nn.Linear(2, 2))) is None
    assert sequential_value_and_grad(nn.Sequential(nn.Flatten(), nn.Linear(4, 4), nn.MaxPool1d(2))) is None
    assert sequential_value_and_grad(nn.Sequential(nn.Conv2d(1, 2, 3, padding="same"), nn.Flatten(),
                                                   nn.Linear(2, 2))) is None


def test_hand_written_cnn_backward_in_client_chunks_equals_autograd(monkeypatch):
    import koinon.local.batched as batched

    # 1,536 bytes of largest activation a client (6 samples): the 3 clients run as 2 + 1.
    monkeypatch.setattr(batched, "_CHUNK_BYTES", 3_100)
    model = build_model("cnn", {"channels": 2}, (1, 4, 4), 10, seed=0)
    test_hand_written_backward_equals_autograd(model, (1, 4, 4))


@pytest.mark.parametrize("name,shape", [("cnn", (1, 6, 6)), ("cnn1d", (2, 12))])
def test_trainer_cnn_hand_written_path_equals_autograd_path(name, shape, monkeypatch):
    """The trainer's hand-written CNN gradient and its autograd path train the same cohort
    alike (clients of unequal sizes, momentum, more clients than one chunk holds)."""
    import koinon.local.batched as batched
    from koinon.clients import CLIENT_ALGORITHMS, LocalTraining
    from koinon.data import Dataset, partition_dataset
    from koinon.local import CohortTrainer

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(300, *shape, generator=gen), torch.randint(0, 10, (300,), generator=gen)
    data = partition_dataset(Dataset.from_tensors(x, y, x[:20], y[:20]), "dirichlet", 12, seed=0,
                             options={"alpha": 0.5})
    model = build_model(name, {"channels": 8}, shape, 10, seed=0)
    monkeypatch.setattr(batched, "_CHUNK_BYTES", 40_000)  # a few clients a chunk
    layout = Layout.from_module(model)
    alg = CLIENT_ALGORITHMS.get("fedavg")()
    local = LocalTraining(epochs=2, batch_size=8, lr=0.1, momentum=0.9)
    results = []
    for manual in (True, False):
        trainer = CohortTrainer(model, layout, data, alg, local)
        assert trainer._manual is not None
        if not manual:
            trainer._manual = None
        results.append(trainer.train(list(range(12)), layout.flatten(model), {}, [{} for _ in range(12)],
                                     seed=1, round_index=2))
    assert len(set(results[0].num_steps.tolist())) > 1
    assert torch.allclose(results[0].deltas, results[1].deltas, atol=1e-5)
    assert torch.allclose(results[0].train_loss, results[1].train_loss, atol=1e-5)
    assert results[0].deltas.abs().sum() > 0
