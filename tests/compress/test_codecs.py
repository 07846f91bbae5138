"""Properties every registered codec must have: round trip, size bound, bad bytes refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from koinon.compress import CODECS, build_codec
from koinon.errors import CodecError
from koinon.params import Entry, Layout

# a tiny MLP: two matrices and two biases (P = 75), so per-layer codecs see 1-D and 2-D entries
LAYOUT = Layout(
    (
        Entry("fc1.weight", (8, 5), torch.float32, 0, True),
        Entry("fc1.bias", (8,), torch.float32, 40, True),
        Entry("fc2.weight", (3, 8), torch.float32, 48, True),
        Entry("fc2.bias", (3,), torch.float32, 72, True),
    )
)
P = LAYOUT.numel


def _linf(x: torch.Tensor) -> float:
    return float(x.abs().max()) if x.numel() else 0.0


def _kth(x: torch.Tensor, k: int) -> float:
    return float(torch.topk(x.abs(), k).values[-1])


# (label, name, options, bound(x, y) -> bool); bounds hold for every input, not on average
SPECS = [
    ("identity", "identity", {}, lambda x, y: torch.equal(x, y)),
    ("fp16", "fp16", {}, lambda x, y: ((x - y).abs() <= x.abs() * 2**-11 + 1e-7).all()),
    ("bf16", "bf16", {}, lambda x, y: ((x - y).abs() <= x.abs() * 2**-8 + 1e-38).all()),
    ("int8", "int8", {}, lambda x, y: _linf(x - y) <= _linf(x) / 254 * 1.001 + 1e-30),
    (
        "int8-block-stoch",
        "int8",
        {"block": 16, "stochastic": True},
        lambda x, y: _linf(x - y) <= _linf(x) / 127 * 1.001 + 1e-30,
    ),
    ("int4", "int4", {"block": 16}, lambda x, y: _linf(x - y) <= _linf(x) / 14 * 1.001 + 1e-30),
    (
        "qsgd",
        "qsgd",
        {"levels": 4, "bucket": 32},
        lambda x, y: _linf(x - y) <= float(x.norm()) / 4 * 1.001 + 1e-30,
    ),
    # top-k keeps the k largest exactly; every dropped entry is at most the k-th magnitude
    (
        "topk",
        "topk",
        {"ratio": 0.1},
        lambda x, y: (y != 0).sum() <= 8 and _linf(x - y) <= _kth(x, 8),
    ),
    ("topk-sampled", "topk", {"ratio": 0.1, "sampled": True}, lambda x, y: (y != 0).sum() <= 8),
    ("topk-int4", "topk", {"ratio": 0.2, "values": "int4"}, lambda x, y: (y != 0).sum() <= 15),
    (
        "randomk",
        "randomk",
        {"ratio": 0.2},
        lambda x, y: (y != 0).sum() <= 15 and ((y == 0) | (y == x)).all(),
    ),
    (
        "threshold",
        "threshold",
        {"threshold": 0.5},
        lambda x, y: torch.equal(y, torch.where(x.abs() >= 0.5, x, torch.zeros_like(x))),
    ),
    (
        "zstd-topk",
        "zstd",
        {"inner": {"name": "topk", "ratio": 0.1, "values": "int8"}},
        lambda x, y: (y != 0).sum() <= 8,
    ),
    # first step from a zero state: the wrappers send exactly what the inner codec would
    (
        "ef",
        "ef",
        {"inner": {"name": "topk", "ratio": 0.1}},
        lambda x, y: _linf(x - y) <= _kth(x, 8),
    ),
    (
        "ef21",
        "ef21",
        {"inner": {"name": "topk", "ratio": 0.1}},
        lambda x, y: _linf(x - y) <= _kth(x, 8),
    ),
    (
        "econtrol",
        "econtrol",
        {"inner": "signsgd"},
        lambda x, y: float((x - y).norm()) <= float(x.norm()) * 1.0001 + 1e-30,
    ),
    # scaled signs and low-rank projections are contractive: ||x - C(x)|| <= ||x||
    (
        "signsgd",
        "signsgd",
        {},
        lambda x, y: float((x - y).norm()) <= float(x.norm()) * 1.0001 + 1e-30,
    ),
    (
        "powersgd",
        "powersgd",
        {"rank": 1},
        lambda x, y: float((x - y).norm()) <= float(x.norm()) * 1.0001 + 1e-6,
    ),
    (
        "dgc",
        "dgc",
        {"ratio": 0.05, "sampled": False},  # 2 of 40 and 2 of 24 kept, biases dense
        lambda x, y: (y != 0).sum() <= 4 + 11 and torch.equal(y[40:48], x[40:48]),
    ),
    (
        "fedzip",
        "fedzip",
        {"ratio": 0.2},
        lambda x, y: (y[:40] != 0).sum() <= 8 and torch.equal(y[40:48], x[40:48]),
    ),
    (
        "spsa",
        "spsa",
        {"num_scalars": P},
        lambda x, y: _linf(x - y) <= _linf(x) / 127 * 1.001 + 1e-30,
    ),
]
IDS = [s[0] for s in SPECS]

finite32 = st.floats(-1e4, 1e4, width=32, allow_subnormal=False)
vectors = arrays(np.float32, P, elements=finite32)


def _codec(name: str, options: dict):
    return build_codec(name, options, LAYOUT)


def test_every_registered_codec_is_covered() -> None:
    assert {name for _, name, _, _ in SPECS} == set(CODECS.names())


@pytest.mark.parametrize(("label", "name", "options", "bound"), SPECS, ids=IDS)
@settings(max_examples=25, deadline=None)
@given(values=vectors, seed=st.integers(0, 2**31))
def test_round_trip_shape_dtype_bound_and_size(label, name, options, bound, values, seed) -> None:
    codec = _codec(name, options)
    x = torch.from_numpy(values)
    data, state = codec.encode(x, codec.init_state(), torch.Generator().manual_seed(seed))
    assert isinstance(data, bytes) and len(data) <= codec.max_bytes()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    y = codec.decode(data)
    assert y.shape == (P,) and y.dtype == torch.float32 and torch.isfinite(y).all()
    assert bound(x, y), f"{label}: error bound violated"


def _payload(name: str, options: dict, seed: int = 0) -> tuple:
    codec = _codec(name, options)
    x = torch.randn(P, generator=torch.Generator().manual_seed(seed))
    data, _ = codec.encode(x, codec.init_state(), torch.Generator().manual_seed(seed))
    return codec, data


@pytest.mark.parametrize(("label", "name", "options", "bound"), SPECS, ids=IDS)
def test_truncated_and_oversized_bytes_raise(label, name, options, bound) -> None:
    codec, data = _payload(name, options)
    for cut in sorted({0, 1, 2, len(data) // 2, len(data) - 1}):
        with pytest.raises(CodecError):
            codec.decode(data[:cut])
    with pytest.raises(CodecError):
        codec.decode(data + b"\x00")
    with pytest.raises(CodecError):
        codec.decode(bytes(codec.max_bytes() + 1))


@pytest.mark.parametrize(("label", "name", "options", "bound"), SPECS, ids=IDS)
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_corrupted_bytes_raise_or_decode_to_valid_tensor(label, name, options, bound, data) -> None:
    # without a checksum a flipped value byte can decode to another valid tensor; what must
    # never happen is another exception type, a wrong shape, or NaN/Inf coming out
    codec, payload = _payload(name, options)
    buf = bytearray(payload)
    for _ in range(data.draw(st.integers(1, 3))):
        buf[data.draw(st.integers(0, len(buf) - 1))] ^= data.draw(st.integers(1, 255))
    if data.draw(st.booleans()):
        buf = bytearray(data.draw(st.binary(max_size=len(payload) + 4)))
    try:
        y = codec.decode(bytes(buf))
    except CodecError:
        return
    assert y.shape == (P,) and y.dtype == torch.float32 and torch.isfinite(y).all()


@pytest.mark.parametrize(
    ("name", "options", "offset"),
    [("identity", {}, 0), ("topk", {"ratio": 0.1}, -4), ("powersgd", {}, 1), ("fedzip", {}, -4)],
)
def test_nan_values_in_payload_raise(name, options, offset) -> None:
    codec, data = _payload(name, options)
    buf = bytearray(data)
    pos = offset % len(buf)
    buf[pos : pos + 4] = np.float32(np.nan).tobytes()
    with pytest.raises(CodecError, match="NaN"):
        codec.decode(bytes(buf))


def test_encode_rejects_wrong_size_and_nonfinite() -> None:
    codec = _codec("topk", {})
    with pytest.raises(CodecError, match="elements"):
        codec.encode(torch.zeros(P + 1), {}, torch.Generator())
    with pytest.raises(CodecError, match="NaN"):
        codec.encode(torch.full((P,), float("nan")), {}, torch.Generator())


@pytest.mark.parametrize("name", ["identity", "fp16"])
def test_dense_batch_path_gives_the_same_bytes_and_values(name):
    from torch import nn

    from koinon.compress import build_codec
    from koinon.params import Layout

    codec = build_codec(name, {}, Layout.from_module(nn.Linear(7, 3)))
    stack = torch.randn(5, 24, generator=torch.Generator().manual_seed(0))
    payloads = codec.encode_batch(stack)
    assert payloads == [codec.encode(row, {}, torch.Generator())[0] for row in stack]
    rows, errors = codec.decode_batch([*payloads[:2], payloads[2][:-1], *payloads[3:]])
    assert errors[2] is not None and "expected exactly" in errors[2]
    assert [e is None for e in errors] == [True, True, False, True, True]
    for i in (0, 1, 3, 4):
        assert torch.equal(rows[i], codec.decode(payloads[i]))
    assert not rows[2].any()
