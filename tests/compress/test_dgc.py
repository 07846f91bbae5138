"""Deep Gradient Compression against hand-computed rounds."""

from __future__ import annotations

import pytest
import torch

from koinon.compress import build_codec
from koinon.compress.sparse import exact_topk, sampled_topk
from koinon.params import Entry, Layout

# one 2x2 matrix (compressed) and a bias of 2 (always sent whole)
LAYOUT = Layout(
    (Entry("w", (2, 2), torch.float32, 0, True), Entry("b", (2,), torch.float32, 4, True))
)


def test_momentum_correction_and_factor_masking_by_hand() -> None:
    codec = build_codec("dgc", {"ratio": 0.25, "momentum": 0.5, "sampled": False}, LAYOUT)
    state, rng = codec.init_state(), torch.Generator()
    data, state = codec.encode(torch.tensor([1.0, -3.0, 2.0, 0.5, 0.1, 0.2]), state, rng)
    torch.testing.assert_close(codec.decode(data), torch.tensor([0.0, -3.0, 0, 0, 0.1, 0.2]))
    # masking zeroes u and v where something was sent
    torch.testing.assert_close(state["u"], torch.tensor([1.0, 0.0, 2.0, 0.5, 0.0, 0.0]))
    torch.testing.assert_close(state["v"], torch.tensor([1.0, 0.0, 2.0, 0.5, 0.0, 0.0]))
    # round 2, zero input: u = 0.5 u = [.5, 0, 1, .25]; v = v + u = [1.5, 0, 3, .75] -> sends 3
    data, state = codec.encode(torch.zeros(6), state, rng)
    torch.testing.assert_close(codec.decode(data), torch.tensor([0.0, 0.0, 3.0, 0, 0, 0]))
    torch.testing.assert_close(state["u"], torch.tensor([0.5, 0.0, 0.0, 0.25, 0.0, 0.0]))
    torch.testing.assert_close(state["v"], torch.tensor([1.5, 0.0, 0.0, 0.75, 0.0, 0.0]))
    assert int(state["round"]) == 2


def test_nesterov_and_clipping_by_hand() -> None:
    options = {"ratio": 1.0, "momentum": 0.5, "nesterov": True, "clip_norm": 1.0}
    codec = build_codec("dgc", options, LAYOUT)
    x = torch.tensor([3.0, 4.0, 0.0, 0.0, 0.0, 0.0])  # norm 5, clipped to norm 1
    data, state = codec.encode(x, codec.init_state(), torch.Generator())
    # u = 0.5 (0 + g) = g/2, v = u + g = 1.5 g with g = [0.6, 0.8]
    torch.testing.assert_close(codec.decode(data), torch.tensor([0.9, 1.2, 0, 0, 0, 0]))


def test_warmup_schedule_by_hand() -> None:
    codec = build_codec("dgc", {"ratio": 0.001, "warmup_rounds": 8}, LAYOUT)
    expected = [0.25, 0.25, 0.0625, 0.0625, 0.015625, 0.015625, 0.00390625, 0.00390625, 0.001]
    assert [codec.keep_ratio(t) for t in range(9)] == expected
    assert codec.keep_ratio(100) == 0.001
    # the floor: a final ratio above a warm-up stage wins
    assert build_codec("dgc", {"ratio": 0.1, "warmup_rounds": 4}, LAYOUT).keep_ratio(1) == 0.1


def test_warmup_counts_in_payloads() -> None:
    layout = Layout((Entry("w", (16, 16), torch.float32, 0, True),))
    codec = build_codec("dgc", {"ratio": 0.01, "warmup_rounds": 2, "warmup_stages": 2}, layout)
    state, rng = codec.init_state(), torch.Generator().manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    counts = []
    for _ in range(3):
        data, state = codec.encode(torch.randn(256, generator=gen), state, rng)
        counts.append(int((codec.decode(data) != 0).sum()))
    # sampled thresholds may keep a little fewer than k = ceil(r n), never more
    assert 0.8 * 64 <= counts[0] <= 64 and 0.8 * 16 <= counts[1] <= 16 and counts[2] <= 3


@pytest.mark.parametrize("k", [1, 10, 100])
def test_sampled_topk_keeps_at_most_k_of_the_largest(k) -> None:
    absx = torch.randn(10_000, generator=torch.Generator().manual_seed(k)).abs()
    idx = sampled_topk(absx, k, torch.Generator().manual_seed(0))
    assert 0.8 * k <= idx.numel() <= k
    # everything kept is at least as large as everything dropped
    dropped = torch.ones_like(absx, dtype=torch.bool)
    dropped[idx] = False
    assert absx[idx].min() >= absx[dropped].max()


def test_exact_topk_breaks_ties_by_position() -> None:
    absx = torch.tensor([1.0, 3.0, 2.0, 2.0, 2.0, 0.5])
    torch.testing.assert_close(exact_topk(absx, 3), torch.tensor([1, 2, 3]))
    torch.testing.assert_close(exact_topk(absx, 6), torch.arange(6))
