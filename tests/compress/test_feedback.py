"""Error feedback loses nothing over time; EF21 tracks its input; EControl(eta=0) is EF21."""

from __future__ import annotations

import pytest
import torch

from koinon.compress import build_codec
from koinon.params import Entry, Layout

LAYOUT = Layout(
    (Entry("w", (20, 10), torch.float32, 0, True), Entry("b", (20,), torch.float32, 200, True))
)
STEPS = 50


def _run(name: str, options: dict, xs: list[torch.Tensor], seed: int = 0):
    codec = build_codec(name, options, LAYOUT)
    state = codec.init_state()
    rng = torch.Generator().manual_seed(seed)
    sent, payloads = [], []
    for x in xs:
        data, state = codec.encode(x, state, rng)
        payloads.append(data)
        sent.append(codec.decode(data))
    return codec, state, sent, payloads


def _inputs(seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(LAYOUT.numel, generator=gen) for _ in range(STEPS)]


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("ef", {"inner": {"name": "topk", "ratio": 0.05}}),
        ("ef", {"inner": {"name": "zstd", "inner": {"name": "topk", "values": "int4"}}}),
        # stochastic inner; variance factor sqrt(16)/8 < 1 keeps it contractive, so EF is stable
        ("ef", {"inner": {"name": "qsgd", "levels": 8, "bucket": 16}}),
        ("ef", {"inner": "randomk"}),
        ("signsgd", {}),
        ("powersgd", {"rank": 1}),
    ],
)
def test_error_feedback_conserves_the_inputs(name, options) -> None:
    xs = _inputs()
    _, state, sent, _ = _run(name, options, xs)
    # what was sent plus what is still owed equals everything put in
    torch.testing.assert_close(
        torch.stack(sent).sum(0) + state["error"], torch.stack(xs).sum(0), atol=1e-4, rtol=1e-5
    )


def test_ef_sends_what_plain_topk_drops() -> None:
    x = torch.zeros(LAYOUT.numel)
    x[:4] = torch.tensor([4.0, 3.0, 2.0, 1.0])
    _, _, sent, _ = _run(
        "ef", {"inner": {"name": "topk", "ratio": 0.005}}, [x, x * 0, x * 0, x * 0]
    )
    # ratio 0.005 of 220 keeps 2 entries per step: 4,3 first, then the residual 2,1
    torch.testing.assert_close(sent[0][:4], torch.tensor([4.0, 3.0, 0.0, 0.0]))
    torch.testing.assert_close(sent[1][:4], torch.tensor([0.0, 0.0, 2.0, 1.0]))
    assert sent[2].abs().sum() == 0


def test_ef21_estimate_converges_to_a_constant_input() -> None:
    x = _inputs()[0]
    _, state, sent, _ = _run("ef21", {"inner": {"name": "topk", "ratio": 0.1}}, [x] * 30)
    torch.testing.assert_close(state["h"], torch.stack(sent).sum(0))  # h is the sum of increments
    assert (state["h"] - x).norm() < 1e-3 * x.norm()


def test_econtrol_with_eta_zero_is_ef21() -> None:
    inner = {"name": "topk", "ratio": 0.05}
    xs = _inputs()
    _, s21, _, p21 = _run("ef21", {"inner": inner}, xs)
    _, sec, _, pec = _run("econtrol", {"inner": inner, "eta": 0.0}, xs)
    assert p21 == pec
    torch.testing.assert_close(s21["h"], sec["h"])


def test_econtrol_error_bookkeeping() -> None:
    xs = _inputs()
    inner = {"name": "topk", "ratio": 0.05}
    _, state, sent, _ = _run("econtrol", {"inner": inner, "eta": 0.3}, xs)
    # e accumulates x_t - h_t - Delta_t with h_t the running sum of earlier Deltas
    h, e = torch.zeros(LAYOUT.numel), torch.zeros(LAYOUT.numel)
    for x, delta in zip(xs, sent, strict=True):
        e, h = e + x - h - delta, h + delta
    torch.testing.assert_close(state["e"], e, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(state["h"], h)
