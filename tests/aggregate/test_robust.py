"""Robust aggregators: agreement with the float64 references, algebraic properties, breakdown."""

from __future__ import annotations

import importlib.util
import pathlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from koinon.aggregate import AGGREGATORS, build_aggregator
from koinon.errors import ConfigError

_spec = importlib.util.spec_from_file_location(
    "aggregate_reference", pathlib.Path(__file__).with_name("reference.py")
)
ref = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
_spec.loader.exec_module(ref)  # type: ignore[union-attr]

ROBUST = [
    "median",
    "trimmed_mean",
    "meamed",
    "krum",
    "multi_krum",
    "bulyan",
    "monna",
    "geometric_median",
    "centered_clipping",
    "caf",
    "nnm+mean",
    "nnm+trimmed_mean",
    "arc+median",
    "signguard",
    "flag",
]


def build(name: str, f: int, **options: object):
    return build_aggregator(name, options, num_byzantine=f)


def stack(seed: int, n: int, p: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, p, generator=g, dtype=dtype)


def run(name: str, x: torch.Tensor, f: int, **options: object) -> torch.Tensor:
    return build(name, f, **options).aggregate(x, torch.ones(x.shape[0]))


# --- agreement with the references ------------------------------------------------------------

CASES = {
    "median": lambda x, f: ref.median(x),
    "trimmed_mean": ref.trimmed_mean,
    "meamed": ref.meamed,
    "krum": ref.krum,
    "multi_krum": lambda x, f: ref.multi_krum(x, f, len(x) - f),
    "bulyan": ref.bulyan,
    "monna": lambda x, f: ref.monna(x, f, 0),
    "caf": ref.caf,
    "nnm+mean": lambda x, f: ref.nnm(x, f).mean(axis=0),
    "nnm+trimmed_mean": lambda x, f: ref.trimmed_mean(ref.nnm(x, f), f),
    "arc+median": lambda x, f: ref.median(ref.arc(x, f)),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize(("n", "f"), [(11, 2), (16, 3), (7, 1)])
def test_matches_reference(name: str, n: int, f: int) -> None:
    if name == "bulyan" and n < 4 * f + 3:
        pytest.skip("outside Bulyan's assumption")
    for seed in range(3):
        x = stack(seed, n, 37, torch.float64)
        expected = CASES[name](x.numpy(), f)
        got = run(name, x, f)
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9, atol=1e-9)


def test_float32_matches_reference() -> None:
    x = stack(0, 20, 5000)
    x64 = x.double().numpy()
    for name in ("median", "trimmed_mean", "meamed", "krum", "geometric_median", "nnm+mean"):
        expected = (
            ref.geometric_median(x64, 100, 1e-6)
            if name == "geometric_median"
            else CASES[name](x64, 4)
        )
        got = run(name, x, 4)
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-5, err_msg=name)


def test_geometric_median_matches_weiszfeld() -> None:
    x = stack(1, 9, 50, torch.float64)
    got = run("geometric_median", x, 2, max_iter=7, tolerance=0.0)
    np.testing.assert_allclose(got.numpy(), ref.geometric_median(x.numpy(), 7, 1e-6), rtol=1e-10)


def test_geometric_median_minimises_sum_of_distances() -> None:
    x = stack(2, 9, 6, torch.float64)
    z = run("geometric_median", x, 0)
    objective = lambda point: (x - point).norm(dim=1).sum()  # noqa: E731
    for k in range(20):
        nudge = 1e-3 * torch.randn(
            6, generator=torch.Generator().manual_seed(k), dtype=torch.float64
        )
        assert objective(z) <= objective(z + nudge) + 1e-12


@pytest.mark.parametrize("iterations", [1, 3])
def test_centered_clipping_matches_reference_over_rounds(iterations: int) -> None:
    rule = build("centered_clipping", 1, radius=2.0, iterations=iterations)
    center = np.zeros(30)
    for seed in range(3):
        x = 3 * stack(seed, 8, 30, torch.float64) + 5
        center = ref.centered_clipping(x.numpy(), center, 2.0, iterations)
        np.testing.assert_allclose(rule.aggregate(x, torch.ones(8)).numpy(), center, rtol=1e-9)


