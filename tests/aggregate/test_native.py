"""The generated C order-statistics kernel: same results as the float64 references and NumPy."""

from __future__ import annotations

import importlib.util
import itertools
import pathlib

import numpy as np
import pytest
import torch

from koinon.aggregate import build_aggregator, kernels, native

_spec = importlib.util.spec_from_file_location(
    "aggregate_reference", pathlib.Path(__file__).with_name("reference.py")
)
ref = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
_spec.loader.exec_module(ref)  # type: ignore[union-attr]

needs_kernel = pytest.mark.skipif(
    native._kernel(5) is None, reason="no C compiler with AVX here: NumPy path only"
)
# Enough columns to take the native path, plus a ragged tail of 5 (not a multiple of 8).
P = native.MIN_COLUMNS + 5


@pytest.mark.parametrize("n", [2, 3, 5, 8, 12])
def test_network_sorts_every_zero_one_input(n: int) -> None:
    # 0-1 principle: a comparator network that sorts all 2^n 0-1 inputs sorts everything.
    pairs = native.sorting_network(n)
    for bits in itertools.product((0, 1), repeat=n):
        v = list(bits)
        for i, j in pairs:
            v[i], v[j] = min(v[i], v[j]), max(v[i], v[j])
        assert v == sorted(bits)


@pytest.mark.parametrize(
    ("n", "lo", "hi"), [(8, 2, 6), (9, 2, 7), (12, 3, 9), (12, 1, 10), (11, 5, 6), (10, 3, 8)]
)
def test_rank_network_groups_every_zero_one_input(n: int, lo: int, hi: int) -> None:
    # The 0-1 principle holds for selection too: the groups are right for all inputs if they
    # are right for every 0-1 input.
    pairs = native.rank_network(n, lo, hi)
    for bits in itertools.product((0, 1), repeat=n):
        v = list(bits)
        for i, j in pairs:
            v[i], v[j] = min(v[i], v[j]), max(v[i], v[j])
        s = sorted(bits)
        assert sum(v[:lo]) == sum(s[:lo]) and sum(v[hi:]) == sum(s[hi:])


def test_network_size() -> None:
    assert len(native.rank_network(50, 10, 40)) == 294  # halves sorted, tails merged, pruned
    assert len(native.sorting_network(50)) == 403  # Batcher for 64, pruned to 50 inputs
    assert native.sorting_network(1) == []


def _stack(seed: int, n: int, ties: bool = False) -> torch.Tensor:
    x = torch.randn(n, P, generator=torch.Generator().manual_seed(seed))
    return x.round() if ties else x  # rounding makes many exact ties per column


@pytest.mark.parametrize(("n", "f"), [(2, 0), (3, 1), (7, 2), (16, 3), (50, 10), (51, 12)])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("use_native", [True, False])
def test_rules_match_reference_on_both_paths(
    n: int, f: int, ties: bool, use_native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Ties (many repeated values per column) are where Meamed's selection is delicate.
    if use_native and native._kernel(n) is None:
        pytest.skip("no C compiler with AVX here")
    if not use_native:
        monkeypatch.setattr(native, "MIN_COLUMNS", 10**9)
    x = _stack(n, n, ties)
    x64 = x.double().numpy()
    for name, expected in (
        ("median", ref.median(x64)),
        ("trimmed_mean", ref.trimmed_mean(x64, f)),
        ("meamed", ref.meamed(x64, f)),
    ):
        if name == "trimmed_mean" and f == 0:
            continue
        got = build_aggregator(name, {}, num_byzantine=f).aggregate(x, torch.ones(n))
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6, err_msg=name)


@needs_kernel
def test_native_equals_numpy_path_and_handles_infinities() -> None:
    x = _stack(0, 20)
    x[3, :100] = float("inf")
    x[4, 50:150] = -float("inf")
    fast = native.order_reduce(x.numpy(), 0, 4, 16, 0, map)
    assert fast is not None
    slow = kernels.sorted_reduce(x, lambda b: b[:, 4:16].mean(1), torch.float32)
    np.testing.assert_allclose(fast, slow.numpy(), rtol=1e-6, atol=1e-6)


@needs_kernel
def test_nan_falls_back_to_numpy() -> None:
    x = _stack(1, 9)
    x[2, P - 1] = float("nan")  # in the ragged tail
    assert native.order_reduce(x.numpy(), 0, 2, 7, 0, map) is None
    out = kernels.coordinate_median(x)  # still answers, through NumPy's sort
    assert torch.isfinite(out[:-1]).all()


def test_small_or_unsupported_inputs_take_numpy(monkeypatch: pytest.MonkeyPatch) -> None:
    x = np.zeros((5, 100), dtype=np.float32)
    assert native.order_reduce(x, 0, 1, 4, 0, map) is None  # too few columns
    big = np.zeros((5, P), dtype=np.float64)
    assert native.order_reduce(big, 0, 1, 4, 0, map) is None  # float64: NumPy
    monkeypatch.setenv("KOINON_NATIVE", "0")
    native._kernel.cache_clear()
    try:
        assert native.order_reduce(np.zeros((5, P), np.float32), 0, 1, 4, 0, map) is None
    finally:
        native._kernel.cache_clear()


