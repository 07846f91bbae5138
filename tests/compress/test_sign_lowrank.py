"""signSGD with majority vote, PowerSGD's low-rank factors, FedZip's clusters."""

from __future__ import annotations

import torch

from koinon.compress import build_codec, majority_vote
from koinon.params import Entry, Layout


def test_scaled_signs_by_hand() -> None:
    layout = Layout(
        (Entry("a", (2,), torch.float32, 0, True), Entry("b", (2,), torch.float32, 2, True))
    )
    codec = build_codec("signsgd", {"error_feedback": False}, layout)
    data, _ = codec.encode(torch.tensor([1.0, -3.0, 0.5, 0.5]), {}, torch.Generator())
    assert len(data) == 2 * 4 + 1
    torch.testing.assert_close(codec.decode(data), torch.tensor([2.0, -2.0, 0.5, 0.5]))


def test_majority_vote_by_hand() -> None:
    layout = Layout((Entry("a", (3,), torch.float32, 0, True),))
    codec = build_codec("signsgd", {"error_feedback": False}, layout)
    clients = [[1.0, -1.0, 2.0], [1.0, 1.0, -2.0], [-1.0, -1.0, 3.0]]
    payloads = [codec.encode(torch.tensor(c), {}, torch.Generator())[0] for c in clients]
    torch.testing.assert_close(majority_vote(codec, payloads), torch.tensor([1.0, -1.0, 1.0]))


def test_powersgd_recovers_a_low_rank_matrix_and_sends_vectors_dense() -> None:
    layout = Layout(
        (Entry("w", (30, 20), torch.float32, 0, True), Entry("b", (30,), torch.float32, 600, True))
    )
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(30, 2, generator=gen) @ torch.randn(2, 20, generator=gen)
    x = torch.cat([m.reshape(-1), torch.randn(30, generator=gen)])
    codec = build_codec("powersgd", {"rank": 2}, layout)
    data, state = codec.encode(x, codec.init_state(), torch.Generator())
    assert len(data) == 1 + 4 * ((30 + 20) * 2 + 30)
    torch.testing.assert_close(codec.decode(data), x, atol=1e-4, rtol=1e-4)
    assert state["error"].abs().max() < 1e-4


def test_powersgd_warm_start_improves_over_rounds() -> None:
    layout = Layout((Entry("w", (40, 40), torch.float32, 0, True),))
    x = torch.randn(1600, generator=torch.Generator().manual_seed(0))
    codec = build_codec("powersgd", {"rank": 1, "error_feedback": False}, layout)
    state, errors = codec.init_state(), []
    for _ in range(10):
        data, state = codec.encode(x, state, torch.Generator())
        errors.append(float((codec.decode(data) - x).norm()))
    # repeated power iterations approach the best rank-1 error (the top singular value removed)
    s = torch.linalg.svdvals(x.view(40, 40))
    best = float(s[1:].norm())
    assert errors[-1] < errors[0] and errors[-1] < best * 1.01


def test_fedzip_values_are_centroids_of_the_kept_entries() -> None:
    layout = Layout((Entry("w", (10, 10), torch.float32, 0, True),))
    x = torch.cat([torch.full((10,), 5.0), torch.full((10,), -5.0), torch.linspace(-0.1, 0.1, 80)])
    codec = build_codec("fedzip", {"ratio": 0.2, "clusters": 3}, layout)
    data, _ = codec.encode(x, {}, torch.Generator())
    y = codec.decode(data)
    torch.testing.assert_close(y[:20], x[:20])  # two tight clusters decode exactly
    assert (y[20:] == 0).all()
