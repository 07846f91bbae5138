"""The router's weights, opting out at inference, and experts of other widths."""

import pytest
import torch
from torch import nn

from koinon.data import Dataset, FederatedData
from koinon.experts import DomainRouter, LinearRouter, Mixture, route
from koinon.experts.domains import SHIFTS, shift_domains
from koinon.topology.experts.common import seed_from


def mlp(hidden: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(6, hidden), nn.ReLU(), nn.Linear(hidden, 4))


def mixture(router: str = "domain", public_expert: bool = True, top_k: int = 0) -> Mixture:
    public = mlp(8, 0)
    experts = [mlp(8, 1), mlp(16, 2), mlp(4, 3)]  # three owners, three widths
    slots = 3 + int(public_expert)
    r: nn.Module = DomainRouter(8, slots, temperature=0.5) if router == "domain" else LinearRouter(8, slots)
    m = Mixture(public, experts, r, public_expert=public_expert, top_k=top_k)
    if isinstance(r, DomainRouter):
        with torch.no_grad():
            r.embeddings.copy_(torch.randn(slots, 8, generator=torch.Generator().manual_seed(5)))
    return m


X = torch.randn(32, 6, generator=torch.Generator().manual_seed(9))


@pytest.mark.parametrize("router,public_expert,top_k", [("domain", True, 0), ("learned", False, 0),
                                                          ("domain", True, 2)])
def test_router_weights_sum_to_one(router: str, public_expert: bool, top_k: int) -> None:
    m = mixture(router, public_expert, top_k)
    for exclude in ([], [1], [0, 2]):
        m.exclude(exclude)
        w = m.weights(X)
        assert w.shape == (32, m.num_slots)
        assert torch.allclose(w.sum(dim=-1), torch.ones(32), atol=1e-6)
        assert (w >= 0).all()
        for owner in exclude:
            assert (w[:, m.slot(owner)] == 0).all()
        if top_k:
            assert ((w > 0).sum(dim=-1) <= top_k).all()
        assert torch.allclose(m(X).exp().sum(dim=-1), torch.ones(32), atol=1e-5)  # a distribution


def test_route_refuses_an_empty_mixture() -> None:
    with pytest.raises(ValueError, match="excluded"):
        route(torch.zeros(2, 3), torch.zeros(3, dtype=torch.bool))
    m = mixture("learned", public_expert=False)
    with pytest.raises(ValueError, match="nothing to predict"):
        m.exclude([0, 1, 2])
    with pytest.raises(ValueError, match="owner 3 does not exist"):
        m.exclude([3])


def test_excluding_an_owner_removes_exactly_its_contribution() -> None:
    m = mixture()
    full_w = m.weights(X)
    m.exclude([1])
    out = m(X)
    # the same number by hand: the other slots' weights renormalized, their distributions mixed
    keep = [0, 1, 3]  # slots: public, owner 0, owner 2
    w = full_w[:, keep] / full_w[:, keep].sum(dim=1, keepdim=True)
    probs = [m.public(X).softmax(-1), m.experts[0](X).softmax(-1), m.experts[2](X).softmax(-1)]
    by_hand = sum(w[:, i : i + 1] * p for i, p in enumerate(probs))
    assert torch.allclose(out.exp(), by_hand, atol=1e-6)
    # the others keep their relative weights
    w_out = m.weights(X)
    assert torch.allclose(w_out[:, 1] / w_out[:, 3], full_w[:, 1] / full_w[:, 3], rtol=1e-5)
    # the excluded expert's weights are never read: changing them changes nothing
    with torch.no_grad():
        for p in m.experts[1].parameters():
            p.add_(torch.randn_like(p))
    assert torch.equal(m(X), out)
    # and nothing else was dropped: with everyone back, owner 1 counts again
    m.exclude([])
    assert not torch.allclose(m(X), out)


