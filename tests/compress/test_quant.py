"""Quantizers: hand-computed levels and unbiasedness of the stochastic ones."""

from __future__ import annotations

import pytest
import torch

from koinon.compress import build_codec
from koinon.params import Entry, Layout

DRAWS = 500


def _layout(n: int) -> Layout:
    return Layout((Entry("w", (n,), torch.float32, 0, True),))


def test_int8_per_tensor_levels_by_hand() -> None:
    codec = build_codec("int8", {}, _layout(4))
    x = torch.tensor([1.27, -0.635, 0.004, 0.0])  # scale = 0.01; levels 127, -63.5 -> -64, 0, 0
    data, _ = codec.encode(x, {}, torch.Generator())
    assert len(data) == 1 + 4 + 4
    torch.testing.assert_close(codec.decode(data), torch.tensor([1.27, -0.64, 0.0, 0.0]))


def test_int4_blocks_have_their_own_scale() -> None:
    codec = build_codec("int4", {"block": 2}, _layout(4))
    x = torch.tensor([7.0, -3.0, 0.07, 0.035])  # block scales 1 and 0.01
    data, _ = codec.encode(x, {}, torch.Generator())
    torch.testing.assert_close(codec.decode(data), torch.tensor([7.0, -3.0, 0.07, 0.04]))


def _mean_decode(name: str, options: dict, x: torch.Tensor) -> torch.Tensor:
    codec = build_codec(name, options, _layout(x.numel()))
    total = torch.zeros_like(x)
    for seed in range(DRAWS):
        data, _ = codec.encode(x, codec.init_state(), torch.Generator().manual_seed(seed))
        total += codec.decode(data)
    return total / DRAWS


def _assert_unbiased(mean: torch.Tensor, x: torch.Tensor, step: torch.Tensor) -> None:
    # each draw rounds to one of two neighbouring levels `step` apart, so its std is at most
    # step / 2 and the mean of DRAWS draws has std <= step / (2 sqrt(DRAWS)); 5 sigma per
    # entry keeps a false alarm below 1e-5 over 64 entries (the draws are seeded anyway)
    tol = 5 * step / (2 * DRAWS**0.5)
    assert ((mean - x).abs() <= tol).all(), float(((mean - x).abs() / tol).max())


X = torch.linspace(-1.0, 1.0, 64) * 0.9 + 0.013


def test_qsgd_is_unbiased() -> None:
    levels = 2
    mean = _mean_decode("qsgd", {"levels": levels, "bucket": 0}, X)
    _assert_unbiased(mean, X, X.norm() / levels)


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_stochastic_rounding_is_unbiased(name) -> None:
    qmax = {"int8": 127, "int4": 7}[name]
    mean = _mean_decode(name, {"block": 0, "stochastic": True}, X)
    _assert_unbiased(mean, X, X.abs().max() / qmax)


def test_spsa_byte_is_unbiased_and_test_detects_nearest_rounding() -> None:
    mean = _mean_decode("spsa", {"num_scalars": 64, "scale": 1.0}, X)
    _assert_unbiased(mean, X, torch.tensor(1.0 / 127))
    # power check: round-to-nearest int4 is biased by up to step / 2, which the test must catch
    biased = _mean_decode("int4", {"block": 0}, X)
    with pytest.raises(AssertionError):
        _assert_unbiased(biased, X, X.abs().max() / 7)


def test_randomk_rescaled_is_unbiased() -> None:
    x = torch.linspace(0.5, 1.0, 20)
    mean = _mean_decode("randomk", {"ratio": 0.25, "rescale": True}, x)
    # each entry is 4x with probability 1/4: std x * sqrt(3) per draw, mean over 500 draws
    tol = 5 * x * 3**0.5 / DRAWS**0.5
    assert ((mean - x).abs() <= tol).all()


def test_spsa_fixed_scale_is_one_byte_per_scalar() -> None:
    codec = build_codec("spsa", {"num_scalars": 3, "scale": 2.0}, _layout(1))
    data, _ = codec.encode(torch.tensor([2.0, -2.0, 5.0]), {}, torch.Generator())
    assert len(data) == 3 == codec.max_bytes()
    torch.testing.assert_close(codec.decode(data), torch.tensor([2.0, -2.0, 2.0]))
