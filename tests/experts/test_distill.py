"""The distillation losses against hand-computed values, TAID's schedule, KnFu's fusion."""

import math

import pytest
import torch

from koinon.experts import (
    TaidSchedule,
    bdkd_loss,
    consensus,
    fuse,
    kl_loss,
    knfu_weights,
    taid_loss,
    taid_target,
)

TARGET = torch.tensor([[0.75, 0.25]]).log()


def test_kl_against_hand_computed() -> None:
    # uniform student, target (3/4, 1/4): KL = 3/4 ln(3/2) + 1/4 ln(1/2)
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert kl_loss(torch.zeros(1, 2), TARGET).item() == pytest.approx(expected, abs=1e-6)
    # temperature T: the student's logits are divided by T and the loss scaled by T^2
    logits = torch.tensor([[2.0, 0.0]])
    s = torch.tensor([2.0 / 3.0, 0.0]).softmax(0)
    hand = 9 * (0.75 * math.log(0.75 / s[0].item()) + 0.25 * math.log(0.25 / s[1].item()))
    assert kl_loss(logits, TARGET, temperature=3.0).item() == pytest.approx(hand, abs=1e-5)


def test_bdkd_balances_forward_and_reverse_by_entropy() -> None:
    forward_u = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    reverse_u = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    # uniform student: less confident than the target, so the reverse KL weighs `balance`
    got = bdkd_loss(torch.zeros(1, 2), TARGET, balance=2.0).item()
    assert got == pytest.approx(forward_u + 2.0 * reverse_u, abs=1e-6)
    # student (0.9, 0.1): more confident than the target, so the forward KL weighs `balance`
    confident = torch.tensor([[math.log(9.0), 0.0]])
    forward_c = 0.75 * math.log(0.75 / 0.9) + 0.25 * math.log(0.25 / 0.1)
    reverse_c = 0.9 * math.log(0.9 / 0.75) + 0.1 * math.log(0.1 / 0.25)
    got = bdkd_loss(confident, TARGET, balance=2.0).item()
    assert got == pytest.approx(2.0 * forward_c + reverse_c, abs=1e-6)
    # balance 1 is the plain symmetric sum, per sample
    both = torch.cat([torch.zeros(1, 2), confident])
    sym = bdkd_loss(both, TARGET.expand(2, 2), balance=1.0)
    assert sym.tolist() == pytest.approx([forward_u + reverse_u, forward_c + reverse_c], abs=1e-6)


def test_taid_interpolates_in_logit_space() -> None:
    # t = 1/2 between a uniform student and (3/4, 1/4): proportional to sqrt(p)
    got = taid_target(torch.zeros(1, 2), TARGET, 0.5).exp()[0]
    norm = math.sqrt(0.75) + math.sqrt(0.25)
    assert got.tolist() == pytest.approx([math.sqrt(0.75) / norm, 0.5 / norm], abs=1e-6)
    # t = 1 is the plain KL to the target; t = 0 is the student itself (zero loss)
    student = torch.tensor([[0.3, -0.2]])
    assert taid_loss(student, TARGET, 1.0).item() == pytest.approx(kl_loss(student, TARGET).item(), abs=1e-6)
    assert taid_loss(student, TARGET, 0.0).item() == pytest.approx(0.0, abs=1e-6)


def test_taid_schedule_by_hand() -> None:
    s = TaidSchedule(t_start=0.4, rounds=10, alpha=1.0, beta=0.9)
    assert s.t == 0.4
    # first round: no previous objective, momentum 0: step = alpha sigmoid(0) (1 - t) = 0.3
    assert s.update(1.0, 1) == pytest.approx(0.7)
    # objective halves: delta = 0.5, m = 0.1 * 0.5, step = sigmoid(0.05) * (1 - 0.7)
    assert s.update(0.5, 2) == pytest.approx(0.7 + 0.3 / (1 + math.exp(-0.05)))
    # with a tiny alpha the linear floor t_start + (1 - t_start) r / rounds rules
    slow = TaidSchedule(t_start=0.4, rounds=10, alpha=0.001, beta=0.9)
    assert [round(slow.update(1.0, r), 6) for r in (1, 2, 10)] == [0.46, 0.52, 1.0]
    restored = TaidSchedule(t_start=0.4, rounds=10, alpha=1.0)
    restored.load(s.state())
    assert (restored.t, restored.momentum, restored.previous) == (s.t, s.momentum, s.previous)
    with pytest.raises(ValueError):
        TaidSchedule(t_start=1.0)


def test_consensus_is_the_mean_of_probabilities() -> None:
    log_p = torch.tensor([[[0.9, 0.1]], [[0.5, 0.5]]]).log()
    assert consensus(log_p).exp()[0].tolist() == pytest.approx([0.7, 0.3], abs=1e-6)


def test_knfu_fuses_self_and_nearest_peers() -> None:
    a = torch.tensor([[0.9, 0.1], [0.2, 0.8]]).log()
    far = torch.tensor([[0.1, 0.9], [0.8, 0.2]]).log()
    log_p = torch.stack([a, a, far])
    w = knfu_weights(log_p, neighbours=1, temperature=1.0)
    assert w.sum(dim=1).tolist() == pytest.approx([1.0, 1.0, 1.0])
    # parties 0 and 1 agree (KL 0): each fuses itself and the other half and half, nothing of 2
    assert w[0].tolist() == pytest.approx([0.5, 0.5, 0.0])
    assert w[1].tolist() == pytest.approx([0.5, 0.5, 0.0])
    # party 2: its two peers are equally near (a tie keeps both); KL(far || a) by hand
    kl = (0.8 * math.log(9.0) + 0.6 * math.log(4.0)) / 2
    peer = math.exp(-kl) / (1 + 2 * math.exp(-kl))
    assert w[2].tolist() == pytest.approx([peer, peer, 1 - 2 * peer], abs=1e-5)
    # four parties, one nearest peer each: a party's row has itself and exactly one peer
    near = torch.tensor([[0.85, 0.15], [0.25, 0.75]]).log()
    w4 = knfu_weights(torch.stack([a, near, far, far]), neighbours=1)
    assert ((w4 > 0).sum(dim=1) == 2).all() and (w4.diagonal() > 0).all()
    assert w4[0, 1] > 0 and w4[2, 3] > 0
    fused = fuse(log_p, w).exp()
    assert torch.allclose(fused[0], a.exp(), atol=1e-6)
    with pytest.raises(ValueError):
        knfu_weights(log_p[:1], 1)


def test_sade_favours_the_expert_whose_prediction_is_stable() -> None:
    from koinon.experts.sade import sade_weights

    gen = torch.Generator().manual_seed(0)
    stable = torch.softmax(torch.randn(40, 5, generator=gen) * 3, dim=-1)
    view_a = torch.stack([stable, torch.softmax(torch.randn(40, 5, generator=gen) * 3, dim=-1), stable])
    view_b = torch.stack([stable, torch.softmax(torch.randn(40, 5, generator=gen) * 3, dim=-1), stable])
    w = sade_weights(view_a, view_b, torch.tensor([True, True, False]))
    assert w.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert w[2] == 0 and w[0] > 0.9  # the excluded expert gets nothing; the stable one wins
    # identical views: every aggregation is perfectly stable, nothing moves from uniform
    same = sade_weights(view_a, view_a)
    assert torch.allclose(same, torch.full((3,), 1 / 3), atol=1e-6)