def test_centered_clipping_state_round_trip() -> None:
    first = build("centered_clipping", 0, radius=1.0)
    x = stack(0, 6, 10)
    first.aggregate(x, torch.ones(6))
    second = build("centered_clipping", 0, radius=1.0)
    second.load_state_dict(first.state_dict())
    y = stack(1, 6, 10)
    assert torch.equal(first.aggregate(y, torch.ones(6)), second.aggregate(y, torch.ones(6)))


def test_fltrust_matches_reference_and_needs_reference() -> None:
    x = stack(0, 10, 40, torch.float64)
    g0 = x[:3].mean(0) + 0.1
    rule = build("fltrust", 3)
    with pytest.raises(ValueError, match="set_reference"):
        rule.aggregate(x, torch.ones(10))
    rule.set_reference(g0)
    np.testing.assert_allclose(
        rule.aggregate(x, torch.ones(10)).numpy(), ref.fltrust(x.numpy(), g0.numpy()), rtol=1e-9
    )
    rule.set_reference(-x.sum(0) * 0)  # zero reference: no trust anywhere
    assert torch.equal(rule.aggregate(x, torch.ones(10)), torch.zeros(40, dtype=torch.float64))


def test_static_clipping_matches_reference() -> None:
    x = stack(0, 6, 20, torch.float64)
    rule = build("clipping+mean", 0, max_norm=3.0)
    expected = ref.clip(x.numpy(), 3.0).mean(axis=0)
    np.testing.assert_allclose(rule.aggregate(x, torch.ones(6)).numpy(), expected, rtol=1e-9)


@pytest.mark.parametrize(("n", "f"), [(11, 2), (16, 3), (7, 1)])
def test_signguard_matches_reference(n: int, f: int) -> None:
    # All coordinates: the default draws a random block, which the reference cannot replay.
    for seed in range(3):
        x = stack(seed, n, 37, torch.float64)
        x[: n // 3] += 1.0  # two sign profiles, so that the clustering has something to find
        x[-1] *= 5  # and one input for the norm filter to drop
        got = run("signguard", x, f, coordinate_fraction=1.0)
        np.testing.assert_allclose(got.numpy(), ref.signguard(x.numpy()), rtol=1e-9, atol=1e-9)


def test_signguard_filters_by_hand() -> None:
    # Three inputs agree; one has the wrong signs, one a tenfold norm: the output is the mean
    # of the three, none of which exceeds the median norm.
    x = torch.tensor(
        [[1.0, 1.0, -1.0], [1.1, 0.9, -1.0], [0.9, 1.0, -1.1], [-1.0, -1.0, 1.0], [10.0, 10, -10]],
        dtype=torch.float64,
    )
    norms = x.norm(dim=1)
    med = norms.sort().values[2]
    expected = (x[:3] * torch.clamp(med / norms[:3], max=1.0)[:, None]).mean(0)
    torch.testing.assert_close(run("signguard", x, 1, coordinate_fraction=1.0), expected)


@pytest.mark.parametrize(("rank", "lam", "iterations"), [(0, 0.0, 4), (2, 0.0, 1), (3, 8.0, 3)])
@pytest.mark.parametrize(("n", "f"), [(11, 2), (16, 3), (7, 1)])
def test_flag_matches_reference(n: int, f: int, rank: int, lam: float, iterations: int) -> None:
    for seed in range(3):
        x = stack(seed, n, 37, torch.float64) + 0.5  # a shared direction, as gradients have
        x[0] *= -3  # one flipped, larger input
        got = run("flag", x, f, rank=rank, lam=lam, iterations=iterations)
        expected = ref.flag(x.numpy(), rank or n // 2 + 1, lam, iterations)
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-7, atol=1e-9)


def test_flag_full_rank_is_the_scaled_mean_direction() -> None:
    # With m >= the span's dimension the projection is the identity: med * mean_i x_i/||x_i||.
    x = stack(0, 5, 8, torch.float64)
    norms = x.norm(dim=1)
    expected = norms.median() * (x / norms[:, None]).mean(0)
    torch.testing.assert_close(run("flag", x, 1, rank=5), expected)


@pytest.mark.parametrize("name", ["signguard", "flag"])
@pytest.mark.parametrize("boost", [1.0, 10.0])
def test_beats_mean_under_sign_flipping(name: str, boost: float) -> None:
    # Toy problem: 14 honest noisy copies of a gradient with mostly positive coordinates, 6
    # attackers send honest updates negated and multiplied by `boost`.
    if name == "flag" and boost == 1.0:
        pytest.skip("a subspace cannot tell v from -v: at honest norms flag moves like the mean")
    g = torch.Generator().manual_seed(0)
    truth = torch.full((2000,), 0.5, dtype=torch.float64)
    honest = truth + 0.5 * torch.randn(20, 2000, generator=g, dtype=torch.float64)
    x = torch.cat([honest[:14], -boost * honest[14:]])
    error = lambda out: float((out - truth).norm() / truth.norm())  # noqa: E731
    robust, plain = error(run(name, x, 6)), error(run("mean", x, 0))
    assert robust < 0.5 * plain, (robust, plain)
    if name == "signguard":  # it drops the attackers: as good as the mean of the honest inputs
        assert robust <= 1.1 * error(honest[:14].mean(0)), robust


def test_even_median_averages_middle_values_by_hand() -> None:
    x = torch.tensor([[1.0, 10.0], [2.0, -10.0], [4.0, 0.0], [100.0, 0.0]])
    assert torch.equal(run("median", x, 1), torch.tensor([3.0, 0.0]))
    assert torch.equal(run("trimmed_mean", x, 1), torch.tensor([3.0, 0.0]))


# --- properties -------------------------------------------------------------------------------


@st.composite
def cohorts(draw):  # type: ignore[no-untyped-def]
    f = draw(st.integers(0, 2))
    n = draw(st.integers(4 * f + 3, 4 * f + 8))
    p = draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**31 - 1))
    return stack(seed, n, p, torch.float64), f, seed