@pytest.mark.parametrize("use_native", [True, False])
def test_one_huge_finite_value_does_not_wipe_out_meamed(
    use_native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A Byzantine row of -1e17 is finite, so the server's filter lets it through; it sorts
    # first and must not drown the honest values inside the window in rounding.
    if use_native and native._kernel(10) is None:
        pytest.skip("no C compiler with AVX here")
    if not use_native:
        monkeypatch.setattr(native, "MIN_COLUMNS", 10**9)
    x = 1.0 + 0.01 * torch.randn(10, P, generator=torch.Generator().manual_seed(3))
    x[0] = -1e17
    for name in ("meamed", "bulyan"):
        if name == "bulyan":
            x2 = x[:, :1000]  # Bulyan's selection runs its own Gram pass; a small stack suffices
            got = build_aggregator(name, {}, num_byzantine=1).aggregate(
                torch.cat([x2, x2[1:3]]), torch.ones(12)
            )
        else:
            got = build_aggregator(name, {}, num_byzantine=1).aggregate(x, torch.ones(10))
        assert (got - 1.0).abs().max() < 0.05, name


needs_linalg = pytest.mark.skipif(
    native._linalg() is None, reason="no C compiler with AVX here: torch path only"
)


@needs_linalg
@pytest.mark.parametrize("n", [1, 2, 3, 5, 13, 50])
@pytest.mark.parametrize("centred", ["mean", "given"])
def test_gram_and_norms_match_float64(n: int, centred: str) -> None:
    # A common offset of 1000 on unit-scale differences: without centring, float32 products
    # would lose the distances; P has a ragged tail past the 1024-column blocks and 16 lanes.
    x = 1000.0 + _stack(n, n).numpy()
    x64 = x.astype(np.float64)
    center = None if centred == "mean" else x[n // 2].copy()
    ref64 = x64.mean(0) if center is None else center.astype(np.float64)
    d = x64 - ref64
    expected = d @ d.T
    got = native.gram(x, center, kernels._pool().map)
    assert got is not None and got.shape == (n, n)
    assert np.array_equal(got, got.T)
    # The float32 column mean is off by rounding, which moves the Gram matrix but not the
    # distances; a given centre is exact.
    dist, dist64 = (kernels.sq_distances_from_gram(torch.from_numpy(g)) for g in (got, expected))
    np.testing.assert_allclose(dist, dist64, rtol=1e-6, atol=1e-6 * float(dist64.max()))
    if center is not None:
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max())
    norms = native.row_sq_norms(x, center, map)
    if center is not None:
        assert norms is not None
        np.testing.assert_allclose(norms, np.diag(expected), rtol=1e-6, atol=1e-3)


@needs_linalg
def test_gram_kernel_is_used_and_small_inputs_take_torch() -> None:
    assert native.gram(np.zeros((4, 100), np.float32), None, map) is None  # too few columns
    assert native.gram(np.zeros((4, P), np.float64), None, map) is None  # float64: torch
    x = _stack(4, 6)
    np.testing.assert_allclose(
        kernels.gram(x).numpy(), native.gram(x.numpy(), None, map), rtol=1e-12
    )


@pytest.mark.parametrize("use_native", [True, False])
def test_distance_rules_match_reference_on_both_paths(
    use_native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if use_native and native._linalg() is None:
        pytest.skip("no C compiler with AVX here")
    if not use_native:
        monkeypatch.setattr(native, "MIN_COLUMNS", 10**9)
    n, f = 16, 3
    x = _stack(7, n)
    x[2] += 0.5  # spread the inputs so that the selections are clear-cut
    x[5] -= 0.3
    x64 = x.double().numpy()
    zero = np.zeros(P)
    cases = {
        "krum": ref.krum(x64, f),
        "multi_krum": ref.multi_krum(x64, f, n - f),
        "monna": ref.monna(x64, f, 0),
        "nnm+mean": ref.nnm(x64, f).mean(0),
        "geometric_median": ref.geometric_median(x64, 100, 1e-6),
        "centered_clipping": ref.centered_clipping(x64, zero, 100.0, 1),
        "clipping+mean": ref.clip(x64, 2.0).mean(0),
        "arc+mean": ref.arc(x64, f).mean(0),
    }
    for name, expected in cases.items():
        got = build_aggregator(name, {}, num_byzantine=f).aggregate(x, torch.ones(n))
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-5, err_msg=name)


@needs_linalg
def test_avx2_branches(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    # This machine may have AVX-512; build the 8-lane branches too, as a CPU without it would.
    monkeypatch.setattr(native, "_FLAGS", [*native._FLAGS, "-mno-avx512f"])
    monkeypatch.setenv("KOINON_CACHE", str(tmp_path))
    native._linalg.cache_clear()
    native._kernel.cache_clear()
    try:
        x = _stack(5, 7).numpy()
        x64 = x.astype(np.float64)
        d = x64 - x64[3]
        got = native.gram(x, x[3].copy(), map)
        assert got is not None and list(tmp_path.glob("linalg-*.so"))
        np.testing.assert_allclose(got, d @ d.T, rtol=1e-6, atol=1e-3)
        norms = native.row_sq_norms(x, None, map)
        assert norms is not None
        np.testing.assert_allclose(norms, (x64**2).sum(1), rtol=1e-6)
        for mode, lo, hi, k, expected in (
            (0, 2, 5, 0, ref.trimmed_mean(x64, 2)),
            (1, 0, 0, 5, ref.meamed(x64, 2)),
        ):
            out = native.order_reduce(x, mode, lo, hi, k, map)
            assert out is not None
            np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
        assert list(tmp_path.glob("order-n7-*.so"))
    finally:
        native._linalg.cache_clear()
        native._kernel.cache_clear()