def test_seed_from_copies_the_overlapping_block() -> None:
    public, wide, narrow = mlp(8, 0), mlp(16, 1), mlp(4, 2)
    before = wide[1].weight[8:].clone()
    seed_from(public, wide)
    seed_from(public, narrow)
    assert torch.equal(wide[1].weight[:8], public[1].weight)
    assert torch.equal(wide[1].weight[8:], before)  # its own initialization beyond the block
    assert torch.equal(wide[3].weight[:, :8], public[3].weight)
    assert torch.equal(narrow[1].weight, public[1].weight[:4])
    same = mlp(8, 3)
    seed_from(public, same)
    assert all(torch.equal(a, b) for a, b in zip(same.parameters(), public.parameters()))


def test_domain_shifts_move_each_owner_and_deal_the_test_set() -> None:
    x = torch.arange(2 * 1 * 2 * 2, dtype=torch.float32).reshape(2, 1, 2, 2)
    assert torch.equal(SHIFTS["rot180"](x, torch.Generator()), x.flip(2, 3))
    x_train = torch.rand(12, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    ds = Dataset("toy", x_train, torch.arange(12) % 3, x_train[:9].clone(), torch.arange(9) % 3, 3)
    data = FederatedData(ds, [torch.arange(0, 4), torch.arange(4, 8), torch.arange(8, 12)])
    shifted = shift_domains(data, ["none", "rot90", "invert"], seed=0).dataset
    assert torch.equal(shifted.x_train[:4], x_train[:4])
    assert torch.equal(shifted.x_train[4:8], torch.rot90(x_train[4:8], 1, dims=(2, 3)))
    assert torch.allclose(shifted.x_train[8:], x_train[8:].max() - x_train[8:])
    groups = shifted.test_groups
    assert groups is not None and sorted(int(i) for g in groups for i in g) == list(range(9))
    g1 = torch.from_numpy(groups[1])
    assert torch.equal(shifted.x_test[g1], torch.rot90(ds.x_test[g1], 1, dims=(2, 3)))
    with pytest.raises(ValueError, match="3 owners"):
        shift_domains(data, ["none"], seed=0)


def test_lora_expert_starts_as_the_public_model_and_trains_only_its_adapter() -> None:
    from koinon.experts.lora import LoRALinear, lora_expert
    from koinon.params import Layout

    public = mlp(8, 0)
    expert = lora_expert(public, rank=2, alpha=2.0, seed=1)
    assert torch.equal(expert(X), public(X))  # B = 0: the adapter adds nothing yet
    layout = Layout.from_module(expert)
    trainable = [e.name for e in layout.entries if e.trainable]
    assert trainable == ["1.lora_a", "1.lora_b", "3.lora_a", "3.lora_b"]
    assert layout.num_trainable == 2 * (6 + 8) + 2 * (8 + 4)
    layer = expert[1]
    assert isinstance(layer, LoRALinear)
    with torch.no_grad():
        layer.lora_b.fill_(0.5)
    by_hand = X @ public[1].weight.T + public[1].bias + (2.0 / 2) * (X @ layer.lora_a.T) @ layer.lora_b.T
    assert torch.allclose(layer(X), by_hand, atol=1e-5)


def test_latent_interface_starts_as_the_mixture_and_respects_opt_out() -> None:
    from koinon.experts.thoughts import LatentInterface

    plain = mixture()
    with_interface = mixture()
    with_interface.interface = LatentInterface([8, 8, 16, 4], latent=5, num_classes=4)
    assert torch.allclose(with_interface(X), plain(X), atol=1e-6)  # zero-initialized output layer
    with torch.no_grad():
        for p in with_interface.interface.parameters():
            p.add_(0.3 * torch.randn_like(p))
    out = with_interface(X)
    assert not torch.allclose(out, plain(X), atol=1e-4)
    assert torch.allclose(out.exp().sum(dim=-1), torch.ones(32), atol=1e-5)
    with_interface.exclude([2])
    excluded = with_interface(X)
    with torch.no_grad():
        for p in with_interface.experts[2].parameters():
            p.add_(torch.randn_like(p))
        for p in with_interface.interface.project[3].parameters():  # owner 2's projection
            p.add_(torch.randn_like(p))
    assert torch.equal(with_interface(X), excluded)
