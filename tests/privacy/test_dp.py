"""Differential privacy: clipping, adaptive clipping (the right sign converges, the reversed
one diverges), noise scale, accounting against dp-accounting itself, budgets."""

from __future__ import annotations

import math

import dp_accounting as dpa
import numpy as np
import pytest
import torch
from scipy import stats

from koinon.privacy import (
    AdaptiveClip,
    CentralDP,
    LocalDP,
    NoiseSource,
    PrivacyBudgetExceeded,
    clip_rows,
)
from koinon.privacy.accounting import PLD_GRID, Accountant, calibrate_noise, epsilon_for
from koinon.privacy.dp import update_noise_multiplier


def test_clip_rows_bounds_norms_keeps_directions_and_zero_rows() -> None:
    stack = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]])
    clipped, norms = clip_rows(stack, 1.0)
    assert torch.allclose(clipped, torch.tensor([[0.6, 0.8], [0.3, 0.4], [0.0, 0.0]]))
    assert norms.tolist() == pytest.approx([5.0, 0.5, 0.0])
    assert torch.isfinite(clipped).all()


def test_zero_updates_give_finite_noised_mean() -> None:
    dp = CentralDP(1.0, 0.5, 4, Accountant(0.1, 1e-5), NoiseSource(seed=1),
                   adaptive=AdaptiveClip(0.5, 0.5, 0.2, 1.0))
    out = dp.aggregate(torch.zeros(4, 10))
    assert torch.isfinite(out).all() and dp.metrics["dp_unclipped"] == pytest.approx(1.0, abs=1.0)


def norms_of_a_round(rng: np.random.Generator, n: int) -> torch.Tensor:
    # Update norms: log-normal with median 1 (so the target quantile 0.5 of the norms is 1.0).
    return torch.from_numpy(rng.lognormal(0.0, 0.5, n))


@pytest.mark.parametrize("quantile", [0.5, 0.8])
def test_adaptive_clip_converges_to_the_target_quantile(quantile: float) -> None:
    rng = np.random.default_rng(0)
    clip = AdaptiveClip(clip=0.05, target_quantile=quantile, lr=0.2, count_stddev=5.0)
    noise = NoiseSource(seed=0)
    history = []
    for _ in range(300):
        norms = norms_of_a_round(rng, 100)
        clip.update(float((norms <= clip.clip).sum()), 100, 100, noise)
        history.append(clip.clip)
    target = math.exp(0.5 * stats.norm.ppf(quantile))  # the quantile of the log-normal
    assert np.median(history[-100:]) == pytest.approx(target, rel=0.15)


def test_reversed_sign_diverges() -> None:
    """Flower's bug: the bit means "was clipped". Fed that bit, the same rule runs away."""
    rng = np.random.default_rng(0)
    clip = AdaptiveClip(clip=1.0, target_quantile=0.5, lr=0.2, count_stddev=5.0)
    noise = NoiseSource(seed=0)
    for _ in range(300):
        norms = norms_of_a_round(rng, 100)
        clip.update(float((norms > clip.clip).sum()), 100, 100, noise)
    assert clip.clip < 1e-3 or clip.clip > 1e3


def test_noise_std_matches_the_formula_and_uses_the_clip_of_the_round() -> None:
    z, clip, m = 1.3, 0.7, 20
    dp = CentralDP(z, clip, m, Accountant(0.2, 1e-5), NoiseSource(seed=3),
                   adaptive=AdaptiveClip(clip, 0.5, 0.5, 4.0))
    out = dp.aggregate(torch.zeros(m, 200_000))
    expected = update_noise_multiplier(z, 4.0) * clip / m
    assert float(out.std()) == pytest.approx(expected, rel=0.01)
    assert abs(float(out.mean())) < 4 * expected / math.sqrt(200_000)
    # The bound moved after the round (all zero updates were unclipped: it shrinks), but the
    # round's noise was computed with the bound that clipped it.
    assert dp.metrics["dp_clip"] == clip and dp.current_clip < clip
    assert dp.metrics["dp_noise_std"] == pytest.approx(update_noise_multiplier(z, 4.0) * clip)
    # Normality of the noise (Kolmogorov-Smirnov on a sample).
    assert stats.kstest(out[:5000].double().numpy() / expected, "norm").pvalue > 1e-3


def test_adaptive_clipping_raises_the_update_noise_as_andrew_et_al() -> None:
    z, sigma_b = 1.0, 2.0
    assert update_noise_multiplier(z, sigma_b) == pytest.approx((z**-2 - (2 * sigma_b) ** -2) ** -0.5)
    with pytest.raises(ValueError, match="clip_count_stddev"):
        update_noise_multiplier(1.0, 0.4)


def test_noise_source_is_secure_by_default_and_reproducible_only_when_seeded() -> None:
    a, b = NoiseSource(), NoiseSource()
    assert a.secure and not torch.equal(a.normal(10), b.normal(10))
    assert torch.equal(NoiseSource(seed=5).normal(10), NoiseSource(seed=5).normal(10))
    sample = NoiseSource().normal(100_000).double()
    assert abs(float(sample.mean())) < 0.02 and float(sample.std()) == pytest.approx(1.0, rel=0.02)