@pytest.mark.parametrize("name", [r for r in ROBUST if r != "monna"])  # monna: pivot is a row
@settings(max_examples=15, deadline=None)
@given(case=cohorts())
def test_permutation_invariant(name: str, case) -> None:  # type: ignore[no-untyped-def]
    x, f, seed = case
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(run(name, x[perm], f), run(name, x, f), rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("name", [*ROBUST, "fltrust", "bucketing+median"])
@settings(max_examples=10, deadline=None)
@given(case=cohorts())
def test_copies_give_the_copy(name: str, case) -> None:  # type: ignore[no-untyped-def]
    x, f, _ = case
    copies = x[:1].repeat(len(x), 1)
    rule = build(name, f)
    if name == "fltrust":
        rule.set_reference(x[0])  # FLTrust rescales to the reference norm
    if name == "centered_clipping":
        rule = build(name, f, radius=1e9)
    torch.testing.assert_close(rule.aggregate(copies, torch.ones(len(x))), x[0])


EQUIVARIANT = [
    "median",
    "trimmed_mean",
    "meamed",
    "krum",
    "multi_krum",
    "bulyan",
    "monna",
    "caf",
    "nnm+trimmed_mean",
]


@pytest.mark.parametrize("name", [*EQUIVARIANT, "geometric_median"])
@settings(max_examples=10, deadline=None)
@given(case=cohorts(), shift=st.floats(-5, 5), scale=st.floats(0.1, 10))
def test_translation_and_scaling_equivariant(name: str, case, shift: float, scale: float) -> None:  # type: ignore[no-untyped-def]
    x, f, _ = case
    smoothing = {"smoothing": 1e-12} if name == "geometric_median" else {}
    expected = scale * run(name, x, f, **smoothing) + shift
    got = run(name, scale * x + shift, f, **smoothing)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6 * (1 + abs(shift)))


@pytest.mark.parametrize("name", ["signguard", "flag"])
@settings(max_examples=10, deadline=None)
@given(case=cohorts(), scale=st.floats(0.1, 10))
def test_scale_equivariant(name: str, case, scale: float) -> None:  # type: ignore[no-untyped-def]
    # Both measure signs, norms and directions from the origin, so only scaling commutes.
    x, f, _ = case
    torch.testing.assert_close(
        run(name, scale * x, f), scale * run(name, x, f), rtol=1e-6, atol=1e-9
    )