@pytest.mark.parametrize("kind", ["rdp", "pld"])
def test_epsilon_is_the_accountants_own(kind: str) -> None:
    z, q, steps, delta = 1.1, 0.01, 50, 1e-5
    acc = Accountant(q, delta, kind)
    for _ in range(steps):
        acc.spend(z)
    reference = dpa.rdp.RdpAccountant() if kind == "rdp" else dpa.pld.PLDAccountant(value_discretization_interval=PLD_GRID)
    reference.compose(dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z)), steps))
    assert acc.epsilon() == pytest.approx(reference.get_epsilon(delta), rel=1e-9)
    assert epsilon_for(z, q, steps, delta, kind) == pytest.approx(reference.get_epsilon(delta), rel=1e-9)


def test_pld_composes_rounds_of_different_noise_as_the_accountant() -> None:
    acc = Accountant(0.1, 1e-5, "pld")
    acc.noise = [0.9] * 30 + [1.1] * 20 + [0.9] * 5
    reference = dpa.pld.PLDAccountant(value_discretization_interval=PLD_GRID)
    for z, n in ((0.9, 35), (1.1, 20)):
        reference.compose(dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(0.1, dpa.GaussianDpEvent(z)), n))
    assert acc.epsilon() == pytest.approx(reference.get_epsilon(1e-5), rel=1e-9)
    # The finer default grid gives nearly the same epsilon, a little below (pessimistic buckets).
    fine = dpa.pld.PLDAccountant()
    for z, n in ((0.9, 35), (1.1, 20)):
        fine.compose(dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(0.1, dpa.GaussianDpEvent(z)), n))
    assert 0 <= acc.epsilon() - fine.get_epsilon(1e-5) < 1e-3


def test_pld_calibration_is_tighter_than_rdp() -> None:
    """PLD's epsilon is exact up to its grid, RDP's an upper bound: at epsilon 8, 100 rounds and
    q = 0.1, PLD needs about 6% less noise (the search starts from RDP's multiplier)."""
    rdp = calibrate_noise(8.0, 0.1, 100, 1e-5, "rdp")
    pld = calibrate_noise(8.0, 0.1, 100, 1e-5, "pld")
    assert epsilon_for(pld, 0.1, 100, 1e-5, "pld") <= 8.0 < epsilon_for(pld * 0.99, 0.1, 100, 1e-5, "pld")
    assert 0.9 * rdp < pld < 0.97 * rdp


def test_calibrated_noise_meets_the_target() -> None:
    z = calibrate_noise(3.0, 0.05, 100, 1e-5)
    assert epsilon_for(z, 0.05, 100, 1e-5) <= 3.0
    assert epsilon_for(z * 0.97, 0.05, 100, 1e-5) > 3.0


def test_budget_refuses_the_round_that_would_pass_it() -> None:
    z = calibrate_noise(2.0, 0.1, 5, 1e-5)
    dp = CentralDP(z, 1.0, 10, Accountant(0.1, 1e-5), NoiseSource(seed=0), target_epsilon=2.0)
    for _ in range(5):
        dp.aggregate(torch.ones(10, 3))
    assert dp.metrics["dp_epsilon"] <= 2.0
    with pytest.raises(PrivacyBudgetExceeded, match="target_epsilon"):
        dp.aggregate(torch.ones(10, 3))
    assert len(dp.accountant.noise) == 5  # the refused round spent nothing


def test_local_dp_clips_and_noises_each_client() -> None:
    local = LocalDP(noise_multiplier=0.5, clip=2.0, delta=1e-5, seed=7)
    updates = torch.zeros(3, 100_000)
    updates[:, 0] = 100.0  # clipped to norm 2
    out = local.privatize(updates, [4, 5, 6], 0)
    assert float(out[:, 1:].std()) == pytest.approx(1.0, rel=0.02)
    assert float(out[:, 0].mean()) == pytest.approx(2.0, abs=3.0)
    assert not torch.equal(out[0, 1:], out[1, 1:])  # each client its own noise
    local.record([4, 5])
    local.record([4])
    assert local.metrics["dp_epsilon"] == pytest.approx(epsilon_for(0.5, 1.0, 2, 1e-5))


def _released_count(bits: list[int], m: int) -> float:
    """The count query of adaptive clipping as the server releases it (noise-free): rows of norm
    0.5 (unclipped, b = 1) or 2.0 (clipped, b = 0) through `CentralDP.aggregate`, and the
    fraction b_bar it reports mapped back to the released sum, (b_bar - 1/2) m."""
    dp = CentralDP(1.0, 1.0, m, Accountant(0.1, 1e-5), NoiseSource(seed=0),
                   adaptive=AdaptiveClip(1.0, 0.5, 1e-9, 0.0))
    rows = torch.tensor([[0.5 if b else 2.0, 0.0] for b in bits])
    dp.aggregate(rows)
    return (dp.metrics["dp_unclipped"] - 0.5) * m


def test_adaptive_clipping_composes_to_the_configured_multiplier() -> None:
    """The count query's sensitivity as implemented (add or remove one client, bit 0 or 1) and
    the raised update multiplier together make a Gaussian mechanism of multiplier exactly z."""
    m = 10
    sensitivity = 0.0
    for base in ([1, 0, 1], [1, 1, 1, 1], [0, 0], [1, 0, 0, 1, 1, 0]):
        for bit in (0, 1):
            sensitivity = max(sensitivity, abs(_released_count(base + [bit], m) - _released_count(base, m)))
    assert sensitivity == pytest.approx(0.5)
    for z, sigma_b in ((1.0, 2.0), (0.8, 5.0), (2.5, 10.0)):
        z_update = update_noise_multiplier(z, sigma_b)  # the update sum has sensitivity C, noise z_update C
        combined = (z_update**-2 + (sensitivity / sigma_b) ** 2) ** -0.5
        assert combined == pytest.approx(z, rel=1e-9)