# Centered clipping moves at most `radius` per round and NNM+mean averages the attackers' own
# mixtures, so neither has a one-round bound.
@pytest.mark.parametrize("name", [r for r in ROBUST if r not in ("centered_clipping", "nnm+mean")])
@settings(max_examples=15, deadline=None)
@given(case=cohorts(), magnitude=st.sampled_from([1e3, 1e6, 1e9]), sign=st.sampled_from([-1, 1]))
def test_bounded_under_f_arbitrary_inputs(name: str, case, magnitude: float, sign: int) -> None:  # type: ignore[no-untyped-def]
    x, f, seed = case
    n = len(x)
    if f == 0:
        return
    honest = x[f:]
    attack = torch.randn(f, x.shape[1], generator=torch.Generator().manual_seed(seed + 1))
    # Attackers come last: MoNNA's pivot (row 0) is by assumption an honest input.
    poisoned = torch.cat([honest, sign * magnitude * (1 + attack.double().abs())])
    out = run(name, poisoned, f)
    # Each rule stays within a small multiple of the honest spread around the honest inputs
    # (coordinate-wise rules even inside the honest range), whatever the attackers' magnitude.
    spread = (honest.max(0).values - honest.min(0).values).norm() + honest.norm(dim=1).max()
    assert (out - honest.mean(0)).norm() <= 4 * spread, (name, n, f)


@pytest.mark.parametrize("name", ["median", "trimmed_mean", "meamed", "bulyan"])
@settings(max_examples=15, deadline=None)
@given(case=cohorts(), magnitude=st.sampled_from([1e3, 1e9]))
def test_coordinatewise_rules_stay_in_honest_range(name: str, case, magnitude: float) -> None:  # type: ignore[no-untyped-def]
    x, f, _ = case
    honest = x[f:]
    poisoned = torch.cat([torch.full((f, x.shape[1]), magnitude, dtype=x.dtype), honest])
    out = run(name, poisoned, f)
    assert bool((out >= honest.min(0).values - 1e-12).all())
    assert bool((out <= honest.max(0).values + 1e-12).all())


def test_mean_is_not_robust() -> None:
    # The breakdown test must be able to fail: the plain mean does fail it.
    x = stack(0, 10, 5, torch.float64)
    x[0] = 1e9
    assert (run("mean", x, 0) - x[1:].mean(0)).norm() > 1e6


# --- assumptions ------------------------------------------------------------------------------

BOUNDS = {  # name: (n that breaks the assumption for f = 2, the requirement's text)
    "median": (4, "n > 2f"),
    "trimmed_mean": (4, "n > 2f"),
    "meamed": (4, "n > 2f"),
    "geometric_median": (4, "n > 2f"),
    "krum": (6, "n > 2f \\+ 2"),
    "multi_krum": (6, "n > 2f \\+ 2"),
    "bulyan": (10, "n >= 4f \\+ 3"),
    "monna": (4, "n > 2f"),
    "caf": (4, "n > 2f"),
    "centered_clipping": (4, "n > 2f"),
    "nnm+mean": (4, "n > 2f"),
    "signguard": (4, "n > 2f"),
    "flag": (4, "n > 2f"),
}


@pytest.mark.parametrize("name", sorted(BOUNDS))
def test_refuses_cohort_breaking_assumption(name: str) -> None:
    n, requirement = BOUNDS[name]
    rule = build(name, 2)
    with pytest.raises(ValueError, match=f"needs {requirement}, got n = {n} inputs and f = 2"):
        rule.aggregate(stack(0, n, 3), torch.ones(n))
    rule.aggregate(stack(0, n + 1, 3), torch.ones(n + 1))  # the smallest allowed n works


@pytest.mark.parametrize("name", AGGREGATORS.names())
def test_negative_f_is_a_config_error(name: str) -> None:
    if "num_byzantine" not in AGGREGATORS.options(name):
        return
    with pytest.raises(ConfigError, match="num_byzantine"):
        build(name, -1)
